"""`qplan calibrate`: fit the roofline's efficiency from measured runs of one device.

For every finished run folder (``qplan run``: plan.json + measured.json with step times), the
plan's counted FLOPs and bytes of a step (``prediction.compute``) give the roofline time on the
device (``planner.compute.timing.ideal_step_seconds``: its peak 16-bit throughput and bandwidth from the
GPU catalog, or from a device file such as a CPU's measured throughput); the measured time is
``measured.timing.mean_step_seconds`` (steps after the warm-up, outside the tracker when there are
any). The fit is ``measured = roofline / efficiency + overhead`` by least squares over the runs
(``overhead``: seconds per step that do not scale with the work — Python, kernel launches, small
ops); with one run, or when the least-squares line would need a negative overhead or an
efficiency above 1, the overhead is 0 and the efficiency is ``sum(roofline) / sum(measured)``.
Each run's own ratio is kept beside it, so the spread is visible, and a leave-one-out check
predicts each run from a fit on the others. The calibration file is what ``qplan estimate
--calibration FILE`` reads and cites.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qplan.planner.compute.timing import ideal_step_seconds, step_peaks
from qplan.planner.document import check_plan
from qplan.planner.errors import QPlanError
from qplan.planner.files import refuse_partial
from qplan.planner.validate import check_measured, read_json
from qplan.planner.vocab import PEFT_METHODS


def _run(folder: str) -> tuple[dict[str, Any], dict[str, Any]]:
    p = Path(folder)
    refuse_partial(p)
    if not (p / "plan.json").is_file() or not (p / "measured.json").is_file():
        raise QPlanError(f"{folder} has no plan.json and measured.json: is it a `qplan run` folder?")
    return (check_plan(read_json(p / "plan.json", "plan"), str(p / "plan.json")),
            check_measured(read_json(p / "measured.json", "measurements", nonfinite=True), str(p / "measured.json")))


def is_gpu(device: dict[str, Any]) -> bool:
    """Catalog GPUs carry a CUDA compute capability; a CPU device file (bench/cpu_device.py) none."""
    return bool(device.get("compute_capability"))


def calibrate(run_dirs: list[str], device: dict[str, Any]) -> dict[str, Any]:
    """The calibration of ``device`` (a catalog row or device file) from ``run_dirs``; runs that
    failed, have no step time or no compute prediction are listed as skipped."""
    if not run_dirs:
        raise QPlanError("give one or more run folders (reports/runs/...)")
    fitted, skipped = [], []
    for d in run_dirs:
        try:
            plan, doc = _run(d)
        except QPlanError as exc:
            skipped.append(f"{d}: {exc}")
            continue
        timing = (doc.get("measured") or {}).get("timing") or {}
        measured = timing.get("mean_step_seconds")
        compute = plan["prediction"].get("compute")
        if doc.get("status") != "ok" or not isinstance(measured, (int, float)) or not measured > 0:
            skipped.append(f"{d}: no measured step time (status {doc.get('status')})")
            continue
        if not compute:
            skipped.append(f"{d}: its plan has no prediction.compute (made by an older qplan): re-plan it")
            continue
        if plan["prediction"].get("data"):
            skipped.append(f"{d}: a --data run: its batches vary in length, so its step time is not the planned "
                           "shape's (calibrate with fixed-shape runs)")
            continue
        ran_on_gpu = str(((doc.get("measured") or {}).get("memory") or {}).get("device", "")).startswith("cuda")
        if ran_on_gpu != is_gpu(device):
            skipped.append(f"{d}: it ran on {'a GPU' if ran_on_gpu else 'the CPU'}, not on {device.get('name')}")
            continue
        quant = plan["quant"]
        peak, lora_peak, bw, reason = step_peaks(device, quant["quant"], quant["compute_dtype"],
                                                 adapter_dtype(plan))
        if reason is not None:
            skipped.append(f"{d}: {reason}")
            continue
        ideal = ideal_step_seconds(compute["flops_per_step"], compute["bytes_per_step"], peak, bw, lora_peak)
        if not ideal > 0:
            skipped.append(f"{d}: its plan counts no work (0 FLOPs and bytes)")
            continue
        fitted.append({"run": str(d), "model": plan["model"]["name"], "ideal_step_seconds": ideal,
                       "measured_step_seconds": float(measured), "efficiency": ideal / float(measured)})
    if not fitted:
        raise QPlanError(f"no run to calibrate on among {len(run_dirs)}: " + "; ".join(skipped)[:400])
    eff, overhead = fit_line(fitted)
    effs = sorted(f["efficiency"] for f in fitted)
    memory = memory_overheads([_run(f["run"])[1] for f in fitted])
    return {
        **memory,
        "device": device.get("name"),
        "efficiency": eff,
        "overhead_seconds": overhead,
        "runs": len(fitted),
        "spread": {"min": effs[0], "median": effs[len(effs) // 2], "max": effs[-1]},
        "fitted_on": fitted,
        "skipped": skipped,
        "method": "least squares: measured step time = roofline / efficiency + overhead (overhead >= 0, efficiency <= 1)",
    }


def memory_overheads(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """From CUDA runs: the CUDA context (``device_used - memory_reserved`` at a quiet moment, as
    measured) and the allocator's slack (``(peak_reserved - peak_allocated) / peak_allocated``),
    medians over the runs; nothing from CPU runs (no context, no caching allocator)."""
    ctx, slack = [], []
    for d in docs:
        mem = (d.get("measured") or {}).get("memory") or {}
        if not str(mem.get("device", "")).startswith("cuda"):
            continue
        if isinstance(mem.get("cuda_context"), int) and mem["cuda_context"] > 0:
            ctx.append(mem["cuda_context"])
        alloc, res = mem.get("peak_allocated"), mem.get("peak_reserved")
        if isinstance(alloc, int) and isinstance(res, int) and alloc > 0 and res >= alloc:
            slack.append((res - alloc) / alloc)
    out: dict[str, Any] = {}
    if ctx:
        out["cuda_context_bytes"] = sorted(ctx)[len(ctx) // 2]
    if slack:
        out["allocator_slack_fraction"] = sorted(slack)[len(slack) // 2]
    return out


def fit_line(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(efficiency, overhead seconds) of ``measured = ideal / efficiency + overhead``."""
    xs = [r["ideal_step_seconds"] for r in rows]
    ys = [r["measured_step_seconds"] for r in rows]
    n = len(rows)
    if n >= 2:
        mx, my = sum(xs) / n, sum(ys) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx > 0:
            k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
            c = my - k * mx
            if k >= 1 and c >= 0:
                return 1 / k, c
    return min(1.0, sum(xs) / sum(ys)), 0.0


