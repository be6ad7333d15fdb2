"""Cut Cross Entropy on the meta device: what axolotl's ``CutCrossEntropyPlugin`` runs, allocation by allocation.

The plugin (axolotl 067b021c8, ``integrations/cut_cross_entropy``) installs the fork it pins,
axolotl-ai-cloud/ml-cross-entropy at 5f0c7a7, and replaces the model's ``*ForCausalLM.forward`` with the fork's
``cce_forward``: the decoder's last hidden state and ``lm_head.weight`` go to ``apply_lce`` -> ``linear_cross_entropy``
-> ``cce_linear_cross_entropy`` -> ``LinearCrossEntropyFunction``, whose Triton kernels never make the ``T x V`` logits.
Triton runs on neither meta nor the CPU, so each kernel is stood in by the tensors it allocates and returns (its
scratch in registers is not device memory); the Python around the kernels is mirrored line by line:

* ``_build_flat_valids`` (shift 1): ``targets[..., 1:] != -100`` (bool), ``.nonzero()`` (int64 ``n x 2``; ``n`` is
  data-dependent, and every label of the trace's batch is a token, so ``n = B (s - 1)``), ``.to(int32)``, the
  in-place stride product, ``.sum(1)`` (int64: torch promotes integer sums);
* ``cce_lse_forward_kernel``: ``lse`` fp32 ``n``, its locks (uint32 ``ceil(n / 128)``, freed on return) and
  ``logit_avg`` fp32 ``V`` (the gradient filter's, as ``filter_eps="auto"`` and a hidden state that needs a gradient
  ask);
* ``indexed_neg_dot_forward_kernel``: fp32 ``n`` (Gemma-2: ``softcapping``, a compiled ``tanh``: one more ``n``);
  ``nll = neg_dot.add_(lse)``; ``reduction="sum"`` (the Trainer passes ``num_items_in_batch``), then ``/ num_items``;
* saved for backward: ``e``, ``c``, ``lse``, the targets, ``valids``, ``logit_avg``;
* backward: ``sort_logit_avg`` (``argsort``: fp32 values and int64 indices, then int32), ``cce_backward_kernel``:
  ``de = zeros_like(e)`` and its locks (int32 ``ceil(n / 128) x ceil(h / 64)``); ``dc`` only for a trained head
  (the planner refuses one).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

IGNORE_INDEX = -100


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _build_flat_valids(targets: Any) -> Any:
    """``cut_cross_entropy.utils._build_flat_valids(targets, -100, shift=1)``."""
    import torch

    shifted = targets[..., 1:]
    mask = shifted != IGNORE_INDEX
    n = shifted.numel()  # every label of the traced batch is a token: nonzero() keeps them all
    nz = torch.empty((n, shifted.ndim), dtype=torch.int64, device=targets.device)
    del mask
    valids = nz.to(torch.int32)
    del nz
    for i in range(shifted.ndim - 1):
        valids[:, i] *= shifted.stride(i)
    return valids.sum(1)


@functools.cache
def _function() -> Any:
    import torch

    class LinearCrossEntropyStandIn(torch.autograd.Function):
        """``cut_cross_entropy.cce.LinearCrossEntropyFunction`` (the fork at 5f0c7a7), kernels by their outputs."""

        @staticmethod
        def forward(ctx: Any, e: Any, c: Any, targets: Any, valids: Any, softcap: Any) -> Any:
            n, V = valids.shape[0], c.shape[0]
            lse = e.new_full((n,), -float("inf"), dtype=torch.float32)
            locks = e.new_full((_cdiv(n, 128),), 0, dtype=torch.uint32)
            logit_avg = e.new_full((V,), 0.0, dtype=torch.float32)
            del locks
            neg_dot = e.new_zeros((n,), dtype=torch.float32)
            if softcap is not None:  # a compiled tanh(x / cap) * cap: one fused kernel, one output
                neg_dot = torch.empty_like(neg_dot)
            nll = neg_dot.add_(lse)
            loss = nll.sum()
            ctx.save_for_backward(e, c, lse, targets, valids, logit_avg)
            ctx.rows = n
            return loss

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            e, c, lse, targets, valids, logit_avg = ctx.saved_tensors
            vocab_ordering = torch.argsort(logit_avg).to(torch.int32)
            grad_out = grad_out.contiguous()
            lse = lse.contiguous()
            de = torch.zeros_like(e)
            de_locks = e.new_zeros((_cdiv(ctx.rows, 128), _cdiv(c.shape[1], 64)), dtype=torch.int32)
            del de_locks, vocab_ordering
            return de, None, None, None, None

    return LinearCrossEntropyStandIn


def apply_lce(e: Any, c: Any, labels: Any, softcap: float | None = None, **loss_kwargs: Any) -> Any:
    """``cut_cross_entropy.transformers.utils.apply_lce`` with the plugin's options (``impl="cce"``,
    ``reduction="mean"``, ``filter_eps="auto"``, no fp32 accumulation) and ``shift=True``."""
    import torch

    num_items = loss_kwargs.get("num_items_in_batch")
    if c.dtype == torch.bfloat16 and e.dtype == torch.float32:  # the fork's one cast (DoRA's fp32 outputs)
        e = e.to(c.dtype)
    targets = labels.to(e.device).contiguous()
    e = e.contiguous()
    valids = _build_flat_valids(targets)
    e = e.flatten(0, -2)
    targets = targets.flatten()
    loss = _function().apply(e, c, targets, valids, softcap)
    if num_items is not None:  # reduction "mean" becomes "sum" over the batch's items, divided here
        loss = loss / num_items
    return loss


def cce_forward(self: Any, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                past_key_values: Any = None, inputs_embeds: Any = None, labels: Any = None, use_cache: Any = None,
                logits_to_keep: Any = 0, **kwargs: Any) -> Any:
    """The fork's ``transformers/llama.cce_forward`` (axolotl's ``patch_llama_like`` installs it on any
    ``*ForCausalLM``; Gemma-2's passes ``final_logit_softcapping``)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    hidden_states = outputs.last_hidden_state
    slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    if labels is None or not self.training:
        raise RuntimeError("the Cut Cross Entropy stand-in traces training steps only")
    softcap = getattr(self.config, "final_logit_softcapping", None)
    loss = apply_lce(hidden_states[:, slice_indices, :], self.lm_head.weight, labels, softcap=softcap, **kwargs)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


@contextlib.contextmanager
def cce_patched(hf: Any):
    """The ``*ForCausalLM`` class of the transformers config ``hf`` has ``cce_forward`` as its forward while the
    context is open (as the plugin's ``pre_model_load`` patch)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf)]
    if not model_cls.__name__.endswith("ForCausalLM"):
        raise ValueError(f"Cut Cross Entropy is traced for *ForCausalLM models, not {model_cls.__name__}")
    original = model_cls.__dict__.get("forward")
    model_cls.forward = cce_forward
    try:
        yield
    finally:
        if original is None:
            del model_cls.forward
        else:
            model_cls.forward = original
