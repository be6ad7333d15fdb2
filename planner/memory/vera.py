"""VeRA (``--peft-type vera``, ``planner.model.vera``): what its scaled random projections make a layer keep.

PEFT 0.21's ``vera.Linear`` adds ``lambda_b * F.linear(lambda_d * F.linear(x, A), B)`` to the base output, ``A`` and
``B`` slices of the shared frozen fp32 projections, the input first cast to the vectors' dtype (fp32). Derived from that
code and checked against the traced step (tests/planner/test_vera.py). Torch-free.
"""

from __future__ import annotations

from typing import Any

from qplan.planner.memory.lin import Lin, Precision

#: ``planner.memory.activations.Branch`` (not imported: activations imports this module)
Branch = Any


def vera_branch_activation(br: Branch, p: Precision, input_grad: bool) -> Lin:
    """What one VeRA-adapted module saves, per token (``tok``) and per layer (``const``).

    ``A`` and ``B`` are frozen, so no matmul saves its input for a weight gradient; the products with the trained
    vectors save their other operand: ``lambda_d * h`` keeps ``h = F.linear(x, A)`` (``r`` wide) and ``lambda_b * g``
    keeps ``g = F.linear(lambda_d h, B)`` (``out`` wide) — fp32 without autocast, the compute dtype under it
    (``e (r + out)`` per token). Under autocast the projections' slices are cast for each matmul (not leaves: not
    cached) and kept for the input gradients: ``c r in`` when the module's input needs one (not layer 0's q/k/v), and
    ``c out r`` always (its input needs one, ``lambda_d`` trains)."""
    e = p.c if p.amp else 4
    const = (p.c * br.vera * br.in_features * (1 if input_grad else 0) + p.c * br.out_features * br.vera) if p.amp else 0
    return Lin(tok=e * (br.vera + br.out_features) * br.per_layer, const=const * br.per_layer)


def vera_forward_transient(branches: tuple[Branch, ...], p: Precision) -> Lin:
    """At the end of a layer's forward or recomputation (``activations.recompute_transient``'s moment), an adapted MLP
    projection's VeRA path holds, per token: the input's fp32 copy (``4 in``, unless the input is fp32; under autocast
    its compute-dtype cast too, ``c in``), and ``lambda_b * g`` and ``result + …``, both fp32 (the fp32 vector promotes
    them): ``8 out``. The largest of the MLP's adapted projections (measured on traced steps)."""
    mlp = [b for b in branches if b.site in ("mlp_in", "mlp_out")]
    x = {"mlp_in": p.R, "mlp_out": p.M}
    return Lin(tok=max(((4 * b.in_features if x[b.site] != 4 else 0) + (p.c * b.in_features if p.amp else 0)
                        + 8 * b.out_features) for b in mlp)) if mlp else Lin()
