"""LoHa (``--peft-type loha``, ``planner.model.loha``): what its per-forward weight update makes a layer keep.

PEFT 0.21's ``loha.Linear`` runs the base layer, then builds the full ``out × in`` update ``HadaWeight.apply(w1_a, w1_b,
w2_a, w2_b, scale)`` (a custom autograd function: it saves only the factors, its matmuls record nothing), casts the
layer's input to the update's dtype (``_cast_input_dtype``) and adds ``F.linear(input, update)`` to the base output.
Derived from that code and checked against the traced step (tests/planner/test_loha.py). Torch-free.
"""

from __future__ import annotations

import math
from typing import Any

from qplan.planner.memory.lin import Lin, Precision

#: ``planner.memory.activations.Branch`` (not imported: activations imports this module)
Branch = Any


def loha_dtype(p: Precision) -> int:
    """Bytes of the update and of the input it multiplies: its fp32 factors' matmuls, or under autocast the compute
    dtype (autocast casts the factors, cached, and the products are 16-bit)."""
    return p.c if p.amp else 4


def loha_branch_activation(br: Branch, x: int, p: Precision, input_grad: bool) -> tuple[Lin, bool]:
    """What one LoHa-adapted module saves, per token (``tok``) and per layer (``const``), and whether the tensor it
    saves is its input itself (``x``: the input's dtype bytes; counted once per input by the caller).

    ``F.linear(input, update)`` saves ``input`` for the update's gradient — a new ``e in`` copy when the input is not
    in the update's dtype ``e`` (``loha_dtype``), else the input itself — and, only when its input needs a gradient
    (not layer 0's q/k/v without checkpointing), the update, ``e out in``."""
    e = loha_dtype(p)
    # LoKr under autocast: kron of the fp32 w1 and the autocast w2 is fp32, so the input is copied to fp32 and
    # autocast's F.linear casts that copy back: a compute-dtype copy per module, never the input itself; MiSS-bat's
    # rebuilt weight is fp32 (the bf16 weight plus an fp32 update), likewise
    shares = x == e and not (br.update in ("lokr", "miss_bat") and p.amp)
    lin = Lin(tok=0 if shares else e * br.in_features * br.per_layer,
              const=e * br.out_features * br.in_features * br.per_layer if input_grad else 0)
    return lin + lokr_products_saved(br, p) + bat_blocks_saved(br, p), shares


def bat_blocks_saved(br: Branch, p: Precision) -> Lin:
    """MiSS-bat (``planner.model.miss``): ``get_delta_weight`` multiplies the weight's fp32 copy, cut into ``r × r``
    blocks, by the trained blocks; the batched matmul keeps that copy (made contiguous: ``4 out in``; under autocast
    its compute-dtype cast, ``c out in``) for the blocks' gradient, in every layer."""
    return Lin(const=loha_dtype(p) * br.out_features * br.in_features * br.per_layer) if br.update == "miss_bat" else Lin()


def lokr_products_saved(br: Branch, p: Precision) -> Lin:
    """LoKr (``planner.model.lokr``) builds its update with autograd's own ops: ``torch.kron(w1, w2)`` saves both
    operands, so a factored ``w1 = w1_a @ w1_b`` / ``w2 = w2_a @ w2_b`` — a new tensor, fp32 or under autocast the
    compute dtype — is kept (``e a c`` / ``e b d``), and under autocast the matmul keeps its operands' cached
    compute-dtype copies too (``c (a r + r c)``); an unfactored ``w1`` / ``w2`` is the parameter itself."""
    if br.update != "lokr":
        return Lin()
    shapes = dict(br.factors)
    e = loha_dtype(p)
    total = 0
    for w in ("w1", "w2"):
        a, b = shapes.get(f"lokr_{w}_a"), shapes.get(f"lokr_{w}_b")
        if a and b:
            total += e * a[0] * b[1] + (p.c * (a[0] * a[1] + b[0] * b[1]) if p.amp else 0)
    return Lin(const=total * br.per_layer)


