"""Control characters never reach the terminal (issue 29): ESC and BEL from a file name, a config key or a
config value used to be printed raw in the one-line error or a warning (``\\x1b[2J`` clears the screen).
Real files with such names, real ``qplan`` processes; stderr is checked byte for byte."""

from __future__ import annotations

from pathlib import Path

import yaml
from test_hostile_input import qplan, refused

TRAINER = Path(__file__).parent / "fixtures" / "trainer_configs"
CONTROL = [chr(c) for c in range(32) if chr(c) not in "\n"] + ["\x7f", "\x9b"]


def _clean(stderr: str) -> None:
    bad = sorted({c for c in stderr if c in CONTROL})
    assert not bad, (bad, stderr)


def test_an_error_naming_a_path_with_esc_and_bel_is_printable(tmp_path):
    missing = tmp_path / "a\x1b[2J\x07b.yml"
    line = refused(qplan("estimate", "--from-config", str(missing)))
    _clean(line)
    assert "\\x1b[2J\\x07" in line


def test_a_warning_listing_config_keys_is_printable(tmp_path):
    cfg = yaml.safe_load((TRAINER / "axolotl-qlora-llama-3.1-8b.yml").read_text())
    cfg["evil\x1b]0;owned\x07key"] = 1
    p = tmp_path / "cfg.yml"
    p.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    out = qplan("estimate", "--from-config", str(p))
    assert out.returncode == 0, out.stderr
    assert "evil" in out.stderr
    _clean(out.stderr)


def test_a_bad_option_value_with_control_characters_is_printable():
    line = refused(qplan("estimate", "--model", "smollm2-135m", "--quant", "nf4\x1b[31m\x07"))
    _clean(line)
