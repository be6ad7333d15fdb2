"""FLOPs of a training step: qplan's count vs torch's FlopCounterMode over the traced step.

    python bench/flops_check.py [--out reports/compute]

The cases of tests/planner/test_compute.py (every bundled family, checkpointing on and off, nf4 /
bf16 / fp32, sdpa and eager), batch 1 x 256 tokens; the oracle counts the second of two traced
steps on the meta device. Writes README.md and flops.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "reports" / "compute"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests" / "planner"))
    from test_compute import CASES

    from qplan.observe.trace import trace_plan
    from qplan.planner.api import plan_dict

    rows = []
    t0 = time.time()
    for model, kw in CASES:
        plan = plan_dict(model=model, batch_size=1, seq_len=256, **kw)
        ours = plan["prediction"]["compute"]["flops_per_step"]
        oracle = trace_plan(plan, count_flops=True)["flops_per_step"][-1]
        rows.append({"model": model, **{k: str(v) for k, v in kw.items()}, "qplan": ours["total"], "flop_counter": oracle,
                     "error": (ours["total"] - oracle) / oracle, "terms": ours})
        print(f"{model} {kw}: {ours['total']:,} vs {oracle:,}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flops.json").write_text(json.dumps({"command": "python bench/flops_check.py", "cases": rows}, indent=1) + "\n")
    worst = max(abs(r["error"]) for r in rows)
    md = ["# FLOPs per step: qplan vs FlopCounterMode", "",
          f"Command: `python bench/flops_check.py` ({time.time() - t0:.0f} s). Batch 1 × 256 tokens, LoRA r=16, "
          "the second of two traced steps on the meta device (CUDA kernels mirrored).", "",
          f"**{len(rows)} cases, worst |error| {100 * worst:.4f}%** (goal 1%).", "",
          "| model | options | qplan FLOPs | FlopCounterMode | error |", "|---|---|---:|---:|---:|"]
    for r, (_, kw) in zip(rows, CASES):
        opts = ", ".join(f"{k}={v}" for k, v in kw.items())
        md.append(f"| {r['model']} | {opts} | {r['qplan']:,} | {r['flop_counter']:,} | {100 * r['error']:+.4f}% |")
    (out / "README.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
