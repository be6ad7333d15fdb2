"""Accuracy of full fine-tuning (``--full``): the analytic plan vs the live-tensor trace, over a grid.

Each case: ``qplan estimate --full`` (analytic: the tensor peak and every moment) against the trace of two real
training steps of the full-size model on the meta device, CUDA kernels mirrored (``--method trace``); several GPUs:
one FSDP2 rank traced under the real ``fully_shard`` on torch's fake process group. Error = (analytic - trace) /
trace, for the peak and for each traced phase (forward, backward, optimizer: the largest planned moment of each).
tests/planner/test_full.py samples this grid; this runs all of it.

    python bench/full_accuracy.py                 # writes reports/accuracy/full/README.md and matrix.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT.parent))

MODELS = ("llama-3.2-1b", "llama-3.1-8b", "qwen3-0.6b", "gemma-2-9b", "phi-4", "mistral-nemo-12b", "qwen3-30b-a3b")
#: weights / compute: bf16 under bf16 autocast, fp32 master weights under bf16 autocast, a pure bf16 step
PRECISIONS = (dict(quant="bf16", compute_dtype="bf16"), dict(quant="fp32", compute_dtype="bf16"),
              dict(quant="bf16", compute_dtype="fp32"))
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
FSDP = [("llama-3.2-1b", dict(gpus=2)), ("qwen3-0.6b", dict(gpus=4, optimizer="sgd", seq_len=256)),
        ("llama-3.1-8b", dict(gpus=2)), ("llama-3.1-8b", dict(gpus=4, optimizer="sgd", seq_len=256)),
        ("gemma-2-9b", dict(gpus=2)), ("phi-4", dict(gpus=2, optimizer="sgd", seq_len=512)),
        ("qwen3-30b-a3b", dict(gpus=2)), ("mistral-nemo-12b", dict(gpus=8, grad_ckpt=False))]


def cases() -> list[dict]:
    out = [dict(model=m, batch_size=2, seq_len=1024, grad_ckpt=ck, optimizer=op, **pr)
           for m, pr, ck, op in itertools.product(MODELS, PRECISIONS, (True, False), OPTIMIZERS)]
    out += [{"model": m, "batch_size": 2, "seq_len": 1024, "optimizer": "adamw_torch_fused", "strategy": "fsdp", **kw}
            for m, kw in FSDP]
    return out


def run(kw: dict) -> dict:
    from qplan.observe.trace import trace_plan
    from qplan.observe.trace.dist import trace_rank_step
    from qplan.planner.api import plan_dict
    from qplan.planner.vocab import MOMENTS_OF_PHASE, PHASES

    plan = plan_dict(full=True, gpu="h100-80gb", **kw)
    traced = trace_rank_step(plan, steps=2) if kw.get("strategy") else trace_plan(plan, steps=2)
    ph, tp = plan["prediction"]["memory_detail"]["phases"], traced["phase_peaks"]
    planned = {phase: max(v for k, v in ph.items() if k in MOMENTS_OF_PHASE[phase]) for phase in PHASES}
    peak = plan["prediction"]["memory"]["tensor_peak"]
    return {"case": kw, "analytic": peak, "trace": traced["tensor_peak"],
            "peak_phase": plan["prediction"]["memory_detail"]["peak_phase"],
            "error": (peak - traced["tensor_peak"]) / traced["tensor_peak"],
            "phase_errors": {k: (planned[k] - tp[k]) / tp[k] for k in planned}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "reports" / "accuracy" / "full"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    rows = []
    for kw in cases():
        r = run(kw)
        rows.append(r)
        print(f"{json.dumps(kw)[:110]:110} {r['error']:+.3%}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    single = [r for r in rows if not r["case"].get("strategy")]
    sharded = [r for r in rows if r["case"].get("strategy")]

    def worst(rs: list[dict], key) -> float:
        return max(abs(key(r)) for r in rs)

    lines = [
        "# Accuracy: full fine-tuning, analytic plan vs exact trace", "",
        f"Command: `python bench/full_accuracy.py` ({time.perf_counter() - t0:.0f} s). Each case: `qplan estimate --full` "
        "against the live-tensor trace of two training steps of the full-size model on the meta device (CUDA kernels "
        "mirrored); several GPUs: one FSDP2 rank under the real `fully_shard` on a fake process group. Batch 2 × 1024 "
        "unless said. Error = (analytic − trace) / trace; the phase errors compare the largest planned moment of each "
        "traced phase.", "",
        f"**One GPU, {len(single)} cases: peak median |error| {statistics.median(abs(r['error']) for r in single):.3%}, "
        f"worst {worst(single, lambda r: r['error']):.3%}; worst phase error "
        f"{worst(single, lambda r: max(r['phase_errors'].values(), key=abs)):.3%}.**", "",
        f"**FSDP2, {len(sharded)} cases: peak worst |error| {worst(sharded, lambda r: r['error']):.3%}** (the moments "
        "inside a layer's backward are planned at its end).", "",
        "| model | case | analytic | trace | error | peak at | forward | backward | optimizer |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        c = {k: v for k, v in r["case"].items() if k not in ("model", "batch_size")}
        e = r["phase_errors"]
        lines.append(f"| {r['case']['model']} | {', '.join(f'{k}={v}' for k, v in c.items())} | {r['analytic']:,} | "
                     f"{r['trace']:,} | {r['error']:+.3%} | {r['peak_phase']} | {e['forward']:+.3%} | "
                     f"{e['backward']:+.3%} | {e['optimizer']:+.3%} |")
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
