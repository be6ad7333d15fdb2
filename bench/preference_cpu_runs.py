"""Real CPU runs of DPO, KTO and reward-model plans (TRL's DPOTrainer, KTOTrainer and RewardTrainer, random weights)
against the plan's CPU prediction.

Each case: ``qplan estimate --objective dpo|kto ...`` (the analytic tensor peak for CPU kernels: TRL's fused head
folds its tiles with torch ops there), then ``qplan run --random-init --device cpu --steps 3`` and the live tensors
the tracker measured (DDP: every rank's, the largest compared). Also recorded: PEFT's trainable count and adapter file
against the plan's, and the first step's loss (DPO ln 2 = 0.693147, KTO 0.5, when the reference is the
adapter-disabled base; a reward model's starts near it, its score head random). One SFT plan with TRL's fused head
(``--loss trl``) for comparison.

    python bench/preference_cpu_runs.py   # writes reports/accuracy/preference-cpu/README.md and runs.json (~6 min)
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

TINY = str(ROOT / "tests" / "backends" / "data" / "tiny-llama.json")
CASES = [
    ("smollm2-135m", ["--objective", "dpo", "--quant", "bf16", "--batch-size", "1", "--seq-len", "256"]),
    ("smollm2-135m", ["--objective", "dpo", "--quant", "bf16", "--no-grad-ckpt", "--batch-size", "1", "--seq-len", "256"]),
    ("smollm2-135m", ["--objective", "dpo", "--batch-size", "1", "--seq-len", "256"]),
    ("smollm2-135m", ["--objective", "dpo", "--quant", "bf16", "--batch-size", "2", "--seq-len", "128", "--r", "64",
                      "--targets", "qv"]),
    ("tiny-llama", ["--objective", "dpo", "--quant", "bf16", "--batch-size", "2", "--seq-len", "128"]),
    ("tiny-llama", ["--objective", "dpo", "--batch-size", "2", "--seq-len", "128"]),
    ("tiny-llama", ["--objective", "dpo", "--quant", "bf16", "--gpus", "2", "--batch-size", "2", "--seq-len", "128"]),
    ("smollm2-135m", ["--objective", "kto", "--quant", "bf16", "--batch-size", "2", "--seq-len", "256"]),
    ("smollm2-135m", ["--objective", "kto", "--quant", "bf16", "--no-grad-ckpt", "--batch-size", "2", "--seq-len", "256"]),
    ("smollm2-135m", ["--objective", "kto", "--batch-size", "2", "--seq-len", "256"]),
    ("tiny-llama", ["--objective", "kto", "--quant", "bf16", "--batch-size", "2", "--seq-len", "128"]),
    ("smollm2-135m", ["--objective", "reward", "--batch-size", "2", "--seq-len", "256"]),
    ("smollm2-135m", ["--objective", "reward", "--no-grad-ckpt", "--batch-size", "2", "--seq-len", "256"]),
    ("tiny-llama", ["--objective", "reward", "--batch-size", "2", "--seq-len", "128"]),
    ("smollm2-135m", ["--loss", "trl", "--quant", "bf16", "--batch-size", "2", "--seq-len", "256"]),
]


def estimate_and_run(model: str, args: list[str], work: Path) -> tuple[Path, dict, float]:
    """``qplan estimate --model MODEL ARGS`` into ``work``, then a real CPU ``qplan run`` of it (random weights, 3
    steps): the plan's path, the run's measured.json and when the run started."""
    from qplan.backends import runner

    plan = work / "plan.json"
    cmd = [sys.executable, "-m", "qplan.cli.main", "estimate", "--model", TINY if model == "tiny-llama" else model,
           *args, "--output", str(plan)]
    subprocess.run(cmd, check=True, capture_output=True)
    t0 = time.time()
    result = runner.run_plan(plan, random_init=True, steps=3, device="cpu", out_dir=work / "runs")
    return plan, json.loads((Path(result["run_dir"]) / "measured.json").read_text(encoding="utf-8")), t0


def run_case(model: str, args: list[str], work: Path) -> dict:
    _, doc, t0 = estimate_and_run(model, args, work)
    c = doc["compared"]
    return {"model": model, "args": " ".join(args), "status": doc["status"],
            "predicted": c["tensor_peak"]["predicted"], "measured": c["tensor_peak"]["measured"],
            "error": c["tensor_peak"]["error"], "peak_phase": doc["measured"]["memory"].get("tensor_peak_phase"),
            "trainable": [c["trainable"]["predicted"], c["trainable"]["measured"]],
            "adapter_file_bytes": [c["adapter_file_bytes"]["predicted"], c["adapter_file_bytes"]["measured"]],
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
    out = ROOT / "reports" / "accuracy" / "preference-cpu"
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    (out / "runs.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    worst = max(abs(r["error"]) for r in rows)
    lines = [
        "# DPO, KTO and reward models on the CPU: TRL's trainers measured against the plan",
        "",
        f"Command: `python bench/preference_cpu_runs.py` at commit {commit} (torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}).",
        "",
        "Each row: `qplan estimate --model MODEL ARGS`, then `qplan run --random-init --device cpu --steps 3`: the "
        "tensor peak the live-tensor tracker measured over the steps against the plan's CPU prediction "
        "(`memory_detail.tensor_peak_cpu`; DDP: the largest rank's). Error = (predicted - measured) / measured. The "
        "first loss is the one at step 0, where the policy equals the reference: DPO's ln 2 = 0.693147, KTO's 0.5 (a "
        "reward model's is near ln 2: its score head is random).",
        "",
        f"**{len(rows)} runs, worst |error| {100 * worst:.2f}%; trainable counts and adapter files equal in all.**",
        "",
        "| model | args | predicted | measured | error | peak phase | trainable | adapter file | first loss | s |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        same = "=" if r["trainable"][0] == r["trainable"][1] else "≠"
        same_f = "=" if r["adapter_file_bytes"][0] == r["adapter_file_bytes"][1] else "≠"
        lines.append(f"| {r['model']} | `{r['args']}` | {r['predicted']:,} | {r['measured']:,} | "
                     f"{100 * r['error']:+.2f}% | {r['peak_phase']} | {r['trainable'][1]:,} {same} | "
                     f"{r['adapter_file_bytes'][1]:,} {same_f} | {r['first_loss']:.6f} | {r['seconds']} |")
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
