"""`qplan run` of a LoHa / LoKr plan (`--peft-type loha`, `lokr`): PEFT's `LoHaConfig` / `LoKrConfig` on the model,
the live tensors of a real CPU step as the plan predicts for CPU kernels, the trainable count and the adapter file
PEFT's."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from backend_helpers import estimate_and_run


@pytest.mark.parametrize("method,prefix,label", [("loha", "hada_w", "LoHa r=4"), ("lokr", "lokr_w", "LoKr r=4")])
def test_a_loha_or_lokr_run_measures_what_the_plan_predicts(tmp_path, capsys, method, prefix, label):
    """Without checkpointing the peak is the backward's start, every layer's update saved (the layer-backward moment
    of a toy model with checkpointing is planned above the trace: tests/planner/test_loha.py, test_lokr.py)."""
    from safetensors.torch import load_file

    run, doc = estimate_and_run(tmp_path, capsys, ["--peft-type", method, "--r", "4", "--targets", "all-linear",
                                                   "--quant", "bf16", "--batch-size", "2", "--seq-len", "128",
                                                   "--no-grad-ckpt"])
    compared = doc["compared"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"]
    assert compared["adapter_file_bytes"]["measured"] == compared["adapter_file_bytes"]["predicted"]
    assert abs(compared["tensor_peak"]["error"]) <= 0.005, compared["tensor_peak"]
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert weights and all(k.rsplit(".", 1)[-1].startswith(prefix) for k in weights)
    assert label in (run / "report.md").read_text(encoding="utf-8")
