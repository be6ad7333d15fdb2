"""`qplan run` of a full fine-tuning plan (`--full`): the Trainer trains the model itself, every parameter, and the
live tensors of a real CPU step are what the plan predicts for CPU kernels. The trained model is written to `model/`
(no adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from backend_helpers import TINY_CONFIG, read_measured
from qplan.backends import runner
from qplan.cli.main import main


@pytest.mark.parametrize("extra", [
    ["--quant", "bf16"],  # bf16 weights, bf16 autocast, checkpointing, AdamW
    ["--quant", "fp32", "--compute-dtype", "bf16", "--no-grad-ckpt", "--optimizer", "sgd", "--seq-len", "256"],
])  # reentrant checkpointing, Adafactor and a pure bf16 step: against the trace in test_full.py, bench/full_accuracy.py
def test_a_full_fine_tuning_run_measures_what_the_plan_predicts(tmp_path, capsys, extra):
    plan = tmp_path / "plan.json"
    args = ["estimate", "--model", str(TINY_CONFIG), "--full", "--batch-size", "2", "--seq-len", "128", *extra]
    assert main([*args, "--output", str(plan)]) == 0, capsys.readouterr().err
    result = runner.run_plan(plan, random_init=True, steps=3, device="cpu", out_dir=tmp_path / "runs")
    run = Path(result["run_dir"])
    doc = read_measured(run)
    assert doc["status"] == "ok", doc.get("failure")
    compared = doc["compared"]
    total = json.loads(plan.read_text())["prediction"]["params"]["total"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"] == total
    assert doc["measured"]["params"] == {"trainable": total, "all": total}
    assert abs(compared["tensor_peak"]["error"]) <= 0.005, compared["tensor_peak"]
    assert compared["weights"]["measured"] == compared["weights"]["predicted"]
    assert (run / "model" / "model.safetensors").is_file() and not (run / "adapter").exists()
    assert "full fine-tuning" in (run / "report.md").read_text(encoding="utf-8")
