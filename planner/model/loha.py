"""LoHa (``--peft-type loha``): PEFT's ``LoHaConfig`` (LyCORIS' Hadamard-product adapter), counted from the spec.

PEFT 0.21 (peft/tuners/loha/layer.py ``LoHaLayer.create_adapter_parameters``) gives each targeted ``nn.Linear``
four fp32 factors — ``hada_w1_a`` ``(out, r)``, ``hada_w1_b`` ``(r, in)``, ``hada_w2_a`` ``(out, r)``, ``hada_w2_b``
``(r, in)`` — whose Hadamard product ``(w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r`` is a full ``out × in`` weight update
made at every forward (``HadaWeight``). Targets match as LoRA's do; without them PEFT takes its LoRA defaults for the
model type (``model_specs/data/peft-lora-defaults.json``: Llama's ``q_proj``, ``v_proj``). ``--r`` and ``--alpha`` are
LoHa's ``r`` and ``alpha`` with qplan's defaults (16, 2r; ``LoHaConfig``'s own are 8 and 8). The oracle is PEFT's
``get_nb_trainable_parameters`` on a meta-device model (tests/planner/test_loha.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, ClassVar

from qplan.planner.errors import QPlanError
from qplan.planner.model.lora import ModuleCount, linear_leaf_names, peft_default_targets, target_names
from qplan.planner.model.spec import ModelSpec

#: ``ModuleCount.kind`` of a LoHa-adapted linear group
LOHA = "loha"


@cache
def lora_family_defaults() -> dict[str, list[str]]:
    """PEFT's default target modules of the LoRA family (LoHa, LoKr) per model type (the bundled data file)."""
    f = resources.files("qplan.model_specs").joinpath("data/peft-lora-defaults.json")
    return json.loads(f.read_text(encoding="utf-8"))["target_modules"]


@dataclass(frozen=True)
class LohaSettings:
    """``LoHaConfig`` fields as qplan gives them (``targets`` None: PEFT's default for the model type)."""

    r: int
    alpha: float
    targets: str | None = None
    method: ClassVar[str] = "loha"
    #: the method's name in messages
    label: ClassVar[str] = "LoHa"
    #: where the method's PEFT default targets differ from the LoRA family's table (``lora_family_defaults``)
    default_overrides: ClassVar[dict[str, list[str]]] = {}

    def resolve(self, spec: ModelSpec) -> list[str]:
        if self.targets is None:
            return peft_default_targets(spec, {**lora_family_defaults(), **self.default_overrides}, self.label,
                                        f"linear modules: {', '.join(linear_leaf_names(spec))}")
        return target_names(spec, self.targets)

    def to_json(self, spec: ModelSpec) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "scaling": self.alpha / self.r, "target_modules": self.resolve(spec)}

    def count(self, spec: ModelSpec, q: Any = None) -> list[ModuleCount]:
        """One ``ModuleCount`` per targeted linear group: its four factors (see the module docstring)."""
        inv = spec.inventory
        targets = self.resolve(spec)
        r = self.r
        for t in targets:
            if any(e.pattern == t or e.pattern.endswith("." + t) for e in inv.embeddings):
                raise QPlanError(f"{self.label} target {t!r} is an embedding: PEFT's {self.label} adapts linear (and conv) "
                                 "layers only")
            if not any(g.pattern == t or g.pattern.endswith("." + t) for g in inv.linear):
                raise QPlanError(f"{self.label} target {t!r} matches no linear module of {spec.name}; its linear modules are: "
                                 f"{', '.join(linear_leaf_names(spec))}")
        out = []
        for g in inv.linear:
            if not any(g.pattern == t or g.pattern.endswith("." + t) for t in targets):
                continue
            if g.weight_tied:
                raise QPlanError(f"{self.label} on {g.pattern}, tied to the embeddings, is not planned: leave it out of "
                                 "--targets")
            i, o = g.in_features, g.out_features
            out.append(ModuleCount(g.pattern, LOHA, f"{i}→{o}", g.instances, 2 * r * (i + o), "float32",
                                   [("hada_w1_a", [o, r]), ("hada_w1_b", [r, i]), ("hada_w2_a", [o, r]),
                                    ("hada_w2_b", [r, i])]))
        return out
