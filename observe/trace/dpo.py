"""TRL's DPO step on the meta device: ``DPOTrainer._compute_loss`` itself, on a stand-in for the trainer's state.

TRL 1.16's ``DPOTrainer`` (``trl/trainer/dpo_trainer.py``) patches the causal LM under the PEFT wrapper with its fused
LM head (``add_fused_lm_head(outputs=("log_probs", "entropy", "mean_logits", "is_top1"))``), and its
``DataCollatorForPreference`` puts each pair's chosen and rejected sequence in one batch: ``input_ids`` and
``completion_mask`` of ``2 B`` rows, the chosen rows first. ``_compute_loss`` runs the policy on them, then the
reference — the same model with its adapters disabled (``use_adapter(model, None)``), under ``no_grad`` with
checkpointing switched off and back on (``disable_gradient_checkpointing``) — and the sigmoid loss. The trace calls
that method, unbound, with what it reads of the trainer: ``DPOConfig``'s defaults (beta, loss type, ...), the model,
and an accelerator whose gathers return host zeros (the metrics' values: ``.item()`` has no meaning on meta).

Not traced: the ``attention_mask`` (the traced pairs have no padding: transformers then makes no 4-D mask; a padded
pair's mask is ``planner.memory.masks``' term); every position is a completion token (the fused head projects the
valid rows only: a prompt makes it project fewer).
"""

from __future__ import annotations

import dataclasses
import types
from collections import defaultdict
from collections.abc import Callable
from typing import Any

#: what DPOTrainer asks its fused head for (``use_weighting=False``, DPOConfig's default)
DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def add_dpo_fused_head(model: Any) -> None:
    """``add_fused_lm_head`` on the causal LM under the PEFT wrapper, as ``DPOTrainer.__init__`` does."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=DPO_OUTPUTS)


class _Accelerator:
    """What ``_compute_loss`` asks of ``self.accelerator``: the device, the unwrapped model, and gathers of metrics
    (host zeros of the same shape: their values are only logged)."""

    def __init__(self, device: Any) -> None:
        self.device = device

    @staticmethod
    def unwrap_model(model: Any) -> Any:
        return model

    @staticmethod
    def gather_for_metrics(t: Any) -> Any:
        import torch

        return torch.zeros(t.shape, dtype=torch.float32)

    gather = gather_for_metrics


def dpo_trainer_state(model: Any, grad_ckpt_kwargs: dict | None) -> Any:
    """The attributes of a ``DPOTrainer`` that ``_compute_loss`` reads, from ``DPOConfig``'s field defaults (the
    dataclass is not instantiated: that would set up accelerate's process-wide state) as ``DPOTrainer.__init__``
    copies them."""
    from trl.trainer.dpo_config import DPOConfig

    d = {f.name: f.default for f in dataclasses.fields(DPOConfig) if f.default is not dataclasses.MISSING}
    for f in dataclasses.fields(DPOConfig):
        if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            d[f.name] = f.default_factory()
    loss_types = d["loss_type"] if isinstance(d["loss_type"], list) else [d["loss_type"]]
    return types.SimpleNamespace(
        model=model, ref_model=None, accelerator=_Accelerator(next(model.parameters()).device),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=grad_ckpt_kwargs),
        beta=d["beta"], precompute_ref_logps=d["precompute_ref_log_probs"], loss_types=loss_types,
        loss_weights=d["loss_weights"] or [1.0] * len(loss_types), ld_alpha=d["ld_alpha"],
        f_divergence_type=d["f_divergence_type"], f_alpha_divergence_coef=d["f_alpha_divergence_coef"],
        label_smoothing=d["label_smoothing"], use_weighting=d["use_weighting"], aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )


def dpo_forward(trainer: Any, model: Any, ids: Any, completion_mask: Any, after: Callable[[], None]) -> Any:
    """One ``DPOTrainer._compute_loss`` on the batch (``input_ids`` of ``2 B`` rows and their ``completion_mask``);
    ``after()`` runs once it returns (the trace re-marks the checkpoint functions that TRL's re-enabling replaced)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    inputs = {"input_ids": ids, "attention_mask": completion_mask.clone(), "completion_mask": completion_mask}
    if trainer.precompute_ref_logps:  # the collator's columns of the reference's log-probabilities, one per pair
        import torch  # fp32: what the collator makes of a column of Python floats

        pairs = ids.shape[0] // 2
        inputs.update(ref_chosen_logps=ids.new_zeros(pairs, dtype=torch.float32),
                      ref_rejected_logps=ids.new_zeros(pairs, dtype=torch.float32))
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    after()
    return loss
