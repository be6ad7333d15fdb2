"""Model specs (data files in model_specs/) and the GPU catalog (model_specs/gpus/).

A spec is JSON: the Hugging Face config, where it came from, and the module inventory that
`planner.model.inventory` read off the model built on the meta device. Loading a bundled spec reads one
small file and imports nothing heavy.
"""

from __future__ import annotations

import difflib
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError
from qplan.planner.files import NAMES_ONLY as _NAMES_ONLY
from qplan.planner.files import names_only as names_only  # re-exported: serve and the API import it here
from qplan.planner.files import safe_exists
from qplan.planner.model.spec import SPEC_SCHEMA_VERSION, Gpu, ModelSpec
from qplan.planner.validate import check_config, read_json


def _data_dir():
    return resources.files("qplan.model_specs")


def bundled_spec_dir():
    """The folder of the bundled specs (inside the installed package)."""
    return _data_dir()


def user_spec_dir() -> Path:
    """Where `qplan spec add` writes specs: $QPLAN_SPEC_DIR, else ~/.config/qplan/model_specs."""
    env = os.environ.get("QPLAN_SPEC_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "qplan" / "model_specs"


def bundled_model_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".json")
        for p in _data_dir().iterdir()
        if p.name.endswith(".json")
    )


def user_model_names() -> list[str]:
    d = user_spec_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.json"))


def model_names() -> list[str]:
    return sorted(set(bundled_model_names()) | set(user_model_names()))


def spec_origin(name: str) -> str:
    """``bundled``, ``user``, or ``user, shadows bundled`` (a user spec of a bundled name, made
    with ``qplan spec add --force``)."""
    user = name in user_model_names()
    bundled = name in bundled_model_names()
    return "user, shadows bundled" if user and bundled else ("user" if user else "bundled")


SPEC_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


def check_spec_name(name: str) -> str:
    """A spec name is a file name in the spec folder: letters, digits, ``._-``, at most 100."""
    import re

    if not isinstance(name, str) or not re.fullmatch(SPEC_NAME, name):
        shown = repr(name) if len(str(name)) <= 40 else repr(str(name)[:37] + "...")
        raise QPlanError(f"invalid spec name {shown}: use --name with letters, digits, '.', '_' or '-' "
                         "(at most 100 characters, not starting with '.')")
    return name


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), choices, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return "known: " + ", ".join(choices)


def _read_json(path, what: str) -> dict[str, Any]:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise QPlanError(f"{what} {path} must hold a JSON object")
    return data


@lru_cache(maxsize=64)
def _load_named_spec(name: str) -> ModelSpec:
    user = user_spec_dir() / f"{name}.json"
    if user.is_file():
        return ModelSpec.from_json(_read_json(user, "model spec"), f"model spec {user}")
    res = _data_dir() / f"{name}.json"
    if res.is_file():
        return ModelSpec.from_json(_read_json(res, "model spec"), f"model spec {name}")
    raise QPlanError(f"unknown model {name!r}: {_suggest(name, model_names())} (see `qplan models`)")


