"""`qplan run` of an (IA)³ plan (`--peft-type ia3`): PEFT's `IA3Config` on the model, the live tensors of a real CPU
step as the plan predicts for CPU kernels, the trainable count and the saved adapter file PEFT's."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from backend_helpers import estimate_and_run


def test_an_ia3_run_measures_what_the_plan_predicts(tmp_path, capsys):
    from safetensors.torch import load_file

    run, doc = estimate_and_run(tmp_path, capsys, ["--peft-type", "ia3", "--quant", "bf16", "--batch-size", "2",
                                                   "--seq-len", "128"])
    compared = doc["compared"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"]
    assert compared["adapter_file_bytes"]["measured"] == compared["adapter_file_bytes"]["predicted"]
    assert abs(compared["tensor_peak"]["error"]) <= 0.005, compared["tensor_peak"]
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert weights and all(k.endswith("ia3_l") for k in weights)
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "(IA)³" in report and "full fine-tuning" not in report
