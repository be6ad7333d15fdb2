"""Step time, predicted vs measured, on this CPU: the roofline on counted FLOPs, calibrated.

    python bench/cpu_device.py        # first: this CPU as a device (reports/benchmarks/cpu-device.json)
    python bench/time_cpu.py          # then: CPU runs, calibration, errors -> reports/benchmarks/time-cpu.md

Trains smollm2-135m (random weights, bf16, LoRA r=16 all-linear) on the CPU for a few shapes with
and without checkpointing (`qplan run --steps 6`: step times of steps 4-6, outside the tracker),
fits the efficiency and the per-step overhead with `qplan calibrate`, and reports each run's
error three ways: the pure roofline (efficiency 1), the uncalibrated default, and leave-one-out
(fitted on the other runs). Nothing is tuned to these numbers beyond that fit, which is the
point of it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [(1, 128, True), (2, 128, True), (2, 256, True), (4, 256, True), (2, 128, False), (2, 256, False)]


def qplan(*args: str) -> str:
    cmd = [sys.executable, "-c", "import sys; from qplan.cli.main import main; sys.exit(main())", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"qplan {' '.join(args)} failed: {res.stderr[-2000:]}")
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=str(ROOT / "reports/benchmarks/cpu-device.json"))
    ap.add_argument("--out", default=str(ROOT / "reports/benchmarks"))
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    out = Path(a.out)
    work = Path(tempfile.mkdtemp(prefix="qplan-time-cpu-"))
    t0 = time.time()
    runs = []
    for b, s, ck in CASES:
        plan = work / f"plan-{b}x{s}-{'ckpt' if ck else 'nockpt'}.json"
        qplan("estimate", "--model", a.model, "--quant", "bf16", "--batch-size", str(b), "--seq-len", str(s),
              "--gpu", a.device, "--output", str(plan), *([] if ck else ["--no-grad-ckpt"]))
        res = json.loads(qplan("run", str(plan), "--random-init", "--steps", "6", "--device", "cpu",
                               "--out-dir", str(work / "runs"), "--format", "json"))
        runs.append((b, s, ck, res["run_dir"], json.loads(plan.read_text())))
        print(f"{b}x{s} ckpt={ck}: {res['status']}", flush=True)
    calib = out / "cpu-calibration.json"
    qplan("calibrate", *[r[3] for r in runs], "--gpu", a.device, "--output", str(calib), "--force")
    doc = json.loads(calib.read_text())
    rows = []
    for (b, s, ck, _run_dir, plan), fit, loo in zip(runs, doc["fitted_on"], doc["holdout"]["errors"]):
        measured = fit["measured_step_seconds"]
        ideal = fit["ideal_step_seconds"]
        default = plan["prediction"]["time"]["step_seconds"]
        rows.append({"shape": f"{b}x{s}", "ckpt": ck, "flops": plan["prediction"]["compute"]["flops_per_step"]["total"],
                     "measured_s": measured, "roofline_s": ideal, "roofline_error": (ideal - measured) / measured,
                     "default_s": default, "default_error": (default - measured) / measured,
                     "leave_one_out_error": loo})
    result = {"command": "python bench/time_cpu.py", "device": json.loads(Path(a.device).read_text()),
              "model": a.model, "efficiency": doc["efficiency"], "holdout": doc["holdout"], "runs": rows,
              "seconds": round(time.time() - t0, 1)}
    (out / "time-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    dev = result["device"]
    md = [
        "# Step time on the CPU: predicted vs measured",
        "",
        f"Command: `python bench/cpu_device.py && python bench/time_cpu.py` ({result['seconds']} s). Device: "
        f"{dev['full_name']}, measured bf16 matmul {dev['peak_bf16_tflops']} TFLOPS, fp32 {dev['peak_fp32_tflops']} "
        f"TFLOPS, copy bandwidth {dev['memory_bandwidth_gb_s']} GB/s ({dev['source']['threads']} threads).",
        "",
        f"Model {a.model}, bf16, LoRA r=16 all-linear, random weights, `qplan run --steps 6 --device cpu` "
        "(mean of steps 4-6, outside the tracker). Error = (predicted - measured) / measured.",
        "",
        f"Fitted (`qplan calibrate`): efficiency **{doc['efficiency']:.3f}**, overhead "
        f"**{doc['overhead_seconds']:.3f} s/step**; leave-one-out step-time error: median "
        f"**{100 * doc['holdout']['median_abs_error']:.1f}%**, worst **{100 * doc['holdout']['worst_abs_error']:.1f}%** "
        "(goal ±30%).",
        "",
        "| shape | ckpt | FLOPs/step | measured s | roofline s (eff. 1) | error | default eff. s | error | leave-one-out error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(f"| {r['shape']} | {'on' if r['ckpt'] else 'off'} | {r['flops']:.3e} | {r['measured_s']:.3f} | "
                  f"{r['roofline_s']:.3f} | {100 * r['roofline_error']:+.1f}% | {r['default_s']:.3f} | "
                  f"{100 * r['default_error']:+.1f}% | {100 * r['leave_one_out_error']:+.1f}% |")
    md += ["", "The pure roofline is far below the measured time on a CPU: most of a small model's step is not",
           "matmul (norms, casts, elementwise ops, Python), which the fitted efficiency and per-step overhead",
           "absorb. The default column is `DEFAULT_EFFICIENCY`, the efficiency fitted to PEFT's L40S runs",
           "(reports/time/README.md): a CPU device file gets no launch term, so on the CPU that default is a",
           "roofline only. GPU plans without a calibration add the fitted host time per kernel launch."]
    (out / "time-cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
