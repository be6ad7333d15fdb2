"""A cache of a dataset's token counts, so a second plan of the same data and tokenizer does not tokenize again.

Key: SHA-256 of the data's *content* (the SHA-256 of each file — of every file of a ``save_to_disk`` folder —
with its path inside the folder), the tokenizer's identity (its backend's JSON, chat template, EOS and BOS
tokens), the format and the cache's version. A copy of the data elsewhere hits; an edit misses, whatever its
timestamps. Hashing reads the data (about 1.3 GB/s here); so a second call stays instant, each file's digest is
remembered against its ``stat`` (device, inode, size, ``mtime_ns`` and ``ctime_ns`` — the kernel sets ``ctime``
on every write and no call sets it back, so an edited file is hashed again even if its ``mtime`` was restored).
Value: the format found and each record's token columns (``lengths`` and ``prompt`` for TRL's formats; the
columns of ``planner.data.axolotl``). Stored as JSON under ``$XDG_CACHE_HOME/qplan/data-lengths``
(``~/.cache``, or ``$QPLAN_DATA_CACHE_DIR``), written atomically; an unreadable or mismatched entry is ignored
and rewritten. ``QPLAN_DATA_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError

VERSION = 2
#: the file of remembered digests (stat -> SHA-256) in the cache folder
DIGESTS = "file-digests"
#: digests remembered (the oldest are forgotten)
MAX_DIGESTS = 4096


def cache_dir() -> Path:
    if os.environ.get("QPLAN_DATA_CACHE_DIR"):
        return Path(os.environ["QPLAN_DATA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qplan" / "data-lengths"


def enabled() -> bool:
    return os.environ.get("QPLAN_DATA_CACHE", "1") not in ("0", "false", "no", "off")


def _files(source: Path) -> list[Path]:
    """The regular files of the source (a FIFO or a device is never opened here: the reader refuses it)."""
    if source.is_dir():
        return sorted(q for q in source.rglob("*") if q.is_file())
    return [source] if source.is_file() else []


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _digests() -> dict[str, str]:
    from qplan.planner.files import read_limited

    try:
        doc = json.loads(read_limited(cache_dir() / DIGESTS, "data digest cache", 1 << 24))
    except (QPlanError, ValueError, OSError):
        return {}
    ok = isinstance(doc, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items())
    return doc if ok else {}


def data_identity(source: str | Path) -> list[Any]:
    """``[[path inside the source, SHA-256], ...]`` of the file, or of each file of the folder."""
    from qplan.planner.files import atomic_write

    root = Path(source).resolve()
    memo = _digests() if enabled() else {}
    changed = False
    out = []
    for f in _files(root):
        sk = _stat_key(f)
        digest = memo.get(sk)
        if digest is None:
            digest = memo[sk] = _sha256(f)
            changed = True
        out.append([str(f.relative_to(root)) if root.is_dir() else "", digest])
    if changed and enabled():
        try:
            cache_dir().mkdir(parents=True, exist_ok=True)
            keep = dict(list(memo.items())[-MAX_DIGESTS:])
            atomic_write(cache_dir() / DIGESTS, json.dumps(keep, separators=(",", ":")))
        except (OSError, QPlanError):
            pass
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
    cols = doc.get("columns")
    ints = (lambda xs: isinstance(xs, list) and bool(xs) and all(type(x) is int and x >= 0 for x in xs))  # noqa: E731
    if not isinstance(cols, dict) or not cols or not all(ints(v) for v in cols.values()) \
            or len({len(v) for v in cols.values()}) != 1:
        return None
    return doc


def store(k: str, fmt: str, columns: dict[str, list[int]]) -> None:
    """Write an entry (a failure to write only costs the next call its speed: never an error)."""
    from qplan.planner.files import atomic_write

    if not enabled():
        return
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write(cache_dir() / f"{k}.json", json.dumps({"version": VERSION, "format": fmt, "columns": columns},
                                                           separators=(",", ":")))
    except (OSError, QPlanError):
        pass
