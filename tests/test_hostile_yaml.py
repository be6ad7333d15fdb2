"""Trainer configs built to hurt (issue 29): YAML alias bombs, integers of hundreds or thousands of digits,
keys that are not names, values too big to print. Each is one line and exit 2 within seconds — never a hang,
never exit 3. Real YAML files, real ``qplan`` processes with a time limit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from test_hostile_input import qplan, refused

TRAINER = Path(__file__).parent / "fixtures" / "trainer_configs"
BASE = (TRAINER / "axolotl-qlora-llama-3.1-8b.yml").read_text()


def _run(*args: str) -> subprocess.CompletedProcess:
    try:
        return qplan(*args, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"qplan {' '.join(args)} hung")


def _config(tmp_path: Path, text: str) -> str:
    p = tmp_path / "cfg.yml"
    p.write_text(text)
    return str(p)


def _bomb(levels: int = 10, fan: int = 9) -> str:
    """``levels`` anchors, each a list of ``fan`` aliases of the one before: fan**levels leaves."""
    lines = ['b0: &b0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * fan)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["adapter", "lora_target_modules", "unknown_key"])
def test_an_alias_bomb_is_refused_at_once(tmp_path, where):
    text = _bomb() + BASE.replace(f"\n{where}:", f"\n{where}_was:") + f"\n{where}: *b9\n"
    line = refused(_run("estimate", "--from-config", _config(tmp_path, text)), "aliases")
    assert len(line) < 400


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    text = BASE + "\nloop: &loop [1, *loop]\n"
    refused(_run("estimate", "--from-config", _config(tmp_path, text)), "contains itself")


def test_ordinary_aliases_still_work(tmp_path):
    cfg = BASE.replace("lora_r:", "lora_r_was:").replace("lora_alpha:", "lora_alpha_was:")
    text = cfg + "\nlora_r: &rank 16\nlora_alpha: *rank\n"
    p = _run("estimate", "--from-config", _config(tmp_path, text), "--format", "json")
    assert p.returncode == 0, p.stderr
    assert '"r": 16' in p.stdout and '"alpha": 16.0' in p.stdout


@pytest.mark.parametrize("key,value,needle", [
    ("lora_alpha", "9" * 400, "digits"),          # float(int) overflowed: OverflowError, exit 3
    ("lora_r", "1" * 5000, "digits"),             # PyYAML's int(): ValueError (int max str digits), exit 3
    ("micro_batch_size", "-" + "7" * 60, "digits"),
    ("adapter", "x" * 200_000, "adapter"),        # a huge string: the line stays short
])
def test_values_too_big_are_one_short_line(tmp_path, key, value, needle):
    text = BASE.replace(f"\n{key}:", f"\n{key}_was:") + f"\n{key}: {value}\n"
    line = refused(_run("estimate", "--from-config", _config(tmp_path, text)), needle)
    assert len(line) < 400


def test_an_int_key_in_fsdp_config_is_one_line(tmp_path):
    cfg = yaml.safe_load(BASE)
    cfg.update(fsdp=["full_shard", "auto_wrap"], fsdp_config={1: "x", "fsdp_version": 2})
    refused(_run("estimate", "--from-config", _config(tmp_path, yaml.safe_dump(cfg)), "--gpus", "2"),
            "fsdp_config", "not a name")
