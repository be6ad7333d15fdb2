"""MiSS (``--peft-type miss``): PEFT's ``MissConfig`` (formerly Bone), counted from the spec's module inventory.

PEFT 0.21 (peft/tuners/miss/layer.py ``MissLayer.update_layer``) gives each targeted ``nn.Linear`` one fp32 block,
``miss_block``, shaped by ``init_weights``:

* ``True`` / ``False`` (MiSS's default; zeros or Kaiming-random): ``(r, out)``. The forward adds
  ``sum(x.reshape(…, in / r, r), -2) @ miss_block`` to the base output (the input zero-padded to a multiple of ``r``);
* ``"mini"``: ``(r, mini_r)``, repeated ``out / mini_r`` times along the output at every forward
  (``out % mini_r == 0``);
* ``"bat"``: ``(out / r, r, r)``; every forward builds the whole weight ``W + W_blocks @ B + B`` and runs ``F.linear``
  with it (``in % r == 0`` and ``out % r == 0``).

``r`` must be at most ``in`` for every module (``r <= in_features``). Targets as LoRA's (PEFT's MiSS table equals
its LoRA table: ``model_specs/data/peft-lora-defaults.json``); ``--r`` with qplan's default (16; ``MissConfig``'s own is
64). The oracle is PEFT's ``get_nb_trainable_parameters`` on a meta-device model (tests/planner/test_miss.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from qplan.planner.errors import QPlanError
from qplan.planner.model.loha import LohaSettings
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.spec import ModelSpec

#: ``ModuleCount.kind`` of a MiSS-adapted linear group, by the forward PEFT runs (``MissLinear.miss_fn``)
MISS, MISS_MINI, MISS_BAT = "miss", "miss_mini", "miss_bat"
MISS_KINDS = {"default": MISS, "mini": MISS_MINI, "bat": MISS_BAT}
#: ``--miss-init``: PEFT's ``init_weights`` values (``true``: zeros, ``false``: Kaiming-random; same shapes)
MISS_INITS = ("true", "false", "bat", "mini")


@dataclass(frozen=True)
class MissSettings(LohaSettings):
    """``MissConfig`` fields as qplan gives them (``targets`` None: PEFT's default for the model type; ``alpha`` unused:
    MiSS has no scaling)."""

    init: str = "true"
    mini_r: int = 1
    method: ClassVar[str] = "miss"
    label: ClassVar[str] = "MiSS"

    @property
    def fn(self) -> str:
        """The forward PEFT runs (``MissLinear.miss_fn``): ``bat``, ``mini`` or the default."""
        return self.init if self.init in ("bat", "mini") else "default"

    def to_json(self, spec: ModelSpec) -> dict[str, Any]:
        init: bool | str = {"true": True, "false": False}.get(self.init, self.init)
        return {"r": self.r, "init_weights": init, "mini_r": self.mini_r, "miss_dropout": 0.0,
                "target_modules": self.resolve(spec)}

    def block_shape(self, i: int, o: int, module: str) -> list[int]:
        """One module's ``miss_block`` shape; one line naming PEFT's constraint the module breaks."""
        r = self.r
        if r > i:
            raise QPlanError(f"MiSS r={r} on {module}: PEFT needs r <= in_features ({i})")
        if self.fn == "bat":
            if i % r or o % r:
                raise QPlanError(f"MiSS --miss-init bat on {module} ({i}→{o}): PEFT needs in_features and out_features "
                                 f"divisible by r={r} (the weight is cut into r × r blocks)")
            return [o // r, r, r]
        if self.fn == "mini":
            if o % self.mini_r:
                raise QPlanError(f"MiSS --mini-r {self.mini_r} on {module} ({i}→{o}): PEFT needs out_features divisible "
                                 "by mini_r (the block is repeated along the output)")
            return [r, self.mini_r]
        return [r, o]

    def count(self, spec: ModelSpec, q: Any = None) -> list[ModuleCount]:
        """Per targeted group its one block (see the module docstring)."""
        out = []
        for c in super().count(spec, q):  # LoHa's target checks and modules
            i, o = c.save_keys[1][1][1], c.save_keys[0][1][0]
            shape = self.block_shape(i, o, c.module)
            n = 1
            for s in shape:
                n *= s
            out.append(ModuleCount(c.module, MISS_KINDS[self.fn], c.shape, c.instances, n, "float32", [("miss_block", shape)]))
        return out
