"""What every `qplan` command shares: output formats, warnings on stderr, and the one error line."""

from __future__ import annotations

import json
from typing import Any

import click

from qplan.planner.errors import QPlanError

FORMATS = click.Choice(["table", "json"])


def emit(fmt: str, data: Any, table: str) -> None:
    """``--format json``: the data; else the table."""
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        click.echo(table)


def warn(warnings: list[str]) -> None:
    for w in warnings:
        click.echo("qplan: warning: " + " ".join(w.split()), err=True)


def error_line(exc: QPlanError | click.ClickException) -> str:
    """The one line the CLI prints for a bad input (``qplan serve`` answers the same line)."""
    if isinstance(exc, QPlanError):
        return "qplan: error: " + " ".join(str(exc).split())
    msg = exc.format_message().replace("\n", " ")
    ctx = getattr(exc, "ctx", None)
    where = f" ({ctx.command_path})" if ctx is not None else ""
    return f"qplan: error{where}: {msg}"
