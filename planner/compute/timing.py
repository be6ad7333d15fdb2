"""How long a step takes and what the run costs: a roofline on counted FLOPs and bytes.

``step_seconds = (max(F / P, W / BW) + (D + O) / BW) / efficiency + overhead`` where ``F`` is the step's FLOPs
(``planner.compute.flops.step_flops``, checked against ``FlopCounterMode``), ``W`` the base weights the
matmuls read, ``D`` the 4-bit dequantization traffic and ``O`` the optimizer's, ``P`` the device's
dense 16-bit peak (``peak_bf16_tflops`` or ``peak_fp16_tflops`` of the GPU catalog) and ``BW`` its
memory bandwidth. The matmuls and their weight reads overlap (a roofline: whichever bounds);
dequantization and the optimizer are separate memory-bound kernels.

``efficiency`` is the fraction of that roofline a real step reaches (kernel launch gaps,
non-matmul ops, attention's causal half, small-matrix inefficiency) and ``overhead`` the seconds
per step that do not scale with the work. Until they are fitted they are the named assumptions
``DEFAULT_EFFICIENCY`` and 0; ``qplan calibrate RUN_DIRS`` fits both from measured runs of one
device (``reports/runs``) into a calibration file, which later plans use and cite.
"""

from __future__ import annotations

import math
from typing import Any

from qplan.planner.errors import QPlanError

#: Fraction of the roofline a LoRA step reaches. An uncalibrated assumption (not measured by
#: qplan): plans that use it say so; `qplan calibrate` replaces it with a fitted value per device.
DEFAULT_EFFICIENCY = 0.5


def device_peak(device: dict[str, Any], compute_dtype: str) -> tuple[float | None, float | None]:
    """(peak FLOP/s, bandwidth B/s) of a catalog device for the plan's compute dtype; fp32 compute
    has no catalog figure (None)."""
    key = {"bfloat16": "peak_bf16_tflops", "float16": "peak_fp16_tflops", "float32": "peak_fp32_tflops"}[compute_dtype]
    tflops = device.get(key)
    bw = device.get("memory_bandwidth_gb_s")
    return (tflops * 1e12 if tflops else None), (bw * 1e9 if bw else None)


def ideal_step_seconds(flops: dict[str, int], moved: dict[str, int], peak: float, bandwidth: float) -> float:
    """The roofline time of one step (efficiency 1): ``max(F/P, W/BW) + (D + O)/BW``."""
    return max(flops["total"] / peak, moved["weights"] / bandwidth) + (moved["dequantization"] + moved["optimizer"]) / bandwidth


def time_prediction(flops: dict[str, int], moved: dict[str, int], device: dict[str, Any] | None, compute_dtype: str,
                    tokens_per_step: int, tokens: int | None, calibration: dict[str, Any] | None) -> dict[str, Any] | None:
    """``prediction.time``: step seconds, tokens/s and (given a token budget) steps and total seconds."""
    if device is None:
        return None
    peak, bw = device_peak(device, compute_dtype)
    if peak is None or bw is None:
        return {"device": device.get("name"), "step_seconds": None,
                "reason": f"the catalog has no {compute_dtype} throughput or bandwidth for {device.get('name')}"}
    if calibration is not None:
        eff, source = float(calibration["efficiency"]), str(calibration.get("source", "calibration"))
        overhead = float(calibration.get("overhead_seconds", 0.0))
    else:
        eff, source = DEFAULT_EFFICIENCY, "assumption (qplan.planner.compute.timing.DEFAULT_EFFICIENCY, not calibrated)"
        overhead = 0.0
    ideal = ideal_step_seconds(flops, moved, peak, bw)
    step = ideal / eff + overhead
    out: dict[str, Any] = {
        "device": device.get("name"),
        # a catalog GPU has a CUDA compute capability; a CPU device file (bench/cpu_device.py) none
        "device_kind": "gpu" if device.get("compute_capability") else "cpu",
        "peak_flops_per_second": peak,
        "bandwidth_bytes_per_second": bw,
        "efficiency": eff,
        "efficiency_source": source,
        "overhead_seconds": overhead,
        "ideal_step_seconds": ideal,
        "step_seconds": step,
        "tokens_per_step": tokens_per_step,
        "tokens_per_second": tokens_per_step / step,
        "tokens": tokens,
        "steps": None,
        "total_seconds": None,
    }
    if tokens is not None:
        out["steps"] = math.ceil(tokens / tokens_per_step)
        out["total_seconds"] = out["steps"] * step
    return out


def cost_prediction(time: dict[str, Any] | None, price_per_hour: float | None, gpus: int = 1) -> dict[str, Any] | None:
    """``prediction.cost``: ``total_seconds / 3600 x price_per_hour x gpus`` (and per step)."""
    if price_per_hour is None:
        return None
    if time is None:
        raise QPlanError("--price-per-hour needs a step time: give --gpu (a catalog GPU or a device file)")
    if time.get("step_seconds") is None:
        raise QPlanError(f"--price-per-hour needs a step time, and there is none: {time.get('reason')}")
    per_step = time["step_seconds"] / 3600 * price_per_hour * gpus
    total = None if time.get("total_seconds") is None else time["total_seconds"] / 3600 * price_per_hour * gpus
    return {"price_per_hour": price_per_hour, "gpus": gpus, "per_step": per_step, "total": total,
            "currency": "as given (per GPU-hour)"}
