"""TRL's GRPO training step on the meta device: ``GRPOTrainer._compute_loss`` itself, on a stand-in for the trainer's
state.

TRL 1.16's ``GRPOTrainer`` (``trl/trainer/grpo_trainer.py``) patches the causal LM under the PEFT wrapper with its fused
LM head (``add_fused_lm_head(outputs=("log_probs", "entropy"))``). A micro-batch of the buffered generation batch holds
``prompt_ids`` / ``prompt_mask`` (left-padded prompts, int64), ``completion_ids`` / ``completion_mask`` (the sampled
tokens; the mask int32) and each row's ``advantages``; ``_compute_loss`` concatenates prompt and completion, scores the
completion positions (``logits_to_keep``: the labels are ``-100`` elsewhere, so on a GPU the fused head projects
``B x C`` rows), and computes the clipped policy loss (``loss_type`` ``dapo``, GRPOConfig's default; ``beta > 0`` adds
the KL term against the reference's log-probabilities, computed before the step). The trace calls that method,
unbound, with what it reads of the trainer: ``GRPOConfig``'s defaults, the model, and an accelerator whose gathers and
reductions return host zeros (the metrics' values: ``.item()`` has no meaning on meta).

Not traced: the generation (``planner.memory.generation``, checked against a tracked real ``generate``), the scoring
passes without grad, padding (every prompt as long as the longest, every completion ``max_completion_length``)."""

from __future__ import annotations

import dataclasses
import types
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from .dpo import _Accelerator

#: what GRPOTrainer asks its fused head for (TRL 1.16)
GRPO_OUTPUTS = ("log_probs", "entropy")


class _GrpoAccelerator(_Accelerator):
    """``_Accelerator`` plus what GRPO's loss asks: one process, gradients synchronised, reductions as host zeros."""

    num_processes = 1
    sync_gradients = True

    @staticmethod
    def reduce(t: Any, reduction: str = "sum") -> Any:
        import torch

        return torch.zeros(t.shape, dtype=torch.float32)

    @staticmethod
    def autocast() -> Any:  # the trace's step runs the forward under autocast already
        return nullcontext()


def add_grpo_fused_head(model: Any) -> None:
    """``add_fused_lm_head`` on the causal LM under the PEFT wrapper, as ``GRPOTrainer.__init__`` does (temperature
    1, GRPOConfig's default)."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, temperature=1.0, outputs=GRPO_OUTPUTS)


def grpo_trainer_state(model: Any, prompt_len: int, beta: float) -> Any:
    """The attributes of a ``GRPOTrainer`` that ``_compute_loss`` reads, from ``GRPOConfig``'s field defaults (not
    instantiated: that would set up accelerate's process-wide state) as ``GRPOTrainer.__init__`` copies them."""
    from trl.trainer.grpo_config import GRPOConfig
    from trl.trainer.grpo_trainer import GRPOTrainer

    d = {f.name: f.default for f in dataclasses.fields(GRPOConfig) if f.default is not dataclasses.MISSING}
    state = types.SimpleNamespace(
        model=model, accelerator=_GrpoAccelerator(next(model.parameters()).device),
        args=types.SimpleNamespace(delta=d["delta"], use_bias_correction_kl=d["use_bias_correction_kl"],
                                   steps_per_generation=1),
        beta=beta, loss_type=d["loss_type"], epsilon_low=d["epsilon"],
        epsilon_high=d["epsilon_high"] if d["epsilon_high"] is not None else d["epsilon"],
        top_entropy_quantile=d["top_entropy_quantile"], off_policy_mask_threshold=d["off_policy_mask_threshold"],
        importance_sampling_level=d["importance_sampling_level"], use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1, max_completion_length=None,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, prompt_len=prompt_len,
    )
    # the method under TRL's profiling decorator (which reads a Trainer's state to report timings)
    method = GRPOTrainer._get_per_token_logps_and_entropies
    state._get_per_token_logps_and_entropies = types.MethodType(getattr(method, "__wrapped__", method), state)
    return state


def grpo_forward(trainer: Any, model: Any, ids: Any, completion_mask: Any, after: Callable[[], None]) -> Any:
    """One ``GRPOTrainer._compute_loss`` on a micro-batch: ``ids`` split at the prompt's length into prompt and
    completion, their masks (int64 / int32, all ones), zero advantages, the batch's completion tokens as
    ``num_items_in_batch`` (``dapo``'s normaliser) and, with ``beta``, the reference's log-probabilities."""
    import torch
    from trl.trainer.grpo_trainer import GRPOTrainer

    P = trainer.prompt_len
    prompt, completion = ids[:, :P], ids[:, P:]
    B, C = completion.shape
    trainer.max_completion_length = C
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt),
              "completion_ids": completion, "completion_mask": torch.ones((B, C), dtype=torch.int32, device=ids.device),
              "advantages": torch.zeros(B, dtype=torch.float32, device=ids.device),
              "num_items_in_batch": torch.tensor(float(B * C), device=ids.device)}
    if trainer.beta != 0.0:
        inputs["ref_per_token_logps"] = torch.zeros((B, C), dtype=torch.float32, device=ids.device)
    loss = GRPOTrainer._compute_loss(trainer, model, inputs)
    after()
    return loss
