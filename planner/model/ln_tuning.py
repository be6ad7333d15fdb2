"""LN tuning (``--peft-type ln_tuning``): PEFT's ``LNTuningConfig``, counted from the spec's module inventory.

PEFT 0.21 (peft/tuners/ln_tuning/layer.py ``LNTuningLayer``) wraps each targeted module and trains a ``deepcopy`` of
it (``ln_tuning_layers``) in the module's own dtype — LN tuning skips ``autocast_adapter_dtype``
(``LNTuningModel._cast_adapter_dtype`` does nothing) — while the original stays frozen beside it; the forward runs
the copy. Targets match as LoRA's do (``check_target_module_exists``: the name, or a ``.``-suffix); without them,
PEFT takes its defaults per model type (``model_specs/data/peft-ln-tuning-defaults.json``: Llama's input, post-attention
and final norms; Qwen2/3's post-attention norms only). qplan plans the copies of norms (RMSNorm / LayerNorm: their
1-D weight and bias); a copy of a linear layer or an embedding is refused. The adapter file holds every copy's
parameters (``…norm.ln_tuning_layers.weight``). The oracle is PEFT's ``get_nb_trainable_parameters`` on a
meta-device model (tests/planner/test_ln_tuning.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, ClassVar

from qplan.planner.errors import QPlanError
from qplan.planner.model.lora import ModuleCount, peft_default_targets
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import QuantSettings

#: ``ModuleCount.kind`` of a trained copy of a norm
LN_TUNING = "ln_tuning"


@cache
def ln_tuning_defaults() -> dict[str, list[str]]:
    """PEFT's LN tuning ``target_modules`` per model type (the bundled data file)."""
    f = resources.files("qplan.model_specs").joinpath("data/peft-ln-tuning-defaults.json")
    return json.loads(f.read_text(encoding="utf-8"))["target_modules"]


def norm_modules(spec: ModelSpec) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """The norms of ``spec`` by module pattern: modules whose parameters are 1-D ``weight`` / ``bias`` and that hold
    no linear layer or embedding (an attention block's ``sinks`` is not a norm)."""
    inv = spec.inventory
    owners = [g.pattern for g in inv.linear + inv.embeddings]
    out: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for p in inv.params:
        out.setdefault(p.pattern, []).append((p.param, tuple(p.shape)))
    return {m: ps for m, ps in out.items()
            if all(name in ("weight", "bias") and len(shape) == 1 for name, shape in ps)
            and not any(o.startswith(m + ".") for o in owners)}


def _matches(pattern: str, target: str) -> bool:
    return pattern == target or pattern.endswith("." + target)


def _check_planned(spec: ModelSpec, norms: dict[str, Any], chosen: dict[str, Any]) -> None:
    """One line for the trained norms whose step is not planned: none inside the decoder layers (the gradient would
    stop at the final norm), a norm other than a residual-stream one (``hidden_size`` wide) or Qwen3's per-head
    ``q_norm`` / ``k_norm`` (DeepSeek's ``kv_a_layernorm``), and Gemma's four norms per layer without the input norm
    (where layer 0's gradient would start is not derived)."""
    h = int((spec.config.get("text_config") or spec.config).get("hidden_size") or 0)
    layer = {m: ps for m, ps in chosen.items() if "*" in m}
    if not layer:
        raise QPlanError("LN tuning of no norm inside the decoder layers (the final norm alone) is not planned: add "
                         "input_layernorm or post_attention_layernorm to --targets")
    for m, ps in layer.items():
        leaf = m.rsplit(".", 1)[-1]
        if ps[0][1] != (h,) and leaf not in ("q_norm", "k_norm"):
            raise QPlanError(f"LN tuning of {leaf} is not planned (only the residual-stream norms and q_norm/k_norm)")
    residual = [m for m, ps in norms.items() if "*" in m and ps[0][1] == (h,)]
    if len(residual) >= 4 and not any(m.endswith(".input_layernorm") for m in layer):
        raise QPlanError("LN tuning of Gemma's norms without input_layernorm is not planned: add it to --targets")


@dataclass(frozen=True)
class LnTuningSettings:
    """``LNTuningConfig`` fields as PEFT resolves them (None: PEFT's default for the model type)."""

    targets: str | None = None
    #: ``PlanDoc.method`` and the plan section's name
    method: ClassVar[str] = "ln_tuning"

    def resolve(self, spec: ModelSpec) -> list[str]:
        """The target module names PEFT ends with; one line where PEFT raises or qplan does not plan the copy."""
        if self.targets is None:
            norms = sorted({m.rsplit(".", 1)[-1] for m in norm_modules(spec)})
            return peft_default_targets(spec, ln_tuning_defaults(), "LN tuning", f"its norms: {', '.join(norms)}")
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not names:
            raise QPlanError("--targets is empty: give the norms to tune, e.g. input_layernorm,post_attention_layernorm")
        return names

    def to_json(self, spec: ModelSpec) -> dict[str, Any]:
        return {"target_modules": self.resolve(spec)}

    def count(self, spec: ModelSpec, q: QuantSettings) -> list[ModuleCount]:
        """One ``ModuleCount`` per targeted norm: its copy's parameters, in the norm's own dtype."""
        inv = spec.inventory
        norms = norm_modules(spec)
        targets = self.resolve(spec)
        for t in targets:
            other = [g.pattern for g in inv.linear + inv.embeddings if _matches(g.pattern, t)]
            if other:
                raise QPlanError(f"LN tuning of {other[0]} (a linear layer or an embedding: a trained full copy) is not "
                                 "planned: target norms")
            if not any(_matches(m, t) for m in norms) and not any(_matches(p.pattern, t) for p in inv.params):
                raise QPlanError(f"LN tuning target {t!r} matches no norm of {spec.name}; its norms are: "
                                 f"{', '.join(sorted({m.rsplit('.', 1)[-1] for m in norms}))}")
            if not any(_matches(m, t) for m in norms):
                raise QPlanError(f"LN tuning target {t!r} is not a norm of {spec.name}: only copies of norms are planned")
        instances = {p.pattern: p.instances for p in inv.params}
        chosen = {m: params for m, params in norms.items() if any(_matches(m, t) for t in targets)}
        _check_planned(spec, norms, chosen)
        out = []
        for m, params in chosen.items():
            n = sum(math.prod(shape) for _, shape in params)
            keys = [(f"ln_tuning_layers.{name}", list(shape)) for name, shape in params]
            out.append(ModuleCount(m, LN_TUNING, f"norm {params[0][1][0]}", instances[m], n, q.unquantized_dtype,
                                   keys))
        return out
