"""``qplan export`` of a hostile plan (issue 29): a plan is the user's file and may be hand-edited. A newline
in ``gpu.name`` or in the plan's file name used to break out of the header comment and become real YAML keys
(``trust_remote_code: true``, ``deepspeed: /etc/passwd``); ``model.source.hub_id`` / ``revision`` were written
unchecked (``../../../etc/passwd`` as ``base_model``). Real plan files, real ``qplan`` processes. The edited plans
are re-sealed (``document.dumps``), as a crafted plan would be: the seal catches hand edits (test_hostile_plans.py),
and export's own checks must hold without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_hostile_input import qplan, refused

EVIL = "t4\ntrust_remote_code: true\ndeepspeed: /etc/passwd"


def _plan(tmp_path: Path, name: str = "plan.json", loss: str = "full", **edit) -> Path:
    """A plan (``loss``: TRL exports need TRL's fused LM head, which its SFTTrainer trains with) with fields edited."""
    base = tmp_path / f"base-{loss}.json"
    if not base.exists():
        p = qplan("estimate", "--model", "llama-3.2-3b", "--quant", "bf16", "--gpu", "t4", "--loss", loss,
                  "--output", str(base))
        assert p.returncode == 0, p.stderr
    plan = json.loads(base.read_text())
    for path, value in edit.items():
        *parents, last = path.split("__")
        node = plan
        for k in parents:
            node = node[k]
        node[last] = value
    from qplan.planner.document import dumps

    out = tmp_path / name
    out.write_text(dumps(plan))
    return out


def _header_and_body(text: str) -> tuple[list[str], dict]:
    lines = text.splitlines()
    head = [ln for ln in lines[:5] if ln.startswith("#")]
    return head, yaml.safe_load(text)


@pytest.mark.parametrize("tool", ["axolotl", "llamafactory", "trl"])
def test_a_newline_in_a_plan_field_or_file_name_stays_in_the_comment(tmp_path, tool):
    loss = "trl" if tool == "trl" else "full"
    for plan_file in (_plan(tmp_path, "p1.json", loss, gpu__name=EVIL),
                      _plan(tmp_path, "plan\ntrust_remote_code: true\ndeepspeed: x.json", loss)):
        p = qplan("export", str(plan_file), "--to", tool)
        assert p.returncode == 0, p.stderr
        cfg = yaml.safe_load(p.stdout)
        assert "trust_remote_code" not in cfg and "deepspeed" not in cfg, p.stdout[:800]
        first_key = next(i for i, ln in enumerate(p.stdout.splitlines()) if not ln.startswith("#"))
        assert all(ln.startswith("# ") for ln in p.stdout.splitlines()[:first_key])


@pytest.mark.parametrize("field,value", [
    ("hub_id", "../../../etc/passwd"),
    ("hub_id", "/etc/passwd"),
    ("hub_id", "meta-llama/Llama 3.2"),
    ("hub_id", "meta-llama/Llama-3.2-3B\ntrust_remote_code: true"),
    ("revision", "../../etc"),
    ("revision", "main\x1b[31m"),
    ("revision", "main branch"),
])
def test_unsafe_hub_ids_and_revisions_are_refused(tmp_path, field, value):
    plan_file = _plan(tmp_path, loss="trl", **{f"model__source__{field}": value})
    out = tmp_path / "cfg.yaml"
    p = qplan("export", str(plan_file), "--to", "trl", "--output", str(out))
    refused(p, f"model.source.{field}")
    assert not out.exists()
    assert "\x1b" not in p.stderr


def test_a_clean_plan_still_exports(tmp_path):
    p = qplan("export", str(_plan(tmp_path, loss="trl", model__source__revision="main")), "--to", "trl")
    assert p.returncode == 0, p.stderr
    assert yaml.safe_load(p.stdout)["model_name_or_path"] == "meta-llama/Llama-3.2-3B"
