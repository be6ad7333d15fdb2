"""What reading a trainer config tells the user beside the plan: each warning with its kind.

A warning is ``{"kind": KIND, "text": ...}``; plan.json keeps them in ``trainer_config.warnings`` (and the
command line prints their texts), so a program can tell keys that change memory from bookkeeping:

* ``approximated`` — a known effect on memory that the plan does not model exactly (it says which way);
* ``ignored`` — keys (or plugins) qplan does not know: whatever they change is not in the plan;
* ``launcher`` — keys that only tell a multi-GPU launcher what to do: one GPU's memory is unchanged;
* ``data`` — about the data the config names: what the plan's lengths come from instead.
"""

from __future__ import annotations

KINDS = ("approximated", "ignored", "launcher", "data")


def note(kind: str, text: str) -> dict[str, str]:
    """One warning of ``kind`` (``KINDS``)."""
    if kind not in KINDS:  # pragma: no cover - a reader's bug, not the user's input
        raise AssertionError(f"unknown warning kind {kind!r}")
    return {"kind": kind, "text": text}
