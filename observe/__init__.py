"""qplan's observation layer (torch-side): what a training step really holds, byte by byte.

* ``tracker`` — the one live-tensor tracker (a ``TorchDispatchMode``) and its storage records;
* ``summary`` — peaks and the one category vocabulary (``qplan.planner.vocab.CATEGORIES``),
  decided from the records;
* ``recompute`` — the one wrapper that tells the tracker when checkpointing recomputes a layer;
* ``existing`` — the model's and the optimizer's tensors before a step, and ``census``;
* ``trace`` — one training step traced on the meta device (or the CPU, as its oracle).

``qplan run``'s measurement (``qplan.backends.measure``) and the trace use the same tracker,
summary and wrapper, so a term-by-term comparison compares memory, not labelling. A tracker
watches one process: each rank of a multi-process run makes its own. torch is imported inside
functions: importing this package is free.
"""
