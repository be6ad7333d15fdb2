"""Kernel launches of one training step: the host-side work of eager PyTorch.

A step of HF Trainer + PEFT runs eagerly: every ATen op it dispatches costs the host a Python call, the dispatcher and
a CUDA launch, and the GPU at least one kernel. With small batches that host work, not the matmuls, sets the step time
(PEFT's own L40S runs reach a quarter of the matmul roofline). ``step_launches`` counts the kernels one optimizer step
launches, by phase, from the model's structure:

``launches = sum over components (instances x kernels per instance)``

for the components of a decoder layer (RMSNorms, linear layers, the rest of the layer: rotary embedding, attention,
activation, residual adds), each LoRA module (and its DoRA, dropout and autocast extras), each (IA)³ module, each
4-bit/8-bit weight (dequantization), a full fine-tuning's weight gradients per layer, the recomputed forward of
checkpointed layers, the model's own ends (embedding, final norm, head, loss), and the optimizer (torch's foreach
kernels: a fixed number per step).

The kernels per instance (``FORWARD``, ``BACKWARD``) are a least-squares fit, rounded, to the launches counted on
traced steps (``bench/op_counts.py``: ``qplan.observe.tracker.launches_kernel`` over every op of the second traced
step, views and metadata excluded) of seven families; ``tests/planner/test_launches.py`` checks the count against the
trace of every bundled family within ``TOLERANCE`` (the families differ in small ways the components do not name:
Gemma's norms, Qwen's biases, fused projections).
"""

from __future__ import annotations

from typing import Any

from qplan.planner.memory.branches import layer_branches
from qplan.planner.memory.terms import dims
from qplan.planner.model.full import is_full

#: relative error of ``step_launches`` (forward + backward) against the traced count, checked for every bundled family
TOLERANCE = 0.15

#: feature -> kernels per instance, forward
FORWARD = {
    "norm": 7, "linear": 1, "layer": 20, "lora": 5, "dora": 13, "dropout": 1, "amp_lora": 3, "kbit": 1,
    "eager_attention": 15, "softcap": 5, "moe": 27, "step": 20, "full": 0, "full_cast": 1, "ia3": 3, "ia3_ff": 4,
    "loha": 10, "lokr": 9, "vera": 7, "miss": 5, "miss_mini": 1, "amp_miss": 1, "miss_bat": 10, "amp_miss_bat": 3, "c3a": 8,
}
#: feature -> kernels per instance, backward (the recomputed forward of checkpointed layers is added to it)
BACKWARD = {
    "norm": 13, "linear": 1, "layer": 34, "lora": 9, "dora": 10, "dropout": 1, "amp_lora": 2, "kbit": 4,
    "eager_attention": 20, "softcap": 0, "moe": 25, "step": 0, "full": 8, "full_cast": 1, "ia3": 6, "ia3_ff": 6,
    "loha": 15, "lokr": 13, "vera": 12, "miss": 6, "miss_mini": 1, "amp_miss": 0, "miss_bat": 7, "amp_miss_bat": 3, "c3a": 12,
}
#: torch AdamW / SGD / bitsandbytes with foreach kernels, plus ``clip_grad_norm_``'s foreach norm and scale
OPTIMIZER_LAUNCHES = 16

FEATURES = tuple(FORWARD)


