"""Files that never end (issue 29): every file qplan reads goes through one bounded reader
(``planner.files.read_limited``). A FIFO, a link to ``/dev/zero`` or a folder where a file is expected is
refused in one line at once (a FIFO used to block forever, ``/dev/zero`` to end in MemoryError, exit 3),
and a file over the stated size is refused without being read. Real FIFOs (``os.mkfifo``), real links
to ``/dev/zero``, real ``qplan`` processes with a time limit."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_hostile_input import qplan, refused

from qplan.planner.errors import QPlanError
from qplan.planner.files import read_limited

TRAINER = Path(__file__).parent / "fixtures" / "trainer_configs"


def _hostile(tmp_path: Path, kind: str, name: str) -> Path:
    p = tmp_path / kind / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "zero":
        p.symlink_to("/dev/zero")
    else:
        p.mkdir()
    return p


NEEDLE = {"fifo": "not a regular file", "zero": "not a regular file", "folder": "folder"}
KINDS = sorted(NEEDLE)


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    try:
        return qplan(*args, cwd=cwd, timeout=60)
    except subprocess.TimeoutExpired:  # the FIFO blocked the read: the bug itself
        pytest.fail(f"qplan {' '.join(args)} hung on a file that never ends")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("what", ["gpu", "model", "calibration", "from-config", "plan", "spec-add", "calibrate-gpu"])
def test_a_file_that_never_ends_is_one_line_at_once(tmp_path, kind, what):
    name = {"from-config": "cfg.yml", "calibration": "calib.json"}.get(what, "x.json")
    bad = str(_hostile(tmp_path, kind, name))
    args = {
        "gpu": ["estimate", "--model", "smollm2-135m", "--gpu", bad],
        "model": ["estimate", "--model", bad],
        "calibration": ["estimate", "--model", "smollm2-135m", "--gpu", "t4", "--calibration", bad],
        "from-config": ["estimate", "--from-config", bad],
        "plan": ["export", bad, "--to", "axolotl"],
        "spec-add": ["spec", "add", bad, "--name", "mine"],
        "calibrate-gpu": ["calibrate", str(tmp_path), "--gpu", bad],
    }[what]
    if kind == "folder" and what in ("model", "spec-add"):  # a folder is a model folder: it has no config.json
        refused(_run(*args), "config.json")
        return
    refused(_run(*args), NEEDLE[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_a_deepspeed_file_that_never_ends_is_one_line(tmp_path, kind):
    cfg = yaml.safe_load((TRAINER / "axolotl-qlora-llama-3.1-8b.yml").read_text())
    cfg["deepspeed"] = str(_hostile(tmp_path, kind, "ds.json"))
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    refused(_run("estimate", "--from-config", str(tmp_path / "cfg.yml"), "--gpus", "2"), "deepspeed", NEEDLE[kind])


def test_a_cached_hub_config_that_never_ends_is_one_line(tmp_path, monkeypatch):
    """huggingface_hub hands back a path in its cache: a FIFO there must not block the read."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from qplan.planner.model import hub

    snap = tmp_path / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    os.mkfifo(snap / "config.json")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(snap / "config.json"))
    with pytest.raises(QPlanError, match="not a regular file"):
        hub.fetch_config("org/name", None)


def test_files_over_the_limit_are_refused_without_being_read(tmp_path):
    big = tmp_path / "plan.json"
    with open(big, "wb") as f:
        f.truncate((64 << 20) + 1)  # sparse: refused by its size, before a byte is read
    refused(_run("export", str(big), "--to", "axolotl"), "over 64 MiB")
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("a: 1\n" + "#" * (1 << 20))
    refused(_run("estimate", "--from-config", str(cfg)), "over 1 MiB")


def test_read_limited_never_reads_past_the_limit(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    assert read_limited(p, "file", 100) == b"x" * 100
    with pytest.raises(QPlanError, match="over 99 bytes"):
        read_limited(p, "file", 99)
    with pytest.raises(QPlanError, match="cannot read file"):
        read_limited(tmp_path / "missing", "file", 99)


def test_a_report_of_a_run_whose_files_never_end_skips_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "plan.json")
    (run / "measured.json").symlink_to("/dev/zero")
    p = _run("report", str(run))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    shutil.rmtree(run)
