"""The plan document (plan.json): inputs + prediction. Compute only; rendering is in render.py.

Same inputs give a byte-identical document: no timestamps, no host names, fixed key order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import __version__
from .errors import QPlanError
from .host import host_prediction
from .lora import (
    LoraSettings,
    adapter_file_bytes,
    added_params,
    count_lora,
    moved_targets_warning,
    resolve_targets,
    trainable_params,
)
from .memory import TrainingSettings, accuracy_warning, dims, text_only_warning
from .phases import training_memory
from .spec import Gpu, ModelSpec
from .vocab import BACKENDS, BYTES, MIXED_PRECISION
from .weights import (
    QuantSettings,
    base_params,
    unquantized_experts_warning,
    weights_breakdown,
    weights_bytes,
    weights_footprint_bytes,
)

PLAN_SCHEMA_VERSION = 1
MEMORY_KEYS = ("weights", "weights_footprint", "adapters", "gradients", "optimizer", "activations",
               "logits", "temporaries", "overhead", "tensor_peak", "peak")


@dataclass(frozen=True)
class PlanInputs:
    spec: ModelSpec
    lora: LoraSettings
    quant: QuantSettings
    training: TrainingSettings
    gpu: Gpu | None
    backend: str = "peft"
    #: time and cost: tokens the run trains on, price per GPU-hour, a fitted efficiency
    tokens: int | None = None
    price_per_hour: float | None = None
    calibration: dict[str, Any] | None = None
    #: several GPUs (``planner.distributed.DistSettings``); None: one GPU
    dist: Any = None


def check_gpu_dtype(quant: QuantSettings, gpu: Gpu | None, auto_fix: bool) -> tuple[QuantSettings, list[str]]:
    """bf16 needs compute capability >= 8.0. Switch to fp16 with a warning, or fail with the fix."""
    warnings: list[str] = []
    uses_bf16 = quant.compute_dtype == "bfloat16" or quant.quant == "bf16"
    if gpu is not None and uses_bf16 and not gpu.bf16:
        if not auto_fix:
            raise QPlanError(
                f"{gpu.name} has no native bfloat16 (compute capability {gpu.compute_capability}): "
                f"use --compute-dtype fp16" + (" --quant fp16" if quant.quant == "bf16" else "")
            )
        new_quant = "fp16" if quant.quant == "bf16" else quant.quant
        quant = QuantSettings(new_quant, quant.double_quant, "float16", quant.upcast_kbit, quant.skip_modules)
        warnings.append(
            f"{gpu.name} has no native bfloat16: switched compute dtype to float16"
            + (" and weights to fp16" if new_quant == "fp16" else "")
        )
    return quant, warnings


def build_plan(inp: PlanInputs, warnings: list[str] | None = None) -> dict[str, Any]:
    spec, lora, q, t = inp.spec, inp.lora, inp.quant, inp.training
    if inp.backend not in BACKENDS:
        raise QPlanError(f"unknown backend {inp.backend!r}: choose one of {', '.join(BACKENDS)}")
    t.validate(spec)
    for note in (unquantized_experts_warning(spec, q), moved_targets_warning(spec, lora),
                 accuracy_warning(spec, lora.use_dora)):
        if note:
            warnings = [*(warnings or []), note]
    dtypes = {"bias": q.unquantized_dtype, "modules_to_save": q.unquantized_dtype}
    counts = count_lora(spec, lora, dtypes)
    note = text_only_warning(spec, counts)
    if note:
        warnings = [*(warnings or []), note]
    trainable = trainable_params(counts)
    base = base_params(spec)
    total = base + added_params(counts)
    w_detail = weights_breakdown(spec, q)
    weights = weights_bytes(spec, q)
    mem = training_memory(spec, counts, lora.r, lora.dropout, q, t, weights,
                          chunked_ce=inp.backend == "unsloth")
    host_offload = None
    if inp.backend == "unsloth":
        mem, host_offload, notes = unsloth_plan_memory(inp, counts, weights)
        warnings = [*(warnings or []), *notes]
    if inp.calibration and ("cuda_context_bytes" in inp.calibration or "allocator_slack_fraction" in inp.calibration):
        from .memory import overhead_bytes

        over = overhead_bytes(mem["tensor_peak"], inp.calibration)
        mem = {**mem, **over, "overhead": sum(over.values()), "peak": mem["tensor_peak"] + sum(over.values())}
    cpu = training_memory(spec, counts, lora.r, lora.dropout, q, t, weights,
                          chunked_ce=inp.backend == "unsloth", kernels="cpu")
    memory = {
        "weights": weights,
        "weights_footprint": weights_footprint_bytes(spec, q),
        **{k: mem[k] for k in MEMORY_KEYS if k in mem},
    }
    memory = {k: int(memory[k]) for k in MEMORY_KEYS}
    usable = inp.gpu.usable_bytes if inp.gpu else None
    prediction = {
        "method": "analytic",
        "params": {
            "base": base,
            "trainable": trainable,
            "total": total,
            "trainable_share": round(trainable / total, 8) if total else 0.0,
            "per_module": [c.to_json(BYTES[c.dtype]) for c in counts],
        },
        "adapter_file_bytes": adapter_file_bytes(spec, counts),
        "memory": memory,
        "host": host_prediction(dims(spec), q, t.batch_size, t.seq_len, t.grad_ckpt, mem["optimizer_paged"],
                                offloaded=host_offload),
        "memory_detail": {
            "weights": w_detail,
            "optimizer_paged": mem["optimizer_paged"],
            "cuda_context": mem["cuda_context"],
            "allocator_slack": mem["allocator_slack"],
            "peak_phase": mem["peak_phase"],
            "phases": mem["phases"],
            # the same step run on the CPU (qplan run --device cpu compares with this)
            "tensor_peak_cpu": cpu["tensor_peak"],
            # what each moment's bytes are (tracker categories; each adds up to its phase), and
            # the moments for CPU kernels: a report draws the moment where a run's peak was measured
            "composition": mem["composition"],
            "peak_phase_cpu": cpu["peak_phase"],
            "phases_cpu": cpu["phases"],
            "composition_cpu": cpu["composition"],
        },
        "fits": (memory["peak"] <= usable) if usable is not None else None,
        "headroom": (usable - memory["peak"]) if usable is not None else None,
    }
    prediction.update(compute_prediction(inp, counts, trainable))
    inv = spec.inventory
    doc = {
        "schema_version": PLAN_SCHEMA_VERSION,
        "qplan_version": __version__,
        "model": {
            "name": spec.name,
            "source": spec.source,
            "architecture": inv.architecture,
            "model_type": inv.model_type,
            "config": spec.config,
        },
        "lora": {**lora.to_json(), **resolve_targets(spec, lora).to_json()},
        "quant": q.to_json(),
        "training": {**t.to_json(), "mixed_precision": MIXED_PRECISION[q.compute_dtype]},
        "gpu": None if inp.gpu is None else {
            "name": inp.gpu.name,
            "usable_bytes": inp.gpu.usable_bytes,
            "total_bytes": inp.gpu.total_bytes,
            "bf16": inp.gpu.bf16,
        },
        "backend": inp.backend,
        "warnings": list(warnings or []),
        "prediction": prediction,
    }
    if inp.dist is None:
        return doc
    from .dist_plan import apply_distributed

    return apply_distributed(doc, inp, counts)


def unsloth_plan_memory(inp: PlanInputs, counts: list, weights: int) -> tuple[dict[str, Any], int, list[str]]:
    """The memory of an Unsloth plan on a GPU (``planner.unsloth_memory``: Unsloth's fast path,
    offloaded checkpointing, fused cross-entropy, RoPE cache, dequantization scratch), its host
    bytes of offloaded checkpoints, and a warning when the plan is off the fast path. Unsloth sizes
    its loss chunks from the GPU's memory: the plan's GPU, else an 80 GiB one with 60 GiB free.
    The warnings: off the fast path; an optimizer other than Unsloth's default."""
    from .unsloth_memory import (
        DEFAULT_FREE_BYTES,
        DEFAULT_TOTAL_BYTES,
        fast_path,
        fast_path_warning,
        optimizer_note,
        unsloth_memory,
    )

    spec, lora, q, t = inp.spec, inp.lora, inp.quant, inp.training
    if inp.gpu is not None:
        total = inp.gpu.total_bytes
        free = max(total - weights, 0)
    else:
        total, free = DEFAULT_TOTAL_BYTES, DEFAULT_FREE_BYTES
    fast = fast_path(spec, counts, lora.dropout, lora.bias, lora.use_dora)
    mem = unsloth_memory(spec, counts, q, t.grad_ckpt, t.batch_size, t.seq_len, weights, t.optimizer, t.grad_accum,
                         fast, total, free)
    notes = [fast_path_warning(spec, counts, lora.dropout, lora.bias, lora.use_dora), optimizer_note(t.optimizer)]
    return mem, mem.pop("host_offload"), [n for n in notes if n]


