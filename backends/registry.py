"""Backends by name, from entry points in the group ``qplan.backends`` — listed without importing them.

qplan's own backends are declared in pyproject.toml (``peft``, ``unsloth``); a third-party
package adds one the same way::

    [project.entry-points."qplan.backends"]
    mine = "my_pkg.qplan_backend:MyBackend"

Listing reads only package metadata (``importlib.metadata``) and asks ``importlib.util.find_spec``
whether each backend's required packages could be imported — it imports neither the backend
module nor torch (``qplan backends`` stays instant; checked by tests with ``python -X importtime``).
``load_backend`` imports and instantiates one, in the process that trains (``backends.worker``).

Each backend runs in its own process (``backends.runner``), by default with the interpreter
running qplan. ``QPLAN_<NAME>_PYTHON`` (e.g. ``QPLAN_UNSLOTH_PYTHON=/opt/unsloth-venv/bin/python``)
names another one: Unsloth pins older transformers/trl than the ``train`` extra, so it lives
in a virtual environment of its own; ``installed`` is then answered by that interpreter.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from qplan.planner.errors import QPlanError

GROUP = "qplan.backends"

#: import names each built-in backend needs, and how to get them (no import needed to read this).
#: bitsandbytes is checked when a k-bit plan is loaded, since 16-bit plans do not need it.
KNOWN: dict[str, tuple[tuple[str, ...], str]] = {
    "peft": (("torch", "transformers", "peft", "accelerate", "safetensors"), "pip install 'qplan[train]'"),
    "unsloth": (
        ("torch", "transformers", "peft", "unsloth", "safetensors"),
        "pip install 'qplan[unsloth]' in a virtual environment of its own (Unsloth pins transformers "
        "and trl), then set QPLAN_UNSLOTH_PYTHON=/path/to/that/venv/bin/python",
    ),
}


@dataclass(frozen=True)
class BackendInfo:
    """A backend as its entry point declares it; nothing imported."""

    name: str
    target: str  # "module:attr"
    requires: tuple[str, ...]
    hint: str
    python: str  # interpreter that runs it

    @property
    def module(self) -> str:
        return self.target.split(":", 1)[0]


def python_var(name: str) -> str:
    """``QPLAN_<NAME>_PYTHON``: the variable naming the interpreter of backend ``name``."""
    return "QPLAN_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper() + "_PYTHON"


def python_for(name: str) -> str:
    """The interpreter that runs backend ``name``: ``$QPLAN_<NAME>_PYTHON`` or this one."""
    return os.environ.get(python_var(name)) or sys.executable


def discover() -> dict[str, BackendInfo]:
    """Every backend declared by an installed distribution, by name (first declaration wins)."""
    out: dict[str, BackendInfo] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if ep.name in out:
            continue
        requires, hint = KNOWN.get(ep.name, ((), ""))
        if not requires:
            dist = ep.dist.name if getattr(ep, "dist", None) else ep.value.split(".", 1)[0]
            requires = (ep.value.split(":", 1)[0].split(".", 1)[0],)
            hint = f"pip install {dist}"
        out[ep.name] = BackendInfo(ep.name, ep.value, requires, hint, python_for(ep.name))
    return out


def _missing(requires: tuple[str, ...], python: str) -> list[str]:
    """Which of ``requires`` the interpreter ``python`` cannot import (find_spec, no import)."""
    if python == sys.executable:
        return [m for m in requires if importlib.util.find_spec(m) is None]
    if not os.path.exists(python):
        return list(requires)
    code = ("import importlib.util, sys; "
            "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))")
    try:
        res = subprocess.run([python, "-c", code, *requires], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return list(requires)
    if res.returncode != 0:
        return list(requires)
    return res.stdout.split()


def backend_info(name: str) -> BackendInfo:
    """The entry point of backend ``name``; an unknown name is an error listing the known ones."""
    found = discover()
    if name not in found:
        known = ", ".join(found) or "none (is qplan installed? pip install -e .)"
        raise QPlanError(f"unknown backend {name!r}: available backends are {known} (see `qplan backends`)")
    return found[name]


def check_installed(info: BackendInfo) -> None:
    """Raise a one-line error naming what to install if ``info``'s packages are missing."""
    missing = _missing(info.requires, info.python)
    if missing:
        where = "" if info.python == sys.executable else f" (interpreter {info.python}, from ${python_var(info.name)})"
        raise QPlanError(
            f"backend {info.name!r} is not installed: cannot import {', '.join(missing)}{where}; {info.hint}"
        )


def list_backends() -> list[dict[str, Any]]:
    """``[{name, target, installed, hint, python}]`` for ``qplan backends``; imports no backend."""
    rows = []
    for info in discover().values():
        missing = _missing(info.requires, info.python)
        rows.append({
            "name": info.name,
            "target": info.target,
            "installed": not missing,
            "hint": info.hint if missing else "",
            "missing": missing,
            "python": info.python,
        })
    return rows


def load_target(target: str) -> Any:
    """Import ``"module:attr"`` and return the attribute."""
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def get_backend(name: str) -> Any:
    """An instance of backend ``name`` (imports its module: torch and friends)."""
    info = backend_info(name)
    check_installed(info)
    return load_target(info.target)()