def loha_forward_casts(branches: tuple[Branch, ...], p: Precision) -> Lin:
    """Under autocast without checkpointing, the cached compute-dtype copies of a layer's LoHa factors (``c · 2 r (in +
    out)`` per module), alive until the autocast region exits after the loss: nothing saves them (``HadaWeight``
    saves the fp32 factors; MiSS-bat's batched matmul casts its fp32 blocks the same way). With checkpointing the
    loss-time term counts every fp32 adapter tensor's copy. LoKr's factored products keep their copies
    (``lokr_products_saved``)."""
    if not p.amp:
        return Lin()
    return Lin(const=sum(p.c * sum(math.prod(shape) for _, shape in b.factors) * b.per_layer
                         for b in branches if b.update in ("loha", "miss_bat")))


def loha_backward_transient(branches: tuple[Branch, ...], p: Precision, x: int) -> Lin:
    """The largest transient of a layer's LoHa backward on top of what the layer keeps, when its first backward op is
    an adapted MLP projection (the down projection's backward runs first, with the rest of the recomputed layer
    alive): ``F.linear``'s backward has freed that module's saved update and input copy and made the update's
    gradient (``e out in``, ``e`` = ``loha_dtype``); ``HadaWeight.backward`` then makes its scaled copy (``e``) and, in
    fp32 (no autocast in a custom backward), ``w1_a w1_b`` and the products with the old and the new ``temp`` at once
    (``3 × 4``): ``(2 e + 12) out in`` (measured on traced steps); LoKr's ``kron`` backward, its gradient (cast
    to fp32 under autocast), the scaled copy and one broadcast product at a time, ``(e + 8 [+ 4]) out in``. An
    attention projection's runs after the attention's
    and the MLP's backward have freed the layer's tensors, far below the moments planned (not counted). ``x``: the
    module's input dtype bytes."""
    mlp = [b for b in branches if b.site in ("mlp_in", "mlp_out") and b.update in ("loha", "lokr")]  # bat: its own
    if not mlp:
        return Lin()
    site = "mlp_out" if any(b.site == "mlp_out" for b in mlp) else "mlp_in"
    e = loha_dtype(p)
    b = max((b for b in mlp if b.site == site), key=lambda b: b.out_features * b.in_features)
    own = e * b.out_features * b.in_features
    # LoKr: the update's gradient (fp32-cast under autocast), scaled, and one of kron's broadcast products at a time
    k = (2 * e + 12) if b.update == "loha" else (e + 8 + (4 if p.amp else 0))
    return Lin(const=k * b.out_features * b.in_features - own,
               tok=-(e * b.in_features if x != e else 0))


def update_recompute_transient(branches: tuple[Branch, ...], p: Precision) -> Lin:
    """LoKr under autocast: ``kron`` of the fp32 ``w1`` and the autocast ``w2`` is fp32, so ``_cast_input_dtype``
    makes an fp32 copy of the down projection's input (``4 in`` per token) that ``F.linear`` casts again for its
    matmul (the copy it saves): a transient at the end of a layer's forward or recomputation
    (``activations.recompute_transient``'s moment)."""
    if not p.amp:
        return Lin()
    return Lin(tok=sum(4 * b.in_features * b.per_layer for b in branches if b.update == "lokr" and b.site == "mlp_out"))


def bat_transients(branches: tuple[Branch, ...], w: int) -> tuple[Lin, Lin]:
    """MiSS-bat's largest weight-sized transients, per layer (``E = out × in`` of its largest module; ``w`` the base
    weight's bytes): forward (``MissLinear.forward`` / ``get_delta_weight``) the weight's clone (``w E``), its fp32 copy
    (``4 E``, unless the weight is fp32), the blocks' sum and its contiguous copy (``8 E``) alive at once; backward the
    rebuilt weight's gradient, its contiguous copy and the blocks' batched-matmul gradient (``12 E``). Counted at the
    layer's recomputation end, its backward and, without checkpointing, the last layer's backward: an upper bound for
    modules other than the down projection (checked on toy models, where they are the peak). Zero without MiSS-bat."""
    E = max((b.out_features * b.in_features for b in branches if b.update == "miss_bat"), default=0)
    return Lin(const=(w + 8 + (4 if w != 4 else 0)) * E), Lin(const=12 * E)
