"""Multi-GPU accuracy rows: the analytic per-rank plan vs the traced step of one FSDP2 rank (fsdp, and hsdp:
FSDP2 on a (nodes, GPUs per node) mesh).

For every plan of the matrix, ``qplan estimate --gpus W --strategy fsdp`` (analytic, planner.memory.per_rank)
and ``qplan estimate ... --method trace`` (qplan.observe.trace.dist.trace_rank_step: the plan's model
sharded by the real ``fully_shard`` on the meta device over torch's fake process group, two steps
under the live-tensor tracker) give one rank's tensor peak; error = (analytic - trace) / trace.
Writes ``matrix.json`` and ``README.md`` under ``--out`` (the formats of ``bench/accuracy.py``).

    python bench/accuracy_dist.py --jobs 1          # the committed rows (reports/accuracy/multi-gpu/)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import pct, source_state

#: (model, [(world, batch, seq)]): a small model over world sizes (3: uneven shards) and shapes,
#: an 8B model at one shape (its trace takes about a minute on one core)
MATRIX = (("llama-3.2-1b", ((2, 1, 512), (3, 1, 1024), (4, 2, 2048))), ("llama-3.1-8b", ((2, 1, 2048),)))
QUANTS = ("nf4", "bf16")
CKPTS = (True, False)
#: hsdp: (nodes, GPUs per node, batch, seq) of the small model (3 per node: uneven shards)
HSDP = ((2, 2, 1, 1024), (3, 2, 2, 512), (2, 3, 1, 2048))


def cases() -> list[dict]:
    out = []
    for model, shapes in MATRIX:
        for (w, b, s), q, ck in itertools.product(shapes, QUANTS, CKPTS):
            if model != "llama-3.2-1b" and q == "bf16":
                continue
            out.append(dict(model=model, strategy="fsdp", nodes=1, world=w, quant=q, b=b, s=s, ckpt=ck))
    for (n, g, b, s), q, ck in itertools.product(HSDP, QUANTS, CKPTS):
        out.append(dict(model="llama-3.2-1b", strategy="hsdp", nodes=n, world=n * g, quant=q, b=b, s=s, ckpt=ck))
    return out


def run_case(case: dict) -> dict:
    from qplan.observe.trace.dist import trace_rank_step
    from qplan.planner.api import plan_dict

    plan = plan_dict(model=case["model"], quant=case["quant"], gpus=case["world"] // case["nodes"],
                     nodes=case["nodes"], strategy=case["strategy"], batch_size=case["b"], seq_len=case["s"],
                     grad_ckpt=case["ckpt"])
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        tr = trace_rank_step(plan)
    a, t = plan["prediction"]["memory"]["tensor_peak"], tr["tensor_peak"]
    return {**case, "analytic_tensor_peak": a, "trace_tensor_peak": t, "error": (a - t) / t,
            "analytic_phase": plan["prediction"]["memory_detail"]["peak_phase"],
            "analytic_phases": plan["prediction"]["memory_detail"]["phases"],
            "trace_phase_peaks": tr["phase_peaks"], "trace_breakdown": tr["breakdown_at_peak"],
            "per_rank": plan["distributed"]["per_rank"], "trace_seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="reports/accuracy/multi-gpu")
    a = ap.parse_args(argv)
    commit, dirty = source_state()
    todo = cases()
    t0 = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(a.jobs) as ex:
        for i, row in enumerate(ex.map(run_case, todo), 1):
            rows.append(row)
            print(f"[{i}/{len(todo)}] {row['model']} {row['strategy']} W={row['world']} {row['quant']} {row['b']}x{row['s']} "
                  f"ckpt={row['ckpt']}: {pct(row['error'])} ({row['trace_seconds']} s)", flush=True)
    errs = [abs(r["error"]) for r in rows]
    worst = max(rows, key=lambda r: abs(r["error"]))
    summary = {"cases": len(rows), "median_abs_error": statistics.median(errs), "worst_abs_error": max(errs),
               "worst_case": {k: worst[k] for k in ("model", "strategy", "world", "quant", "b", "s", "ckpt", "error")}}
    versions = {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")}
    cmd = " ".join(["python", "bench/accuracy_dist.py", *argv])
    doc = {"command": cmd, "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
           "planner_dirty": dirty, "versions": versions, "seconds": round(time.perf_counter() - t0, 1),
           "summary": summary, "cases": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# Multi-GPU accuracy: analytic per-rank plan vs the traced step of one FSDP2 rank", "",
             f"Command: `{cmd}` at commit {commit}{' (planner modified)' if dirty else ''} ({doc['generated']}, "
             f"{doc['seconds']} s; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ").", "",
             "Each case: `qplan estimate --gpus W --strategy fsdp` (one rank's analytic tensor peak) vs",
             "`--method trace` (the model sharded by the real `fully_shard` per decoder layer and at the root on the",
             "meta device over torch's fake process group, two training steps under the live-tensor tracker).",
             "hsdp rows: `--gpus G --nodes M --strategy hsdp`, traced on a fake (M, G) mesh (replicated across nodes,",
             "sharded inside one).",
             "Defaults otherwise: LoRA r=8 all-linear, nf4 + double quant with the fp32 upcast, bf16 compute, AdamW.",
             "Error = (analytic - trace) / trace.", "",
             f"**{summary['cases']} cases: median |error| {100 * summary['median_abs_error']:.4f}%, worst |error| "
             f"{100 * summary['worst_abs_error']:.4f}%** (worst: {summary['worst_case']}).", "",
             "| model | strategy | ranks | quant | b×s | ckpt | analytic | trace | error | analytic peak moment |",
             "|---|---|---:|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        ranks = f"{r['world']}" if r["nodes"] == 1 else f"{r['world']} ({r['nodes']} nodes × {r['world'] // r['nodes']})"
        lines.append(f"| {r['model']} | {r['strategy']} | {ranks} | {r['quant']} | {r['b']}×{r['s']} | "
                     f"{'on' if r['ckpt'] else 'off'} | "
                     f"{r['analytic_tensor_peak']} | {r['trace_tensor_peak']} | {pct(r['error'])} | {r['analytic_phase']} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"median |error| {100 * summary['median_abs_error']:.4f}%, worst {100 * summary['worst_abs_error']:.4f}% "
          f"over {summary['cases']} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
