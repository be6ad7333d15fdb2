"""Shared test helpers: config fixtures, specs built from them, real models built from configs."""

from __future__ import annotations

import json
import logging
import os
from functools import cache
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# --data's token-count cache: one fresh folder per test session, never the user's ~/.cache
os.environ["QPLAN_DATA_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="qplan-data-cache-")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

FIXTURES = Path(__file__).parent / "fixtures" / "configs"
TINY_FAMILIES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def tiny_config(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@cache
def _tiny_spec_json(name: str) -> str:
    from qplan.planner.model.catalog import make_spec

    return json.dumps(make_spec(tiny_config(name), name, {"fixture": name}).to_json())


def tiny_spec(name: str):
    """A spec built from a fixture config through the real inventory path (cached, fresh copy)."""
    from qplan.planner.model.spec import ModelSpec

    return ModelSpec.from_json(json.loads(_tiny_spec_json(name)))


def hf_config(config: dict):
    """The transformers config of a config dict: qplan's one mapping (``qplan.hf``)."""
    from qplan.hf import hf_config as build

    return build(config)


def meta_model(config: dict):
    from qplan.hf import model_from_config

    return model_from_config(config, device="meta")


@pytest.fixture(scope="session")
def saved_tiny_models(tmp_path_factory):
    """Tiny random-init models saved in bf16, keyed by family (built on first use)."""
    import torch

    from qplan.hf import model_from_config

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            torch.manual_seed(0)
            m = model_from_config(tiny_config(name), dtype="bfloat16", device="cpu")
            d = root / name
            m.save_pretrained(d)
            cache[name] = d
        return cache[name]

    return get


def unsloth_missing() -> str | None:
    """Why the Unsloth venv (``QPLAN_UNSLOTH_PYTHON``) cannot run here, or None: the reason Unsloth's
    tests skip with."""
    from qplan.backends import registry

    info = registry.backend_info("unsloth")
    missing = registry._missing(info.requires, info.python)
    if missing:
        return (f"Unsloth is not importable by {info.python} (missing {', '.join(missing)}): set "
                f"QPLAN_UNSLOTH_PYTHON to the python of a venv with qplan[unsloth]")
    return None
