"""Where output goes (issue 29): ``--output ''`` used to be silently ignored — ``qplan estimate`` printed the
plan and wrote nothing, ``qplan report`` wrote a default folder — so a script that built the name from an
empty variable believed its file was written. An empty or blank name is one line and exit 2, before any
work, and nothing is written. Real ``qplan`` processes in a fresh folder."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_hostile_input import QPLAN, qplan, refused, tree

from conftest import FIXTURES


@pytest.fixture
def plan_file(tmp_path):
    p = qplan("estimate", "--model", "llama-3.2-1b", "--quant", "bf16", "--gpu", "t4", "--output", str(tmp_path / "plan.json"))
    assert p.returncode == 0, p.stderr
    return tmp_path / "plan.json"


@pytest.mark.parametrize("name", ["", " ", "\t"])
@pytest.mark.parametrize("command", ["estimate", "export", "report", "calibrate"])
def test_an_empty_output_name_is_refused_and_nothing_is_written(tmp_path, plan_file, command, name):
    work = tmp_path / "work"
    work.mkdir()
    args = {"estimate": ["estimate", "--model", "smollm2-135m"],
            "export": ["export", str(plan_file), "--to", "trl"],
            "report": ["report"],
            "calibrate": ["calibrate", "--gpu", "t4"]}[command]
    p = qplan(*args, "--output", name, cwd=work, env=None)
    line = refused(p, "--output")
    assert "expected a file or folder name" in line, line
    assert p.stdout == ""  # not the plan or config printed as if there were no --output
    assert tree(work) == {}
    assert json.loads(plan_file.read_text())["model"]["name"] == "llama-3.2-1b"


# ------------------------------------------------------------------ an unwritable or full destination

#: a folder nobody can write in, root included (sysfs refuses mkdir and create); the tests need Linux
UNWRITABLE = Path("/sys")


def _unwritable() -> Path:
    try:
        os.rmdir(tempfile.mkdtemp(dir=UNWRITABLE))
    except OSError:
        return UNWRITABLE
    pytest.skip("/sys is writable here: not Linux?")  # pragma: no cover


def _run_folder(root: Path, name: str, plan_file: Path) -> Path:
    """A run folder as `qplan run` leaves it: the plan and a measured.json (a CPU run, its tensor peak 10% over)."""
    plan = json.loads(plan_file.read_text())
    d = root / name
    d.mkdir(parents=True)
    (d / "plan.json").write_text(json.dumps(plan))
    peak = plan["prediction"]["memory_detail"]["tensor_peak_cpu"]
    (d / "measured.json").write_text(json.dumps({
        "schema_version": 1, "status": "ok", "backend": "peft",
        "measured": {"memory": {"device": "cpu", "tensor_peak": int(peak * 1.1)}}}))
    return d


#: (command, where the unwritable place is named): the working folder (a default output there), --output FILE,
#: or a folder option (report --output DIR, run --out-dir, spec add --output-dir)
UNWRITABLE_CASES = [("estimate", "output-file"), ("export", "output-file"), ("report", "cwd"), ("report", "output-file"),
                    ("report", "output-folder"), ("calibrate", "cwd"), ("calibrate", "output-file"), ("run", "cwd"),
                    ("run", "output-folder"), ("run", "output-file"), ("spec-add", "output-folder"),
                    ("spec-add", "output-file")]


@pytest.mark.parametrize("command,where", UNWRITABLE_CASES)
def test_an_unwritable_destination_is_refused_before_any_work(tmp_path, plan_file, command, where):
    """A read-only place used to give exit 3 (`report`), or fail only after the work (`spec add` built the
    model first). Now one line naming the folder, exit 2, before any input is read: the run folders given
    to report/calibrate do not exist, so a refusal that named them would mean the work came first."""
    ro = _unwritable()
    dest = {"cwd": [], "output-file": ["--output", str(ro / "out.json")],
            "output-folder": {"report": ["--output", str(ro / "summary")], "run": ["--out-dir", str(ro / "runs")],
                              "spec-add": ["--output-dir", str(ro / "specs")]}.get(command, [])}[where]
    if command == "run" and where != "output-folder":
        dest = ["--out-dir", "runs"] if where == "cwd" else ["--out-dir", str(ro)]
    if command == "spec-add" and where == "output-file":
        dest = ["--output-dir", str(ro)]
    args = {"estimate": ["estimate", "--model", "smollm2-135m"],
            "export": ["export", str(plan_file), "--to", "trl"],
            "report": ["report", str(tmp_path / "no-such-run")],
            "calibrate": ["calibrate", str(tmp_path / "no-such-run"), "--gpu", "t4"],
            "run": ["run", str(plan_file), "--random-init", "--device", "cpu"],
            "spec-add": ["spec", "add", str(FIXTURES / "llama-tied.json"), "--name", "mine"]}[command]
    env = {**os.environ, "XDG_CONFIG_HOME": str(ro / "config")} if command == "calibrate" and where == "cwd" else None
    start = time.monotonic()
    p = qplan(*args, *dest, cwd=ro if where == "cwd" else tmp_path, env=env)
    line = refused(p, "cannot ")
    assert str(ro) in line and "no-such-run" not in line, line
    assert time.monotonic() - start < 30  # no training, no model built


def _fsize_limit(limit: int):
    """A child whose files cannot grow past ``limit`` bytes (RLIMIT_FSIZE, SIGXFSZ ignored: the write fails
    with EFBIG) — what a full disk does to a write, without needing one."""
    import resource
    import signal

    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


@pytest.mark.parametrize("output", ["summary", None])
def test_a_report_folder_that_cannot_be_written_whole_is_not_left_half_written(tmp_path, plan_file, output):
    """On a full disk `report --output DIR` used to leave an empty scatter.svg and no summary: now the folder is
    written under a hidden staging name and renamed when whole, so a failed write leaves nothing."""
    runs = [_run_folder(tmp_path / "runs", f"r{i}", plan_file) for i in range(2)]
    work = tmp_path / "work"
    work.mkdir()
    p = subprocess.run([*QPLAN, "report", *map(str, runs), *(["--output", output] if output else [])],
                       capture_output=True, text=True, cwd=work, preexec_fn=_fsize_limit(4096), timeout=120)
    refused(p, "cannot write it", "nothing was left behind")
    assert tree(work) in ({}, {"reports": b"<dir>"}), tree(work)
    # the same command with room to write: the folder appears whole
    p = subprocess.run([*QPLAN, "report", *map(str, runs), "--output", "summary"], capture_output=True, text=True,
                       cwd=work, timeout=120)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(work / "summary")) == ["scatter.svg", "summary.html", "summary.json", "summary.md"]
    assert sorted(os.listdir(work)) in (["summary"], ["reports", "summary"])


def test_report_skips_a_run_folder_still_being_written(tmp_path, plan_file):
    runs = [_run_folder(tmp_path, "done", plan_file), _run_folder(tmp_path, "training.partial", plan_file)]
    p = qplan("report", *map(str, runs), "--output", str(tmp_path / "s.json"))
    assert p.returncode == 0, p.stderr
    assert "training.partial" in p.stderr and "still training" in p.stderr
    assert [r["run"] for r in json.loads((tmp_path / "s.json").read_text())["runs"]] == ["done"]