def launch_features(spec: Any, counts: list, q: Any, training: Any, lora: Any) -> dict[str, int]:
    """How many instances of each component one micro-batch's forward runs (``FEATURES``)."""
    d = dims(spec)
    L = d.L
    sites = layer_branches(spec, counts, 1, q)
    linears = sum(b.per_layer for b in sites) * L
    adapted = sum(b.per_layer for b in sites if b.r and not b.miss) * L  # LoRA's (MiSS: its own features)
    miss = sum(b.per_layer for b in sites if b.miss) * L
    kbit = sum(b.per_layer for b in sites if b.kbit) * L if q.quant in ("nf4", "fp4", "int8") else 0
    amp = q.compute_dtype in ("bfloat16", "float16")
    experts = any(len(p.shape) == 3 for p in spec.inventory.params) or any(
        g.pattern.rsplit(".", 1)[-1] in ("gate", "router") for g in spec.inventory.linear)
    moe_layers = L if experts else 0
    return {
        "norm": L * (d.norms + (2 if d.qk_norm else 0)),
        "linear": linears,
        "layer": L,
        "lora": adapted,
        "dora": adapted if lora.use_dora else 0,
        "dropout": adapted if lora.dropout > 0 else 0,
        "amp_lora": adapted if amp else 0,
        "kbit": kbit,
        "eager_attention": L if training.attn_impl == "eager" else 0,
        "softcap": L if d.attn_softcap else 0,
        "moe": moe_layers,
        "step": 1,
        # full fine-tuning: a decoder layer's weight gradients (a matmul per projection, a product and a sum per
        # norm weight), fitted to the traced full fine-tuning steps of five families (bench/op_counts.py)
        "full": L if is_full(counts) else 0,
        # and each trained weight autocast casts to the compute dtype (fp32 weights under bf16/fp16 autocast): the cast
        # in the forward, its gradient's cast back in the backward
        "full_cast": linears if is_full(counts) and amp and q.unquantized_dtype != q.compute_dtype else 0,
        # (IA)³: the scaling's ops per module (``1 * ia3_l``, the multiply and its casts; a feed-forward module casts
        # its input too), counted on traced steps that differ by 16 feed-forward or 32 output-scaled modules
        "ia3": sum(b.per_layer for b in sites if b.ia3 == "out") * L,
        "ia3_ff": sum(b.per_layer for b in sites if b.ia3 == "ff") * L,
        # LoHa: per module the update's two products, their product and scale, the input's cast, F.linear, the sum and
        # the cast back; backward F.linear's two matmuls, HadaWeight's nine ops and the casts (traced steps differing
        # by 16 and by 80 modules: 10 and 15)
        "loha": sum(b.per_layer for b in sites if b.update == "loha") * L,
        # LoKr: its factored w2's product, the Kronecker product and scale, then as LoHa; backward the two halves of
        # the product's gradient with their sums, the factor's (traced the same way: 9 and 13)
        "lokr": sum(b.per_layer for b in sites if b.update == "lokr") * L,
        # VeRA: the input's cast, two matmuls, two products with the vectors, the sum and the casts (traced: 7 and 12)
        "vera": sum(b.per_layer for b in sites if b.vera) * L,
        # MiSS: the input's cast, the slices' sum, the matmul, the sum with the base output and the cast back (mini:
        # the block's repeat; autocast: the sum's cast); backward the block's and the input's gradients, the expanded
        # sum's copy and the casts (traced steps differing by 80 modules, pure bf16 and under autocast: 5 and 6)
        "miss": miss,
        "miss_mini": sum(b.per_layer for b in sites if b.miss == "miss_mini") * L,
        "amp_miss": miss if amp else 0,
        # MiSS-bat: the weight's clone, fp32 copy, blocks' matmul, sums and copies, F.linear in place of the base layer
        # (counted there) and the cast back; backward the weight's gradient, its copies, the blocks' gradient; autocast
        # casts three more (traced steps differing by 80 modules, pure bf16 and under autocast: 10/7, 3/3)
        "miss_bat": (bat := sum(b.per_layer for b in sites if b.update == "miss_bat") * L),
        "amp_miss_bat": bat if amp else 0,
        # C3A: the input's fp32 copy, two FFTs, the complex einsum, the inverse FFT, the real part, the scale, the cast
        # and the sum into the base output; backward its two einsums and four FFTs (traced as MiSS: 8 and 12)
        "c3a": sum(b.per_layer for b in sites if b.c3a) * L,
    }


def step_launches(spec: Any, counts: list, q: Any, training: Any, lora: Any) -> dict[str, int]:
    """Kernel launches of one optimizer step by phase (``grad_accum`` micro-batches, one optimizer step)."""
    f = launch_features(spec, counts, q, training, lora)
    fwd = sum(FORWARD[k] * n for k, n in f.items())
    bwd = sum(BACKWARD[k] * n for k, n in f.items())
    if training.grad_ckpt != "off":  # the checkpointed layers' forward runs again in the backward
        bwd += fwd - FORWARD["step"] * f["step"]
    acc = training.grad_accum
    out = {"forward": fwd * acc, "backward": bwd * acc, "optimizer": OPTIMIZER_LAUNCHES}
    out["total"] = sum(out.values())
    return out
