"""Accuracy of Unsloth plans: `qplan estimate --backend unsloth` vs the Unsloth mode of the trace.

Each case: the analytic plan (``planner.memory.unsloth``) vs the live-tensor trace of two training
steps of the full-size model with Unsloth's own GPU code path run on the meta device
(``qplan.observe.trace.unsloth_mode``, in Unsloth's venv: QPLAN_UNSLOTH_PYTHON). Compared: the
tensor peak, each phase's peak, and the host bytes of offloaded checkpoints.

    QPLAN_UNSLOTH_PYTHON=/path/to/unsloth-venv/bin/python python bench/accuracy_unsloth.py --out reports/accuracy/unsloth

Writes matrix.json and README.md there. All traces run in one Unsloth process (~5 min on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-7b")
QUANTS = ("nf4", "bf16")
CKPTS = ("unsloth", "hf", "off")
SHAPES = ((1, 512), (2, 4096))
R, OPTIMIZER = 16, "adamw_8bit"


def plan_of(model: str, quant: str, ckpt: str, b: int, s: int) -> dict:
    """The Unsloth plan; ``hf`` (Unsloth's ``use_gradient_checkpointing=True``) is set on the
    training settings, as ``qplan run --backend unsloth`` maps it."""
    from qplan.planner.api import plan_inputs
    from qplan.planner.plan import build_plan

    inp, warnings = plan_inputs(model=model, quant=quant, r=R, alpha=float(R), dropout=0.0, targets="all-linear",
                                optimizer=OPTIMIZER, seq_len=s, batch_size=b, backend="unsloth",
                                grad_ckpt=ckpt != "off")
    inp = dataclasses.replace(inp, training=dataclasses.replace(inp.training, grad_ckpt=ckpt))
    return build_plan(inp, warnings).to_dict()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="reports/accuracy/unsloth")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--reuse", action="store_true",
                    help="compare with the traces saved in OUT/traces.json by an earlier run (same cases)")
    args = ap.parse_args()
    from qplan.observe.trace.unsloth_run import run_unsloth_mode, trace_doc, unsloth_python

    cases = []
    for model, quant, ckpt, (b, s) in itertools.product(args.models.split(","), QUANTS, CKPTS, SHAPES):
        plan = plan_of(model, quant, ckpt, b, s)
        cases.append(({"model": model, "quant": quant, "ckpt": ckpt, "b": b, "s": s}, plan))
    t0 = time.time()
    docs = [trace_doc(p) for _, p in cases]
    saved = Path(args.out) / "traces.json"
    if args.reuse:
        old = json.loads(saved.read_text(encoding="utf-8"))
        if old["cases"] != json.loads(json.dumps(docs)):
            raise SystemExit(f"{saved} traced other cases: run without --reuse")
        traced, seconds = old["results"], old["seconds"]
    else:
        traced = run_unsloth_mode({"cases": docs}, timeout=3600)
        seconds = time.time() - t0
        Path(args.out).mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"cases": docs, "results": traced, "seconds": round(seconds, 1)}) + "\n",
                         encoding="utf-8")
    rows = []
    for (key, plan), tr in zip(cases, traced):
        pred = plan["prediction"]
        row = dict(key, analytic=pred["memory"]["tensor_peak"], phase=pred["memory_detail"]["peak_phase"],
                   host=pred["host"]["offloaded_checkpoints"], phases=pred["memory_detail"]["phases"],
                   fast_path=not any("fast LoRA path" in w for w in plan["warnings"]))
        if "error" in tr:
            row["trace_error"] = tr["error"]
        else:
            phase = max(tr["phase_peaks"], key=tr["phase_peaks"].get)
            row.update(trace_phases=tr["phase_peaks"], trace=tr["tensor_peak"], trace_phase=phase,
                       trace_host=tr["host_peak"],
                       error=(row["analytic"] - tr["tensor_peak"]) / tr["tensor_peak"],
                       host_error=(row["host"] - tr["host_peak"]) / tr["host_peak"] if tr["host_peak"] else
                       (0.0 if row["host"] == 0 else None))
        rows.append(row)
    ok = [r for r in rows if "error" in r]
    errs = [abs(r["error"]) for r in ok]
    worst = max(ok, key=lambda r: abs(r["error"])) if ok else None
    py = unsloth_python()
    versions = subprocess.run([py, "-c", "import importlib.metadata as m; import json; print(json.dumps({k: m.version(k) "
                               "for k in ('unsloth', 'unsloth_zoo', 'torch', 'transformers', 'peft', 'bitsandbytes')}))"],
                              capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {
        "command": "QPLAN_UNSLOTH_PYTHON=... python bench/accuracy_unsloth.py --out " + args.out,
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit, "versions": json.loads(versions or "{}"), "python": sys.version.split()[0],
        "seconds": round(seconds, 1),
        "summary": {"cases": len(rows), "traced": len(ok),
                    "median_abs_error": statistics.median(errs) if errs else None,
                    "worst_abs_error": max(errs) if errs else None, "worst_case": worst,
                    "host_worst_abs_error": max((abs(r["host_error"]) for r in ok if r.get("host_error") is not None),
                                                default=None)},
        "by_model": by_model(rows),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    (out / "README.md").write_text(readme(doc), encoding="utf-8")
    print(f"{len(ok)}/{len(rows)} traced; median |error| {doc['summary']['median_abs_error']:.3%}, "
          f"worst {doc['summary']['worst_abs_error']:.3%}")
    return 0


def by_model(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        if "error" in r:
            out.setdefault(r["model"], []).append(abs(r["error"]))
    return {m: {"cases": len(v), "median_abs_error": statistics.median(v), "worst_abs_error": max(v)}
            for m, v in out.items()}


def readme(doc: dict) -> str:
    s = doc["summary"]
    lines = [
        "# Accuracy: Unsloth plans vs the Unsloth trace", "",
        f"Command: `{doc['command']}` at commit {doc['commit']} ({doc['generated']}, {doc['seconds']} s; "
        f"{', '.join(f'{k} {v}' for k, v in doc['versions'].items())}).", "",
        "Each case: `qplan estimate --backend unsloth` (analytic, `planner/memory/unsloth.py`) vs the live-tensor "
        "trace of two training steps of the full-size model with Unsloth's GPU code path run on the meta device "
        "(`qplan estimate --backend unsloth --method trace`: Unsloth's own forwards, fast LoRA Functions, "
        "offloaded checkpointing and fused cross-entropy, with the stand-ins listed in docs/memory-model.md). "
        f"r {R}, alpha {R}, dropout 0, all-linear targets, {OPTIMIZER}, bf16 compute, double-quant nf4 or a bf16 "
        "base, sdpa; checkpointing `unsloth` (offloading), `hf` (Unsloth's `use_gradient_checkpointing=True`) "
        "or off; no GPU named: an 80 GiB one with 60 GiB free. Error = (analytic - trace) / trace; host = "
        "pinned host bytes of offloaded checkpoints (plan `prediction.host.offloaded_checkpoints` vs the "
        "trace's host-booked peak).", "",
        f"**{s['traced']} of {s['cases']} cases traced: median |error| {s['median_abs_error']:.3%}, worst "
        f"|error| {s['worst_abs_error']:.3%}**; host bytes: worst |error| "
        f"{(s['host_worst_abs_error'] or 0):.3%}.", "",
        "| model | cases | median abs error | worst abs error |", "|---|---:|---:|---:|",
        *[f"| {m} | {v['cases']} | {v['median_abs_error']:.3%} | {v['worst_abs_error']:.3%} |"
          for m, v in doc["by_model"].items()],
        "",
        "Qwen2.5's q, k, v projections have biases, so Unsloth's `patch_peft_model` leaves them on PEFT's "
        "forward instead of `LoRA_QKV`; the Unsloth terms are derived for the fast path only, and such plans "
        "carry a warning (\"fast path\" column). PEFT's forward of those three projections keeps more than "
        "`LoRA_QKV` does (its own copies of the input, most with a 16-bit base): those plans are low, by up to "
        "the worst error above, and are not part of what the Unsloth terms claim; the Llama rows are. "
        "`--method trace` is exact for both.",
        "",
        "| model | quant | b×s | ckpt | fast path | analytic | trace | error | phase (plan / trace) | host (plan) "
        "| host (trace) |",
        "|---|---|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in doc["rows"]:
        if "error" not in r:
            lines.append(f"| {r['model']} | {r['quant']} | {r['b']}×{r['s']} | {r['ckpt']} | | {r['analytic']} | "
                         f"not traced: {r.get('trace_error', '')} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['quant']} | {r['b']}×{r['s']} | {r['ckpt']} | "
                     f"{'yes' if r['fast_path'] else 'no'} | {r['analytic']} | {r['trace']} | {r['error']:+.3%} | "
                     f"{r['phase']} / {r['trace_phase']} | {r['host']} | {r['trace_host']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
