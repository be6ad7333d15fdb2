"""`qplan run` of a prompt-tuning plan (`--peft-type prompt_tuning`): PEFT's `PromptTuningConfig` on the model, the
HF Trainer's real CPU steps on `seq_len + num_virtual_tokens` positions, the live tensors as the plan predicts for CPU
kernels, the trainable count and the adapter file PEFT saves (its `prompt_embeddings`)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from backend_helpers import estimate_and_run


@pytest.mark.parametrize("method,extra,label", [
    ("prompt_tuning", [], "prompt tuning 16 virtual tokens"),
    ("prompt_tuning", ["--no-grad-ckpt"], "prompt tuning 16 virtual tokens"),
    ("p_tuning", ["--encoder-hidden-size", "96"], "p-tuning 16 virtual tokens"),  # its MLP trains too
], ids=["checkpointing", "no-checkpointing", "p-tuning"])
def test_a_prompt_learning_run_measures_what_the_plan_predicts(tmp_path, capsys, method, extra, label):
    """The prompt trains (p-tuning: the MLP that makes it); the file keeps only the prompt."""
    from safetensors.torch import load_file

    run, doc = estimate_and_run(tmp_path, capsys, ["--peft-type", method, "--num-virtual-tokens", "16",
                                                   "--quant", "bf16", "--batch-size", "2", "--seq-len", "128", *extra])
    compared = doc["compared"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"]
    assert compared["adapter_file_bytes"]["measured"] == compared["adapter_file_bytes"]["predicted"]
    assert abs(compared["tensor_peak"]["error"]) <= 0.005, compared["tensor_peak"]
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert list(weights) == ["prompt_embeddings"] and tuple(weights["prompt_embeddings"].shape) == (16, 128)
    assert label in (run / "report.md").read_text(encoding="utf-8")
