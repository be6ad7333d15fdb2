"""axolotl's plugins and kernel keys (``plugins:``, ``liger_*``, ...): what each does to a step's memory, read from
axolotl 0.19's ``integrations/*/args.py``; the ones that change it are refused by name until planned."""

from __future__ import annotations

from typing import Any

from qplan.planner.errors import QPlanError, shown
from qplan.planner.interop.notes import note

#: axolotl plugins (``plugins:``) by class path; what each does to training memory (axolotl 0.19 ``integrations/``)
AXOLOTL_CCE = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
AXOLOTL_LIGER = "axolotl.integrations.liger.LigerPlugin"
AXOLOTL_KERNELS = "axolotl.integrations.kernels.KernelsPlugin"
AXOLOTL_EP = "axolotl.integrations.expert_parallel.ExpertParallelPlugin"
#: plugins that only log or evaluate: nothing per GPU
#: axolotl's Liger keys qplan plans -> ``--liger-kernels`` names (None: the loss, or a key that patches nothing in
#: RMSNorm models)
LIGER_KEYS = {"liger_fused_linear_cross_entropy": None, "liger_rms_norm": "rms_norm", "liger_glu_activation": "swiglu",
              "liger_swiglu": "swiglu", "liger_rope": "rope", "liger_layer_norm": None}
AXOLOTL_PLUGINS_NO_EFFECT = {"axolotl.integrations.swanlab.SwanLabPlugin", "axolotl.integrations.lm_eval.LMEvalPlugin"}


def axolotl_plugins(r: Any, o: dict[str, Any]) -> None:
    """Plugins and the kernel keys that change what a step holds are planned (into the options ``o``) or refused by
    name, never planned as the plain stack (axolotl 0.19 ``integrations/*/args.py``):

    * Cut Cross Entropy: ``cut_cross_entropy`` defaults to true once the plugin is loaded — the loss without
      the full-vocabulary logits: ``loss: cce`` (``cut_cross_entropy: false`` keeps the full logits);
    * Liger (with the plugin loaded): ``liger_fused_linear_cross_entropy`` is the loss without the logits
      (``loss: liger``); ``liger_rms_norm``, ``liger_glu_activation``, ``liger_rope`` are ``liger_kernels``
      (``rms_norm``, ``swiglu``, ``rope``); ``liger_layer_norm`` patches nothing in a model with RMSNorms (Liger's
      patch of such a model type has no LayerNorm; named in a warning); the others (``liger_cross_entropy``,
      ``liger_rms_norm_gated``, token scaling) are refused by name;
    * Kernels (MoE / attention kernels), expert parallelism beyond 1, ``quantize_moe_experts`` (experts
      quantized on load), ``fused_attn_kernel``.

    Other plugins are named in a warning (their memory effect is not planned)."""
    plugins = r.get("plugins", [])
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise QPlanError(f"axolotl config: plugins must be a list of plugin class paths, got {shown(plugins)}")
    if AXOLOTL_CCE in plugins:
        cce = r.typed("cut_cross_entropy", bool, True)  # CutCrossEntropyArgs: default True once the plugin is loaded
        r.used.add("cut_cross_entropy")
        if cce:
            o["loss"] = "cce"
    flce = "liger_fused_linear_cross_entropy"
    other = sorted(k for k in r.cfg if k.startswith("liger_") and k not in LIGER_KEYS and r.cfg[k])
    r.used.update(k for k in r.cfg if k.startswith("liger_"))
    if other:
        raise QPlanError(f"axolotl config: {', '.join(other)}: Liger's kernels here change what a step saves in a way "
                         "qplan does not plan yet: turn them off")
    on = [k for k in LIGER_KEYS if r.typed(k, bool, False)]
    if on and AXOLOTL_LIGER not in plugins:
        raise QPlanError(f"axolotl config: {', '.join(on)} without plugins: [{AXOLOTL_LIGER}] does nothing in axolotl: "
                         "add the plugin or remove the keys")
    if flce in on:
        if o.get("loss") == "cce":
            raise QPlanError(f"axolotl config: Cut Cross Entropy and {flce} both replace the loss: keep one")
        o["loss"] = "liger"
    kernels = [LIGER_KEYS[k] for k in on if LIGER_KEYS[k]]
    if kernels:
        o["liger_kernels"] = ",".join(kernels)
    if "liger_layer_norm" in on:
        r.warnings.append(note("ignored", "axolotl config: liger_layer_norm patches no module of a model with RMSNorms "
                               "(Liger's patch of such a model type has no LayerNorm); in a LayerNorm model Liger's "
                               "LayerNorm is not planned"))
    if AXOLOTL_KERNELS in plugins:
        raise QPlanError("axolotl config: plugins: KernelsPlugin swaps in MoE / attention kernels qplan does not model: "
                         "remove it")
    ep = r.get("expert_parallel_size", 1)
    if ep != 1:
        raise QPlanError(f"axolotl config: expert_parallel_size {shown(ep)} shards the experts over GPUs, which qplan "
                         "does not plan: remove it")
    r.refuse({"quantize_moe_experts"}, "quantizes the experts on load, which qplan does not plan (it plans them "
                                       "16-bit): remove it")
    r.refuse({"fused_attn_kernel"}, "changes the attention kernels, which qplan does not model: remove it")
    other = [p for p in plugins if p not in {AXOLOTL_CCE, AXOLOTL_LIGER, AXOLOTL_EP} | AXOLOTL_PLUGINS_NO_EFFECT]
    if other:
        r.warnings.append(note("ignored", f"axolotl config: plugins whose memory qplan does not plan (ignored): "
                               f"{', '.join(other)}"))
