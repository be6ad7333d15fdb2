"""Kernel launches per step: traced counts against ``qplan.planner.compute.ops.step_launches``, and the fit behind it.

    python bench/op_counts.py                 # trace the cases, compare, write reports/benchmarks/op-counts.{json,md}
    python bench/op_counts.py --fit           # also print the least-squares kernels per component (FORWARD/BACKWARD)

Each case is a plan traced on the meta device (two steps, the second counted); ``launches_kernel`` decides which
dispatched ops launch a kernel. Forward and backward are compared (the optimizer phase runs torch's per-tensor loops
on meta, foreach kernels on CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT.parent))

BASE = dict(r=32, alpha=64, batch_size=2, seq_len=128, gpu="l40s")
PURE16 = dict(quant="bf16", compute_dtype="fp32", grad_ckpt=False, dropout=0.0)


def cases() -> list[dict]:
    out = []
    m = "llama-3.2-1b"
    for t in ("qv", "mlp", "attn", "all-linear"):
        out.append({**BASE, **PURE16, "model": m, "targets": t})
    out.append({**BASE, **PURE16, "model": m, "targets": "qv", "dora": True})
    out.append({**BASE, **PURE16, "model": m, "targets": "all-linear", "dora": True})
    out.append({**BASE, **PURE16, "model": m, "targets": "qv", "dropout": 0.05})
    for t in ("qv", "all-linear"):
        out.append({**BASE, "model": m, "targets": t})
        out.append({**BASE, "model": m, "targets": t, "grad_ckpt": False})
        out.append({**BASE, "model": m, "targets": t, "quant": "bf16", "grad_ckpt": False})
    out.append({**BASE, "model": m, "targets": "qv", "reentrant": True})
    out.append({**BASE, "model": m, "targets": "qv", "attn_impl": "eager", "grad_ckpt": False})
    out.append({**BASE, "model": m, "targets": "qv", "quant": "int8", "grad_ckpt": False})
    for m in ("qwen2.5-0.5b", "qwen3-0.6b", "smollm2-135m", "gemma-2-9b", "phi-4", "mixtral-8x7b", "qwen3-30b-a3b",
              "mistral-nemo-12b", "gpt-oss-20b"):
        out.append({**BASE, "model": m, "targets": "all-linear"})
        out.append({**BASE, **PURE16, "model": m, "targets": "qv" if m != "gpt-oss-20b" else "attn"})
    full = dict(full=True, quant="bf16", batch_size=2, seq_len=128, gpu="l40s")  # full fine-tuning: no LoRA options
    for m in ("llama-3.2-1b", "llama-3.1-8b", "qwen3-0.6b", "gemma-2-9b", "phi-4", "qwen3-30b-a3b"):
        out.append({**full, "model": m})
    out.append({**full, "model": "llama-3.2-1b", "grad_ckpt": False})
    out.append({**full, "model": "llama-3.2-1b", "quant": "fp32"})
    return out


def trace_counts(kw: dict) -> dict:
    from qplan.observe.trace import trace_plan
    from qplan.planner.api import plan_dict

    return trace_plan(plan_dict(**kw), steps=2)["kernel_launches"]


def predicted(kw: dict) -> tuple[dict, dict]:
    from qplan.planner.api import PlanOptions
    from qplan.planner.compute.ops import launch_features, step_launches
    from qplan.planner.plan import plan_counts, plan_inputs

    inp, _ = plan_inputs(PlanOptions(**kw))
    counts = plan_counts(inp)
    args = (inp.spec, counts, inp.quant, inp.training, inp.lora)
    return launch_features(*args), step_launches(*args)


def fit(rows: list[dict]) -> None:
    import numpy as np

    from qplan.planner.compute.ops import FEATURES

    for phase in ("forward", "backward"):
        use = [r for r in rows if phase == "forward" or r["features"]["ckpt"] == 0]
        X = np.array([[r["features"][k] for k in FEATURES] for r in use], dtype=float)
        y = np.array([r["traced"][phase] for r in use], dtype=float)
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        print(phase, {k: round(float(c), 2) for k, c in zip(FEATURES, coef)})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fit", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "op-counts"))
    a = ap.parse_args()
    rows = []
    t0 = time.perf_counter()
    for kw in cases():
        traced = trace_counts(kw)
        feats, pred = predicted(kw)
        feats["ckpt"] = int(kw.get("grad_ckpt", True))
        fb_t = traced["forward"] + traced["backward"]
        fb_p = pred["forward"] + pred["backward"]
        rows.append({"options": kw, "traced": traced, "predicted": pred, "features": feats,
                     "error": (fb_p - fb_t) / fb_t})
        print(f"{kw['model']:16} {json.dumps({k: v for k, v in kw.items() if k not in BASE and k != 'model'})[:70]:70} "
              f"traced {traced['forward']:5}/{traced['backward']:5} predicted {pred['forward']:5}/{pred['backward']:5} "
              f"{100 * rows[-1]['error']:+.1f}%", flush=True)
    if a.fit:
        fit(rows)
    worst = max(abs(r["error"]) for r in rows)
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"command": "python bench/op_counts.py", "rows": rows}, indent=1))
    lines = ["# Kernel launches per step: qplan vs the traced step", "",
             f"Command: `python bench/op_counts.py` ({time.perf_counter() - t0:.0f} s). Batch {BASE['batch_size']} x "
             f"{BASE['seq_len']} tokens, LoRA r={BASE['r']} (full fine-tuning: every parameter); the second of two "
             "steps traced on the meta device; "
             "a launch is an ATen op that is not a view, alias or metadata query "
             "(`qplan.observe.tracker.launches_kernel`). Forward + backward compared.", "",
             f"**{len(rows)} cases, worst |error| {100 * worst:.1f}%.**", "",
             "| model | options | traced fwd / bwd | qplan fwd / bwd | error |", "|---|---|---:|---:|---:|"]
    for r in rows:
        kw = {k: v for k, v in r["options"].items() if k not in BASE and k != "model"}
        lines.append(f"| {r['options']['model']} | {', '.join(f'{k}={v}' for k, v in kw.items())} | "
                     f"{r['traced']['forward']:,} / {r['traced']['backward']:,} | "
                     f"{r['predicted']['forward']:,} / {r['predicted']['backward']:,} | {100 * r['error']:+.1f}% |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
