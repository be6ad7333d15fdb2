"""LoKr (``--peft-type lokr``): PEFT's ``LoKrConfig`` (LyCORIS' Kronecker-product adapter), counted from the spec.

PEFT 0.21 (peft/tuners/lokr/layer.py ``LoKrLayer.update_layer``) factors each targeted ``nn.Linear``'s ``in`` and
``out`` with ``factorization(dim, decompose_factor)`` into ``out = a b``, ``in = c d`` and trains, in fp32, ``w1``
``(a, c)`` (``w1_a (a, r) @ w1_b (r, c)`` with ``decompose_both`` when ``r < max(a, c) / 2``) and ``w2`` ``(b, d)``, or
``w2_a (b, r) @ w2_b (r, d)`` when ``r < max(b, d) / 2``. Every forward builds the full ``out × in`` update
``kron(w1, w2) · alpha / r`` (``make_kron``), as LoHa does its Hadamard product. Targets as LoHa's (PEFT's LoRA defaults
for the model type); ``--r`` / ``--alpha`` with qplan's defaults (``LoKrConfig``'s own: 8 and 8). The oracle is PEFT's
``get_nb_trainable_parameters`` on a meta-device model (tests/planner/test_lokr.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from qplan.planner.errors import QPlanError
from qplan.planner.model.loha import LohaSettings
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.spec import ModelSpec

#: ``ModuleCount.kind`` of a LoKr-adapted linear group
LOKR = "lokr"


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's ``peft.tuners.lokr.layer.factorization``: ``dimension = m n`` with ``m <= n``, ``m = factor`` when it
    divides ``dimension``, else the divisor pair nearest the square root that keeps ``m <= factor`` (any, for -1)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def lokr_factors(in_features: int, out_features: int, r: int, factor: int, decompose_both: bool
                 ) -> list[tuple[str, list[int]]]:
    """The trained tensors of one module, PEFT's names and shapes, in ``create_adapter_parameters``' order."""
    c, d = factorization(in_features, factor)
    a, b = factorization(out_features, factor)
    use_w1 = not (decompose_both and r < max(a, c) / 2)
    use_w2 = not (r < max(b, d) / 2)
    out = [("lokr_w1", [a, c])] if use_w1 else [("lokr_w1_a", [a, r]), ("lokr_w1_b", [r, c])]
    out += [("lokr_w2", [b, d])] if use_w2 else [("lokr_w2_a", [b, r]), ("lokr_w2_b", [r, d])]
    return out


@dataclass(frozen=True)
class LokrSettings(LohaSettings):
    """``LoKrConfig`` fields as qplan gives them (``targets`` None: PEFT's default for the model type)."""

    decompose_factor: int = -1
    decompose_both: bool = False
    method: ClassVar[str] = "lokr"
    label: ClassVar[str] = "LoKr"

    def to_json(self, spec: ModelSpec) -> dict[str, Any]:
        return {**super().to_json(spec), "decompose_factor": self.decompose_factor,
                "decompose_both": self.decompose_both}

    def count(self, spec: ModelSpec, q: Any = None) -> list[ModuleCount]:
        """One ``ModuleCount`` per targeted linear group: its factors (see the module docstring)."""
        out = []
        for c in super().count(spec, q):  # LoHa's target checks and modules, LoKr's tensors
            i, o = c.save_keys[1][1][1], c.save_keys[0][1][0]
            keys = lokr_factors(i, o, self.r, self.decompose_factor, self.decompose_both)
            n = sum(x * y for _, (x, y) in keys)
            out.append(ModuleCount(c.module, LOKR, c.shape, c.instances, n, "float32", keys))
        if not out:  # pragma: no cover - LoHa's count raises first
            raise QPlanError("LoKr adapts no module")
        return out
