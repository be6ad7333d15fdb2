"""TRL's KTO step on the meta device: ``KTOTrainer._compute_loss`` itself, on a stand-in for the trainer's state.

TRL 1.16's ``KTOTrainer`` (``trl/trainer/kto_trainer.py``) patches the causal LM under the PEFT wrapper with its fused
LM head (``add_fused_lm_head(outputs=("log_probs", "entropy", "mean_logits"))``); ``DataCollatorForUnpairedPreference``
batches ``B`` unpaired rows (``input_ids``, ``attention_mask``, ``completion_mask``), the KL term's mismatched rows
(each prompt with the previous row's completion: ``KL_input_ids``, ``KL_attention_mask``, ``KL_completion_mask``) and
each row's ``label`` (desirable or not). ``_compute_loss`` runs the policy on the KL rows without grad, the policy on
the batch, then the reference — the same model with its adapters disabled, under ``no_grad`` with checkpointing
switched off and back on — on the KL rows and on the batch, and the KTO loss. The trace calls that method, unbound,
with what it reads of the trainer: ``KTOConfig``'s defaults (beta, loss type, weights), the model, and an accelerator
whose gathers return host zeros (``observe.trace.dpo._Accelerator``).

Stood in: ``torch.nonzero`` of the labels (data-dependent: every row stands for both a desirable and an undesirable
one, so both loss branches run at full size — their tensors are ``B`` scalars). Not traced: padding (the traced rows
are full, the KL rows as wide as the batch's).
"""

from __future__ import annotations

import dataclasses
import types
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from .dpo import _Accelerator

#: what KTOTrainer asks its fused head for (TRL 1.16)
KTO_OUTPUTS = ("log_probs", "entropy", "mean_logits")


def add_kto_fused_head(model: Any) -> None:
    """``add_fused_lm_head`` on the causal LM under the PEFT wrapper, as ``KTOTrainer.__init__`` does."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=KTO_OUTPUTS)


def kto_trainer_state(model: Any, grad_ckpt_kwargs: dict | None) -> Any:
    """The attributes of a ``KTOTrainer`` that ``_compute_loss`` reads, from ``KTOConfig``'s field defaults (not
    instantiated: that would set up accelerate's process-wide state) as ``KTOTrainer.__init__`` copies them."""
    from trl.trainer.kto_config import KTOConfig
    from trl.trainer.kto_trainer import KTOTrainer

    d = {f.name: f.default for f in dataclasses.fields(KTOConfig) if f.default is not dataclasses.MISSING}
    state = types.SimpleNamespace(
        model=model, ref_model=None, accelerator=_Accelerator(next(model.parameters()).device),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=grad_ckpt_kwargs),
        beta=d["beta"], precompute_ref_logps=d["precompute_ref_log_probs"], loss_type=d["loss_type"],
        desirable_weight=d["desirable_weight"], undesirable_weight=d["undesirable_weight"],
        calculate_KL=d["loss_type"] != "apo_zero_unpaired", aux_loss_enabled=False, router_aux_loss_coef=0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    state._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, state)  # a method _compute_loss calls
    return state


def nonzero_stand_ins() -> dict:
    """``aten.nonzero`` on meta (a data-dependent size): every entry non-zero."""
    import torch

    def nonzero(reg: Any, self: Any) -> Any:
        return reg(torch.empty((self.numel(), self.dim()), dtype=torch.int64, device=self.device))

    return {torch.ops.aten.nonzero.default: nonzero}


def kto_forward(trainer: Any, model: Any, ids: Any, completion_mask: Any, after: Callable[[], None]) -> Any:
    """One ``KTOTrainer._compute_loss`` on the batch (``input_ids`` of ``B`` rows, their ``completion_mask``, the KL
    rows as wide, half the labels desirable); ``after()`` runs once it returns (the trace re-marks the checkpoint
    functions that TRL's re-enabling replaced)."""
    import torch
    from trl.trainer.kto_trainer import KTOTrainer

    label = (torch.arange(ids.shape[0], device=ids.device) % 2 == 0).to(torch.int64)
    inputs = {"input_ids": ids, "attention_mask": completion_mask.clone(), "completion_mask": completion_mask,
              "KL_input_ids": ids.clone(), "KL_attention_mask": completion_mask.clone(),
              "KL_completion_mask": completion_mask.clone(), "label": label}
    if trainer.precompute_ref_logps:  # the collator's columns of the reference's log-probabilities, one per row
        inputs.update(ref_logps=ids.new_zeros(ids.shape[0], dtype=torch.float32),
                      ref_KL_logps=ids.new_zeros(ids.shape[0], dtype=torch.float32))
    loss = KTOTrainer._compute_loss(trainer, model, inputs, False)
    after()
    return loss
