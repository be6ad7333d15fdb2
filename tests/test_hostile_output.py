"""Where output goes (issue 29): ``--output ''`` used to be silently ignored — ``qplan estimate`` printed the
plan and wrote nothing, ``qplan report`` wrote a default folder — so a script that built the name from an
empty variable believed its file was written. An empty or blank name is one line and exit 2, before any
work, and nothing is written. Real ``qplan`` processes in a fresh folder."""

from __future__ import annotations

import json

import pytest
from test_hostile_input import qplan, refused, tree


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
