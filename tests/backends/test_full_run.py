"""`qplan run` of a full fine-tuning plan (`--full`): the Trainer trains the model itself, every parameter, and the
live tensors of a real CPU step are what the plan predicts for CPU kernels. The trained model is written to `model/`
(no adapter)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from backend_helpers import estimate_and_run


@pytest.mark.parametrize("extra", [
    ["--quant", "bf16"],  # bf16 weights, bf16 autocast, checkpointing, AdamW
    ["--quant", "fp32", "--compute-dtype", "bf16", "--no-grad-ckpt", "--optimizer", "sgd", "--seq-len", "256"],
])  # reentrant checkpointing, Adafactor and a pure bf16 step: against the trace in test_full.py, bench/full_accuracy.py
def test_a_full_fine_tuning_run_measures_what_the_plan_predicts(tmp_path, capsys, extra):
    run, doc = estimate_and_run(tmp_path, capsys, ["--full", "--batch-size", "2", "--seq-len", "128", *extra])
    plan = run / "plan.json"
    compared = doc["compared"]
    total = json.loads(plan.read_text())["prediction"]["params"]["total"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"] == total
    assert doc["measured"]["params"] == {"trainable": total, "all": total}
    assert abs(compared["tensor_peak"]["error"]) <= 0.005, compared["tensor_peak"]
    assert compared["weights"]["measured"] == compared["weights"]["predicted"]
    assert (run / "model" / "model.safetensors").is_file() and not (run / "adapter").exists()
    assert "full fine-tuning" in (run / "report.md").read_text(encoding="utf-8")
