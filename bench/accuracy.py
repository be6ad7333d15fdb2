"""Accuracy matrix: the analytic training-memory model vs the exact meta-device trace.

For every plan in the matrix, ``qplan estimate`` (analytic, planner.memory.terms) and the live-tensor
trace of two real training steps on the meta device (qplan.observe.trace, CUDA kernels mirrored) give a
tensor-level peak; the error is (analytic - trace) / trace.  Writes ``matrix.json`` (every case)
and ``README.md`` (median / worst error, per model, and the command) under ``--out``.

    python bench/accuracy.py                      # the committed matrix (reports/accuracy/)
    python bench/accuracy.py --models smollm2-135m --quick --out /tmp/acc   # a small subset
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

MODELS = ("llama-3.1-8b", "qwen2.5-7b", "mistral-nemo-12b", "phi-4", "gemma-2-9b")
#: transformers refuses sdpa with Gemma-2's attention softcapping and gpt-oss's attention sinks: eager is
#: what users run without flash-attention kernels
ATTN = {"gemma-2-9b": "eager", "gpt-oss-20b": "eager"}
QUANTS = ("nf4", "bf16")
SHAPES = ((1, 512), (4, 2048), (8, 4096))
CKPTS = (True, False)
RS = (8, 64)
TARGETS = ("qv", "all-linear")
OPTIMIZERS = ("adamw_torch", "adamw_8bit")


def plan_for(model: str, quant: str, b: int, s: int, ckpt: bool, r: int, targets: str, optimizer: str,
             attn: str = "sdpa") -> dict:
    from qplan.planner.api import plan_dict
    from qplan.planner.model.catalog import load_spec

    # PEFT refuses dropout on the fused expert parameters its MoE rewrite targets (lora.ParamWrapper)
    dropout = 0.0 if load_spec(model).inventory.moe_conversion is not None else 0.05
    return plan_dict(**dict(
        model=model, r=r, alpha=None, dropout=dropout, targets=targets, bias="none", dora=False, rslora=False,
        modules_to_save="", quant=quant, double_quant=True, compute_dtype="bf16", upcast=True, gpu=None,
        seq_len=s, batch_size=b, grad_accum=1, grad_ckpt=ckpt, optimizer=optimizer, attn_impl=attn,
        backend="peft"))


def run_case(case: dict) -> dict:
    import contextlib
    import io

    from qplan.observe.trace import trace_plan as trace_for_plan

    plan = plan_for(**case)
    mem = plan["prediction"]["memory"]
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        tr = trace_for_plan(plan)
    analytic, traced = mem["tensor_peak"], tr["tensor_peak"]
    return {
        **case,
        "analytic_tensor_peak": analytic,
        "trace_tensor_peak": traced,
        "error": (analytic - traced) / traced,
        "analytic_phase": plan["prediction"]["memory_detail"].get("peak_phase"),
        "trace_phase_peaks": tr["phase_peaks"],
        "trace_breakdown": tr["breakdown_at_peak"],
        "trainable_analytic": plan["prediction"]["params"]["trainable"],
        "trainable_trace": tr["trainable_params"],
        "trace_seconds": round(time.perf_counter() - t0, 2),
    }


def cases(models, quick: bool) -> list[dict]:
    shapes = SHAPES[:1] + SHAPES[-1:] if quick else SHAPES
    out = []
    for m, q, (b, s), ck, r, tg, op in itertools.product(models, QUANTS, shapes, CKPTS, RS, TARGETS, OPTIMIZERS):
        if quick and (r, op) not in ((8, "adamw_torch"), (64, "adamw_8bit")):
            continue
        out.append(dict(model=m, quant=q, b=b, s=s, ckpt=ck, r=r, targets=tg, optimizer=op, attn=ATTN.get(m, "sdpa")))
    return out


def summarize(rows: list[dict]) -> dict:
    errs = [abs(r["error"]) for r in rows]
    worst = max(rows, key=lambda r: abs(r["error"]))
    return {"cases": len(rows), "median_abs_error": statistics.median(errs), "worst_abs_error": max(errs),
            "worst_case": {k: worst[k] for k in ("model", "quant", "b", "s", "ckpt", "r", "targets", "optimizer", "error")}}


def pct(x: float) -> str:
    return f"{100 * x:+.3f}%"


SCATTER_LINE = ("![analytic vs trace tensor peak, log-log, y = x, ±5% band](scatter.svg) "
                "(`python bench/accuracy_scatter.py` draws it from matrix.json; scatter.html is the page)")


def write_report(rows: list[dict], out: Path, argv: list[str], seconds: float, commit, dirty) -> None:
    out.mkdir(parents=True, exist_ok=True)
    versions = {}
    for mod in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version we cannot read is recorded as None
            versions[mod] = None
    total = summarize(rows)
    by_model = {m: summarize([r for r in rows if r["model"] == m]) for m in dict.fromkeys(r["model"] for r in rows)}
    doc = {"command": " ".join(["python", "bench/accuracy.py", *argv]),
           "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "commit": commit, "planner_dirty": dirty, "versions": versions, "python": platform.python_version(),
           "seconds": round(seconds, 1),
           "summary": total, "by_model": by_model, "cases": rows}
    (out / "matrix.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        "# Accuracy: analytic training-memory model vs exact trace",
        "",
        f"Command: `{doc['command']}` at commit {commit}{' (planner modified)' if dirty else ''} "
        f"({doc['generated']}, {doc['seconds']} s; "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + ").",
        "",
        "Each case: `qplan estimate` (analytic tensor peak) vs the live-tensor trace of two training steps",
        "of the full-size model on the meta device (`qplan estimate --method trace`, CUDA kernels mirrored).",
        "Error = (analytic - trace) / trace. LoRA dropout 0.05 (0 where PEFT adapts fused MoE experts, which refuses",
        "dropout), alpha 2r, bf16 compute, double-quant nf4",
        "with `prepare_model_for_kbit_training`, sdpa attention (eager for Gemma-2, which refuses sdpa).",
        "",
        f"**{total['cases']} cases: median |error| {100 * total['median_abs_error']:.3f}%, "
        f"worst |error| {100 * total['worst_abs_error']:.3f}%** (worst: {total['worst_case']}).",
        "",
        SCATTER_LINE,
        "",
        "| model | cases | median abs error | worst abs error |",
        "|---|---:|---:|---:|",
    ]
    for m, sm in by_model.items():
        lines.append(f"| {m} | {sm['cases']} | {100 * sm['median_abs_error']:.3f}% | {100 * sm['worst_abs_error']:.3f}% |")
    lines += ["", "| model | attn | quant | b×s | ckpt | r | targets | optimizer | analytic | trace | error | peak phase |",
              "|---|---|---|---|---|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        ckpt = "on" if r["ckpt"] else "off"
        lines.append(f"| {r['model']} | {r['attn']} | {r['quant']} | {r['b']}×{r['s']} | {ckpt} | {r['r']} | "
                     f"{r['targets']} | {r['optimizer']} | {r['analytic_tensor_peak']} | {r['trace_tensor_peak']} | "
                     f"{pct(r['error'])} | {r['analytic_phase']} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    sys.path.insert(0, str(Path(__file__).parent))
    import accuracy_scatter

    accuracy_scatter.write(out / "matrix.json", out)


def source_state() -> tuple[str | None, bool | None]:
    """The commit the run starts from, and whether planner/ or bench/ differ from it."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "planner", "bench"], capture_output=True,
                                    text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):  # pragma: no cover
        return None, None
    return commit, dirty


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="2 shapes x 2 (r, optimizer) pairs")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="reports/accuracy")
    a = ap.parse_args(argv)
    commit, dirty = source_state()
    todo = cases(a.models.split(","), a.quick)
    t0 = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(a.jobs) as ex:
        for i, row in enumerate(ex.map(run_case, todo), 1):
            rows.append(row)
            print(f"[{i}/{len(todo)}] {row['model']} {row['quant']} {row['b']}x{row['s']} ckpt={row['ckpt']} r={row['r']} "
                  f"{row['targets']} {row['optimizer']}: {pct(row['error'])} ({row['trace_seconds']} s)", flush=True)
    write_report(rows, Path(a.out), argv, time.perf_counter() - t0, commit, dirty)
    sm = summarize(rows)
    print(f"median |error| {100 * sm['median_abs_error']:.3f}%, worst {100 * sm['worst_abs_error']:.3f}% "
          f"over {sm['cases']} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
