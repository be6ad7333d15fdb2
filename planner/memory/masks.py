"""Attention-mask terms: the materialised masks eager attention and masked SDPA keep, the rotary tables, and what the
embeddings' backward holds beside them (``Lin`` forms, as ``planner.memory.activations``, which composes them into a
step's activations)."""

from __future__ import annotations

from qplan.planner.memory.lin import ZERO, Lin, Precision
from qplan.planner.memory.terms import Dims, dims
from qplan.planner.model.spec import ModelSpec


def eager_mask_activation(spec: ModelSpec, p: Precision) -> Lin:
    """Eager attention gets a materialised additive causal mask, ``[b, 1, s, s]`` in the
    embeddings' dtype (``R`` bytes; masking_utils ``eager_mask``), one per attention type of the
    config's ``layer_types`` (recorded in the spec's inventory; Gemma-2 alternates sliding-window
    and global layers: two).  Checkpointing keeps the layers' inputs,
    masks included, for the recomputation: ``n R b s^2`` until backward ends.  (Without
    checkpointing the masks die with the forward.)"""
    n = max(1, len(spec.inventory.attention_types))
    return Lin(quad=n * p.R)


def padding_mask_activation(spec: ModelSpec, p: Precision) -> tuple[Lin, Lin]:
    """A 4-D attention mask under SDPA (padded rows, or padding-free packs told apart by position ids):
    ``(kept, per_layer)``.

    A batch padded to its longest has zeros in its ``attention_mask``, and packed documents need a block-causal
    pattern, so transformers cannot skip the mask (``masking_utils.sdpa_mask``: ``allow_is_causal_skip`` only
    without either) and builds a bool ``[b, 1, s, s]`` mask per attention type (1 byte per element).
    Checkpointing keeps it with the layers' inputs until backward ends (``kept``: ``n b s^2``). Each layer whose
    forward is saved (every layer without checkpointing, the recomputed one with it) adds (``per_layer``):

    * the additive float mask ``scaled_dot_product_attention`` makes of the bool one and saves for its backward
      (ATen ``convert_boolean_attn_mask``: ``where(mask, 0, -inf)`` in the query's dtype, ``c b s^2``);
    * with grouped-query attention, key and value repeated to every query head: transformers'
      ``sdpa_attention_forward`` passes ``enable_gqa`` only without a mask (``use_gqa_in_sdpa``), else
      ``repeat_kv``, and SDPA saves the repeated copies instead of the rope'd key and the value
      (``(n_rep − 1) · 2 · kv · c`` per token, ``n_rep = heads / kv_heads``) — under autocast; in fp32 the
      unmasked path is already the math composite that repeats them (``attention_activation``).

    Measured on the CPU (tiny-llama, 2 layers, 4 heads, 2 KV heads, head dim 32, bf16; the tracker's bytes,
    ``tests/backends/test_run_user_data.py``): a padded 2 × 128 step +164,240 B with checkpointing (this term:
    163,840), +262,544 B without (262,144); a padding-free packed 1 × 256 step +264,072 B (262,144). The
    same kernels take a mask on CUDA (the memory-efficient one; ``repeat_kv`` likewise): derived, not measured
    on a GPU."""
    d = dims(spec)
    n = max(1, len(spec.inventory.attention_types))
    n_rep = max(1, d.nh // max(1, d.nkv)) if p.low else 1
    return Lin(quad=n), Lin(quad=p.c, tok=(n_rep - 1) * 2 * d.kv * p.c)


def rotary_activation(d: Dims, p: Precision) -> Lin:
    """The rotary ``cos``/``sin`` of a step, alive from the embeddings to the end of backward:
    ``[1, s, hd]`` each in ``R`` bytes (batch 1, broadcast), one pair per rotary table the model
    computes (``d.rope_sets``: Gemma-3 one per layer type, sliding and full; others one):
    ``2 R hd s`` per pair (transformers ``*RotaryEmbedding.forward``, 5.23)."""
    return Lin(seq=2 * p.R * d.hd * d.rope_sets)


def embeddings_backward_activation(spec: ModelSpec, p: Precision, d: Dims, kernels: str, grad_ckpt: str,
                                   attn_impl: str, padded: bool) -> tuple[Lin, Lin]:
    """Full fine-tuning: what is alive besides the gradients at the embeddings' backward, the end of the backward:
    ``(kept, transient)``.

    The batch (``16 T``). An untied embedding's backward also holds its incoming gradient (``R h T``) and, on CUDA,
    its fp32 partial sums, a row per token at most (``4 h T``, ``embedding_backward_cuda_kernel``); a tied one peaks
    after that, when its two gradients are summed (``planner.memory.full.full_layer_grads``). Reentrant
    checkpointing keeps every layer's keyword inputs until the whole backward ends: transformers binds them into
    the function ``CheckpointFunction`` holds (``partial(super().__call__, **kwargs)``), so the rotary ``cos``/``sin``
    and the attention masks (eager's additive masks, SDPA's padding mask) are still alive."""
    kept = Lin(tok=16)
    transient = ZERO if d.tied else Lin(tok=p.R * d.h + (4 * d.h if kernels == "cuda" else 0))
    if grad_ckpt == "reentrant":
        kept = kept + rotary_activation(d, p)
        if attn_impl == "eager":
            kept = kept + eager_mask_activation(spec, p)
        if padded and attn_impl == "sdpa":
            kept = kept + padding_mask_activation(spec, p)[0]
    return kept, transient
