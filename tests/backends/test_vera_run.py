"""`qplan run` of a VeRA plan (`--peft-type vera`): PEFT's `VeraConfig` on the model, the live tensors of a real CPU
step as the plan predicts for CPU kernels, the trainable count and the adapter file PEFT's (its projections in it)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from backend_helpers import estimate_and_run


@pytest.mark.parametrize("ckpt", [[], ["--no-grad-ckpt"]], ids=["checkpointing", "no-checkpointing"])
def test_a_vera_run_measures_what_the_plan_predicts(tmp_path, capsys, ckpt):
    from safetensors.torch import load_file

    run, doc = estimate_and_run(tmp_path, capsys, ["--peft-type", "vera", "--r", "16", "--targets", "all-linear",
                                                   "--quant", "bf16", "--batch-size", "2", "--seq-len", "128", *ckpt])
    compared = doc["compared"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"]
    assert compared["adapter_file_bytes"]["measured"] == compared["adapter_file_bytes"]["predicted"]
    # with checkpointing this toy model peaks in a layer's recomputation, whose VeRA transients are approximated (3%)
    assert abs(compared["tensor_peak"]["error"]) <= (0.03 if not ckpt else 0.005), compared["tensor_peak"]
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(weights)
    assert "VeRA r=16" in (run / "report.md").read_text(encoding="utf-8")
