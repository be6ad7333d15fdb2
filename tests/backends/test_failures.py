"""Out of memory and Ctrl-C during a real run: partial measurements, a report, a non-zero exit."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from backend_helpers import child_env, make_plan_file, qplan_cmd, read_measured


def _run_dir(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_oom_is_recorded_beside_the_prediction(tmp_path):
    """Also the --model-dir path: a local folder with config, weights and its own tokenizer."""
    plan_file = make_plan_file(tmp_path)
    from qplan.backends.modelsrc import build_random_model_dir

    model_dir = build_random_model_dir(json.loads(plan_file.read_text())["model"]["config"], tmp_path / "model")
    out = tmp_path / "runs"
    env = child_env(QPLAN_CALLBACKS="faults:OomAtStep2")
    res = subprocess.run(qplan_cmd("run", str(plan_file), "--model-dir", str(model_dir), "--steps", "4",
                                   "--device", "cpu", "--out-dir", str(out)),
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "status: oom — OOM at step 2 in phase forward: OutOfMemoryError: simulated" in res.stdout
    run = _run_dir(out)
    doc = read_measured(run)
    assert doc["status"] == "oom" and doc["run"]["model_dir"] == str(model_dir.resolve())
    assert doc["failure"]["kind"] == "oom" and doc["failure"]["step"] == 2 and doc["failure"]["phase"] == "forward"
    m = doc["measured"]
    assert m["params"]["trainable"] > 0 and len(m["loss"]) == 1  # step 1 finished, step 2 did not
    assert set(m["memory"]["phases"]) == {"after_load", "after_prepare", "after_adapters"}
    assert doc["error"]["trainable"] == 0.0 and doc["error"]["adapter_file_bytes"] is None
    assert not (run / "adapter").exists()
    md = (run / "report.md").read_text()
    assert "status: **oom** — OOM at step 2 in phase forward" in md
    assert (run / "report.html").is_file() and (run / "plan.json").is_file()


def test_ctrl_c_writes_partial_measurements_and_a_report(tmp_path):
    """SIGINT to `qplan run` (as Ctrl-C in a terminal): the run stops, partial results are kept."""
    plan_file = make_plan_file(tmp_path)
    out = tmp_path / "runs"
    marker = tmp_path / "at-step-2"
    env = child_env(QPLAN_CALLBACKS="faults:StallAtStep2", QPLAN_TEST_MARKER=str(marker))
    proc = subprocess.Popen(qplan_cmd("run", str(plan_file), "--random-init", "--steps", "6", "--device", "cpu",
                                      "--out-dir", str(out)), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached step 2"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0, stderr[-3000:]
    assert re.search(r"status: interrupted — interrupted at step 2 in phase forward", stdout), stdout
    run = _run_dir(out)
    doc = read_measured(run)
    assert doc["status"] == "interrupted" and doc["failure"]["step"] == 2
    assert len(doc["measured"]["loss"]) == 1 and doc["measured"]["params"]["trainable"] > 0
    assert "status: **interrupted**" in (run / "report.md").read_text()
    assert (run / "report.html").is_file()


def test_a_compiled_torchao_step_is_refused_on_the_cpu_before_anything_starts(tmp_path):
    """torchao's low-bit AdamW compiles its update, which finds no frame under the CPU measurement's tracker (a real
    run failed at its first measured step): one line, exit 2, no run folder."""
    plan_file = make_plan_file(tmp_path, optimizer="adamw_torch_8bit")
    out = tmp_path / "runs"
    p = subprocess.run([*qplan_cmd(), "run", str(plan_file), "--device", "cpu", "--random-init", "--steps", "3",
                        "--out-dir", str(out)], capture_output=True, text=True, env=child_env(), timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "adamw_torch_8bit" in p.stderr and "on the CPU" in p.stderr
    assert not out.exists() or not any(out.iterdir())
