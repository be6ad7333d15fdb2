"""The whole PEFT-count grid of the bundled models: every preset at every rank vs PEFT's own count.

tests/planner/test_lora.py checks the same thing with the same oracle (its ``check``: qplan's
count vs ``get_peft_model(...).get_nb_trainable_parameters()`` on the meta-device model), but
samples the grid: one bundled spec per model type (its ``PYTEST_SPECS``), and the (model, preset)
pairs in its ``BENCH_ONLY_R64`` run at r=1 only there,
because PEFT initialises every LoRA tensor on the CPU before moving it to meta (DeepSeek-V3's mlp
and all-linear at r=64 take minutes).  This script runs every case and writes, under ``--out``,
``peft-counts.json`` (every case, its seconds, pass or the failure) and ``peft-counts.md``.

    python bench/peft_counts.py                                  # the whole grid (~12 min, 2 cores)
    python bench/peft_counts.py --models deepseek-v3 --out /tmp/pc   # one model's grid
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "planner")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    import warnings

    import test_lora as T  # the tests' oracle, unchanged

    from qplan.planner.model.catalog import bundled_model_names, load_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="", help="comma-separated bundled names (default: all)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "benchmarks"))
    a = ap.parse_args()
    names = [m for m in a.models.split(",") if m] or bundled_model_names()
    warnings.simplefilter("ignore")
    rows = []
    t_all = time.perf_counter()
    for name in names:
        spec = load_spec(name)
        sampled = set(T.bundled_cases(name))
        for preset, r in T.bundled_cases(name, full=True):
            t = time.perf_counter()
            try:
                T.check(spec, name, preset, r)
                result = "pass"
            except AssertionError as e:
                result = f"FAIL: {e}"
            dt = time.perf_counter() - t
            rows.append(dict(model=name, preset=preset, r=r, in_pytest=(preset, r) in sampled,
                             seconds=round(dt, 2), result=result))
            print(f"{name:24} {preset:10} r={r:<3} {dt:7.1f} s  {result}", flush=True)
        T._models.clear()
    total = time.perf_counter() - t_all
    command = "python bench/peft_counts.py" + (f" --models {a.models}" if a.models else "")
    doc = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "total_seconds": round(total, 1), "cases": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peft-counts.json").write_text(json.dumps(doc, indent=2) + "\n")
    failed = [c for c in rows if c["result"] != "pass"]
    lines = [
        "# PEFT trainable counts: the whole grid of the bundled models", "",
        f"Command: `{command}` · {doc['date']} · {doc['machine']}", "",
        "qplan's trainable and total parameter counts vs PEFT's `get_nb_trainable_parameters()` on the "
        "meta-device model (the `check` of tests/planner/test_lora.py), every preset at r=1 and r=64. "
        "pytest runs the cases marked *yes*; the others are here only (PEFT initialises the LoRA "
        "tensors on the CPU: seconds per 1e9 adapter parameters). A model's first case includes building "
        "its meta-device model.", "",
        f"**{len(rows) - len(failed)} / {len(rows)} cases equal PEFT's counts**, {total:.0f} s in all "
        f"({sum(c['seconds'] for c in rows if c['in_pytest']):.0f} s for the cases pytest runs).", "",
        "| model | preset | r | in pytest | seconds | result |", "|---|---|---:|---|---:|---|",
        *[f"| {c['model']} | {c['preset']} | {c['r']} | {'yes' if c['in_pytest'] else 'bench only'} | "
          f"{c['seconds']:.1f} | {c['result']} |" for c in rows],
    ]
    (out / "peft-counts.md").write_text("\n".join(lines) + "\n")
    if failed:
        raise SystemExit(f"{len(failed)} case(s) differ from PEFT")


if __name__ == "__main__":
    main()
