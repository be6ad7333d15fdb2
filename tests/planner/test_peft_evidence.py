"""qplan against PEFT's own GPU benchmark (huggingface/peft ``method_comparison/MetaMathQA``: real L40S runs of
Llama-3.2-3B, bf16 without autocast, no checkpointing, batch 4 x 768; ``tests/fixtures/peft_metamathqa``): the
trainable count and the adapter file's bytes equal PEFT's (LoRA, DoRA, LoRA-FA, IA3, prompt tuning, p-tuning, LN
tuning, LoHa, LoKr, VeRA), and the tensor peak
of each run's padded worst batch (DoRA's too; for the full fine-tuning run, whose allocator reserve is larger, the plan's
peak with its slack; LoRA-FA and prompt tuning: see their branches) is within 3% of its measured
``max_memory_reserved`` (issue 23's reproduction; ``bench/peft_metamathqa.py`` writes the report with the trace).
No constant is fitted to these numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import peft_metamathqa as B  # noqa: E402

RUNS = json.loads(B.EVIDENCE.read_text(encoding="utf-8"))["runs"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_peft_benchmark_runs_are_reproduced(name):
    run = RUNS[name]
    plans = B.planned(run)
    measured = run["measured"]
    assert plans["plain"]["prediction"]["params"]["trainable"] == measured["num_trainable_params"]
    if run["peft_config"] is not None:  # the adapter file PEFT's save_pretrained wrote, to the byte
        assert plans["plain"]["prediction"]["adapter_file_bytes"] == measured["file_size"]
    reserved = measured["accelerator_memory_max"]
    mem = plans["padded"]["prediction"]["memory"]
    if run["train_config"]["optimizer_type"] == "lora-fa":
        # LoRA-FA: the live tensors are the trace's (tests/planner/test_lorafa.py), 2.2 GB fewer than LoRA's (no saved
        # input for the frozen A), yet the run reserved as much as LoRA's: the plan is below it and says so
        assert mem["tensor_peak"] < reserved
        assert any("LoRA-FA" in w and "budget LoRA's peak" in w for w in plans["plain"]["warnings"])
        # the warning's advice: the same run planned as LoRA (AdamW) is within 3% of what this run reserved
        lora = B.planned({**run, "train_config": {**run["train_config"], "optimizer_type": "AdamW"}})
        assert abs(lora["padded"]["prediction"]["memory"]["tensor_peak"] - reserved) <= 0.03 * reserved
        return
    if (run["peft_config"] or {}).get("peft_type") == "PROMPT_TUNING":
        # prompt tuning: the live tensors are the trace's (tests/planner/test_prompt_tuning.py) and within 5% of the
        # reserved peak, which is 4.4% above them (LoRA's runs: 1.3%; not explained without a GPU); the plan's peak
        # with its allocator slack covers the run
        peak = mem["peak"] - plans["padded"]["prediction"]["memory_detail"]["cuda_context"]
        assert mem["tensor_peak"] < reserved <= peak
        assert abs(mem["tensor_peak"] - reserved) <= 0.05 * reserved
        return
    if run["peft_config"] is None:
        # full fine-tuning: the live tensors' peak (the trace's, tests/planner/test_full.py) is below the reserved peak,
        # by the allocator's reserve (7% in this run); with the plan's slack it is within 3%
        peak = mem["peak"] - plans["padded"]["prediction"]["memory_detail"]["cuda_context"]
        assert mem["tensor_peak"] < reserved
    else:
        peak = mem["tensor_peak"]
    assert abs(peak - reserved) <= 0.03 * reserved, peak
