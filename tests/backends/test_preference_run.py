"""`qplan run` of DPO and KTO plans: TRL's own DPOTrainer (preference pairs) and KTOTrainer (unpaired rows) train the
PEFT model (random weights, CPU).

The oracles are the run's own: the live tensors the tracker sees during real steps (against the plan's CPU
prediction, which counts TRL's fused head folding its tiles with torch ops), PEFT's trainable count, the adapter file
PEFT writes, and the loss at the first step: the policy equals the reference there (LoRA's B is zero), so DPO's
sigmoid loss is exactly ``-log sigmoid(0) = ln 2`` and KTO's ``1 - sigmoid(0) = 0.5`` (its KL estimate 0 too) — which
holds only if the reference is the base with the adapters disabled, as the plan assumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

from backend_helpers import TINY_CONFIG, estimate_and_run

#: each objective's loss at step 0 (policy = reference) and rows a batch element
FIRST_LOSS = {"dpo": math.log(2), "kto": 0.5}
ROWS = {"dpo": 2, "kto": 1}


@pytest.mark.parametrize("objective", ["dpo", "kto"])
@pytest.mark.parametrize("args, tol", [
    (["--quant", "bf16"], 0.015),
    (["--quant", "bf16", "--no-grad-ckpt"], 0.015),
    ([], 0.015),  # nf4: the trainer casts the adapters to bf16, as the plan says
], ids=["bf16", "bf16-no-checkpointing", "nf4"])
def test_a_preference_run_measures_what_the_plan_predicts(tmp_path, capsys, objective, args, tol):
    from safetensors import safe_open

    run, doc = estimate_and_run(tmp_path, capsys, ["--objective", objective, "--batch-size", "2", "--seq-len", "128",
                                                   *args])
    plan = json.loads((tmp_path / "plan.json").read_text(encoding="utf-8"))
    compared = doc["compared"]
    assert abs(compared["tensor_peak"]["error"]) <= tol, compared["tensor_peak"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"]
    assert compared["adapter_file_bytes"]["measured"] == compared["adapter_file_bytes"]["predicted"]
    assert math.isclose(doc["measured"]["loss"][0], FIRST_LOSS[objective], abs_tol=1e-4), doc["measured"]["loss"]
    # DPO: two rows a pair went through the step; the reference adapter the trainer copies from a wrapped model is gone
    assert doc["measured"]["timing"]["tokens_per_step"] == ROWS[objective] * 2 * 128
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
        dtypes = {str(f.get_tensor(n).dtype) for n in names}
    assert names and not any(".ref." in n for n in names)
    assert dtypes == {"torch." + plan["lora"]["adapter_dtype"]}
    assert (plan["lora"]["adapter_dtype"] == "bfloat16") == ("--quant" not in args)


def test_an_sft_run_with_trl_s_fused_head_measures_what_the_plan_predicts_on_the_cpu(tmp_path, capsys):
    """The same torch folds in an SFT step (``--loss trl``), which the CPU prediction counts."""
    _, doc = estimate_and_run(tmp_path, capsys, ["--loss", "trl", "--quant", "bf16", "--batch-size", "2",
                                                 "--seq-len", "128"])
    assert abs(doc["compared"]["tensor_peak"]["error"]) <= 0.015, doc["compared"]["tensor_peak"]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_run_on_two_ddp_ranks_measures_what_the_plan_predicts_per_rank(tmp_path, capsys, objective):
    """DDP: each rank runs the trainer on its own rows; the plan's per-rank CPU prediction adds DDP's gradient buckets
    to every moment, the reference's too."""
    _, doc = estimate_and_run(tmp_path, capsys, ["--objective", objective, "--quant", "bf16", "--gpus", "2",
                                                 "--batch-size", "2", "--seq-len", "128"], steps=4)
    assert [e["rank"] for e in doc["ranks"]] == [0, 1] and doc["run"]["strategy"] == "ddp"
    for e in doc["ranks"]:
        assert abs(e["error"]["tensor_peak"]) <= 0.015, (e["rank"], e["error"])
    assert math.isclose(doc["measured"]["loss"][0], FIRST_LOSS[objective], abs_tol=1e-4)


def _dpo_plan(tmp_path, capsys):
    from qplan.cli.main import main

    plan = tmp_path / "plan.json"
    assert main(["estimate", "--model", str(TINY_CONFIG), "--objective", "dpo", "--seq-len", "64", "--output",
                 str(plan)]) == 0
    capsys.readouterr()
    return plan


