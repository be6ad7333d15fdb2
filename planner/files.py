"""Writing the user's files safely: never over an existing file without being asked, never half.

``write_new_file`` writes to a fresh, unpredictable temporary file in the target's directory
(``tempfile.mkstemp``: ``O_CREAT | O_EXCL``, so no existing file or symbolic link is ever
followed or clobbered), with the permissions a new file gets (``0o666 & ~umask``, or the mode of
the file it replaces); then, for a new file, hard-links it into place (``os.link`` fails if
something appeared there meanwhile: nothing is overwritten), or with ``--force`` renames it over
the old file (``os.replace``, atomic on POSIX) — only over a regular file, never a device, a
pipe or a folder. On any error the temporary file is removed: nothing is left behind.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from qplan.planner.errors import QPlanError


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, data: str | bytes, replace: bool = True) -> Path:
    """Write ``data`` (UTF-8 for text) to ``path`` atomically: renamed over an existing regular
    file when ``replace``, else linked into place only if nothing is there."""
    p = Path(path)
    blob = data.encode("utf-8") if isinstance(data, str) else data
    try:
        old = os.lstat(p)
    except FileNotFoundError:
        old = None
    if old is not None and replace and not stat.S_ISREG(old.st_mode):
        raise QPlanError(f"{p} is not a regular file (a link, device, pipe or folder): not replacing it")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name[:100]}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode) if old is not None else _umask_mode())
            f.write(blob)
        if replace:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)
            except FileExistsError as exc:
                raise QPlanError(f"{p} already exists: choose another path or pass --force to replace it") from exc
            except OSError:  # a file system without hard links: the rename, if still nothing is there
                if os.path.lexists(p):
                    raise QPlanError(f"{p} already exists: choose another path or pass --force to replace it") from None
                os.replace(tmp, p)
            else:
                os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


def write_new_file(path: str | Path, text: str, force: bool) -> Path:
    """Write ``text`` to ``path``; refuse to replace an existing file unless ``force``, and never a folder."""
    p = Path(path)
    if safe_exists(p) and p.is_dir():
        raise QPlanError(f"{p} is a directory: give a file name")
    if safe_exists(p) and not force:
        raise QPlanError(f"{p} already exists: choose another --output or pass --force to replace it")
    if p.parent and not p.parent.exists():
        raise QPlanError(f"directory {p.parent} does not exist")
    try:
        return atomic_write(p, text, replace=force)
    except OSError as exc:
        raise QPlanError(f"cannot write {p}: {exc.strerror or exc}") from exc


def safe_exists(path: str | Path) -> bool:
    """``Path.exists`` that answers instead of raising for names the OS refuses (too long, ...)."""
    try:
        return Path(path).exists() or Path(path).is_symlink()
    except (OSError, ValueError) as exc:
        raise QPlanError(f"cannot use the path {str(path)[:80]!r}: {getattr(exc, 'strerror', None) or exc}") from exc


def safe_is_file(path: str | Path) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError) as exc:
        raise QPlanError(f"cannot use the path {str(path)[:80]!r}: {getattr(exc, 'strerror', None) or exc}") from exc


def check_folder(path: str | Path, option: str, create: bool = False) -> Path:
    """A folder option: not a file; created (with parents) when ``create``; one line if it cannot be."""
    p = Path(path)
    if safe_exists(p) and not p.is_dir():
        raise QPlanError(f"{option} {p} is a file, not a folder: give a folder")
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QPlanError(f"{option} {p}: cannot create the folder ({exc.strerror or exc})") from exc
    return p