def compute_prediction(inp: PlanInputs, counts: list, trainable: int) -> dict[str, Any]:
    """``prediction.compute`` (FLOPs and bytes of one optimizer step), ``time`` and ``cost``."""
    from .compute import not_counted, step_bytes, step_flops
    from .timing import cost_prediction, time_prediction

    t, q = inp.training, inp.quant
    flops = step_flops(inp.spec, counts, inp.lora.r, q, t.batch_size, t.seq_len, t.grad_ckpt, t.attn_impl, t.grad_accum)
    moved = step_bytes(inp.spec, counts, inp.lora.r, q, t.grad_ckpt, t.optimizer, trainable, t.grad_accum)
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    device = inp.gpu.to_json() if inp.gpu is not None else None
    time = time_prediction(flops, moved, device, q.compute_dtype, tokens_per_step, inp.tokens, inp.calibration)
    if inp.tokens is not None and time is None:
        raise QPlanError("--tokens / --dataset-tokens need --gpu: the time of a step depends on the device")
    if inp.tokens is not None and time.get("step_seconds") is None:
        raise QPlanError(f"--tokens: no step time to total: {time.get('reason')}")
    if inp.calibration is not None and inp.gpu is None:
        raise QPlanError("--calibration needs --gpu: the device the calibration was fitted on")
    missing = not_counted(inp.spec, inp.lora.use_dora)
    compute = {"flops_per_step": flops, "bytes_per_step": moved,
               "flops_counted_as": "torch.utils.flop_counter.FlopCounterMode (2 m k n per matmul)"}
    if missing:
        compute["not_counted"] = missing
    return {
        "compute": compute,
        "time": time,
        "cost": cost_prediction(time, inp.price_per_hour),
    }


def attach_trace(plan: dict[str, Any], traced: dict[str, Any]) -> dict[str, Any]:
    """Put a trace of the plan's step (``qplan.observe.trace.trace_plan``) beside the analytic terms."""
    plan["prediction"]["method"] = "trace"
    plan["prediction"]["trace"] = {
        "tensor_peak": int(traced["tensor_peak"]),
        "breakdown_at_peak": {k: int(v) for k, v in traced["breakdown_at_peak"].items()},
        "phase_peaks": {k: int(v) for k, v in traced.get("phase_peaks", {}).items()},
        "trainable_params": int(traced["trainable_params"]),
        "notes": list(traced.get("notes", [])),
    }
    if "host_peak" in traced:  # the Unsloth trace books offloaded checkpoints as host memory
        plan["prediction"]["trace"]["host_peak"] = int(traced["host_peak"])
    return plan


def dumps(plan: dict[str, Any]) -> str:
    """Canonical JSON: 2-space indent, UTF-8, trailing newline."""
    return json.dumps(plan, indent=2, ensure_ascii=False) + "\n"
