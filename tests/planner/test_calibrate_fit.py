"""`qplan calibrate`'s fit on run folders of a GPU, made here (no GPU needed, no torch): the fitted
line recovers the efficiency and overhead that generated the step times, the CUDA context and
allocator slack are the runs' medians, and a plan given the file uses them all."""

from __future__ import annotations

import json

import pytest

from qplan.cli.main import main
from qplan.planner.api import plan_dict
from qplan.planner.compute.calibrate import calibrate
from qplan.planner.document import dumps
from qplan.planner.model.catalog import load_gpu


def _runs(tmp_path, eff=0.4, overhead=0.02):
    dirs = []
    for i, (b, s) in enumerate([(1, 512), (2, 1024), (4, 2048), (8, 2048)]):
        plan = plan_dict(model="llama-3.2-1b", gpu="h100-80gb", batch_size=b, seq_len=s)
        ideal = plan["prediction"]["time"]["ideal_step_seconds"]
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "plan.json").write_text(dumps(plan))
        alloc = plan["prediction"]["memory"]["tensor_peak"]
        (d / "measured.json").write_text(json.dumps({
            "schema_version": 1, "status": "ok", "backend": "peft",
            "measured": {"memory": {"device": "cuda", "peak_allocated": alloc, "peak_reserved": int(alloc * (1.08 + i / 100)),
                                    "cuda_context": 600_000_000 + i * 1_000_000},
                         "timing": {"mean_step_seconds": ideal / eff + overhead}}}))
        dirs.append(str(d))
    return dirs


def test_fit_recovers_efficiency_overhead_and_memory_overheads(tmp_path):
    res = calibrate(_runs(tmp_path), load_gpu("h100-80gb").to_json())
    assert res["runs"] == 4 and not res["skipped"]
    assert res["efficiency"] == pytest.approx(0.4, rel=1e-9)
    assert res["overhead_seconds"] == pytest.approx(0.02, rel=1e-9)
    assert res["cuda_context_bytes"] == 602_000_000  # median of the four
    assert res["allocator_slack_fraction"] == pytest.approx(0.10, rel=1e-6)


def test_a_plan_uses_and_cites_the_calibration(tmp_path, capsys):
    dirs = _runs(tmp_path)
    out = tmp_path / "h100.json"
    assert main(["calibrate", *dirs, "--gpu", "h100-80gb", "--output", str(out)]) == 0
    capsys.readouterr()
    p = plan_dict(model="llama-3.2-1b", gpu="h100-80gb", batch_size=2, seq_len=1024, calibration=str(out))
    t, mem = p["prediction"]["time"], p["prediction"]["memory"]
    assert t["efficiency_source"] == str(out)
    assert t["step_seconds"] == pytest.approx(t["ideal_step_seconds"] / 0.4 + 0.02, rel=1e-6)
    doc = json.loads(out.read_text())
    assert mem["overhead"] == doc["cuda_context_bytes"] + int(doc["allocator_slack_fraction"] * mem["tensor_peak"])
    assert mem["peak"] == mem["tensor_peak"] + mem["overhead"]
    assert doc["holdout"]["worst_abs_error"] < 1e-6  # the synthetic times lie on the line


def test_cpu_runs_are_not_gpu_evidence(tmp_path):
    """Runs measured on the CPU neither calibrate a GPU nor give CUDA memory overheads."""
    from qplan.planner.compute.calibrate import memory_overheads
    from qplan.planner.errors import QPlanError

    dirs = _runs(tmp_path)
    docs = []
    for d in dirs:
        m = json.loads((tmp_path / d / "measured.json").read_text())
        m["measured"]["memory"] = {"device": "cpu", "tensor_peak": 1000}
        (tmp_path / d / "measured.json").write_text(json.dumps(m))
        docs.append(m)
    with pytest.raises(QPlanError, match="ran on the CPU, not on h100-80gb"):
        calibrate(dirs, load_gpu("h100-80gb").to_json())
    assert memory_overheads(docs) == {}
