"""`qplan run` of a MiSS plan (`--peft-type miss`): PEFT's `MissConfig` on the model, the live tensors of a real CPU
step as the plan predicts for CPU kernels, the trainable count and the adapter file PEFT's."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from backend_helpers import estimate_and_run


@pytest.mark.parametrize("options", [["--no-grad-ckpt"], ["--miss-init", "mini", "--mini-r", "32"],
                                     ["--miss-init", "bat", "--no-grad-ckpt"]],
                         ids=["default-no-checkpointing", "mini-checkpointing", "bat-no-checkpointing"])
def test_a_miss_run_measures_what_the_plan_predicts(tmp_path, capsys, options):
    from safetensors.torch import load_file

    run, doc = estimate_and_run(tmp_path, capsys, ["--peft-type", "miss", "--r", "16", "--targets", "all-linear",
                                                   "--quant", "bf16", "--batch-size", "2", "--seq-len", "128", *options])
    compared = doc["compared"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"]
    assert compared["adapter_file_bytes"]["measured"] == compared["adapter_file_bytes"]["predicted"]
    assert abs(compared["tensor_peak"]["error"]) <= 0.005, compared["tensor_peak"]
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert weights and all(k.endswith("miss_block") for k in weights)
    assert "MiSS r=16" in (run / "report.md").read_text(encoding="utf-8")
