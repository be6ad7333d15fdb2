"""A run folder appears complete or not at all (issue 29): `qplan run` trains in ``<name>.partial`` and renames it
once measured.json and the report are written; a folder that cannot be completed (a full disk) keeps its
``.partial`` name and everything in it, and the command says so in one line. Paths inside the folder are
relative to it, so nothing in it points at the ``.partial`` name after the rename."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest

from backend_helpers import make_plan_file, read_measured
from qplan.backends import runner
from qplan.cli.main import main


def _fake_python(tmp_path: Path, marker: Path) -> Path:
    """An interpreter whose worker records how it was started (the job file, its folder's listing), then dies."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nif [ "$1" = "-m" ]; then\n'
                    f'  echo "$3" > {marker}; ls "$(dirname "$3")" >> {marker}; kill -9 $$\nfi\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    return fake


def test_the_run_trains_in_a_partial_folder_renamed_when_complete(tmp_path, monkeypatch):
    marker = tmp_path / "started"
    monkeypatch.setenv("QPLAN_PEFT_PYTHON", str(_fake_python(tmp_path, marker)))
    monkeypatch.setattr(runner, "utc_stamp", lambda: "20260101T000000Z")
    out = tmp_path / "runs"
    result = runner.run_plan(make_plan_file(tmp_path), random_init=True, steps=4, out_dir=out)

    job_file, *listing = marker.read_text().split()
    assert job_file == str((out / "20260101T000000Z-tiny-llama-peft.partial" / "job.json").resolve())
    assert sorted(listing) == ["job.json", "plan.json", "worker.log"]  # no measured.json, no report yet
    run = Path(result["run_dir"])
    assert run.name == "20260101T000000Z-tiny-llama-peft" and sorted(p.name for p in out.iterdir()) == [run.name]
    assert sorted(p.name for p in run.iterdir()) == ["job.json", "measured.json", "plan.json", "report.html",
                                                      "report.md", "worker.log"]
    assert json.loads((run / "job.json").read_text())["plan"] == "plan.json"
    for f in ("job.json", "measured.json", "report.md", "report.html"):
        assert ".partial" not in (run / f).read_text(), f  # nothing points at the staging name
    assert read_measured(run)["failure"]["kind"] == "crashed"
    assert result["report_md"] == str(run / "report.md")


def test_a_run_folder_that_cannot_be_completed_is_kept_as_partial(tmp_path, monkeypatch, capsys):
    """The report cannot be written (ENOSPC): one line, exit 2, and the folder — with the run's measured.json —
    is kept under its ``.partial`` name; no folder under the final name is left looking complete."""
    monkeypatch.setenv("QPLAN_PEFT_PYTHON", str(_fake_python(tmp_path, tmp_path / "started")))

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "write_run_report", full)
    out = tmp_path / "runs"
    rc = main(["run", str(make_plan_file(tmp_path)), "--random-init", "--out-dir", str(out)])
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("qplan: error")]
    assert rc == 2 and len(line) == 1 and "Traceback" not in err, err
    assert "could not be completed (No space left on device)" in line[0] and ".partial" in line[0]
    (kept,) = out.iterdir()
    assert kept.name.endswith(".partial") and read_measured(kept)["failure"]["kind"] == "crashed"
    assert str(kept) in line[0]


def test_the_run_folder_is_refused_before_training_when_it_cannot_be_made(tmp_path, capsys):
    plan = make_plan_file(tmp_path)
    (tmp_path / "file").write_text("mine")
    rc = main(["run", str(plan), "--random-init", "--out-dir", str(tmp_path / "file")])
    assert rc == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("taken", ["name", "name.partial"])
def test_a_new_run_folder_avoids_both_names(tmp_path, monkeypatch, taken):
    from qplan.backends.report import new_folder

    (tmp_path / taken.replace("name", "run")).mkdir()
    made = new_folder(tmp_path, "run", ".partial")
    assert made.name == "run-2.partial"
