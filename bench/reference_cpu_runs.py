"""Real CPU runs of the reference's other forms: full fine-tuning DPO/KTO (TRL loads the checkpoint again as the
reference), ``precompute_ref_log_probs`` (the pass before training, measured in the trainer's construction), and
full fine-tuning through TRL's fused head (SFT) — against the plan's CPU prediction.

Each case: ``qplan estimate ...``, then ``qplan run --random-init --device cpu --steps 3``: the steps' tensor peak the
live-tensor tracker measured against the plan's CPU prediction of the steps' moments, the pass's (``Probe.measured_pass``)
against the plan's ``precompute`` moment, the policy's weights, and the first step's loss (DPO's ln 2 = 0.693147, KTO's
0.5: the reference is the policy's own checkpoint, or its log-probabilities from the pass).

    python bench/reference_cpu_runs.py   # writes reports/accuracy/reference-cpu/README.md and runs.json (~8 min)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT.parent))

sys.path.insert(0, str(ROOT / "bench"))
CASES = [
    ("smollm2-135m", ["--objective", "dpo", "--full", "--quant", "bf16", "--batch-size", "1", "--seq-len", "256"]),
    ("smollm2-135m", ["--objective", "dpo", "--full", "--quant", "bf16", "--no-grad-ckpt", "--batch-size", "1",
                      "--seq-len", "256"]),
    ("smollm2-135m", ["--objective", "kto", "--full", "--quant", "bf16", "--batch-size", "2", "--seq-len", "256"]),
    ("smollm2-135m", ["--objective", "dpo", "--full", "--quant", "bf16", "--precompute-ref-log-probs",
                      "--precompute-ref-batch-size", "2", "--batch-size", "1", "--seq-len", "256"]),
    ("smollm2-135m", ["--objective", "dpo", "--precompute-ref-log-probs", "--precompute-ref-batch-size", "4",
                      "--batch-size", "1", "--seq-len", "256"]),
    ("smollm2-135m", ["--objective", "kto", "--quant", "bf16", "--precompute-ref-log-probs", "--batch-size", "2",
                      "--seq-len", "256"]),
    ("smollm2-135m", ["--full", "--loss", "trl", "--quant", "bf16", "--batch-size", "2", "--seq-len", "256"]),
    ("tiny-llama", ["--objective", "dpo", "--full", "--quant", "fp32", "--batch-size", "2", "--seq-len", "128"]),
]


def run_case(model: str, args: list[str], work: Path) -> dict:
    from preference_cpu_runs import estimate_and_run

    plan, doc, t0 = estimate_and_run(model, args, work)
    c = doc["compared"]
    pre = c.get("precompute_tensor_peak") or {}
    reference = json.loads(plan.read_text(encoding="utf-8"))["prediction"]["memory_detail"]["weights"].get("reference", 0)
    return {"model": model, "args": " ".join(args), "status": doc["status"],
            "predicted": c["tensor_peak"]["predicted"], "measured": c["tensor_peak"]["measured"],
            "error": c["tensor_peak"]["error"], "peak_phase": doc["measured"]["memory"].get("tensor_peak_phase"),
            "pass": [pre.get("predicted"), pre.get("measured"), pre.get("error")],
            "weights": [c["weights"]["predicted"], c["weights"]["measured"]], "reference_weights": reference,
            "first_loss": doc["measured"]["loss"][0], "seconds": round(time.time() - t0, 1)}


def main() -> None:
    import torch
    import transformers
    import trl

    rows = []
    for model, args in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run_case(model, args, Path(tmp)))
        print(rows[-1], flush=True)
    out = ROOT / "reports" / "accuracy" / "reference-cpu"
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    (out / "runs.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    worst = max(abs(r["error"]) for r in rows)
    passes = [r["pass"][2] for r in rows if r["pass"][2] is not None]
    lines = [
        "# The reference's other forms on the CPU: full fine-tuning DPO/KTO, precomputed log-probabilities",
        "",
        f"Command: `python bench/reference_cpu_runs.py` at commit {commit} (torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}).",
        "",
        "Each row: `qplan estimate --model MODEL ARGS`, then `qplan run --random-init --device cpu --steps 3` with TRL's "
        "own trainer: the steps' tensor peak the live-tensor tracker measured against the plan's CPU prediction of the "
        "steps' moments; with `--precompute-ref-log-probs` also the pass before training (measured around the "
        "trainer's construction, where TRL runs it) against the plan's `precompute` moment. `weights`: the policy's, "
        "predicted and measured after load (the reference model, `--full` without the pass, is loaded by the trainer "
        "and is in the steps' peak). The first loss is DPO's ln 2 = 0.693147 / KTO's 0.5 when the reference is the "
        "policy's own checkpoint (or its log-probabilities from the pass).",
        "",
        f"**{len(rows)} runs, worst steps |error| {100 * worst:.2f}%"
        + (f", worst pass |error| {100 * max(abs(e) for e in passes):.2f}%" if passes else "") + ".**",
        "",
        "| model | args | steps: predicted | measured | error | pass: predicted | measured | error | "
        "reference weights | first loss | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["pass"]
        pass_cells = (f"{p[0]:,} | {p[1]:,} | {100 * p[2]:+.2f}%" if p[2] is not None else "— | — | —")
        lines.append(f"| {r['model']} | `{r['args']}` | {r['predicted']:,} | {r['measured']:,} | "
                     f"{100 * r['error']:+.2f}% | {pass_cells} | {r['reference_weights']:,} | "
                     f"{r['first_loss']:.6f} | {r['seconds']} |")
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
