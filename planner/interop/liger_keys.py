"""Liger-Kernel keys of the trainer configs that are not axolotl's plugin (``axolotl_plugins``): TRL's
``use_liger_kernel`` / ``liger_kernel_config``."""

from __future__ import annotations

from typing import Any

from qplan.planner.errors import QPlanError, shown
from qplan.planner.vocab import LIGER_KERNELS


def trl_liger(r: Any, o: dict[str, Any]) -> None:
    """``use_liger_kernel`` (TRL 1.16 ``SFTTrainer.__init__``): Liger's layer kernels only — the trainer turns the fused
    linear cross-entropy off and keeps its own fused LM head — as transformers applies them
    (``_apply_liger_kernel_to_instance`` with the patch's defaults: RMSNorm, SwiGLU, RoPE), each switchable in
    ``liger_kernel_config``; any other kernel turned on there is refused."""
    r.used.add("liger_kernel_config")
    if not r.typed("use_liger_kernel", bool, False):
        return
    cfg = r.typed("liger_kernel_config", dict, None) or {}
    other = sorted(k for k, v in cfg.items() if k not in LIGER_KERNELS and v)
    if other:
        raise QPlanError(f"trl config: liger_kernel_config turns on {', '.join(map(str, other))}, which qplan does not "
                         f"plan (it plans {', '.join(LIGER_KERNELS)})")
    for k in LIGER_KERNELS:
        if not isinstance(cfg.get(k, True), bool):
            raise QPlanError(f"trl config: liger_kernel_config.{k} must be bool, got {shown(cfg[k])}")
    kernels = [k for k in LIGER_KERNELS if cfg.get(k, True)]
    if kernels:
        o["liger_kernels"] = ",".join(kernels)
