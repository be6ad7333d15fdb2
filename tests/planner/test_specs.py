"""Bundled specs are data derived from transformers; they must not drift from what it builds."""

from __future__ import annotations

import json

import pytest

from qplan.planner.model.catalog import bundled_model_names, load_spec
from qplan.planner.model.inventory import build_inventory
from qplan.planner.model.spec import inventory_json


@pytest.mark.parametrize("name", bundled_model_names())
def test_bundled_inventory_is_what_transformers_builds_today(name):
    spec = load_spec(name)
    fresh = build_inventory(spec.config)
    stored = inventory_json(spec.inventory)
    fresh.pop("generated_by")
    stored.pop("generated_by")
    assert json.loads(json.dumps(fresh)) == stored, (
        f"{name}: regenerate with `qplan spec add --force --output-dir model_specs` and review the diff"
    )


@pytest.mark.parametrize("name", bundled_model_names())
def test_spec_records_its_source(name):
    spec = load_spec(name)
    assert spec.name == name
    assert spec.source.get("hub_id"), "every bundled spec names the Hub repo its config came from"
