"""``qplan compare``: full fine-tuning, LoRA and QLoRA side by side for one model, GPU and batch shape.

Each method is a whole plan (``api.plan_dict``, what ``qplan estimate`` prints for it) made from the same options with
only what defines the method changed:

* ``full`` — ``--full``: every parameter trains; the weights load in the given 16/32-bit dtype, else bf16;
* ``lora`` — LoRA over a 16/32-bit base: the given dtype, else bf16;
* ``qlora`` — LoRA over a 4-bit base: the given nf4/fp4, else nf4 (bitsandbytes, double quantization as given);
* ``dora`` — ``lora`` with DoRA's magnitude vectors;
* ``lorafa`` — ``lora`` trained by PEFT's LoRA-FA optimizer (``lora_A`` frozen);
* ``loha`` — LoHa with the rank and alpha given and PEFT's default targets for the model type (unless given), over a
  16/32-bit base;
* ``lokr`` — LoKr, likewise (with ``--decompose-factor`` when given);
* ``vera`` — VeRA with the rank given, likewise;
* ``miss`` — MiSS with the rank given (and ``--miss-init``, ``--mini-r`` when given), likewise;
* ``c3a`` — C3A with ``--block-size`` (PEFT's 256 by default) and the targets given, likewise;
* ``ia3`` — (IA)³ with PEFT's default targets for the model type, over a 16/32-bit base;
* ``ln_tuning`` — LN tuning of PEFT's default norms for the model type, over a 16/32-bit base;
* ``prompt_tuning`` — prompt tuning with the ``--num-virtual-tokens`` given, over a 16/32-bit base;
* ``p_tuning`` — p-tuning with the ``--num-virtual-tokens`` and ``--encoder-hidden-size`` given, likewise.

The LoRA options given (rank, targets, ...) apply to the LoRA methods and are set aside for the others, as each
method's own options (``--feedforward-modules``, ``--num-virtual-tokens``, ``--encoder-hidden-size``) are for the
rest. A method the
planner cannot plan here (full fine-tuning over several GPUs, say) is a row with its one-line reason, not a failure
of the whole comparison. Torch-free.
"""

from __future__ import annotations

from typing import Any

from qplan.planner.errors import QPlanError, shown
from qplan.planner.methods import LORA_ONLY, METHOD_OPTIONS
from qplan.planner.options import FULL_QUANT, PlanOptions, as_dict
from qplan.planner.vocab import FOUR_BIT, KBIT

#: the methods ``qplan compare`` knows, in the order it lists them by default
METHODS = ("full", "lora", "qlora", "dora", "lorafa", "loha", "lokr", "vera", "miss", "c3a", "ia3", "ln_tuning",
           "prompt_tuning", "p_tuning")
DEFAULT_METHODS = ("full", "lora", "qlora")


def parse_methods(text: str) -> tuple[str, ...]:
    """``full,lora,qlora`` as a tuple of known methods (each once, in the order given); one line otherwise."""
    names = [m.strip() for m in str(text).split(",") if m.strip()]
    if not names:
        raise QPlanError(f"--methods is empty: give a comma-separated list of {', '.join(METHODS)}")
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise QPlanError(f"--methods: unknown method {shown(bad[0])}: choose from {', '.join(METHODS)}")
    return tuple(dict.fromkeys(names))


def method_options(options: dict[str, Any], method: str) -> dict[str, Any]:
    """The options of one method: ``options`` with only what defines ``method`` changed (see the module docstring)."""
    o = dict(options)
    given = o.get("quant")
    defaults = as_dict(PlanOptions())
    o.update({k: defaults[k] for k, (owners, _) in METHOD_OPTIONS.items() if method not in owners})
    if method in ("full", "ia3", "prompt_tuning", "p_tuning", "ln_tuning"):
        o.update({k: defaults[k] for k in LORA_ONLY})
        if o.get("optimizer") == "lorafa":
            o["optimizer"] = defaults["optimizer"]
    if method == "full":
        return {**o, "full": True, "quant": given if given and given not in KBIT else FULL_QUANT}
    o["full"] = False
    if method in ("ia3", "prompt_tuning", "p_tuning", "ln_tuning"):
        return {**o, "peft_type": method, "quant": given if given and given not in KBIT else FULL_QUANT}
    if method in ("loha", "lokr", "vera", "miss", "c3a"):  # LoRA's rank (alpha) and targets are theirs, not the rest
        o.update({k: defaults[k] for k in LORA_ONLY if k not in ("r", "alpha", "targets") or (
            method in ("vera", "miss", "c3a") and k == "alpha") or (method == "c3a" and k == "r")})
        if o.get("optimizer") == "lorafa":
            o["optimizer"] = defaults["optimizer"]
        return {**o, "peft_type": method, "quant": given if given and given not in KBIT else FULL_QUANT}
    if method == "qlora":
        return {**o, "quant": given if given in FOUR_BIT else "nf4"}
    o["quant"] = given if given and given not in KBIT else FULL_QUANT
    if method == "dora":
        o["dora"] = True
    if method == "lorafa":
        o["optimizer"] = "lorafa"
    return o


def compare_methods(options: dict[str, Any], methods: tuple[str, ...] = DEFAULT_METHODS) -> dict[str, Any]:
    """One row per method: its quantization, trainable parameters, peak and verdict, step time and cost (a plan's
    numbers, read from ``plan_dict``), or its one-line reason when it cannot be planned."""
    from qplan.planner.api import plan_dict

    rows: list[dict[str, Any]] = []
    model = gpu = None
    for method in methods:
        try:
            plan = plan_dict(**method_options(options, method))
        except QPlanError as exc:
            rows.append({"method": method, "error": str(exc)})
            continue
        p = plan["prediction"]
        model, gpu = plan["model"]["name"], (plan.get("gpu") or {}).get("name")
        time, cost = p.get("time") or {}, p.get("cost") or {}
        row = {"method": method, "quant": plan["quant"]["quant"], "compute_dtype": plan["quant"]["compute_dtype"],
               "trainable": p["params"]["trainable"], "total_params": p["params"]["total"],
               "peak": p["memory"]["peak"], "tensor_peak": p["memory"]["tensor_peak"],
               "peak_phase": p["memory_detail"]["peak_phase"], "fits": p["fits"], "headroom": p["headroom"],
               "step_seconds": time.get("step_seconds"), "tokens_per_second": time.get("tokens_per_second")}
        if time.get("total_seconds") is not None:
            row["total_seconds"] = time["total_seconds"]
        if cost:
            row["total_cost" if cost.get("total") is not None else "cost_per_step"] = cost.get("total", cost.get("per_step"))
        row["warnings"] = plan["warnings"]
        rows.append(row)
    if all("error" in r for r in rows):  # nothing to compare: the first reason is the command's
        raise QPlanError(rows[0]["error"])
    return {"model": model, "gpu": gpu, "methods": rows}
