"""The step-time defaults against PEFT's published MetaMathQA runs on an L40S (issue 31).

The oracle is the published measurement (``tests/fixtures/peft_metamathqa/results.json``, copied unchanged from
huggingface/peft): tokens/s over 250-step windows of real runs. The shipped constants must be the least-squares fit of
``bench/time_fit.py`` (rounded), each run must be predicted from a fit on the others, and the shipped defaults must
hold PEFT's LoRA r32 q,v run within 30% and predict DoRA 8-30% slower, as issue 31 asks. No torch: plans only.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tf():
    spec = importlib.util.spec_from_file_location("time_fit", ROOT / "bench" / "time_fit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.rows()
    return mod, rows, mod.fit(rows)


def test_shipped_defaults_are_the_fit(tf):
    from qplan.planner.compute.timing import DEFAULT_EFFICIENCY, SECONDS_PER_LAUNCH

    _, rows, fit = tf
    assert len(rows) == 6  # every run qplan can plan: five LoRA/DoRA, one full fine-tuning
    assert DEFAULT_EFFICIENCY == round(fit["efficiency"], 2)
    assert SECONDS_PER_LAUNCH == pytest.approx(round(fit["seconds_per_launch"] * 1e6) * 1e-6)


def test_each_run_is_predicted_from_the_others(tf):
    _, _, fit = tf
    assert fit["leave_one_out_median_abs_error"] <= 0.20
    assert fit["leave_one_out_worst_abs_error"] <= 0.10


def test_peft_lora_run_and_dora_with_the_shipped_defaults(tf):
    _, rows, _ = tf
    by = {r["run"]: r for r in rows}
    lora, dora = by["lora--llama-3.2-3B-rank32"], by["lora--llama-3.2-3B-rank32-dora"]
    assert lora["measured_tokens_per_second"] == pytest.approx(7174.29, abs=0.01)  # the figure
    predicted_tps = lora["tokens_per_step"] / lora["plan_step_seconds"]
    assert abs(predicted_tps / 7174.29 - 1) <= 0.30
    assert 0.08 <= dora["plan_step_seconds"] / lora["plan_step_seconds"] - 1 <= 0.30
    # the pure 16-bit setting is timed: bf16 base matmuls, the fp32 adapters' at the fp32 rate
    for r in rows:
        assert r["plan_step_seconds"] > r["ideal_step_seconds"] > 0


def test_the_committed_report_is_current(tf):
    mod, rows, fit = tf
    committed = json.loads((ROOT / "reports" / "time" / "fit.json").read_text(encoding="utf-8"))
    assert committed["padded_tokens"] == mod.PADDED
    assert committed["fit"]["efficiency"] == pytest.approx(fit["efficiency"], rel=1e-9)
    assert committed["fit"]["seconds_per_launch"] == pytest.approx(fit["seconds_per_launch"], rel=1e-9)
    assert [r["plan_step_seconds"] for r in committed["runs"]] == pytest.approx([r["plan_step_seconds"] for r in rows])


def test_measured_windows_are_the_published_ones(tf):
    _, rows, _ = tf
    ev = json.loads((ROOT / "tests" / "fixtures" / "peft_metamathqa" / "results.json").read_text(encoding="utf-8"))
    for r in rows:
        mt = ev["runs"][r["run"]]["measured_time"]
        assert len(mt["tokens / sec"]) == 20
        assert r["measured_tokens_per_second"] == pytest.approx(statistics.fmean(mt["tokens / sec"]))
