"""How long a step takes and what the run costs: a roofline on counted FLOPs and bytes, plus the host's launches.

``step_seconds = (max(F_base / P_base + F_lora / P_lora, W / BW) + (D + O) / BW) / efficiency + N x t_launch`` where
``F`` are the step's FLOPs (``planner.compute.flops.step_flops``, checked against ``FlopCounterMode``), split by the
dtype their matmuls run in (``matmul_dtypes``): the adapters' matmuls run in the adapters' own dtype when no autocast
casts them (PEFT's benchmark harness: bf16 weights, fp32 adapters, so fp32 LoRA matmuls), everything else in the
compute dtype, or in a pure 16-bit step in the weights' dtype. ``W`` is the base weights the matmuls read, ``D`` the
4-bit dequantization traffic and ``O`` the optimizer's, ``P`` the device's dense peak for that dtype
(``peak_bf16_tflops``, ``peak_fp16_tflops`` or ``peak_fp32_tflops`` of the GPU catalog, each cited in its file) and
``BW`` its memory bandwidth. The matmuls and their weight reads overlap (a roofline: whichever bounds);
dequantization and the optimizer are separate memory-bound kernels.

``N`` is the number of kernels the step launches (``planner.compute.ops.step_launches``, checked against the traced
step) and ``t_launch`` the host's seconds per launch: eager PyTorch pays a Python call, the dispatcher and a CUDA
launch for every op, and with small batches that, not the matmuls, sets the step time. ``efficiency`` (the fraction of
the roofline the device's kernels reach) and ``t_launch`` are fitted to published GPU runs whose setup is known in
full: PEFT's MetaMathQA runs on an L40S (``bench/time_fit.py``, ``reports/time/README.md``, with each run predicted
from a fit on the others). ``qplan calibrate RUN_DIRS`` fits an efficiency and a per-step overhead to the user's own
runs of one device (``reports/runs``); a plan given that file uses them instead (its overhead then stands for the
host's launches as measured).

Several GPUs: each rank's step is timed on its own share (data parallel: every rank runs the planned micro-batches)
plus the communication between the ranks (``planner.compute.comm``: ring collectives over the catalog's link, a
bound); ``tokens_per_second`` is the run's total (``gpus`` x a rank's), ``tokens_per_second_per_gpu`` one rank's;
what is not predicted (several nodes, CPU offload) is said in ``not_in_time``.
"""

from __future__ import annotations

import math
from typing import Any

from qplan.planner.errors import QPlanError

#: The fraction of the roofline the device's kernels reach, and the host's seconds per kernel launch: least squares
#: over PEFT's six plannable MetaMathQA runs on an L40S, five LoRA/DoRA and one full fine-tuning (``python
#: bench/time_fit.py``; the fit, its leave-one-out errors and what it rests on are in ``reports/time/README.md``;
#: ``tests/planner/test_time_fit.py`` keeps these equal to the fit)
DEFAULT_EFFICIENCY = 0.76
SECONDS_PER_LAUNCH = 19e-6
DEFAULTS_SOURCE = ("fitted to PEFT's MetaMathQA runs on an L40S (reports/time/README.md), not calibrated on this "
                   "device: qplan calibrate fits your own runs")
#: what a person should budget around the predicted time with the fitted defaults
UNCERTAINTY = ("the defaults come from one GPU (L40S), one host and one eager stack (PEFT, batch 4 x ~224 tokens), "
               "where each run is predicted within 7% from the others; on other GPUs, hosts, batch shapes and stacks "
               "(compiled, fused kernels) the error is not measured: budget +-30% and calibrate on a short run of your "
               "own")


PEAK_KEYS = {"bfloat16": "peak_bf16_tflops", "float16": "peak_fp16_tflops", "float32": "peak_fp32_tflops"}


def device_peak(device: dict[str, Any], dtype: str) -> tuple[float | None, float | None]:
    """(dense peak FLOP/s for matmuls in ``dtype``, bandwidth B/s) of a catalog device; None where the file has no
    figure."""
    tflops = device.get(PEAK_KEYS[dtype])
    bw = device.get("memory_bandwidth_gb_s")
    return (tflops * 1e12 if tflops else None), (bw * 1e9 if bw else None)


def matmul_dtypes(quant: str, compute_dtype: str, adapter_dtype: str) -> tuple[str, str]:
    """(dtype of the base, attention and head matmuls, dtype of the adapters' matmuls).

    Under autocast (a 16-bit ``compute_dtype``) every matmul runs in it (autocast casts the adapters' inputs and
    weights). Without autocast: a pure 16-bit step (``--quant bf16/fp16 --compute-dtype fp32``) runs the frozen
    matmuls in the weights' dtype; any other fp32-compute plan in fp32 (bitsandbytes dequantizes to its compute dtype).
    PEFT's LoRA forward casts its input to ``lora_A.weight.dtype``, so the adapters' matmuls run in the adapters' dtype
    (``peft/tuners/lora/layer.py``, ``Linear.forward``)."""
    if compute_dtype in ("bfloat16", "float16"):
        return compute_dtype, compute_dtype
    base = {"bf16": "bfloat16", "fp16": "float16"}.get(quant, "float32")
    return base, adapter_dtype


