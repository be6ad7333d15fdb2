"""What the bytes of each predicted moment are (``memory_detail.composition``), against the trace.

The oracle is the committed accuracy matrix (``reports/accuracy/matrix.json``, issue 3): for
each of its 480 cases the live-tensor trace's bytes by category at its measured peak
(``trace_breakdown``), and the phase of that peak.  The plan's composition of the moment in
that phase (``moment_in_phase``) must hold the same bytes per category, and every moment's
parts must add up to the moment's total (what a report draws as the predicted stack).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qplan.planner.api import plan_dict
from qplan.planner.memory.phases import moment_in_phase
from qplan.planner.vocab import CATEGORIES

ROOT = Path(__file__).resolve().parents[2]
MATRIX = json.loads((ROOT / "reports" / "accuracy" / "matrix.json").read_text())
KEYS = ("model", "quant", "b", "s", "ckpt", "r", "targets", "optimizer", "attn")


def _plan(model, quant, b, s, ckpt, r, targets, optimizer, attn, **kw):
    o = dict(model=model, r=r, alpha=None, dropout=0.05, targets=targets, bias="none", dora=False,
             rslora=False, modules_to_save="", quant=quant, double_quant=True, compute_dtype="bf16",
             upcast=True, gpu=None, seq_len=s, batch_size=b, grad_accum=1, grad_ckpt=ckpt,
             optimizer=optimizer, attn_impl=attn, backend="peft")
    o.update(kw)
    return plan_dict(**o)


def _check_adds_up(detail: dict) -> None:
    for kernels in ("", "_cpu"):
        phases, comp = detail["phases" + kernels], detail["composition" + kernels]
        assert set(comp) == set(phases)
        for moment, parts in comp.items():
            assert list(parts) == [c for c in CATEGORIES if c != "optimizer_paged"]
            assert all(isinstance(v, int) and v >= 0 for v in parts.values()), (moment, parts)
            assert sum(parts.values()) == phases[moment], moment
    assert detail["tensor_peak_cpu"] == max(detail["phases_cpu"].values())
    assert detail["phases_cpu"][detail["peak_phase_cpu"]] == detail["tensor_peak_cpu"]


def test_every_accuracy_case_matches_the_trace_by_category():
    worst: dict[str, float] = {}
    for case in MATRIX["cases"]:
        plan = _plan(**{k: case[k] for k in KEYS})
        detail = plan["prediction"]["memory_detail"]
        _check_adds_up(detail)
        peaks = case["trace_phase_peaks"]
        moment = moment_in_phase(detail["phases"], max(peaks, key=peaks.get))
        comp = detail["composition"][moment]
        for cat, v in comp.items():
            rel = abs(v - case["trace_breakdown"].get(cat, 0)) / case["trace_tensor_peak"]
            worst[cat] = max(worst.get(cat, 0.0), rel)
    print("worst |analytic - trace| by category, share of the peak:", {k: f"{v:.4%}" for k, v in worst.items()})
    assert max(worst.values()) < 0.001


@pytest.mark.parametrize("kw", [
    dict(grad_accum=4), dict(optimizer="paged_adamw_8bit"), dict(attn="eager", ckpt=True),
    dict(attn="eager", ckpt=False), dict(dora=True), dict(quant="int8"), dict(backend="unsloth"),
], ids=str)
def test_moments_add_up(kw):
    case = dict(model="llama-3.2-1b", quant="nf4", b=2, s=256, ckpt=True, r=16, targets="all-linear",
                optimizer="adamw_torch", attn="sdpa")
    case.update({k: kw[k] for k in list(kw) if k in case})
    detail = _plan(**case, **{k: v for k, v in kw.items() if k not in case})["prediction"]["memory_detail"]
    _check_adds_up(detail)
    if kw.get("grad_accum"):  # gradients stay alive between micro-batches: in every moment
        assert all(p["gradients"] > 0 for p in detail["composition"].values())
    if case["attn"] == "eager" and case["ckpt"]:
        assert detail["composition"]["attention"]["temporaries"] > 0


def test_moment_in_phase():
    phases = {"forward": 5, "backward": 7, "layers": 9, "optimizer": 3}
    assert moment_in_phase(phases, "backward") == "layers"
    assert moment_in_phase(phases, "forward") == "forward"
    assert moment_in_phase(phases, "optimizer") == "optimizer"
    assert moment_in_phase(phases, "between_steps") is None and moment_in_phase(phases, None) is None
