"""Models named by their Hugging Face Hub id: ``ORG/NAME[@REVISION]``.

Only ``config.json`` is ever fetched (never weights), through ``huggingface_hub``'s own client, so
its conventions hold: ``HF_HOME`` / ``HF_HUB_CACHE`` (where the file is cached), ``HF_HUB_OFFLINE=1``
(answer from the cache, no network), ``HF_TOKEN`` (gated and private repos) and ``HF_ENDPOINT``
(a mirror). The spec built from the config (the inventory read on the meta device: torch and
transformers) is cached in qplan's cache directory, keyed by repo, resolved commit and transformers
version, so a second call reads one small file and imports no torch.

Resolution order: an id without ``@REVISION`` that a bundled spec records as its ``hub_id`` is that
bundled spec (offline, no download); else the Hub (or the Hugging Face cache when offline).
A pinned 40-hex commit, or ``HF_HUB_OFFLINE=1``, is answered from qplan's cache without importing
``huggingface_hub`` at all when the spec is already there. Online, the commit a branch or tag points
at is checked with the Hub (one ``HEAD`` request, like ``from_pretrained``) unless qplan checked it in
the last ``$QPLAN_HUB_CHECK_SECONDS`` (default 600; 0 always checks): within that interval a repeat
call reuses the commit it resolved, so it needs no network and takes as long as a bundled model.
"""

from __future__ import annotations

import json
import os
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError
from qplan.planner.files import atomic_write, read_limited
from qplan.planner.model.spec import ModelSpec
from qplan.planner.validate import check_config, loads

#: ``ORG/NAME`` or ``ORG/NAME@REVISION`` (huggingface_hub's repo-id rules: letters, digits, ``-_.``)
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})"
                    r"(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9._/-]{0,199}))?")
COMMIT = re.compile(r"[0-9a-f]{40}")
#: config.json larger than this is not a config (a mirror serving the wrong file)
MAX_CONFIG_BYTES = 4 << 20
#: seconds a branch/tag's resolved commit is reused before the Hub is asked again
DEFAULT_CHECK_SECONDS = 600
#: seconds one Hub request may take ($QPLAN_HUB_TIMEOUT); an unreachable Hub is one try, not five with backoff
DEFAULT_HUB_TIMEOUT = 10.0


def _env_seconds(name: str, default: float) -> tuple[float, str]:
    """``$name`` as seconds (``default`` when unset or blank) and its raw text; not a number: one line."""
    raw = os.environ.get(name, "").strip()
    try:
        return (float(raw) if raw else default), raw
    except ValueError:
        raise QPlanError(f"{name} must be a number of seconds, got {raw[:40]!r}") from None


def _hub_timeout() -> float:
    value, raw = _env_seconds("QPLAN_HUB_TIMEOUT", DEFAULT_HUB_TIMEOUT)
    if not (0 < value <= 600):
        raise QPlanError(f"QPLAN_HUB_TIMEOUT must be > 0 and at most 600 seconds, got {raw[:40]!r}")
    return value


