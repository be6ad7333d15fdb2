"""VeRA (``--peft-type vera``): PEFT's ``VeraConfig``, counted from the spec's module inventory.

PEFT 0.21 (peft/tuners/vera) shares one pair of frozen random projections across every targeted module — ``vera_A``
``(r, max in)`` and ``vera_B`` ``(max out, r)``, fp32 buffers (``BufferDict``) sized for the widest module, sliced
per module — and trains two fp32 vectors per module: ``vera_lambda_d`` ``(r)`` and ``vera_lambda_b`` ``(out)``. The
forward adds ``lambda_b * F.linear(lambda_d * F.linear(x, A), B)``. ``save_projection`` (PEFT's default) writes the
projections into the adapter file as ``base_model.vera_A`` / ``vera_B``. Targets as LoRA's (PEFT's LoRA defaults for
the model type when none are given); ``--r`` with qplan's default (16; ``VeraConfig``'s own is 256). The oracle is
PEFT's ``get_nb_trainable_parameters`` on a meta-device model (tests/planner/test_vera.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from qplan.planner.model.loha import LohaSettings
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.spec import ModelSpec

#: ``ModuleCount.kind`` of a VeRA-adapted linear group (its two vectors), and of the shared frozen projections
VERA, VERA_PROJECTION = "vera", "vera_projection"


@dataclass(frozen=True)
class VeraSettings(LohaSettings):
    """``VeraConfig`` fields as qplan gives them (``targets`` None: PEFT's default for the model type)."""

    method: ClassVar[str] = "vera"
    label: ClassVar[str] = "VeRA"
    #: ``TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING`` (PEFT 0.21): LoRA's, but for phi
    default_overrides: ClassVar[dict[str, list[str]]] = {"phi": ["q_proj", "v_proj"]}

    def to_json(self, spec: ModelSpec) -> dict[str, Any]:
        return {"r": self.r, "target_modules": self.resolve(spec), "save_projection": True}

    def count(self, spec: ModelSpec, q: Any = None) -> list[ModuleCount]:
        """Per targeted group its two vectors, then the shared projections (on the device and in the file, not
        trained)."""
        r = self.r
        out = []
        widest_in = widest_out = 0
        for c in super().count(spec, q):  # LoHa's target checks and modules
            i, o = c.save_keys[1][1][1], c.save_keys[0][1][0]
            widest_in, widest_out = max(widest_in, i), max(widest_out, o)
            out.append(ModuleCount(c.module, VERA, c.shape, c.instances, r + o, "float32",
                                   [("vera_lambda_b", [o]), ("vera_lambda_d", [r])]))
        out.append(ModuleCount("vera", VERA_PROJECTION, f"A {r}×{widest_in}, B {widest_out}×{r}", 1,
                               r * widest_in + widest_out * r, "float32",
                               [("vera_A", [r, widest_in]), ("vera_B", [widest_out, r])]))
        return out
