"""Full fine-tuning's activation and gradient terms: what training the base weights adds to a LoRA-free step.

With every parameter trained (``planner.model.full``) autograd keeps, beyond what a frozen model's step keeps
(``planner.memory.activations`` with no LoRA branch):

* each linear layer's input, for its weight gradient (``full_layer_activation``);
* each norm's normalized input, for its weight gradient;
* the output head's input;
* layer 0's input path: the embeddings train, so the first layer's input needs a gradient like every other layer's
  (the terms of layer 0 are a full layer's: ``first`` no longer applies);
* under autocast, the cached casts of every weight not in the compute dtype, which live until the autocast region
  exits (``cached_weight_casts``).

Derived from the code a step runs (transformers' Llama-family modules, torch's autocast ``cached_cast`` and
``F.linear``'s saved tensors) and checked against the traced step (tests/planner/test_full.py).
Notation as in ``planner.memory.terms``.
"""

from __future__ import annotations

import math

from qplan.planner.memory.lin import ZERO, Lin, Precision
from qplan.planner.memory.terms import Dims, idle_in_step
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.spec import ModelSpec
from qplan.planner.vocab import BYTES


def full_layer_activation(d: Dims, p: Precision, sites: list[tuple[str, int, int]], gemma_norm: bool,
                          attn_impl: str) -> Lin:
    """Per layer, what trained weights save beyond a frozen layer, per token.

    ``sites``: ``(site, in_features, modules per layer)`` of each linear group of the layer
    (``activations.layer_branches``), ``site`` one of ``attn_in``, ``attn_out``, ``mlp_in``, ``mlp_out``.

    * ``F.linear`` saves its input for the weight gradient. Without autocast, or with an input already in the compute
      dtype, that is the tensor the site receives, saved once however many projections read it (q/k/v share the
      normed stream, gate/up too): ``x h`` (attention and MLP inputs, the residual dtype ``R``) and ``M i`` (the
      MLP product feeding the down projection). The attention output ``o_proj`` reads (``attn_output.transpose(1,
      2).contiguous()``) is the one flash / memory-efficient attention saves already (their output is laid out
      ``[b, s, nh, hd]``: ``contiguous()`` copies nothing); eager attention and SDPA's math path (fp32 with grouped
      kv heads) return ``[b, nh, s, hd]``, whose contiguous copy is new: ``c q``.
      Under autocast an input in another dtype is cast by each projection anew (``cached_cast`` caches leaves only):
      ``c in`` per module.
    * A norm's trained weight: transformers' RMSNorm returns ``weight * x.to(input_dtype)``, whose product saves the
      normalized ``x`` in the input dtype, ``R h`` per residual-stream norm (Gemma's ``output * (1 + weight.float())``
      saves the fp32 ``output``: ``4 h``); the per-head q/k norms save theirs in the projections' output dtype.
    """
    tok = 0
    widths = {"attn_in": d.h, "attn_out": d.q, "mlp_in": d.h, "mlp_out": d.i}
    dtype = {"attn_in": p.R, "attn_out": p.c, "mlp_in": p.R, "mlp_out": p.M}
    shared: set[str] = set()
    for site, in_features, per_layer in sites:
        if p.amp and dtype[site] != p.c:
            tok += p.c * in_features * per_layer
        else:
            shared.add(site)
    math_out = attn_impl == "eager" or (not p.low and d.nkv != d.nh)
    tok += sum(dtype[s] * widths[s] for s in shared if s != "attn_out" or math_out)
    tok += (4 if gemma_norm else p.R) * d.h * d.norms
    if d.qk_norm:
        tok += (p.c if p.amp else p.M) * (d.q + d.kv)
    return Lin(tok=tok)


