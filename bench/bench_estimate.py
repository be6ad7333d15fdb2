"""Benchmark: `qplan estimate` vs today's way, and the `qplan fit` search rate.

Today's way = what a user does without qplan to get an exact count: import transformers + peft,
build the model from its config on the meta device, wrap it with get_peft_model and ask
get_nb_trainable_parameters(). Both are timed as a user meets them: a fresh process each run.

    python bench/bench_estimate.py [--runs 7] [--model llama-3.2-3b] [--out reports/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

TODAY = """
import json, sys, torch
from peft import get_peft_model
from qplan.hf import lora_config, model_from_config
from qplan.planner.model.catalog import load_spec
m = model_from_config(load_spec(sys.argv[1]).config, device="meta")
pm = get_peft_model(m, lora_config(dict(r=32, alpha=64, target_modules="all-linear")))
print(pm.get_nb_trainable_parameters())
"""


def wall(cmd: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(time.perf_counter() - t)
    return out


def fit_rate() -> dict:
    from qplan.planner.search.fit import search

    t = time.perf_counter()
    res = search("llama-3.1-8b", "a100-80gb")
    dt = time.perf_counter() - t
    return {"candidates": res["candidates"], "seconds": round(dt, 4), "per_second": int(res["candidates"] / dt)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--model", default="llama-3.2-3b")
    ap.add_argument("--out", default="reports/benchmarks")
    a = ap.parse_args()
    qplan = [sys.executable, "-c", "import sys; from qplan.cli.main import main; sys.exit(main())",
             "estimate", "--model", a.model, "--r", "32", "--gpu", "t4", "--format", "json"]
    today = [sys.executable, "-c", TODAY, a.model]
    q = wall(qplan, a.runs)
    t = wall(today, a.runs)
    fr = fit_rate()
    res = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": " ".join(["python", "bench/bench_estimate.py", "--runs", str(a.runs), "--model", a.model]),
        "machine": f"{platform.machine()}, {platform.python_version()}, {__import__('os').cpu_count()} cores",
        "model": a.model,
        "qplan_estimate_s": {"median": round(statistics.median(q), 4), "min": round(min(q), 4), "runs": a.runs},
        "meta_model_plus_peft_s": {"median": round(statistics.median(t), 4), "min": round(min(t), 4), "runs": a.runs},
        "speedup_median": round(statistics.median(t) / statistics.median(q), 1),
        "fit_search": fr,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimate.json").write_text(json.dumps(res, indent=2) + "\n")
    md = [
        "# `qplan estimate` wall time vs building the model and asking PEFT",
        "",
        f"Command: `{res['command']}` · {res['date']} · {res['machine']}",
        "",
        "| what | median s | min s |",
        "|---|---:|---:|",
        f"| `qplan estimate --model {a.model} --r 32 --gpu t4` (fresh process) | "
        f"{res['qplan_estimate_s']['median']} | {res['qplan_estimate_s']['min']} |",
        f"| meta-device model + `get_peft_model` + count (fresh process) | "
        f"{res['meta_model_plus_peft_s']['median']} | {res['meta_model_plus_peft_s']['min']} |",
        "",
        f"Speed-up (median): **{res['speedup_median']}×** (goal ≥ 20×, qplan ≤ 0.2 s).",
        "",
        f"`qplan fit` analytic search (llama-3.1-8b on a100-80gb, in process): {fr['candidates']} candidate plans "
        f"in {fr['seconds']} s = **{fr['per_second']:,} plans/s** (goal ≥ 100,000/s).",
        "",
    ]
    (out / "estimate.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
