"""`qplan run` input errors (one line, exit 2) and the run-folder rules; no training here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from backend_helpers import build_plan, llama_spec, make_plan_file, read_measured, write_plan
from qplan.backends import runner
from qplan.backends.report import new_folder
from qplan.cli.main import main


def _run_cli(capsys, *args):
    code = main(["run", *args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("content, needle", [
    ("{not json", "is not valid JSON"),
    ('{"schema_version": 1, "model": {}}', "missing required field"),
    ('{"schema_version": 99}', "has schema_version 99"),
    ("[]", "is not a JSON object"),
])
def test_malformed_plan(tmp_path, capsys, content, needle):
    p = tmp_path / "plan.json"
    p.write_text(content)
    code, err = _run_cli(capsys, str(p), "--random-init", "--out-dir", str(tmp_path / "runs"))
    assert code == 2
    assert err.startswith("qplan: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "runs").exists()  # nothing written for bad input


def test_missing_plan_file(tmp_path, capsys):
    code, err = _run_cli(capsys, str(tmp_path / "nope.json"), "--random-init")
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("extra, needle", [
    ([], "no model: pass --model-dir DIR"),
    (["--random-init", "--model-dir", "."], "not both"),
    (["--model-dir", "{tmp}"], "has no config.json"),
    (["--model-dir", "{tmp}/nowhere"], "is not a directory"),
    (["--random-init", "--data", "{tmp}/missing.jsonl"], "data file {tmp}/missing.jsonl does not exist"),
    (["--random-init", "--data", "{tmp}/bad.jsonl"], "bad.jsonl:1 is not valid JSON"),
    (["--random-init", "--steps", "2"], "--steps must be at least 3"),
    (["--random-init", "--steps", "5", "--epochs", "1"], "either --steps or --epochs"),
    (["--random-init", "--device", "tpu"], "--device must be auto, cpu or cuda"),
])
def test_bad_run_inputs(tmp_path, capsys, extra, needle):
    plan_file = make_plan_file(tmp_path)
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, err = _run_cli(capsys, str(plan_file), *args, "--out-dir", str(tmp_path / "runs"))
    assert code == 2, err
    assert needle.replace("{tmp}", str(tmp_path)) in err and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_unknown_backend_in_plan(tmp_path, capsys):
    plan = build_plan(llama_spec())
    plan["backend"] = "nope"
    p = write_plan(tmp_path / "plan.json", plan)
    code, err = _run_cli(capsys, str(p), "--random-init")
    assert code == 2 and "unknown backend 'nope': available backends are peft, unsloth" in err


def test_backend_not_installed_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QPLAN_UNSLOTH_PYTHON", raising=False)
    import importlib.util

    if importlib.util.find_spec("unsloth") is not None:
        pytest.skip("unsloth is importable in this environment")
    p = write_plan(tmp_path / "plan.json", build_plan(llama_spec(), backend="unsloth"))
    code, err = _run_cli(capsys, str(p), "--random-init", "--out-dir", str(tmp_path / "runs"))
    assert code == 2
    assert "backend 'unsloth' is not installed" in err and "pip install 'qplan[unsloth]'" in err


def test_new_folder_never_reuses_one(tmp_path):
    first = new_folder(tmp_path, "run")
    (first / "keep.txt").write_text("mine")
    second = new_folder(tmp_path, "run")
    third = new_folder(tmp_path, "run")
    assert [first.name, second.name, third.name] == ["run", "run-2", "run-3"]
    assert (first / "keep.txt").read_text() == "mine"


def test_crashed_worker_is_reported_and_existing_run_folder_kept(tmp_path, monkeypatch):
    """The training process dies by SIGKILL (what the kernel's OOM killer does): the parent still
    writes measured.json and a report, in a new folder beside an existing one of the same name."""
    plan_file = make_plan_file(tmp_path)
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then kill -9 $$; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("QPLAN_PEFT_PYTHON", str(fake))
    monkeypatch.setattr(runner, "utc_stamp", lambda: "20260101T000000Z")
    out = tmp_path / "runs"
    taken = out / "20260101T000000Z-tiny-llama-peft"
    taken.mkdir(parents=True)
    (taken / "report.md").write_text("someone's report")

    result = runner.run_plan(plan_file, random_init=True, steps=4, out_dir=out)

    assert Path(result["run_dir"]).name == "20260101T000000Z-tiny-llama-peft-2"
    assert (taken / "report.md").read_text() == "someone's report"
    assert result["status"] == "error" and result["returncode"] == -9
    doc = read_measured(result["run_dir"])
    assert doc["failure"]["kind"] == "crashed"
    assert "SIGKILL" in doc["failure"]["message"] and "OOM killer" in doc["failure"]["message"]
    assert doc["error"]["trainable"] is None
    for name in ("plan.json", "job.json", "measured.json", "report.md", "report.html"):
        assert (Path(result["run_dir"]) / name).is_file(), name
    assert json.loads((Path(result["run_dir"]) / "plan.json").read_text()) == json.loads(plan_file.read_text())
