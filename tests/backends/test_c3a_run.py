"""`qplan run` of a C3A plan (`--peft-type c3a`): PEFT's `C3AConfig` on the model, the live tensors of a real CPU step
as the plan predicts for CPU kernels, the trainable count and the adapter file PEFT's."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from backend_helpers import estimate_and_run


def test_a_c3a_run_measures_what_the_plan_predicts(tmp_path, capsys):
    """Without checkpointing (this toy model, vocabulary 512, peaks in its last layer's backward, in the down
    projection's FFTs, planned exactly). With checkpointing the recomputation's C3A forward transient is an upper
    bound, +2.3% on this run; tests/planner/test_c3a.py bounds it on the meta device (a CPU run takes 35 s here)."""
    from safetensors.torch import load_file

    run, doc = estimate_and_run(tmp_path, capsys, ["--peft-type", "c3a", "--block-size", "16", "--targets", "all-linear",
                                                   "--quant", "bf16", "--batch-size", "2", "--seq-len", "128", "--no-grad-ckpt"])
    compared = doc["compared"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"]
    assert compared["adapter_file_bytes"]["measured"] == compared["adapter_file_bytes"]["predicted"]
    assert abs(compared["tensor_peak"]["error"]) <= 0.005, compared["tensor_peak"]
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert weights and all(k.endswith("c3a_kernel") for k in weights)
    assert "C3A block=16" in (run / "report.md").read_text(encoding="utf-8")