def holdout_error(result: dict[str, Any]) -> dict[str, Any] | None:
    """Leave-one-out check: each run's step time predicted with the efficiency fitted on the
    others; the median and worst |error| (None with fewer than two runs)."""
    rows = result["fitted_on"]
    if len(rows) < 2:
        return None
    errs = []
    for i, r in enumerate(rows):
        eff, overhead = fit_line(rows[:i] + rows[i + 1:])
        pred = r["ideal_step_seconds"] / eff + overhead
        errs.append((pred - r["measured_step_seconds"]) / r["measured_step_seconds"])
    a = sorted(abs(e) for e in errs)
    return {"runs": len(errs), "median_abs_error": a[len(a) // 2], "worst_abs_error": a[-1],
            "errors": [round(e, 4) for e in errs]}


def calibration_file(result: dict[str, Any], command: str) -> dict[str, Any]:
    """What is written: enough for a plan to use (device, efficiency, runs) and cite (source)."""
    out = {k: result[k] for k in ("device", "efficiency", "overhead_seconds", "runs", "spread", "method")}
    for k in ("cuda_context_bytes", "allocator_slack_fraction"):
        if k in result:
            out[k] = result[k]
    out["command"] = command
    out["fitted_on"] = [dict(r) for r in result["fitted_on"]]
    return out


def fit_launch_model(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(efficiency, seconds per kernel launch) of ``measured = ideal / efficiency + launches x t_launch``: least squares
    through the origin over ``rows`` (``ideal_step_seconds``, ``kernel_launches``, ``measured_step_seconds``), bounded
    to the physical (efficiency at most 1, no negative launch time: where the unbounded fit leaves that range, the
    bound is taken and the other constant refitted). The model ``planner.compute.timing`` ships its defaults from
    (``bench/time_fit.py``)."""
    xs = [r["ideal_step_seconds"] for r in rows]
    ns = [r["kernel_launches"] for r in rows]
    ys = [r["measured_step_seconds"] for r in rows]
    sxx, snn = sum(x * x for x in xs), sum(n * n for n in ns)
    sxn = sum(x * n for x, n in zip(xs, ns))
    sxy, sny = sum(x * y for x, y in zip(xs, ys)), sum(n * y for n, y in zip(ns, ys))
    if not (sxx > 0 and snn > 0):
        raise QPlanError("no run to fit: every run counts no work or no launches")
    det = sxx * snn - sxn * sxn
    k = (sxy * snn - sny * sxn) / det if det > 0 else 0.0
    t = (sny * sxx - sxy * sxn) / det if det > 0 else -1.0
    if det <= 0 or k < 1 or t < 0:
        # on a bound: the roofline at full efficiency (k = 1) with the launches refitted, or no launch time
        t1 = max(0.0, sum(n * (y - x) for x, n, y in zip(xs, ns, ys)) / snn)
        k0 = max(1.0, sxy / sxx)
        err = lambda k_, t_: sum((y - k_ * x - t_ * n) ** 2 for x, n, y in zip(xs, ns, ys))  # noqa: E731
        k, t = min(((1.0, t1), (k0, 0.0)), key=lambda c: err(*c))
    return 1 / k, t


def adapter_dtype(plan: dict[str, Any]) -> str:
    """The dtype the trained tensors' matmuls see: the LoRA tensors', or with full fine-tuning the weights' own."""
    lora = plan.get("lora")
    if plan.get("method") in PEFT_METHODS and plan["method"] != "ln_tuning":  # all fp32 (LN tuning: the norms' dtype)
        return "float32"
    if lora is None:
        return plan["quant"].get("unquantized_dtype", plan["quant"]["quant"])
    return lora.get("adapter_dtype", "float32")
