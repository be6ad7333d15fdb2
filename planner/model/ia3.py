"""(IA)³ (``--peft-type ia3``): PEFT's ``IA3Config``, counted from the spec's module inventory.

PEFT 0.21 (peft/tuners/ia3/layer.py ``IA3Layer.update_layer``) gives each targeted ``nn.Linear`` / ``Conv1D`` one
trainable vector ``ia3_l``: ``(1, in_features)`` on a feed-forward module (it scales the module's input) and
``(out_features, 1)`` on any other (it scales the output), created fp32 (``torch.randn``, then ``get_peft_model``'s
``autocast_adapter_dtype`` keeps it fp32 on a 16-bit model). Targets match as LoRA's do (``check_target_module_exists``:
the name, or a ``.``-suffix); a module is feed-forward when its name ends with a ``feedforward_modules`` entry
(``IA3Model._check_target_module_feedforward``: ``key.endswith(target_key)``, no ``.`` needed), and those must be a
subset of ``target_modules`` (``IA3Config.__post_init__``). Without them, PEFT takes its defaults per model type
(``model_specs/data/peft-ia3-defaults.json``). The oracle is PEFT's ``get_nb_trainable_parameters`` on a meta-device
model (tests/planner/test_ia3.py).
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

#: ``ModuleCount.kind`` of an (IA)³ vector: ``ia3`` scales the output, ``ia3_ff`` the input of a feed-forward module
IA3, IA3_FF = "ia3", "ia3_ff"


@cache
def ia3_defaults() -> dict[str, dict[str, list[str]]]:
    """PEFT's IA3 ``target_modules`` and ``feedforward_modules`` per model type (the bundled data file)."""
    f = resources.files("qplan.model_specs").joinpath("data/peft-ia3-defaults.json")
    d = json.loads(f.read_text(encoding="utf-8"))
    return {"target_modules": d["target_modules"], "feedforward_modules": d["feedforward_modules"]}


@dataclass(frozen=True)
class Ia3Settings:
    """``IA3Config`` fields as PEFT resolves them (None: PEFT's default for the model type)."""

    targets: str | None = None
    feedforward: tuple[str, ...] | None = None
    #: ``PlanDoc.method`` and the plan section's name
    method: ClassVar[str] = "ia3"

    def to_json(self, spec: ModelSpec) -> dict[str, Any]:
        t, ff = resolve_ia3(spec, self)
        return {"target_modules": t, "feedforward_modules": ff}

    def count(self, spec: ModelSpec, q: Any = None) -> list[ModuleCount]:
        return count_ia3(spec, self)


def resolve_ia3(spec: ModelSpec, ia3: Ia3Settings) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) PEFT ends with: the given ones (a preset is LoRA's list of names), or
    its defaults for the model type; one line where PEFT raises."""
    mt = spec.model_type
    d = ia3_defaults()
    if ia3.targets is None:
        targets = peft_default_targets(spec, d["target_modules"], "IA3",
                                       f"linear modules: {', '.join(linear_leaf_names(spec))}")
    else:
        targets = target_names(spec, ia3.targets)
    for t in targets:
        if any(e.pattern == t or e.pattern.endswith("." + t) for e in spec.inventory.embeddings):
            raise QPlanError(f"IA3 target {t!r} is an embedding: PEFT's IA3 adapts linear (and conv) modules only")
    if ia3.feedforward is None:
        if mt not in d["feedforward_modules"]:
            raise QPlanError(f"PEFT has no default IA3 feed-forward modules for model type {mt!r} ('Please specify "
                             "`feedforward_modules`'): give --feedforward-modules")
        ff = list(d["feedforward_modules"][mt])
    else:
        ff = list(ia3.feedforward)
    if (ia3.targets is None or ia3.targets.strip() != "all-linear") and not set(ff) <= set(targets):
        raise QPlanError(f"PEFT's IA3: feedforward_modules ({', '.join(sorted(set(ff) - set(targets)))}) must be a "
                         f"subset of target_modules ({', '.join(targets)})")
    return targets, ff


def count_ia3(spec: ModelSpec, ia3: Ia3Settings) -> list[ModuleCount]:
    """One ``ModuleCount`` per targeted linear group: its ``ia3_l`` vector (see the module docstring)."""
    inv = spec.inventory
    targets, ff = resolve_ia3(spec, ia3)
    out: list[ModuleCount] = []
    matched: set[str] = set()
    for t in targets:
        hits = [g for g in inv.linear if g.pattern == t or g.pattern.endswith("." + t)]
        if not hits:
            raise QPlanError(f"IA3 target {t!r} matches no linear module of {spec.name}; its linear modules are: "
                             f"{', '.join(linear_leaf_names(spec))}")
        matched.update(g.pattern for g in hits)
    for g in inv.linear:
        if g.pattern not in matched:
            continue
        if g.weight_tied:
            raise QPlanError(f"IA3 on {g.pattern}, tied to the embeddings, is not planned: leave it out of --targets")
        is_ff = any(g.pattern.replace("*", "0").endswith(k) for k in ff)
        n, key = (g.in_features, [1, g.in_features]) if is_ff else (g.out_features, [g.out_features, 1])
        out.append(ModuleCount(g.pattern, IA3_FF if is_ff else IA3, f"{g.in_features}→{g.out_features}", g.instances,
                               n, "float32", [("ia3_l", key)]))
    return out
