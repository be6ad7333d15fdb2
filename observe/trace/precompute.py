"""The pass before training of TRL's ``precompute_ref_log_probs``, on the meta device: ``compute_ref_log_probs`` itself.

TRL 1.16's ``DPOTrainer.__init__`` (and ``KTOTrainer``'s) with ``precompute_ref_log_probs=True`` runs the reference over
the whole training set before training (``_precompute_ref_logps``): batches of ``precompute_ref_batch_size`` pairs
(``per_device_train_batch_size`` when unset), collated and padded as the training batches are, each through
``compute_ref_log_probs`` — under ``no_grad``, with checkpointing switched off, the adapters disabled (PEFT; without
PEFT the policy itself: no reference model is loaded) and ``accelerator.autocast()`` — and the log-probabilities
written into the dataset, so the step reads them from its batch. The pass runs before the optimizer exists: the
device holds the weights and the adapters, the batch, and the forward. KTO's pass runs the batch's rows and then the
KL term's rows.

The trace calls that method, unbound, on the trainer's stand-in state (``observe.trace.dpo``, ``observe.trace.kto``)
with an accelerator whose ``autocast`` is the step's, every position a completion token and no padding.
"""

from __future__ import annotations

import contextlib
from typing import Any

from qplan.hf import torch_dtype

from ..existing import register_model
from ..summary import Curve
from ..tracker import LiveTensorTracker, LogitsRule
from . import autocast as emu
from .settings import TraceSettings


def precompute_inputs(s: TraceSettings, vocab: int) -> dict[str, Any]:
    """One batch of the pass: ``precompute_batch`` pairs (DPO: chosen and rejected, ``2 x`` rows) or rows (KTO, with
    its KL rows as wide), ``seq_len`` positions, int64 ids and masks as the collators make them."""
    import torch

    rows = s.precompute_batch * (2 if s.objective == "dpo" else 1)
    if s.device == "meta":
        ids = torch.empty(rows, s.seq_len, dtype=torch.long, device="meta")
    else:
        ids = torch.randint(0, vocab, (rows, s.seq_len), generator=torch.Generator().manual_seed(s.seed + 1))
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask.clone(), "completion_mask": mask}
    if s.objective == "kto":
        inputs.update(KL_input_ids=ids.clone(), KL_attention_mask=mask.clone(), KL_completion_mask=mask.clone())
    return inputs


def run_precompute(model: Any, vocab: int, s: TraceSettings, amp: Any, state: Any, stand_ins: dict) -> dict:
    """``compute_ref_log_probs`` of one batch under the tracker, with the step's ``stand_ins`` (``run.step_stand_ins``):
    its peak (``tensor_peak``, the ``forward`` phase) and what the bytes at the peak are."""
    import torch
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

    def autocast() -> Any:
        if not s.amp:
            return contextlib.nullcontext()
        if s.device == "meta":
            return emu.AmpContext(s.amp_device, torch_dtype(s.compute_dtype), True, True)
        return torch.autocast("cpu", dtype=torch_dtype(s.compute_dtype))

    inputs = precompute_inputs(s, vocab)
    state.accelerator.autocast = autocast
    trainer = DPOTrainer if s.objective == "dpo" else KTOTrainer
    rows = inputs["input_ids"].shape[0]
    tracker = LiveTensorTracker(s.device, logits=LogitsRule.for_step(vocab, rows, s.seq_len),
                                stand_ins=stand_ins)
    with contextlib.ExitStack() as stack:
        if amp is not None:
            stack.enter_context(amp.fmode)
        stack.enter_context(tracker)
        for t in inputs.values():
            tracker.add_existing(t, "input")
        register_model(tracker, model, as_weights=s.full)
        tracker.set_phase("forward", 1)
        out = trainer.compute_ref_log_probs(state, state.ref_model or model, inputs)
        del out
        tracker.set_phase("end")
    tracker.detach()
    res = Curve(tracker).summarize()
    for key in ("peak_phase", "peak_event"):
        res.pop(key)
    return res
