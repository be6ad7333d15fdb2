"""Shared test helpers: config fixtures, specs built from them, real models built from configs."""

from __future__ import annotations

import json
import logging
import os
import warnings
from functools import lru_cache
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

FIXTURES = Path(__file__).parent / "fixtures" / "configs"
TINY_FAMILIES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def tiny_config(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@lru_cache(maxsize=None)
def _tiny_spec_json(name: str) -> str:
    from qplan.planner.specs import make_spec

    return json.dumps(make_spec(tiny_config(name), name, {"fixture": name}))


def tiny_spec(name: str) -> dict:
    """A spec built from a fixture config through the real inventory path (cached, fresh copy)."""
    return json.loads(_tiny_spec_json(name))


def hf_config(config: dict):
    from transformers import AutoConfig

    cfg = dict(config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def meta_model(config: dict):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config(config))


@pytest.fixture(scope="session")
def saved_tiny_models(tmp_path_factory):
    """Tiny random-init models saved in bf16, keyed by family (built on first use)."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            torch.manual_seed(0)
            m = AutoModelForCausalLM.from_config(hf_config(tiny_config(name)), dtype=torch.bfloat16)
            d = root / name
            m.save_pretrained(d)
            cache[name] = d
        return cache[name]

    return get
