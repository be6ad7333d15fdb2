"""`qplan calibrate` on real CPU runs (issue 12): fit, file, and plans that use and cite it.

Two short runs of the tiny Llama on the CPU, planned for this CPU as a device
(reports/benchmarks/cpu-device.json: its measured matmul throughput and bandwidth). The step
time itself is compared in a benchmark (bench/time_cpu.py, reports/benchmarks/time-cpu.md), not
here: tests do not time things.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from backend_helpers import TINY_CONFIG, child_env, qplan_cmd

pytestmark = pytest.mark.slow  # two real 5-step CPU runs in fresh processes: ~40 s

ROOT = Path(__file__).resolve().parents[2]
DEVICE = ROOT / "reports" / "benchmarks" / "cpu-device.json"


def qplan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(qplan_cmd(*args), capture_output=True, text=True, env=child_env(), timeout=600)


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    runs = []
    for b in (2, 4):
        plan = root / f"plan-{b}.json"
        p = qplan("estimate", "--model", str(TINY_CONFIG), "--quant", "bf16", "--batch-size", str(b), "--seq-len", "64",
                  "--gpu", str(DEVICE), "--output", str(plan))
        assert p.returncode == 0, p.stderr
        r = qplan("run", str(plan), "--random-init", "--steps", "5", "--device", "cpu", "--out-dir", str(root / "runs"),
                  "--format", "json")
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(json.loads(r.stdout)["run_dir"])
    return root, runs


def test_calibrate_fits_writes_and_plans_cite_it(cpu_runs, tmp_path):
    root, runs = cpu_runs
    out = tmp_path / "cpu.json"
    p = qplan("calibrate", *runs, "--gpu", str(DEVICE), "--output", str(out))
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["runs"] == 2 and 0 < doc["efficiency"] <= 1
    assert doc["holdout"]["runs"] == 2
    for row, run in zip(doc["fitted_on"], runs):
        measured = json.loads((Path(run) / "measured.json").read_text())["measured"]["timing"]["mean_step_seconds"]
        plan = json.loads((Path(run) / "plan.json").read_text())
        assert row["measured_step_seconds"] == pytest.approx(measured, rel=1e-5)
        assert row["ideal_step_seconds"] == pytest.approx(plan["prediction"]["time"]["ideal_step_seconds"], rel=1e-5)
    # the fitted line passes through both runs (two points), or falls back to the ratio
    for row in doc["fitted_on"]:
        pred = row["ideal_step_seconds"] / doc["efficiency"] + doc["overhead_seconds"]
        if doc["overhead_seconds"] > 0:
            assert pred == pytest.approx(row["measured_step_seconds"], rel=1e-3)
    assert doc["overhead_seconds"] >= 0
    # a later plan for the same device uses and cites the calibration
    e = qplan("estimate", "--model", str(TINY_CONFIG), "--quant", "bf16", "--batch-size", "2", "--seq-len", "64",
              "--gpu", str(DEVICE), "--calibration", str(out), "--format", "json")
    assert e.returncode == 0, e.stderr
    t = json.loads(e.stdout)["prediction"]["time"]
    assert t["efficiency"] == doc["efficiency"] and t["efficiency_source"] == str(out)
    assert t["step_seconds"] == pytest.approx(t["ideal_step_seconds"] / doc["efficiency"] + doc["overhead_seconds"])
    # never over an existing file without --force; a calibration of another device is refused
    assert qplan("calibrate", *runs, "--gpu", str(DEVICE), "--output", str(out)).returncode == 2
    wrong = qplan("estimate", "--model", "smollm2-135m", "--gpu", "t4", "--calibration", str(out))
    assert wrong.returncode == 2 and "fitted on cpu, not t4" in wrong.stderr


def test_calibrate_skips_bad_folders_and_refuses_when_none_is_left(cpu_runs, tmp_path):
    root, runs = cpu_runs
    bad = tmp_path / "bad"
    bad.mkdir()
    p = qplan("calibrate", runs[0], str(bad), "--gpu", str(DEVICE), "--output", str(tmp_path / "c.json"))
    assert p.returncode == 0 and "skipped" in p.stderr and str(bad) in p.stderr
    assert json.loads((tmp_path / "c.json").read_text())["runs"] == 1
    p = qplan("calibrate", str(bad), "--gpu", str(DEVICE), "--output", str(tmp_path / "d.json"))
    assert p.returncode == 2 and "no run to calibrate on" in p.stderr and len(p.stderr.strip().splitlines()) == 1
