"""`qplan run` of a prompt-tuning plan (`--peft-type prompt_tuning`): PEFT's `PromptTuningConfig` on the model, the
HF Trainer's real CPU steps on `seq_len + num_virtual_tokens` positions, the live tensors as the plan predicts for CPU
kernels, the trainable count and the adapter file PEFT saves (its `prompt_embeddings`)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from backend_helpers import estimate_and_run


@pytest.mark.parametrize("ckpt", [[], ["--no-grad-ckpt"]], ids=["checkpointing", "no-checkpointing"])
def test_a_prompt_tuning_run_measures_what_the_plan_predicts(tmp_path, capsys, ckpt):
    from safetensors.torch import load_file

    run, doc = estimate_and_run(tmp_path, capsys, ["--peft-type", "prompt_tuning", "--num-virtual-tokens", "16",
                                                   "--quant", "bf16", "--batch-size", "2", "--seq-len", "128", *ckpt])
    compared = doc["compared"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"]
    assert compared["adapter_file_bytes"]["measured"] == compared["adapter_file_bytes"]["predicted"]
    assert abs(compared["tensor_peak"]["error"]) <= 0.005, compared["tensor_peak"]
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert list(weights) == ["prompt_embeddings"] and tuple(weights["prompt_embeddings"].shape) == (16, 128)
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "prompt tuning 16 virtual tokens" in report


def test_a_p_tuning_run_measures_what_the_plan_predicts(tmp_path, capsys):
    """P-tuning: the MLP trains (its 3 linear layers), the file keeps only the prompt it makes."""
    from safetensors.torch import load_file

    run, doc = estimate_and_run(tmp_path, capsys, ["--peft-type", "p_tuning", "--num-virtual-tokens", "16",
                                                   "--encoder-hidden-size", "96", "--quant", "bf16", "--batch-size",
                                                   "2", "--seq-len", "128"])
    compared = doc["compared"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"]
    assert compared["adapter_file_bytes"]["measured"] == compared["adapter_file_bytes"]["predicted"]
    assert abs(compared["tensor_peak"]["error"]) <= 0.005, compared["tensor_peak"]
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert list(weights) == ["prompt_embeddings"] and tuple(weights["prompt_embeddings"].shape) == (16, 128)
    assert "p-tuning 16 virtual tokens" in (run / "report.md").read_text(encoding="utf-8")