def read_config(path: str | Path) -> dict[str, Any]:
    """Read a Hugging Face config.json, or the config.json inside a model directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise QPlanError(f"{path} is a directory without a config.json")
    return check_config(_read_json(p, "config"), f"config {p}")


def make_spec(config: dict[str, Any], name: str, source: dict[str, Any]) -> ModelSpec:
    """Build a spec from a config (imports torch + transformers: the inventory is read on meta)."""
    from qplan.planner.model.inventory import build_inventory

    return ModelSpec.from_json({
        "schema_version": SPEC_SCHEMA_VERSION,
        "name": name,
        "source": source,
        "config": config,
        "inventory": build_inventory(config),
    }, f"model spec {name}")


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 60 else repr(value[:57] + "...")


def _named_spec_only(model: str) -> ModelSpec:
    from qplan.planner.model.hub import parse_hub_id

    if model in model_names():
        return _load_named_spec(model)
    if parse_hub_id(model):
        return hub_spec(model)
    if not _path_syntax(model):  # a plain name that is no spec: the CLI's "unknown model" line, no file looked up
        raise QPlanError(f"unknown model {model!r}: {_suggest(model, model_names())} (see `qplan models`)")
    raise QPlanError(f"model {_shown(model)} is not a bundled model, one of your specs or a Hub id (ORG/NAME): "
                     "qplan serve plans names, never a local path (use `qplan estimate --model PATH` for a local config)")


def _path_syntax(name: str) -> bool:
    """Reads as a path by its spelling alone (nothing on disk is looked at)."""
    return name.endswith(".json") or os.sep in name or name.startswith(".") or "\0" in name


def _looks_like_path(model: str) -> bool:
    return _path_syntax(model) or (safe_exists(model) and Path(model).is_dir())


def load_spec(model: str) -> ModelSpec:
    """A bundled/user spec by name, a Hub id (``ORG/NAME[@REVISION]``, ``planner.model.hub``), or a spec
    built on the fly from a config path or model dir (a path that exists wins over a Hub id)."""
    from qplan.planner.model.hub import parse_hub_id

    if _NAMES_ONLY.get():
        return _named_spec_only(model)
    if not safe_exists(model) and not model.endswith(".json") and parse_hub_id(model):
        return hub_spec(model)
    if _looks_like_path(model):
        p = Path(model)
        if not safe_exists(p):
            raise QPlanError(f"no such file or directory: {model}")
        if p.is_file() and p.suffix == ".json":
            data = _read_json(p, "file")
            if data.get("schema_version") == SPEC_SCHEMA_VERSION and "inventory" in data:
                return ModelSpec.from_json(data, f"model spec {p}")
        cfg = read_config(p)
        name = p.name if p.is_dir() else (p.parent.name if p.name == "config.json" else p.stem)
        return make_spec(cfg, name, {"path": str(p.resolve())})
    return _load_named_spec(model)


@lru_cache(maxsize=1)
def bundled_hub_ids() -> dict[str, str]:
    """Lower-cased Hub id -> bundled spec name (each bundled spec records the repo it came from)."""
    out: dict[str, str] = {}
    for name in bundled_model_names():
        src = json.loads((bundled_spec_dir() / f"{name}.json").read_text(encoding="utf-8")).get("source") or {}
        if src.get("hub_id"):
            out[str(src["hub_id"]).lower()] = name
    return out


def hub_spec(model: str) -> ModelSpec:
    """The spec of a Hub id (``planner.model.hub``'s docstring gives the resolution order and the caches):
    a bundled spec of that repo, a cached spec, else the fetched config built on the meta device."""
    from qplan.planner.model import hub

    parsed = hub.parse_hub_id(model)
    if parsed is None:
        raise QPlanError(f"{model!r} is not a Hub id (ORG/NAME or ORG/NAME@REVISION)")
    repo, revision = parsed
    bundled = bundled_hub_ids().get(repo.lower())
    if bundled and revision is None:
        return _load_named_spec(bundled)
    hit = hub.cached_spec(repo, revision)
    if hit is not None:
        return hit
    config, commit, hit = hub.fetch_and_remember(repo, revision)
    if hit is not None:
        return hit
    tv = hub.spec_buildable(repo, config)
    spec = make_spec(config, repo.split("/", 1)[1], {"hub_id": repo, "revision": commit, "config_file": "config.json"})
    hub.store_spec(repo, commit, tv, spec)
    return spec


# ---------------------------------------------------------------------------------------- GPUs


@lru_cache(maxsize=1)
def gpu_catalog() -> dict[str, Gpu]:
    out = {}
    for p in (_data_dir() / "gpus").iterdir():
        if p.name.endswith(".json"):
            g = Gpu.from_json(json.loads(p.read_text(encoding="utf-8")), p.name)
            out[g.name] = g
    return dict(sorted(out.items()))


def load_gpu(name: str) -> Gpu:
    """A catalog GPU by name or alias, or a device file (``*.json``: the catalog's fields, e.g. a
    CPU's measured throughput from ``bench/cpu_device.py``); inside ``names_only()`` a catalog GPU only."""
    if _NAMES_ONLY.get():
        return _catalog_gpu(name)
    if name.endswith(".json"):
        if not safe_exists(name):
            raise QPlanError(f"no such device file: {name}")
        data = _read_json(Path(name), "device file")
        return Gpu.from_json(data, name)
    return _catalog_gpu(name)


def _catalog_gpu(name: str) -> Gpu:
    cat = gpu_catalog()
    key = name.lower()
    if key in cat:
        return cat[key]
    for g in cat.values():
        if key in [a.lower() for a in g.aliases]:
            return g
    if _NAMES_ONLY.get() and _path_syntax(name):
        raise QPlanError(f"GPU {_shown(name)} is not a catalog GPU ({_suggest(key[:100], list(cat))}): qplan serve plans "
                         "catalog GPUs only, never a device file (use `qplan estimate --gpu FILE.json` for one)")
    raise QPlanError(f"unknown GPU {name!r}: {_suggest(key, list(cat))} (see `qplan gpus`)")
