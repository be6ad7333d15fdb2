"""MiSS and C3A (``planner.model.miss``, ``planner.model.c3a``): what their output dtype makes the MLP keep, and what
C3A's own branch saves.

PEFT 0.21's ``MissLinear.forward`` and ``C3ALinear.forward`` return ``result.to(previous_dtype)``, ``previous_dtype``
being the module's *input's* dtype, where LoRA returns the base layer's output dtype. Under autocast with fp32 weights
(an fp32 residual stream), such an adapted MLP input projection therefore hands the activation fp32 where autocast's
matmul gave 16 bits, and the gated MLP's saved tensors follow. MiSS's branch itself is LoRA-FA's
(``planner.memory.branches.lora_branch_activation``). Derived from that code and checked against the traced step
(tests/planner/test_miss.py, test_c3a.py). Torch-free.
"""

from __future__ import annotations

from qplan.planner.errors import QPlanError
from qplan.planner.memory.branches import Branch
from qplan.planner.memory.lin import ZERO, Lin, Precision

#: leaf names of a gated MLP's two input projections (a fused ``gate_up_proj`` is both)
GATE, UP = {"gate_proj", "w1", "gate_up_proj"}, {"up_proj", "w3", "gate_up_proj"}


def mlp_promotion(branches: list[Branch], i: int, gated: bool, p: Precision) -> Lin:
    """Per layer, per token: the gated MLP's saved tensors that a MiSS or C3A gate/up projection promotes to its input's
    dtype ``R`` under autocast (``c`` otherwise): the gate's output (saved by the activation) and the activation's
    output (saved by the product) when the gate is adapted, the up projection's output (saved by the product) when it
    is: ``(R − c) i (2 gate + up)``. Zero without autocast or when the stream is in the compute dtype; one line for a
    plain MLP's (not traced yet)."""
    leaves = {b.leaf for b in branches if (b.miss or b.c3a or b.update == "miss_bat") and b.site == "mlp_in"}
    if not p.amp or p.R == p.c or not leaves:
        return ZERO
    if not gated:
        raise QPlanError(f"MiSS/C3A on {', '.join(sorted(leaves))} (a plain MLP's input) under autocast with fp32 "
                         "weights is not planned yet: it returns fp32 to the MLP; use --quant bf16 or leave it out of "
                         "--targets")
    return Lin(tok=(p.R - p.c) * i * (2 * bool(leaves & GATE) + bool(leaves & UP)))


def c3a_branch_activation(br: Branch, x: int) -> tuple[Lin, bool]:
    """What one C3A-adapted module saves, per token, and whether it is its input itself (``x``: the input's dtype
    bytes; a shared input is counted once by the caller). ``BlockCircularConvolution`` saves its fp32 input
    (``x.to(torch.float32)``: a new ``4 in`` copy unless the input is fp32) and the kernel (a parameter), in every
    layer: a custom Function saves what it is given, whether or not its input needs a gradient. Its FFTs and
    products are made and freed inside its forward."""
    if x == 4:
        return Lin(), True
    return Lin(tok=4 * br.in_features * br.per_layer), False


def c3a_forward_transient(c3a: tuple[Branch, ...]) -> Lin:
    """The largest transient of a C3A module's forward beyond its saved fp32 input, per token (at the end of a layer's
    forward or recomputation, ``activations.recompute_transient``'s moment): the input's FFT and the ``bmm``'s output
    (``8 in + 8 out``, complex64), or that output and its inverse FFT (``16 out``), the largest module's. An upper
    bound for modules before the down projection (fewer of the layer's tensors are alive then)."""
    return Lin(tok=max((max(8 * b.in_features + 8 * b.out_features, 16 * b.out_features) for b in c3a), default=0))


def c3a_backward_transient(c3a: tuple[Branch, ...], h: int, second: int) -> int:
    """Per token, the largest moment of a C3A module's backward (``BlockCircularConvolution.backward``) beyond the
    gradient reaching the layer: the output gradient in fp32, scaled (``4 out``), its FFT (``8 out``), the input
    gradient's FFT and the input's inverse FFT, both alive at the kernel gradient's einsum (``16 in``), plus, for a
    module other than the down projection, its own output gradient (``o out``, counted as 4: an upper bound); the
    layer's second incoming gradient (``second h``: ``backward.incoming_gradients``) is gone by then. Exact for the
    down projection, the first backward op of a layer (traced on toy models, where it is the peak); an upper bound for
    the others, whose backward runs after part of the layer's tensors are freed."""
    return max((12 * b.out_features + 16 * b.in_features + (0 if b.site == "mlp_out" else 4 * b.out_features)
                - second * h for b in c3a), default=0)