def full_head_activation(d: Dims, p: Precision, gemma_norm: bool, head_linear: bool, ckpt: bool) -> tuple[Lin, Lin]:
    """Outside the layers: ``(saved, loss_time)`` — what the trained final norm and output head save for backward, and
    the change to what is alive only while the loss is computed.

    The final norm saves its normalized input like a layer's (``R h T``; Gemma ``4 h T``). The head (a linear layer,
    unless a fused loss reads its weight) saves its input, the final norm's output: that tensor itself (``R h T``)
    when it is in the compute dtype or there is no autocast — then it is saved, no longer only alive while the loss is
    computed (``loss_time``: ``- R h T``) — else autocast's ``c h T`` copy. The embeddings' output, layer 0's input,
    now needs a gradient: in an fp32 stream without checkpointing layer 0's input norm saves it as it is (``4 h T``;
    a 16-bit stream's norm saves its own fp32 copy, a layer term; checkpointing keeps every layer's input anyway)."""
    saved = (4 if gemma_norm else p.R) * d.h + (4 * d.h if p.R == 4 and not ckpt else 0)
    loss_time = ZERO
    if head_linear:
        if p.amp and p.R != p.c:
            saved += p.c * d.h
        else:
            saved += p.R * d.h
            loss_time = Lin(tok=-p.R * d.h)
    return Lin(tok=saved), loss_time


def cached_weight_casts(spec: ModelSpec, p: Precision, weights_dtype: str) -> int:
    """Autocast's cached casts of the decoder layers' trained linear weights, alive at the loss with checkpointing.

    ``cached_cast`` (aten/src/ATen/autocast_mode.cpp) keeps the compute-dtype copy of a leaf that requires grad until
    the outermost autocast region exits — after the loss. Without checkpointing each copy is saved by its layer anyway
    (counted per layer); with it, the layers' saved copies are dropped but the cache still holds every one:
    ``c`` bytes per decoder-layer linear weight element. None without autocast or for weights in the compute dtype."""
    if not p.amp or weights_dtype == p.compute:
        return 0
    inv = spec.inventory
    return sum(p.c * g.in_features * g.out_features * g.instances for g in inv.linear
               if "*" in g.pattern and g.role in ("attn", "mlp") and not idle_in_step(spec, g.pattern))


def grad_parts(counts: list[ModuleCount]) -> tuple[int, int, int]:
    """Gradient bytes of a full fine-tuning: ``(every parameter's, the decoder layers', the embeddings')``, from the
    tensors' shapes (an FSDP rank's are its shards: ``sharding.sharded_counts``)."""
    total = layers = emb = 0
    for c in counts:
        b = sum(math.prod(shape) for _, shape in c.save_keys) * c.instances * BYTES[c.dtype]
        total += b
        if "*" in c.module:
            layers += b
        elif c.shape.startswith("emb"):
            emb += b
    return total, layers, emb


def full_layer_grads(counts: list[ModuleCount], L: int, tied: bool, first: int = 0) -> tuple[int, ...]:
    """Gradients inside the backward of full fine-tuning: ``(at layer 0's backward, at the last layer's, at the
    embeddings' backward, the same with gradient accumulation, and of those two what is a parameter's .grad)``.

    The output head's and the final norm's gradients come first, then each layer's from the last to layer 0, then
    the embeddings'. At layer 0's backward every gradient but layer 0's and an untied embedding's exists, and the
    first of layer 0's own, its last projection's (``first``: a dense MLP's down projection, whose backward runs
    first; the moment's transients are that backward's); at the last layer's backward (checkpointing's other moment)
    only the head's, the final norm's and a tied embedding's.

    A tied embedding is one parameter used twice: autograd's ``InputBuffer`` sums its two gradients before the
    parameter's ``AccumulateGrad`` runs, out of place (``old_var + var``: measured with torch's profiler, an
    ``aten::add`` of the weight's size), so at the embeddings' backward the head's gradient, the embedding's and their
    sum are alive at once: every other gradient and ``3 V h``. An untied embedding's new gradient becomes its
    ``.grad``: every gradient. With gradient accumulation the ``.grad`` of every parameter already exists and the new
    one is added into it in place: every gradient and ``3 V h`` (tied) or ``V h`` (untied)."""
    total, layers, emb = grad_parts(counts)
    untied_emb = 0 if tied else emb
    end = total + 2 * emb if tied else total
    end_accum = total + (3 * emb if tied else emb)
    # the embedding's new gradient (a tied weight's sum in autograd's buffer, or an untied one's in the making) is not
    # its .grad yet: a transient to a tracker
    return (total - layers // max(1, L) - untied_emb + first, total - layers - untied_emb, end, end_accum,
            total - emb, total)
