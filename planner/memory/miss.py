"""MiSS (``--peft-type miss``, ``planner.model.miss``): what its output dtype makes the MLP keep.

PEFT 0.21's ``MissLinear.forward`` returns ``result.to(previous_dtype)``, ``previous_dtype`` being its *input's* dtype,
where LoRA returns the base layer's output dtype. Under autocast with fp32 weights (an fp32 residual stream), a
MiSS-adapted MLP input projection therefore hands the activation fp32 where autocast's matmul gave 16 bits, and the
gated MLP's saved tensors follow (its branch itself is LoRA-FA's: ``planner.memory.branches.lora_branch_activation``).
Derived from that code and checked against the traced step (tests/planner/test_miss.py). Torch-free.
"""

from __future__ import annotations

from typing import Any

from qplan.planner.errors import QPlanError
from qplan.planner.memory.lin import ZERO, Lin, Precision

#: ``planner.memory.branches.Branch`` (not imported: branches would import this module's importers)
Branch = Any

#: leaf names of a gated MLP's two input projections (a fused ``gate_up_proj`` is both)
GATE, UP = {"gate_proj", "w1", "gate_up_proj"}, {"up_proj", "w3", "gate_up_proj"}


def miss_mlp_promotion(branches: tuple[Branch, ...] | list[Branch], i: int, gated: bool, p: Precision) -> Lin:
    """Per layer, per token: the gated MLP's saved tensors a MiSS gate/up projection promotes to its input's dtype
    ``R`` under autocast (``c`` otherwise): the gate's output (saved by the activation) and the activation's output
    (saved by the product) when the gate is adapted, the up projection's output (saved by the product) when it is:
    ``(R − c) i (2 gate + up)``. Zero without autocast or when the stream is in the compute dtype; one line for a
    plain MLP's (not traced yet)."""
    leaves = {b.leaf for b in branches if b.miss and b.site == "mlp_in"}
    if not p.amp or p.R == p.c or not leaves:
        return ZERO
    if not gated:
        raise QPlanError(f"MiSS on {', '.join(sorted(leaves))} (a plain MLP's input) under autocast with fp32 weights "
                         "is not planned yet: it returns fp32 to the MLP; use --quant bf16 or leave it out of --targets")
    return Lin(tok=(p.R - p.c) * i * (2 * bool(leaves & GATE) + bool(leaves & UP)))

