"""Real CPU runs of GRPO plans (TRL 1.16's GRPOTrainer with transformers' generate, random weights, a toy reward)
against the plan's CPU prediction, and real ``generate`` calls against the planned generation moments.

Each trainer case: ``make_plan(objective="grpo", ...)`` (the analytic moments for CPU kernels) and
``qplan.observe.grpo_probe.tracked_grpo_run`` (3 steps, steps 2-3 tracked, the generation its own phase). Each
generate case: ``tracked_generate`` (one generation batch, TRL's sampling settings) against
``generation_terms(kernels="cpu")``: the KV cache to the byte, the prefill, last-decode and last-sampling moments.

    python bench/grpo_cpu_runs.py   # writes reports/accuracy/grpo-cpu/README.md and runs.json (~3 min)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT.parent))

TINY = str(ROOT / "tests" / "backends" / "data" / "tiny-llama.json")
SMOL = str(ROOT / "model_specs" / "smollm2-135m.json")
QWEN = str(ROOT / "model_specs" / "qwen2.5-0.5b.json")
ALL = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
#: (model, batch, generations, prompt, completion, grad_accum, steps_per_generation, grad_ckpt, dropout)
TRAINER = [
    (SMOL, 4, 4, 32, 24, 1, None, True, 0.0),
    (SMOL, 4, 4, 32, 24, 1, None, False, 0.0),
    (SMOL, 2, 4, 32, 24, 2, None, True, 0.0),
    (SMOL, 2, 2, 32, 24, 2, 1, True, 0.05),
    (TINY, 4, 4, 16, 8, 1, None, True, 0.0),
    (TINY, 4, 2, 24, 12, 1, None, True, 0.1),
]
#: (model, rows, prompt, completion, dtype, dropout)
GENERATE = [
    (TINY, 4, 64, 48, "bfloat16", 0.05),
    (TINY, 8, 16, 120, "float32", 0.0),
    (SMOL, 8, 64, 16, "bfloat16", 0.05),
    (SMOL, 4, 32, 40, "bfloat16", 0.0),
    (SMOL, 4, 32, 8, "float32", 0.05),
    (QWEN, 2, 24, 6, "bfloat16", 0.0),
]


def config(model: str) -> dict:
    data = json.loads(Path(model).read_text())
    return data.get("config", data)


def pct(planned: int, measured: int) -> float:
    return round(100.0 * (planned / measured - 1.0), 3)


def main() -> None:
    from qplan.observe.grpo_probe import tracked_generate, tracked_grpo_run
    from qplan.planner.api import make_plan
    from qplan.planner.memory.generation import GenerationShape, generation_terms
    from qplan.planner.model.catalog import load_spec
    from qplan.planner.model.weights import QuantSettings

    out = ROOT / "reports" / "accuracy" / "grpo-cpu"
    out.mkdir(parents=True, exist_ok=True)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    runs, gens = [], []
    for model, b, g, p, c, ga, spg, ckpt, drop in TRAINER:
        t0 = time.perf_counter()
        measured = tracked_grpo_run(config(model), b, g, p, c, ga, spg, ckpt, drop)
        plan = make_plan(model=model, objective="grpo", quant="bf16", batch_size=b, num_generations=g,
                         max_prompt_length=p, max_completion_length=c, grad_accum=ga, steps_per_generation=spg,
                         grad_ckpt=ckpt, dropout=drop).to_dict()
        phases = plan["prediction"]["memory_detail"]["phases_cpu"]
        runs.append({"model": Path(model).stem, "batch": b, "generations": g, "prompt": p, "completion": c,
                     "grad_accum": ga, "steps_per_generation": spg or ga, "grad_ckpt": ckpt, "dropout": drop,
                     "measured_peak": measured["tensor_peak"], "planned_peak": max(phases.values()),
                     "peak_error_pct": pct(max(phases.values()), measured["tensor_peak"]),
                     "measured_generation": measured["phase_peaks"]["generation"],
                     "planned_generation": phases["generation"],
                     "generation_error_pct": pct(phases["generation"], measured["phase_peaks"]["generation"]),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(runs[-1], flush=True)
    for model, n, p, c, dtype, drop in GENERATE:
        measured = tracked_generate(config(model), n, p, c, dtype=dtype, dropout=drop)
        q = QuantSettings("bf16" if dtype == "bfloat16" else "fp32", False, dtype)
        planned = generation_terms(load_spec(model), q, "float32", ALL, GenerationShape(n, p, c), drop, "cpu")
        gens.append({"model": Path(model).stem, "rows": n, "prompt": p, "completion": c, "dtype": dtype,
                     "dropout": drop, "kv_cache_measured": measured["kv_cache"], "kv_cache_planned": planned["kv_cache"],
                     **{f"{m}_error_pct": pct(planned[m], measured[m]) for m in ("prefill", "decode", "sample")},
                     "peak_error_pct": pct(planned["peak"], max(measured[m] for m in ("prefill", "decode", "sample")))})
        print(gens[-1], flush=True)
    (out / "runs.json").write_text(json.dumps({"commit": rev, "trainer_runs": runs, "generate_runs": gens}, indent=1))
    lines = ["# GRPO on the CPU: planned vs measured", "",
             f"`python bench/grpo_cpu_runs.py` at {rev}: TRL 1.16 `GRPOTrainer` (transformers' generate, bf16, LoRA r=16 "
             "on every linear layer, random weights, a toy length reward), steps 2-3 tracked by qplan's live-tensor "
             "tracker; the plan's CPU-kernel moments (`prediction.memory_detail.phases_cpu`).", "",
             "| model | B | G | P | C | GA | spg | ckpt | dropout | measured peak | planned | error | generation measured "
             "| planned | error |", "|" + "---|" * 15]
    for r in runs:
        lines.append(f"| {r['model']} | {r['batch']} | {r['generations']} | {r['prompt']} | {r['completion']} | "
                     f"{r['grad_accum']} | {r['steps_per_generation']} | {r['grad_ckpt']} | {r['dropout']} | "
                     f"{r['measured_peak']:,} | {r['planned_peak']:,} | {r['peak_error_pct']:+.2f}% | "
                     f"{r['measured_generation']:,} | {r['planned_generation']:,} | {r['generation_error_pct']:+.3f}% |")
    lines += ["", "One generation batch with `generate` (TRL's sampling settings, no EOS, the first row left-padded), "
              "the bytes beyond the model's own at each moment:", "",
              "| model | rows | P | C | dtype | dropout | KV cache measured | planned | prefill | last decode | "
              "last sampling | peak |", "|" + "---|" * 12]
    for r in gens:
        lines.append(f"| {r['model']} | {r['rows']} | {r['prompt']} | {r['completion']} | {r['dtype']} | {r['dropout']} | "
                     f"{r['kv_cache_measured']:,} | {r['kv_cache_planned']:,} | {r['prefill_error_pct']:+.2f}% | "
                     f"{r['decode_error_pct']:+.2f}% | {r['sample_error_pct']:+.2f}% | {r['peak_error_pct']:+.2f}% |")
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
