"""qplan's library API: one call from options to the plan document.

    from qplan.planner.api import make_plan, plan_dict
    plan = make_plan(model="llama-3.2-3b", r=32, gpu="t4")      # a PlanDoc: plan.prediction.memory.peak
    doc = plan_dict(model="llama-3.2-3b", r=32, gpu="t4")       # == qplan estimate --format json

The CLI, ``qplan serve``, ``qplan fit``, the benchmarks and the tests call this. The options are
``planner.options.PlanOptions`` (the CLI's options, by their Python names); the plan is a typed
``planner.document.PlanDoc``, and plan.json is its encoding (``plan_dict`` / ``document.dumps``). Torch-free for
bundled specs; a config path builds its inventory with transformers on the meta device.
Bad input raises ``QPlanError`` with one line that names the option and the fix.
"""

from __future__ import annotations

from typing import Any

from qplan.planner.document import PlanDoc
from qplan.planner.model.spec import Gpu, ModelSpec
from qplan.planner.options import PlanOptions
from qplan.planner.plan import build_plan, plan_inputs
from qplan.planner.vocab import ADAPTER_DTYPES

__all__ = ["make_plan", "plan_dict", "plan_inputs", "PlanOptions", "PlanDoc", "check_consistent", "plan_settings"]

def make_plan(options: PlanOptions | dict[str, Any] | None = None, /, *, spec: ModelSpec | None = None,
              device: Gpu | None = None, **fields: Any) -> PlanDoc:
    """The plan of ``options`` — a ``PlanOptions``, or its fields as keywords (``make_plan(model="llama-3.2-3b",
    r=32)``) — as a typed ``PlanDoc`` (plan.json is its encoding: ``plan.to_dict()``, ``document.dumps``),
    with ``suggestions`` when it does not fit its GPU. ``spec`` / ``device``: see ``plan_inputs``."""
    if options is not None and fields:
        raise TypeError("make_plan takes PlanOptions or keywords, not both")
    inputs, warnings = plan_inputs(options, spec=spec, device=device, **fields)
    plan = build_plan(inputs, warnings)
    if plan.prediction.fits is False and inputs.dist is not None:
        plan.suggestions = ["`qplan fit --max-gpus N` searches the number of GPUs and the strategy"
                            + ("" if inputs.dist.cpu_offload or inputs.dist.strategy == "ddp"
                               else "; --cpu-offload moves the sharded states to host memory")]
    elif plan.prediction.fits is False:
        from qplan.planner.search.suggest import suggestions

        plan.suggestions = suggestions(inputs)
    return plan


def plan_dict(options: PlanOptions | dict[str, Any] | None = None, /, *, spec: ModelSpec | None = None,
              device: Gpu | None = None, **fields: Any) -> dict[str, Any]:
    """``make_plan(...)`` as plan.json's JSON value (what ``qplan estimate --format json`` prints)."""
    return make_plan(options, spec=spec, device=device, **fields).to_dict()


EDITED = "plan.json was edited: its prediction does not match its settings; re-create it with qplan estimate"
RESEALED = ("plan.json was edited after qplan wrote it (its content no longer matches its seal); re-create it with "
            "qplan estimate")


