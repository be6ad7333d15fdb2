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
#: the runs' ``optimizer_type`` -> qplan's optimizer (PEFT's LoRA-FA: ``create_lorafa_optimizer``)
OPTIMIZER = {"AdamW": "adamw_torch", "lora-fa": "lorafa"}


def plan_options(run: dict) -> dict:
    """qplan's options for one PEFT run (its train and LoRA config)."""
    tc, pc = run["train_config"], run["peft_config"]
    assert tc["dtype"] == "bfloat16" and not tc["use_amp"] and not tc["use_gc"]
    assert tc["optimizer_type"] in OPTIMIZER, tc["optimizer_type"]
    setting = dict(model="llama-3.2-3b", quant="bf16", compute_dtype="fp32", grad_ckpt=False,
                   batch_size=tc["batch_size"], seq_len=tc["max_seq_length"], optimizer=OPTIMIZER[tc["optimizer_type"]],
                   gpu="l40s")
    if pc is None:  # PEFT's full fine-tuning run: no adapter, every parameter trains
        return {**setting, "full": True}
    if pc.get("peft_type") == "IA3":  # (IA)³: its own target and feed-forward modules
        return {**setting, "peft_type": "ia3", "targets": ",".join(sorted(pc["target_modules"])),
                "feedforward_modules": ",".join(sorted(pc["feedforward_modules"])) or "none"}
    if pc.get("peft_type") == "PROMPT_TUNING":  # its virtual tokens (the initialisation changes no byte)
        return {**setting, "peft_type": "prompt_tuning", "num_virtual_tokens": pc["num_virtual_tokens"]}
    if pc.get("peft_type") == "LOHA":  # its rank, alpha and targets (no rank or module dropout in these runs)
        assert not pc["rank_dropout"] and not pc["module_dropout"], pc
        return {**setting, "peft_type": "loha", "r": pc["r"], "alpha": float(pc["alpha"]),
                "targets": ",".join(sorted(pc["target_modules"]))}
    if pc.get("peft_type") == "LOKR":  # its rank, alpha, targets and factorization (no dropout in these runs)
        assert not pc["rank_dropout"] and not pc["module_dropout"] and not pc["decompose_both"], pc
        return {**setting, "peft_type": "lokr", "r": pc["r"], "alpha": float(pc["alpha"]),
                "targets": ",".join(sorted(pc["target_modules"])), "decompose_factor": pc["decompose_factor"]}
    if pc.get("peft_type") == "VERA":  # its rank and targets (no dropout, projections saved, as qplan plans)
        assert not pc["vera_dropout"] and pc["save_projection"] and pc["bias"] == "none", pc
        return {**setting, "peft_type": "vera", "r": pc["r"], "targets": ",".join(sorted(pc["target_modules"]))}
    if pc.get("peft_type") == "MISS":  # its rank, form and targets (no dropout or bias in these runs)
        assert not pc["miss_dropout"] and pc["bias"] == "none", pc
        init = str(pc["init_weights"]).lower()
        return {**setting, "peft_type": "miss", "r": pc["r"], "targets": ",".join(sorted(pc["target_modules"])),
                "miss_init": init, **({"mini_r": pc["mini_r"]} if init == "mini" else {})}
    if pc.get("peft_type") == "C3A":  # its block size and targets (no per-module sizes; the initialisation changes no byte)
        assert not pc["block_size_pattern"] and pc["bias"] == "none", pc
        return {**setting, "peft_type": "c3a", "block_size": pc["block_size"],
                "targets": ",".join(sorted(pc["target_modules"]))}
    if pc.get("peft_type") == "LN_TUNING":  # the norms it trains a copy of
        return {**setting, "peft_type": "ln_tuning", "targets": ",".join(sorted(pc["target_modules"]))}
    if pc.get("peft_type") == "P_TUNING":  # its virtual tokens and the MLP that makes them
        assert pc["encoder_reparameterization_type"] == "MLP", pc
        return {**setting, "peft_type": "p_tuning", "num_virtual_tokens": pc["num_virtual_tokens"],
                "encoder_hidden_size": pc["encoder_hidden_size"]}
    return {**setting, "r": pc["r"], "alpha": float(pc["lora_alpha"]), "dropout": float(pc["lora_dropout"]),
            "targets": ",".join(sorted(pc["target_modules"])), "rslora": pc["use_rslora"], "dora": pc["use_dora"]}


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
               "analytic_padded_peak_less_context": plans["padded"]["prediction"]["memory"]["peak"]
               - plans["padded"]["prediction"]["memory_detail"]["cuda_context"],
               "dora": (run["peft_config"] or {}).get("use_dora", False), "full": run["peft_config"] is None}
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
        "| run | trainable (qplan = PEFT) | measured max reserved | tensor peak, padded | ratio | + slack, ratio | "
        "unpadded | " + ("trace (unpadded) | " if args.trace else "") + "",
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if args.trace else ""),
    ]
    for r in rows:
        tr = f" {r['trace_tensor_peak'] / GiB:.2f} GiB |" if args.trace else ""
        same = "=" if r["trainable"] == r["measured_trainable"] else "≠"
        lines.append(f"| {r['run'].replace('--', ' / ')} | {r['trainable']:,} {same} {r['measured_trainable']:,} | "
                     f"{r['measured_max_reserved'] / GiB:.2f} GiB | "
                     f"{r['analytic_padded_tensor_peak'] / GiB:.2f} GiB | "
                     f"{r['analytic_padded_tensor_peak'] / r['measured_max_reserved']:.3f} | "
                     f"{r['analytic_padded_peak_less_context'] / r['measured_max_reserved']:.3f} | "
                     f"{r['analytic_tensor_peak'] / GiB:.2f} GiB |{tr}")
    lines += [
        "",
        "The LoRA runs' padded tensor peak lands within 2% of the reserved peak; the allocator's reserve above live "
        "tensors is 1–2% here, below the uncalibrated 5% slack qplan adds (`+ slack`: the plan's `peak` less the CUDA "
        "context, 3–5.5% high for them: a `qplan calibrate` file fitted on a device's runs replaces the assumption). "
        "DoRA's saved tensors are planned (its weight-norm transients are not: the plan says so).",
        "",
        "LoRA-FA (`--optimizer lorafa`, PEFT's `create_lorafa_optimizer`; nothing fitted to it): `lora_A` frozen, "
        "so 3,670,016 trainable parameters (PEFT's count), no gradient or AdamW state for A and no saved input for it; "
        "the plan's own terms are the trace's (tests/planner/test_lorafa.py), 2.2 GB of fp32 input copies fewer than "
        "LoRA's. Yet the run reserved as much as LoRA's (20.71 vs 20.76 GiB), 11% above its live tensors: not "
        "explained without a GPU (a hypothesis, unmeasured: the input copies LoRA keeps are made and freed in every "
        "layer here, which can leave the caching allocator's segments in pieces). The plan warns and says to budget "
        "LoRA's peak, which is within 3% of this run (tests/planner/test_peft_evidence.py). Its step time is not "
        "planned: the optimizer's loop takes a pseudo-inverse per adapted module (a host sync each), 23% slower than "
        "LoRA in this run; it is left out of the time fit (reports/time/).",
        "",
        "(IA)³ (`--peft-type ia3`, PEFT's `IA3Config`; nothing fitted to it): the trainable count and the adapter "
        "file (1,157,064 bytes for the default targets) are PEFT's; the live tensors are the trace's (tests/planner/"
        "test_ia3.py): each scaled module keeps what its `ia3_l` gradient needs — the fp32 copy of a feed-forward "
        "module's input, the base output of the others.",
        "",
        "Prompt tuning (`--peft-type prompt_tuning --num-virtual-tokens 200`, PEFT's `PromptTuningConfig`; nothing "
        "fitted to it): 614,400 trainable parameters and the 2,457,728-byte adapter file are PEFT's; every row runs "
        "768 + 200 positions, layer 0's input needs a gradient, and PEFT's forward keeps the model's input, the cast "
        "prompt and the extended labels until it returns (tests/planner/test_prompt_tuning.py: the trace's, every "
        "phase). The reserved peak is 4.4% above the live tensors (LoRA's runs: 1.3%), not explained without a GPU "
        "(the allocator's reserve over the 968-position batches is the hypothesis, unmeasured); the plan's peak with "
        "its 5% slack covers it (`+ slack`). Its step time is 25% under the runs' (reports/time/): the plan warns.",
        "",
        "P-tuning (`--peft-type p_tuning --num-virtual-tokens 20 --encoder-hidden-size 3072`, PEFT's "
        "`PromptEncoderConfig` with its MLP; nothing fitted to it): 28,382,208 trainable parameters (the 20 × 3072 "
        "embedding and the three-layer MLP) are PEFT's, and the 245,880-byte adapter file holds only the prompt the MLP "
        "makes, as PEFT saves it; the MLP runs once per step on one row of the virtual tokens, its saved inputs live "
        "until its backward (the trace's, tests/planner/test_prompt_tuning.py).",
        "",
        "LN tuning (`--peft-type ln_tuning`, PEFT's `LNTuningConfig` with its Llama defaults: input, post-attention and "
        "final norms; nothing fitted to it): 175,104 trainable parameters (bf16 copies of the norms: LN tuning skips "
        "the fp32 adapter cast) and the 358,288-byte adapter file are PEFT's; each trained norm saves its normalized "
        "input and the gradient runs down to layer 0's input norm (tests/planner/test_ln_tuning.py: the trace's).",
        "",
        "LoHa (`--peft-type loha --r 32 --alpha 64 --targets q_proj,v_proj`, PEFT's `LoHaConfig`; nothing fitted to "
        "it): 18,350,080 trainable parameters and the 73,429,560-byte adapter file are PEFT's; each adapted module "
        "builds its full fp32 weight update every forward and saves it with an fp32 copy of its input "
        "(tests/planner/test_loha.py: the trace's), 1.4 GB more than LoRA at the same rank.",
        "",
        "LoKr (`--peft-type lokr --r 32 --alpha 64 --decompose-factor 4 --targets q_proj,v_proj`, PEFT's `LoKrConfig`; "
        "nothing fitted to it): PEFT's factorization gives 2,294,656 trainable parameters and the 9,199,776-byte "
        "adapter file; each module saves its full `kron(w1, w2)` update and input copy as LoHa's "
        "(tests/planner/test_lokr.py: the trace's).",
        "",
        "VeRA (`--peft-type vera --r 256 --targets q_proj,v_proj`, PEFT's `VeraConfig`; nothing fitted to it): "
        "129,024 trainable parameters, the model's total with the projections as buffers, and the 6,821,968-byte "
        "adapter file (the shared projections in it) are PEFT's; each module keeps the two products its vectors "
        "scale (tests/planner/test_vera.py: the trace's).",
        "",
        "MiSS (`--peft-type miss --r 64 --targets q_proj,v_proj`, and `--miss-init mini --mini-r 64`: PEFT's "
        "`MissConfig`; nothing fitted to them): 7,340,032 and 229,376 trainable parameters and the 29,367,496- and "
        "924,568-byte adapter files are PEFT's; each module saves only the r-wide sum of its input's slices that its "
        "block multiplies, as LoRA-FA saves its frozen A's output (tests/planner/test_miss.py: the trace's). Unlike "
        "LoRA-FA's run, both reserved peaks are within 2% of the plan. PEFT's third MiSS run (`--miss-init bat`) "
        "rebuilds each adapted weight in fp32 every forward and saves it with its blocks' copy and the input's fp32 "
        "copy: 4.9 GB more, also within 2% of its reserved peak.",
        "",
        "C3A (`--peft-type c3a --block-size 64 --targets q_proj,v_proj`, PEFT's `C3AConfig`; nothing fitted to it): "
        "5,505,024 trainable parameters and the 22,027,512-byte adapter file are PEFT's; each module saves the fp32 "
        "copy of its input that its block-circulant FFTs read (tests/planner/test_c3a.py: the trace's), and its "
        "FFTs' passes over every token are in the step time's bytes.",
        "",
        "Full fine-tuning (`--full`; PEFT's `full-finetuning` run, nothing fitted to it): the trainable count is the "
        "model's 3,212,749,824 parameters, and the tensor peak is the trace's (16 bytes apart; tests/planner/test_full.py) "
        "at its start of backward (the logits' fp32 copies over every layer's activations, the AdamW states). The "
        "reserved peak is 7% above it — the allocator's reserve in this run, four times the LoRA runs': the 3.2 B "
        "gradients made layer by layer while activations are freed, and the foreach AdamW's 6 GiB `sqrt` of each "
        "step, leave the cache in pieces that the next step's activations fit only in part. The plan's peak with its "
        "uncalibrated 5% slack covers most of it (`+ slack`); `qplan calibrate` on a few steps of the run measures it.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
