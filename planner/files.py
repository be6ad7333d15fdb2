"""Writing the user's files safely: never over an existing file without being asked, never half.

``write_new_file`` writes to a fresh, unpredictable temporary file in the target's directory
(``tempfile.mkstemp``: ``O_CREAT | O_EXCL``, so no existing file or symbolic link is ever
followed or clobbered), with the permissions a new file gets (``0o666 & ~umask``, or the mode of
the file it replaces); then, for a new file, hard-links it into place (``os.link`` fails if
something appeared there meanwhile: nothing is overwritten), or with ``--force`` renames it over
the old file (``os.replace``, atomic on POSIX) — only over a regular file, never a device, a
pipe or a folder. On any error the temporary file is removed: nothing is left behind.

Folders of outputs (``qplan report --output DIR``, a ``qplan run`` folder) are made the same way:
written whole under a staging name in the same parent and renamed into place (``StagedFolder``,
``publish_folder``), so a folder of that name is complete or absent. ``check_output_file`` and
``check_new_folder`` refuse, in one line and before any work, a destination qplan could not write:
they create and remove a probe in the folder, so what the file system says (read-only, no permission,
a quota) is what the user hears — ``os.access`` would answer yes to root on a read-only mount.

``read_limited`` is the one way in: every file qplan reads (plans, specs, configs, device files,
calibration, measured.json, trainer configs, a DeepSpeed JSON, a cached Hub config.json) is opened
without blocking (a FIFO never hangs the open), refused in one line unless it is a regular file (a
pipe, ``/dev/zero``, a folder), and read up to a stated size: at most ``limit + 1`` bytes are ever read.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError

#: set by ``names_only()``: inputs are resolved by name only (a bundled spec, a Hub id, a catalog GPU, a Hub
#: dataset id in the HF cache), never from a file or folder a caller names
NAMES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("qplan_names_only", default=False)


@contextlib.contextmanager
def names_only() -> Iterator[None]:
    """Inside it, ``load_spec`` takes only a bundled/user spec name or a Hub id, ``load_gpu`` only a catalog name or
    alias, and ``--data`` only a Hub dataset id in the HF cache: no path is read, no file or folder is even looked
    up (``qplan serve``: a request never names a file the server reads, nor learns whether a path exists)."""
    token = NAMES_ONLY.set(True)
    try:
        yield
    finally:
        NAMES_ONLY.reset(token)


#: the suffix of a folder still being written (a ``qplan run`` folder while it trains; a staged output folder)
PARTIAL = ".partial"

#: the most qplan reads of a JSON file (plans, specs, configs, measured.json)
MAX_JSON_BYTES = 64 << 20


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n:,} bytes"


def read_limited(path: str | Path, what: str, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them; a pipe, a device, a socket or a
    folder, a file over ``limit``, or one that cannot be opened: a one-line ``QPlanError`` naming ``what``."""
    p = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except (OSError, ValueError) as exc:
        raise QPlanError(f"cannot read {what} {p}: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise QPlanError(f"{what} {p} is a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise QPlanError(f"{what} {p} is not a regular file (a pipe, device or socket): give a file")
        if st.st_size > limit:
            raise QPlanError(f"{what} {p} is over {_size(limit)} ({st.st_size:,} bytes): is it the right file?")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise QPlanError(f"cannot read {what} {p}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:  # it grew while being read
        raise QPlanError(f"{what} {p} is over {_size(limit)}: is it the right file?")
    return data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
            os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode) if old is not None else 0o666 & ~_umask())
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
    p = _check_target(Path(path), force, "--output", None)
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
            raise QPlanError(f"{option}: cannot create the folder {os.path.abspath(p)} ({exc.strerror or exc})") from exc
    return p


def nearest_folder(p: Path) -> Path:
    """``p`` or its nearest ancestor that exists (the folder a ``mkdir -p`` of ``p`` would write in)."""
    q = p if str(p) else Path(".")
    while not safe_exists(q):
        if q.parent == q:
            break
        q = q.parent if str(q.parent) else Path(".")
    return q