def step_peaks(device: dict[str, Any], quant: str, compute_dtype: str,
               adapter_dtype: str) -> tuple[float | None, float | None, float | None, str | None]:
    """(base peak, adapters' peak, bandwidth, reason when one is missing) of a catalog device for a plan."""
    base, lora = matmul_dtypes(quant, compute_dtype, adapter_dtype)
    pb, bw = device_peak(device, base)
    pl, _ = device_peak(device, lora)
    missing = sorted({d for d, p in ((base, pb), (lora, pl)) if p is None})
    if missing or bw is None:
        what = " or ".join(missing) + (" throughput" if missing else "")
        what = f"{what}{' or ' if missing and bw is None else ''}{'bandwidth' if bw is None else ''}"
        return pb, pl, bw, f"the catalog has no {what} for {device.get('name')}"
    return pb, pl, bw, None


def ideal_step_seconds(flops: dict[str, int], moved: dict[str, int], peak: float, bandwidth: float,
                       lora_peak: float | None = None) -> float:
    """The roofline time of one step (efficiency 1): ``max(F_base/P + F_lora/P_lora, W/BW) + (D + O + U)/BW`` (the
    adapters' FLOPs at ``lora_peak``, the base peak when None; ``U``: LoHa's weight updates, GRPO's decode reads; 0 for
    the rest)."""
    lora = flops.get("lora", 0) if lora_peak is not None else 0
    matmul = (flops["total"] - lora) / peak + (lora / lora_peak if lora else 0.0)
    # GRPO's decode steps read the weights and cache once per token, one step after another
    serial = moved["dequantization"] + moved["optimizer"] + moved.get("adapter_updates", 0) + moved.get("generation", 0)
    return max(matmul, moved["weights"] / bandwidth) + serial / bandwidth


def time_prediction(flops: dict[str, int], moved: dict[str, int], device: dict[str, Any] | None,
                    dtypes: tuple[str, str, str], tokens_per_step: int, tokens: int | None,
                    calibration: dict[str, Any] | None, gpus: int = 1, launches: int = 0,
                    comm: tuple[dict[str, Any] | None, list[str]] = (None, [])) -> dict[str, Any] | None:
    """``prediction.time``: step seconds, tokens/s (in total and per GPU) and, given a token budget, steps and total
    seconds. ``dtypes``: (quant, compute dtype, adapter dtype); ``tokens_per_step``: one GPU's tokens per optimizer
    step; ``gpus``: data-parallel ranks, each running its own micro-batches; ``launches``: the step's kernel launches
    (``planner.compute.ops.step_launches``), timed at ``SECONDS_PER_LAUNCH`` on a GPU without a calibration;
    ``comm``: (the ranks' communication, what of it is not predicted) from ``planner.compute.comm.comm_time``."""
    if device is None:
        return None
    peak, lora_peak, bw, reason = step_peaks(device, *dtypes)
    if reason is not None:
        return {"device": device.get("name"), "step_seconds": None, "reason": reason}
    base_dtype, lora_dtype = matmul_dtypes(*dtypes)
    # a catalog GPU has a CUDA compute capability; a CPU device file (bench/cpu_device.py) none
    gpu = bool(device.get("compute_capability"))
    per_launch = 0.0
    if calibration is not None:
        eff, source = float(calibration["efficiency"]), str(calibration.get("source", "calibration"))
        overhead = float(calibration.get("overhead_seconds", 0.0))
    else:
        eff, source, overhead = DEFAULT_EFFICIENCY, DEFAULTS_SOURCE, 0.0
        per_launch = SECONDS_PER_LAUNCH if gpu else 0.0  # fitted on a GPU's host; a CPU device file has no launches
    ideal = ideal_step_seconds(flops, moved, peak, bw, lora_peak)
    communication, not_predicted = comm
    step = ideal / eff + launches * per_launch + overhead + (communication["seconds"] if communication else 0.0)
    total_per_step = tokens_per_step * gpus
    out: dict[str, Any] = {
        "device": device.get("name"),
        "device_kind": "gpu" if gpu else "cpu",
        "peak_flops_per_second": peak,
        "matmul_dtype": base_dtype,
        "bandwidth_bytes_per_second": bw,
        "efficiency": eff,
        "efficiency_source": source,
        "overhead_seconds": overhead,
        "kernel_launches": launches,
        "seconds_per_launch": per_launch,
        "launch_seconds": launches * per_launch,
        "ideal_step_seconds": ideal,
        "step_seconds": step,
        "gpus": gpus,
        "tokens_per_step": total_per_step,
        "tokens_per_second": total_per_step / step,
        "tokens": tokens,
        "steps": None,
        "total_seconds": None,
    }
    if lora_dtype != base_dtype:
        out["adapter_matmul_dtype"] = lora_dtype
        out["adapter_peak_flops_per_second"] = lora_peak
    if gpus > 1:
        out["tokens_per_step_per_gpu"] = tokens_per_step
        out["tokens_per_second_per_gpu"] = tokens_per_step / step
        if communication is not None:
            out["communication"] = communication
    if not_predicted:
        out["not_in_time"] = list(not_predicted)
    if calibration is None and gpu:
        out["uncertainty"] = UNCERTAINTY
    if tokens is not None:
        out["steps"] = math.ceil(tokens / total_per_step)
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