def plan_settings(plan: dict[str, Any]) -> dict[str, Any]:
    """The ``PlanOptions`` fields a plan.json was made from, read back from its own sections (model and GPU by
    name; the document has passed ``check_plan``)."""
    lora, quant, tr, d = plan["lora"], plan["quant"], plan["training"], plan.get("distributed")
    o: dict[str, Any] = {"model": plan["model"]["name"], "gpu": plan["gpu"]["name"] if plan.get("gpu") else None}
    if plan.get("method") == "ia3":  # (IA)³: its modules, as PEFT got them
        i3 = plan["ia3"]
        o.update({"peft_type": "ia3", "targets": ",".join(i3["target_modules"]),
                  "feedforward_modules": ",".join(i3["feedforward_modules"]) or "none"})
    elif plan.get("method") == "vera":  # its rank and modules, as PEFT got them
        o.update({"peft_type": "vera", "r": plan["vera"]["r"], "targets": ",".join(plan["vera"]["target_modules"])})
    elif plan.get("method") == "c3a":  # its block size and modules, as PEFT got them
        o.update({"peft_type": "c3a", "block_size": plan["c3a"]["block_size"],
                  "targets": ",".join(plan["c3a"]["target_modules"])})
    elif plan.get("method") == "miss":  # its rank, form and modules, as PEFT got them
        m = plan["miss"]
        o.update({"peft_type": "miss", "r": m["r"], "targets": ",".join(m["target_modules"]),
                  "miss_init": str(m["init_weights"]).lower()})
        if m["init_weights"] == "mini":
            o["mini_r"] = m["mini_r"]
    elif plan.get("method") in ("loha", "lokr"):  # its rank, alpha and modules, as PEFT got them
        lh = plan[plan["method"]]
        o.update({"peft_type": plan["method"], "r": lh["r"], "alpha": lh["alpha"],
                  "targets": ",".join(lh["target_modules"])})
        if lh.get("decompose_factor", -1) != -1:
            o["decompose_factor"] = lh["decompose_factor"]
    elif plan.get("method") == "ln_tuning":  # its norms, as PEFT got them
        o.update({"peft_type": "ln_tuning", "targets": ",".join(plan["ln_tuning"]["target_modules"])})
    elif plan.get("method") in ("prompt_tuning", "p_tuning"):  # its virtual tokens (and p-tuning's encoder)
        pt = plan[plan["method"]]
        o.update({"peft_type": plan["method"], "num_virtual_tokens": pt["num_virtual_tokens"]})
        if "encoder_hidden_size" in pt:
            o["encoder_hidden_size"] = pt["encoder_hidden_size"]
    elif lora is None:  # full fine-tuning: no LoRA options
        o["full"] = True
    else:
        targets = lora["targets"]
        o.update({
            "r": lora["r"], "alpha": lora["alpha"], "dropout": lora["dropout"],
            "targets": targets if isinstance(targets, str) else ",".join(targets), "bias": lora["bias"],
            "dora": lora["use_dora"], "rslora": lora["use_rslora"],
            "target_parameters": ",".join(lora.get("target_parameters") or []),
            "modules_to_save": ",".join(lora.get("modules_to_save") or []),
            "adapter_dtype": {v: k for k, v in ADAPTER_DTYPES.items()}[lora.get("adapter_dtype", "float32")]})
    o.update({
        "quant": quant["quant"], "compute_dtype": quant["compute_dtype"], "seq_len": tr["seq_len"],
        "batch_size": tr["batch_size"], "grad_accum": tr["grad_accum"], "grad_ckpt": tr["grad_ckpt"] != "off",
        "reentrant": tr["grad_ckpt"] == "reentrant",
        "optimizer": tr["optimizer"], "attn_impl": tr["attn_impl"], "backend": plan["backend"],
        "loss": tr.get("loss", "full"), "liger_kernels": ",".join(tr.get("liger_kernels") or []),
    })
    if tr.get("objective") in ("dpo", "kto"):  # TRL's DPO/KTO trainers (GRPO's and reward's are not read back yet)
        o["objective"] = tr["objective"]
        if tr.get("precompute_ref_log_probs"):
            o["precompute_ref_log_probs"] = True
            o["precompute_ref_batch_size"] = tr.get("precompute_ref_batch_size")
        if o.get("loss") == "trl":  # what the trainer computes with: the option's default reads the same
            o["loss"] = "full"
    if "double_quant" in quant:
        o["double_quant"] = quant["double_quant"]
    if "prepare_model_for_kbit_training" in quant:
        o["upcast"] = quant["prepare_model_for_kbit_training"]
    if d:
        o.update(gpus=d["gpus_per_node"], nodes=d["nodes"], strategy=d["strategy"], cpu_offload=d["cpu_offload"])
        if d.get("network_gbps") is not None:
            o["network_gbps"] = d["network_gbps"]
    return o


def check_consistent(plan: dict[str, Any]) -> None:
    """One line when a plan contradicts itself (``qplan run`` and ``qplan export``, before anything starts): its world
    size is not GPUs x nodes, or it was edited after qplan wrote it. A plan file qplan wrote carries a ``seal`` (the
    hash of its content, ``document.seal``): any edit — a batch size, a rank, a strategy, in a plan made from a
    bundled name, a config path, a device file, a Hub id or a trainer config's per-module ranks — no longer matches.
    A plan without a seal (``plan_dict`` of the API, or a seal removed by hand) is re-made from its settings when its
    model and GPU resolve by name (a bundled or user spec, a catalog GPU) and its tensor terms compared; otherwise
    it is checked for its world size only."""
    from qplan.planner.document import seal
    from qplan.planner.errors import QPlanError

    d = plan.get("distributed")
    if d and d["world_size"] != d["gpus_per_node"] * d["nodes"]:
        raise QPlanError(f"plan.json was edited: distributed.world_size {d['world_size']} is not gpus_per_node "
                         f"{d['gpus_per_node']} x nodes {d['nodes']}; re-create it with qplan estimate")
    if "seal" in plan:
        if plan["seal"] != seal(plan):
            raise QPlanError(RESEALED)
        return  # exactly what a qplan made, whatever its version: the settings and the prediction belong together
    if plan["prediction"]["method"] != "analytic":
        return  # a traced step's memory is measured on the meta device, not re-made from the options
    if (plan["lora"] or {}).get("rank_pattern") or (plan["lora"] or {}).get("alpha_pattern"):
        return  # per-module ranks come from a trainer config, not from options
    if "/" in plan["model"]["name"]:
        return  # a Hub id: re-making it could need the network
    from qplan.planner.model.catalog import names_only

    try:
        with names_only():
            again = make_plan(**plan_settings(plan)).to_dict()
    except QPlanError:
        if _resolvable(plan):
            raise QPlanError(EDITED) from None
        return
    # the overhead (and so the peak) may come from a calibration file, which is not among the settings
    tensors = [k for k in plan["prediction"]["memory"] if k not in ("overhead", "peak")]
    if any(again["prediction"]["memory"].get(k) != plan["prediction"]["memory"][k] for k in tensors):
        raise QPlanError(EDITED)


def _resolvable(plan: dict[str, Any]) -> bool:
    """Whether the plan's model and GPU are found by name (else its settings cannot be re-made here)."""
    from qplan.planner.errors import QPlanError
    from qplan.planner.model.catalog import load_gpu, load_spec, names_only

    try:
        with names_only():
            load_spec(plan["model"]["name"])
            if plan.get("gpu"):
                load_gpu(plan["gpu"]["name"])
    except QPlanError:
        return False
    return True