def test_a_dpo_run_without_trl_is_one_line_before_anything_starts(tmp_path, capsys, monkeypatch):
    import importlib.util

    from qplan.cli.main import main

    plan = _dpo_plan(tmp_path, capsys)
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find(name, *a))
    rc = main(["run", str(plan), "--random-init", "--device", "cpu", "--out-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "runs").exists()
    assert len(err.strip().splitlines()) == 1 and "pip install trl==1.16.0" in err, err


def test_a_reward_model_run_measures_what_the_plan_predicts(tmp_path, capsys):
    """RewardTrainer on AutoModelForSequenceClassification (SmolLM2-135M: on the 2-layer toy model a padded batch's
    mask transients, about 0.8 MB the plan leaves out, are 4-6% of its step), PEFT's SEQ_CLS copy of the score head
    in the adapter file."""
    from safetensors import safe_open

    from qplan.backends import runner
    from qplan.cli.main import main

    plan = tmp_path / "plan.json"
    assert main(["estimate", "--model", "smollm2-135m", "--objective", "reward", "--batch-size", "1", "--seq-len",
                 "128", "--output", str(plan)]) == 0
    capsys.readouterr()
    result = runner.run_plan(plan, random_init=True, steps=3, device="cpu", out_dir=tmp_path / "runs")
    run = Path(result["run_dir"])
    doc = json.loads((run / "measured.json").read_text())
    assert doc["status"] == "ok", doc.get("failure")
    compared = doc["compared"]
    assert abs(compared["tensor_peak"]["error"]) <= 0.01, compared["tensor_peak"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"]
    assert compared["adapter_file_bytes"]["measured"] == compared["adapter_file_bytes"]["predicted"]
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(k.endswith("score.weight") for k in f.keys())


@pytest.mark.parametrize("args", [
    ["--quant", "bf16", "--batch-size", "2", "--grad-accum", "2", "--steps-per-generation", "1", "--num-generations",
     "2"],
    [],  # nf4: the trainer casts the adapters to bf16, as the plan says
], ids=["bf16-generation-inside-the-window", "nf4"])
def test_a_grpo_run_measures_what_the_plan_predicts(tmp_path, capsys, args):
    """TRL's GRPOTrainer (transformers' generate) trains the plan: the tensor peak within 5% of the CPU prediction, the
    generation marked as its own phase and within 1% of the plan's generation moment (with the gradients alive when a
    generation batch starts inside an accumulation window), the counts and the adapter file exact."""
    run, doc = estimate_and_run(tmp_path, capsys, ["--objective", "grpo", "--batch-size", "4", "--num-generations", "4",
                                                   "--max-prompt-length", "16", "--max-completion-length", "8",
                                                   *args])
    plan = json.loads((tmp_path / "plan.json").read_text(encoding="utf-8"))
    compared = doc["compared"]
    assert abs(compared["tensor_peak"]["error"]) <= 0.05, compared["tensor_peak"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"]
    assert compared["adapter_file_bytes"]["measured"] == compared["adapter_file_bytes"]["predicted"]
    t = plan["training"]
    assert doc["measured"]["timing"]["tokens_per_step"] == t["batch_size"] * t["grad_accum"] * (16 + 8)
    generation = doc["measured"]["memory"]["phase_peaks"]["generation"]
    assert generation == pytest.approx(plan["prediction"]["memory_detail"]["phases_cpu"]["generation"], rel=0.01)


@pytest.mark.parametrize("args", [["--objective", "dpo"], ["--loss", "trl"],
                                  ["--objective", "dpo", "--precompute-ref-log-probs", "--precompute-ref-batch-size", "4"]],
                         ids=["dpo", "sft-fused-head", "dpo-precomputed"])
def test_a_full_fine_tuning_run_with_trl_s_head_measures_what_the_plan_predicts(tmp_path, capsys, args):
    """DPOTrainer on a model without PEFT loads the reference from the policy's checkpoint (the plan's second copy of
    the weights): the first loss is ln 2 only if it is the same model; with precompute_ref_log_probs it loads none and
    reads the pass's log-probabilities (ln 2 again: the pass ran the same weights), and the pass itself is measured
    against the plan's moment of it. SFTTrainer's fused head on a full model: the head's gradient through its chunks.
    Against the plan's CPU prediction (TRL's torch folds, ~0.7% over)."""
    run, doc = estimate_and_run(tmp_path, capsys, ["--full", "--quant", "bf16", "--batch-size", "2",
                                                   "--seq-len", "128", *args])
    plan = json.loads((tmp_path / "plan.json").read_text(encoding="utf-8"))
    compared = doc["compared"]
    assert abs(compared["tensor_peak"]["error"]) <= 0.01, compared["tensor_peak"]
    reference = plan["prediction"]["memory_detail"]["weights"].get("reference", 0)
    loaded = "dpo" in args and "--precompute-ref-log-probs" not in args
    assert (reference == compared["weights"]["predicted"]) == loaded  # the policy's weights, once more
    assert compared["weights"]["measured"] == compared["weights"]["predicted"]  # the policy's, after load
    if "dpo" in args:
        assert math.isclose(doc["measured"]["loss"][0], math.log(2), abs_tol=1e-4), doc["measured"]["loss"]
    if "--precompute-ref-log-probs" in args:  # the pass (4 pairs: above the steps), measured in the trainer's __init__
        pre = compared["precompute_tensor_peak"]
        assert pre["predicted"] > compared["tensor_peak"]["predicted"] and abs(pre["error"]) <= 0.01, pre
    else:
        assert "precompute_tensor_peak" not in compared
    assert (run / "model" / "model.safetensors").is_file() and not (run / "adapter").exists()
