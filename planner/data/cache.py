"""A cache of a dataset's token counts, so a second plan of the same data and tokenizer does not tokenize again.

Key: SHA-256 of the data's identity (resolved path, size and modification time of the file, or of every file of
a ``save_to_disk`` folder — the test ``make`` and ``ccache`` use), the tokenizer's identity (its backend's JSON,
chat template and EOS token), the format and the cache's version. Value: the format found and each record's
token counts (and prompt counts). Stored as JSON under ``$XDG_CACHE_HOME/qplan/data-lengths`` (``~/.cache``),
(or ``$QPLAN_DATA_CACHE_DIR``), written atomically; an unreadable or mismatched entry is ignored and rewritten.
``QPLAN_DATA_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError

VERSION = 1


def cache_dir() -> Path:
    if os.environ.get("QPLAN_DATA_CACHE_DIR"):
        return Path(os.environ["QPLAN_DATA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qplan" / "data-lengths"


def enabled() -> bool:
    return os.environ.get("QPLAN_DATA_CACHE", "1") not in ("0", "false", "no", "off")


def _files(source: Path) -> list[Path]:
    return sorted(q for q in source.rglob("*") if q.is_file()) if source.is_dir() else [source]


def data_identity(source: str | Path) -> list[Any]:
    out = []
    for f in _files(Path(source).resolve()):
        st = f.stat()
        out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def tokenizer_identity(tok: Any) -> str:
    backend = getattr(tok, "_tokenizer", None)
    body = backend.to_str() if backend is not None and hasattr(backend, "to_str") else repr(tok.get_vocab())
    extra = json.dumps([type(tok).__name__, getattr(tok, "chat_template", None), tok.eos_token,
                        getattr(tok, "bos_token", None)], default=str)
    return hashlib.sha256((body + extra).encode("utf-8")).hexdigest()


def key(source: str | Path, tok: Any, fmt: str) -> str:
    ident = json.dumps([VERSION, data_identity(source), tokenizer_identity(tok), fmt])
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()


def load(k: str) -> dict[str, Any] | None:
    """The cached entry, or None (absent, unreadable, or not this cache's shape)."""
    from qplan.planner.files import read_limited

    path = cache_dir() / f"{k}.json"
    if not enabled() or not path.is_file():
        return None
    try:
        doc = json.loads(read_limited(path, "data-length cache", 1 << 30))
    except (QPlanError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("format"), str):
        return None
    lengths, prompt = doc.get("lengths"), doc.get("prompt")
    ints = (lambda xs: isinstance(xs, list) and bool(xs) and all(type(x) is int and x >= 0 for x in xs))  # noqa: E731
    if not ints(lengths) or not (prompt is None or (ints(prompt) and len(prompt) == len(lengths))):
        return None
    return doc


def store(k: str, fmt: str, lengths: list[int], prompt: list[int] | None) -> None:
    """Write an entry (a failure to write only costs the next call its speed: never an error)."""
    from qplan.planner.files import atomic_write

    if not enabled():
        return
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write(cache_dir() / f"{k}.json", json.dumps({"version": VERSION, "format": fmt, "lengths": lengths,
                                                            "prompt": prompt}, separators=(",", ":")))
    except (OSError, QPlanError):
        pass
