"""`qplan estimate --method trace`: attach an exact live-tensor trace of one training step.

Runs `planner.trace.trace_training_step` (torch, transformers, peft on the meta device) with the
plan's own settings, so the analytic terms and the trace sit side by side in the plan.
"""

from __future__ import annotations

from typing import Any

from .errors import QPlanError


def trace_for_plan(plan: dict[str, Any], device: str = "meta", steps: int = 2) -> dict[str, Any]:
    try:
        from .trace import trace_training_step
    except ImportError as exc:  # pragma: no cover - only without the train extra
        raise QPlanError("--method trace needs torch, transformers and peft: pip install 'qplan[train]'") from exc
    lora, q, t = plan["lora"], plan["quant"], plan["training"]
    try:
        return trace_training_step(
            plan["model"]["config"],
            quant=q["quant"],
            double_quant=bool(q.get("double_quant", False)),
            compute_dtype={"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[q["compute_dtype"]],
            upcast_kbit=bool(q.get("prepare_model_for_kbit_training", False)),
            lora={
                "r": lora["r"], "alpha": lora["alpha"], "dropout": lora["dropout"],
                "target_modules": lora["target_modules"], "bias": lora["bias"],
                "use_dora": lora["use_dora"], "use_rslora": lora["use_rslora"],
                "modules_to_save": lora["modules_to_save"] or None,
            },
            batch_size=t["batch_size"], seq_len=t["seq_len"], grad_ckpt=t["grad_ckpt"] != "off",
            optimizer=t["optimizer"], attn_impl=t["attn_impl"], device=device, steps=steps,
        )
    except ImportError as exc:  # pragma: no cover
        raise QPlanError(f"--method trace needs the train extra ({exc.name} missing): pip install 'qplan[train]'") from exc


def attach_trace(plan: dict[str, Any]) -> dict[str, Any]:
    tr = trace_for_plan(plan)
    plan["prediction"]["method"] = "trace"
    plan["prediction"]["trace"] = {
        "tensor_peak": int(tr["tensor_peak"]),
        "breakdown_at_peak": {k: int(v) for k, v in tr["breakdown_at_peak"].items()},
        "phase_peaks": {k: int(v) for k, v in tr.get("phase_peaks", {}).items()},
        "trainable_params": int(tr["trainable_params"]),
        "notes": list(tr.get("notes", [])),
    }
    return plan
