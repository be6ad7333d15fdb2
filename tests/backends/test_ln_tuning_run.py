"""`qplan run` of an LN tuning plan (`--peft-type ln_tuning`): PEFT's `LNTuningConfig` on the model, the live tensors
of a real CPU step as the plan predicts for CPU kernels, the trainable count and the adapter file PEFT's."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from backend_helpers import estimate_and_run


@pytest.mark.parametrize("extra", [[], ["--no-grad-ckpt", "--targets", "post_attention_layernorm"]],
                         ids=["defaults", "post-attention-only"])
def test_an_ln_tuning_run_measures_what_the_plan_predicts(tmp_path, capsys, extra):
    from safetensors.torch import load_file

    run, doc = estimate_and_run(tmp_path, capsys, ["--peft-type", "ln_tuning", "--quant", "bf16", "--batch-size", "2",
                                                   "--seq-len", "128", *extra])
    compared = doc["compared"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"]
    assert compared["adapter_file_bytes"]["measured"] == compared["adapter_file_bytes"]["predicted"]
    assert abs(compared["tensor_peak"]["error"]) <= 0.005, compared["tensor_peak"]
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert weights and all(k.endswith("ln_tuning_layers.weight") for k in weights)
    assert "LN tuning" in (run / "report.md").read_text(encoding="utf-8")