def parse_hub_id(model: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``model`` reads as a Hub id, else None."""
    m = HUB_ID.fullmatch(model.strip()) if isinstance(model, str) else None
    if not m or ".." in m.group("repo") or m.group("repo").endswith((".git", ".")):
        return None
    return m.group("repo"), m.group("rev")


def qplan_cache_dir() -> Path:
    """$QPLAN_CACHE_DIR, else $XDG_CACHE_HOME/qplan, else ~/.cache/qplan."""
    env = os.environ.get("QPLAN_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qplan"




def _transformers_version() -> str | None:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def spec_cache_path(repo: str, commit: str, transformers_version: str) -> Path:
    return qplan_cache_dir() / "hub" / repo.replace("/", "--") / commit / f"transformers-{transformers_version}.json"


def _cached_commit(repo: str, revision: str) -> str | None:
    """The commit a revision resolves to in the Hugging Face cache (``refs/<revision>``), without
    importing huggingface_hub: ``$HF_HUB_CACHE`` or ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``."""
    if COMMIT.fullmatch(revision):
        return revision
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        cache = str(Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub")
    ref = Path(cache) / f"models--{repo.replace('/', '--')}" / "refs" / revision
    try:
        sha = read_limited(ref, "Hub cache ref", 4096).decode("utf-8").strip()
    except (OSError, ValueError, QPlanError):
        return None
    return sha if COMMIT.fullmatch(sha) else None


def _check_seconds() -> float:
    v, _ = _env_seconds("QPLAN_HUB_CHECK_SECONDS", DEFAULT_CHECK_SECONDS)
    return v if v >= 0 else 0.0


def _resolved_path(repo: str, revision: str) -> Path:
    return qplan_cache_dir() / "hub" / repo.replace("/", "--") / "resolved" / f"{revision.replace('/', '--')}.json"


def _recently_resolved(repo: str, revision: str) -> str | None:
    """The commit qplan resolved ``revision`` to less than ``QPLAN_HUB_CHECK_SECONDS`` ago, if any."""
    try:
        d = json.loads(read_limited(_resolved_path(repo, revision), "resolved revision", 4096).decode("utf-8"))
        commit, at = str(d["commit"]), float(d["checked_at"])
    except (OSError, ValueError, KeyError, TypeError, QPlanError):
        return None
    fresh = 0 <= time.time() - at < _check_seconds()
    return commit if fresh and COMMIT.fullmatch(commit) else None


def _remember_resolution(repo: str, revision: str, commit: str) -> None:
    if not COMMIT.fullmatch(commit):
        return
    p = _resolved_path(repo, revision)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, json.dumps({"commit": commit, "checked_at": time.time()}) + "\n")
    except OSError:
        pass


def _read_cached_spec(repo: str, commit: str | None) -> ModelSpec | None:
    tv = _transformers_version()
    if commit is None or tv is None:
        return None
    p = spec_cache_path(repo, commit, tv)
    try:
        data = loads(read_limited(p, "cached spec").decode("utf-8"), f"cached spec {p}")
    except (OSError, ValueError, QPlanError):
        return None  # missing or damaged: rebuilt below
    try:
        return ModelSpec.from_json(data, f"cached spec {p}")
    except QPlanError:
        return None


def fetch_config(repo: str, revision: str | None) -> tuple[dict[str, Any], str]:
    """``(config, commit)``: ``config.json`` of ``repo`` at ``revision`` through huggingface_hub."""
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise QPlanError(f"{repo} is a Hub id: reading it needs huggingface_hub: pip install 'qplan[hub]'") from exc
    rev = revision or "main"
    where = f"{repo}@{rev}" if revision else repo
    timeout = _hub_timeout()
    # one try first: huggingface_hub retries a refused or timed-out request five times with backoff (23 s and a
    # dozen lines); when the Hub cannot be reached at all, answer from the cache, or one line, at once
    reachable, commit_now = (True, None) if _offline() else _probe(repo, revision, timeout)
    try:
        cached = _in_hf_cache(repo, commit_now) if commit_now else None
        path = cached or hf_hub_download(repo, "config.json", revision=revision, etag_timeout=timeout,
                                         local_files_only=not reachable)
    except hf_errors.GatedRepoError as exc:
        raise QPlanError(f"Hub repo {repo} is gated: accept its terms on the Hub and set HF_TOKEN "
                         "(or run `hf auth login`)") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise QPlanError(f"no Hub repo {repo} (or it is private: set HF_TOKEN); check the id") from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise QPlanError(f"Hub repo {repo} has no revision {rev!r}") from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        how = "HF_HUB_OFFLINE=1 is set" if _offline() else f"the Hub could not be reached (one try, {timeout:g} s)"
        raise QPlanError(f"{where}: config.json is not in the Hugging Face cache and {how}; "
                         "run once with network access (or unset HF_HUB_OFFLINE)") from exc
    except hf_errors.EntryNotFoundError as exc:
        raise QPlanError(f"Hub repo {where} has no config.json: not a transformers model repo?") from exc
    except hf_errors.HfHubHTTPError as exc:
        code = getattr(getattr(exc, "response", None), "status_code", None)
        raise QPlanError(f"Hub request for {where} failed (HTTP {code or '?'}): "
                         f"{str(exc).splitlines()[0][:200]}") from exc
    except (OSError, ValueError) as exc:
        why = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise QPlanError(f"Hub request for {where} failed: {why}") from exc
    p = Path(path)
    commit = p.parent.name if COMMIT.fullmatch(p.parent.name) else (revision or "unknown")
    try:
        text = read_limited(p, f"config.json of {where}", MAX_CONFIG_BYTES).decode("utf-8")
    except ValueError as exc:
        raise QPlanError(f"config.json of {where} cannot be read as UTF-8 text: {type(exc).__name__}") from exc
    data = loads(text, f"config.json of {where}")
    if not isinstance(data, dict):
        raise QPlanError(f"config.json of {where} must hold a JSON object")
    return check_config(data, f"config.json of {where}"), commit


def _probe(repo: str, revision: str | None, timeout: float) -> tuple[bool, str | None]:
    """One ``HEAD`` request for ``config.json``, no retries: ``(reachable, the commit it points at)``. Not reachable
    when refused, timed out or unroutable; an HTTP answer, even an error, is reachable (the download that follows
    reports it in its own words)."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, "config.json", revision=revision), timeout=timeout)
    except hf_errors.HfHubHTTPError:
        return True, None
    except Exception:  # noqa: BLE001 - the client's network errors (httpx's, OSError, timeouts): not reachable
        return False, None
    commit = getattr(meta, "commit_hash", None)
    return True, commit if isinstance(commit, str) and COMMIT.fullmatch(commit) else None


def _in_hf_cache(repo: str, commit: str) -> str | None:
    """The Hugging Face cache's ``config.json`` of ``repo`` at ``commit``, if it holds it (no request)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json", revision=commit)
    return found if isinstance(found, str) else None


def _needs_remote_code(config: dict[str, Any]) -> bool:
    """A config whose model_type this transformers does not know and which ships its own code."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # pragma: no cover - checked before
        return False
    return config.get("model_type") not in CONFIG_MAPPING_NAMES




def cached_spec(repo: str, revision: str | None) -> ModelSpec | None:
    """The cached spec of ``repo`` at ``revision`` without fetching (a commit, or offline: the cache
    alone; a branch: only when resolved within ``QPLAN_HUB_CHECK_SECONDS``), else None."""
    rev = revision or "main"
    if COMMIT.fullmatch(rev) or _offline():
        return _read_cached_spec(repo, _cached_commit(repo, rev))
    return _read_cached_spec(repo, _recently_resolved(repo, rev))


def fetch_and_remember(repo: str, revision: str | None) -> tuple[dict[str, Any], str, ModelSpec | None]:
    """``fetch_config``, the branch's resolution remembered, and the spec already cached for that commit."""
    config, commit = fetch_config(repo, revision)
    _remember_resolution(repo, revision or "main", commit)
    return config, commit, _read_cached_spec(repo, commit)


def spec_buildable(repo: str, config: dict[str, Any]) -> str:
    """The transformers version that builds ``config``'s spec, or a one-line error: no transformers, or a
    ``model_type`` it does not know (code shipped in a repo, trust_remote_code, is never executed)."""
    tv = _transformers_version()
    if tv is None:
        raise QPlanError(f"building the spec of {repo} (its modules, read on the meta device) needs transformers "
                         "and torch: pip install 'qplan[train]'")
    if _needs_remote_code(config):
        # plans, traces and runs rebuild the model from its config by model_type: code shipped in a repo
        # (trust_remote_code) is never executed
        raise QPlanError(f"{repo} has model_type {config.get('model_type')!r}, which transformers {tv} does not know"
                         + (" (the repo ships its own code, trust_remote_code, which qplan never runs)"
                            if "auto_map" in config else "") + ": upgrade transformers if a newer one supports it")
    return tv


def store_spec(repo: str, commit: str, transformers_version: str, spec: ModelSpec) -> None:
    """Cache ``spec`` (an unwritable cache costs speed, not correctness)."""
    path = spec_cache_path(repo, commit, transformers_version)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(spec.to_json(), indent=2, ensure_ascii=False) + "\n")
    except OSError:
        pass
