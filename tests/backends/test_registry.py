"""Backends are entry points, listed without importing them (or torch)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest

from qplan.backends import registry
from qplan.planner.errors import QPlanError


def test_builtin_backends_are_listed_with_install_state(monkeypatch):
    monkeypatch.delenv("QPLAN_UNSLOTH_PYTHON", raising=False)
    rows = {r["name"]: r for r in registry.list_backends()}
    assert rows["peft"]["target"] == "qplan.backends.peft_backend:PeftBackend"
    assert rows["peft"]["installed"] is True
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    assert rows["unsloth"]["installed"] is has_unsloth
    if not has_unsloth:
        assert "qplan[unsloth]" in rows["unsloth"]["hint"]
        assert rows["unsloth"]["missing"] == ["unsloth"]


def test_listing_imports_neither_torch_nor_backend_modules():
    """`qplan backends` in a fresh interpreter: -X importtime names every module imported."""
    code = "import sys; from qplan.cli.main import main; sys.exit(main(['backends']))"
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "peft" in res.stdout and "unsloth" in res.stdout
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "qplan.backends.registry" in imported  # the log is what we think it is
    assert not {"torch", "transformers", "peft", "unsloth"} & imported
    assert not any(m.startswith("qplan.backends.") and m.endswith("_backend") for m in imported)


def test_unknown_backend_lists_available_ones():
    with pytest.raises(QPlanError, match=r"unknown backend 'nope': available backends are peft, unsloth"):
        registry.backend_info("nope")


def test_not_installed_backend_names_the_extra(monkeypatch):
    monkeypatch.delenv("QPLAN_UNSLOTH_PYTHON", raising=False)
    if importlib.util.find_spec("unsloth") is not None:
        pytest.skip("unsloth is importable here")
    with pytest.raises(QPlanError, match=r"backend 'unsloth' is not installed: cannot import unsloth.*qplan\[unsloth\]"):
        registry.check_installed(registry.backend_info("unsloth"))


def test_a_foreign_interpreter_answers_for_its_backend(monkeypatch, tmp_path):
    """QPLAN_UNSLOTH_PYTHON points at another interpreter: installed is asked of that one."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("QPLAN_UNSLOTH_PYTHON", str(fake))
    info = registry.backend_info("unsloth")
    assert info.python == str(fake)
    expected = importlib.util.find_spec("unsloth") is None
    assert (registry._missing(info.requires, info.python) == ["unsloth"]) is expected
    monkeypatch.setenv("QPLAN_UNSLOTH_PYTHON", str(tmp_path / "missing-python"))
    row = {r["name"]: r for r in registry.list_backends()}["unsloth"]
    assert row["installed"] is False


def test_third_party_backend_via_entry_point(tmp_path):
    """A package that declares an entry point in `qplan.backends` is listed and loadable."""
    (tmp_path / "mybackend.py").write_text(textwrap.dedent("""
        class MyBackend:
            name = "mine"
    """))
    dist = tmp_path / "mybackend-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mybackend\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[qplan.backends]\nmine = mybackend:MyBackend\n")
    code = textwrap.dedent("""
        import sys
        from qplan.backends.registry import get_backend, list_backends
        rows = {r["name"]: r for r in list_backends()}
        print(rows["mine"]["target"], rows["mine"]["installed"])
        print(type(get_backend("mine")).__name__)
    """)
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["mybackend:MyBackend", "True", "MyBackend"]
