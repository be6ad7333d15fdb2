"""C3A (``--peft-type c3a``): PEFT's ``C3AConfig`` (circular convolution adaptation), counted from the spec.

PEFT 0.21 (peft/tuners/c3a/layer.py ``C3ALayer.update_layer``) gives each targeted ``nn.Linear`` one fp32 kernel,
``c3a_kernel`` ``(out / b, in / b, b)`` (``b``: ``block_size``, which must divide both ``in`` and ``out``; fp32 whatever
the model's dtype: bf16 has no FFT). The forward adds ``BlockCircularConvolution(x.float(), kernel) / in`` — a block
circulant matrix applied through FFTs — to the base output. Targets as LoRA's (PEFT's C3A table, but for GPT-2's);
``--block-size`` with PEFT's default (256). The oracle is PEFT's ``get_nb_trainable_parameters`` on a meta-device
model (tests/planner/test_c3a.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from qplan.planner.errors import QPlanError
from qplan.planner.model.loha import LohaSettings
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.spec import ModelSpec

#: ``ModuleCount.kind`` of a C3A-adapted linear group
C3A = "c3a"
#: ``C3AConfig.block_size``'s default
C3A_BLOCK = 256


@dataclass(frozen=True)
class C3aSettings(LohaSettings):
    """``C3AConfig`` fields as qplan gives them (``targets`` None: PEFT's default for the model type; ``r`` and
    ``alpha`` unused: C3A has neither)."""

    block_size: int = C3A_BLOCK
    method: ClassVar[str] = "c3a"
    label: ClassVar[str] = "C3A"
    #: ``TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING`` (PEFT 0.21): LoRA's, but for GPT-2's
    default_overrides: ClassVar[dict[str, list[str]]] = {"gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}

    def to_json(self, spec: ModelSpec) -> dict[str, Any]:
        return {"block_size": self.block_size, "init_weights": "xavier_uniform", "target_modules": self.resolve(spec)}

    def count(self, spec: ModelSpec, q: Any = None) -> list[ModuleCount]:
        """Per targeted group its kernel (see the module docstring); one line naming PEFT's constraint a module
        breaks."""
        b = self.block_size
        out = []
        for c in super().count(spec, q):  # LoHa's target checks and modules
            i, o = c.save_keys[1][1][1], c.save_keys[0][1][0]
            if i % b or o % b:
                raise QPlanError(f"C3A --block-size {b} on {c.module} ({i}→{o}): PEFT needs the block size to divide "
                                 "both in_features and out_features (give a common divisor)")
            out.append(ModuleCount(c.module, C3A, c.shape, c.instances, o * i // b, "float32",
                                   [("c3a_kernel", [o // b, i // b, b])]))
        return out
