"""qplan backends: trainers that run a plan for real and measure it (loaded lazily by name).

* ``base`` — the ``Backend`` Protocol and the plain data crossing it;
* ``registry`` — backends by entry point (group ``qplan.backends``), listed without importing them;
* ``runner`` — ``qplan run``: checks inputs, makes the run folder, trains in a child process;
* ``worker`` — the child process: load, train, measure, write measured.json;
* ``measure`` — the measuring protocol (CUDA counters; a live-tensor tracker on the CPU);
* ``compare`` — which predicted and measured numbers are compared, and their signed error;
* ``report`` — report.md/report.html of a run and ``qplan report`` summaries;
* ``data`` / ``modelsrc`` — JSONL -> packed token blocks; local or random-init model folders;
* ``hf_train`` — the plan's ``TrainingArguments`` and ``Trainer``, shared by:
* ``peft_backend`` (transformers + bitsandbytes + PEFT) and ``unsloth_backend`` (Unsloth).

Only ``registry``, ``runner``, ``compare``, ``report``, ``data`` and ``modelsrc`` are imported by the
parent process; none of them imports torch at module level.
"""