def probe_writable(folder: str | Path, option: str) -> Path:
    """Create and remove an empty folder in ``folder``: one line naming ``option`` if the file system refuses."""
    d = Path(folder) if str(folder) else Path(".")
    if not d.is_dir():
        raise QPlanError(f"{option}: {d} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qplan-probe-", dir=d))
    except OSError as exc:
        raise QPlanError(f"{option}: cannot write in {os.path.abspath(d)} ({exc.strerror or exc}): choose a folder you can "
                         "write to") from exc
    return d


def check_output_file(path: str | Path, force: bool, option: str = "--output", rename: str | None = None) -> Path:
    """Before any work: ``path`` can be written as a new file (or replace a regular file with ``force``);
    ``rename``: the option that names the file, if not ``option``."""
    p = _check_target(Path(path), force, option, rename)
    probe_writable(p.parent if str(p.parent) else Path("."), option)
    return p


def _check_target(p: Path, force: bool, option: str, rename: str | None) -> Path:
    """``p`` may be written as a file: not a folder, not an existing file without ``force``, in a folder that exists."""
    if safe_exists(p) and p.is_dir():
        raise QPlanError(f"{p} is a directory: give a file name")
    if safe_exists(p) and not force:
        raise QPlanError(f"{p} already exists: choose another {rename or option} or pass --force to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if not safe_exists(parent):
        raise QPlanError(f"directory {parent} does not exist")
    return p


def check_new_folder(path: str | Path, option: str) -> Path:
    """Before any work: ``path`` is not there yet and could be created (with its parents)."""
    p = Path(path)
    if safe_exists(p):
        raise QPlanError(f"{option} {p} already exists: give a new folder")
    probe_writable(nearest_folder(p), option)
    return p


def publish_folder(stage: str | Path, final: str | Path) -> Path:
    """Rename the finished folder ``stage`` to ``final`` (same parent): never over anything already there (an
    empty folder made in the instant between the check and the rename would be replaced: POSIX ``rename``)."""
    stage, final = Path(stage), Path(final)
    if os.path.lexists(final):
        raise QPlanError(f"{final} appeared while qplan was writing it")
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0o700: the mode mkdir would have given
    os.rename(stage, final)
    return final


class StagedFolder:
    """``with StagedFolder(final, option) as stage:`` — fill ``stage``, a hidden folder beside ``final``; on success
    it is renamed to ``final`` (``.final``; with ``free``, a name taken meanwhile is replaced by ``free()``), on any
    error it is removed, and so are the parent folders it had to create (a full disk, a refused write: one line,
    nothing left behind)."""

    def __init__(self, final: str | Path, option: str, free: Any = None) -> None:
        self.final, self.option, self.free = Path(final), option, free
        self.stage: Path | None = None
        self.made: list[Path] = []

    def __enter__(self) -> Path:
        parent = self.final.parent if str(self.final.parent) else Path(".")
        missing = []
        q = parent
        while not safe_exists(q) and q.parent != q:
            missing.append(q)
            q = q.parent
        try:
            for d in reversed(missing):
                d.mkdir()
                self.made.append(d)
            self.stage = Path(tempfile.mkdtemp(prefix=f".{self.final.name[:100]}.", suffix=PARTIAL, dir=parent))
        except OSError as exc:
            self._clean()
            raise QPlanError(f"{self.option} {self.final}: cannot create the folder ({exc.strerror or exc})") from exc
        return self.stage

    def _clean(self) -> None:
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
        for d in reversed(self.made):
            try:
                d.rmdir()
            except OSError:
                break

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if kind is None:
            try:
                if self.free is not None and os.path.lexists(self.final):
                    self.final = Path(self.free())
                publish_folder(self.stage, self.final)
                return False
            except (OSError, QPlanError) as err:
                exc = err
        self._clean()
        if isinstance(exc, OSError):
            raise QPlanError(f"{self.option} {self.final}: cannot write it ({exc.strerror or exc}); nothing was left "
                             "behind") from exc
        if kind is None:
            raise exc  # publishing's own QPlanError
        return False  # the body's error goes on as it was


def refuse_partial(folder: str | Path) -> None:
    """A run folder whose name ends in ``PARTIAL`` is still training or could not be completed: not read."""
    if Path(folder).resolve().name.endswith(PARTIAL):
        raise QPlanError(f"{folder} is a run still training, or one whose folder could not be completed "
                         f"(its name ends in {PARTIAL})")
