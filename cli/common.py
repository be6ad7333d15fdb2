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


def printable(text: str) -> str:
    """``text`` on one line with no control characters: whitespace runs become one space, and ESC, BEL and the
    other non-printable characters are written as escapes (``\\x1b``), so a value from a file or a path cannot
    drive the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in " ".join(text.split()))


def output_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """The click callback of every ``--output``: an empty or blank name is an error, not "no output" (``--output ''``
    used to be silently ignored: the plan was printed and nothing written)."""
    if value is not None and not value.strip():
        raise QPlanError(f"--output: expected a file or folder name, got {value!r}")
    return value


def warn(warnings: list[str]) -> None:
    for w in warnings:
        click.echo("qplan: warning: " + printable(w), err=True)


def error_line(exc: QPlanError | click.ClickException) -> str:
    """The one line the CLI prints for a bad input (``qplan serve`` answers the same line)."""
    if isinstance(exc, QPlanError):
        return "qplan: error: " + printable(str(exc))
    msg = exc.format_message().replace("\n", " ")
    ctx = getattr(exc, "ctx", None)
    where = f" ({ctx.command_path})" if ctx is not None else ""
    return printable(f"qplan: error{where}: {msg}")
