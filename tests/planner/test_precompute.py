"""``--precompute-ref-log-probs`` (TRL's ``precompute_ref_log_probs``, DPO and KTO): the reference's log-probabilities
computed in a pass before training, so the step runs no reference forward and, without PEFT, loads no reference model.

The pass is a moment of its own (``phases.precompute``): weights and adapters (no optimizer state yet), the batch of
``precompute_ref_batch_size`` pairs and a forward without grad (``planner.memory.precompute``). The oracles: TRL's own
``compute_ref_log_probs`` traced on meta (``observe.trace.precompute``), and the step traced through each trainer's
``_compute_loss`` reading the precomputed columns (tests/backends/test_preference_run.py runs it for real)."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

from test_trainer_configs import one_line, qplan

from qplan.observe.trace import trace_plan
from qplan.planner.api import plan_dict
from qplan.planner.errors import QPlanError
from qplan.planner.plan import build_plan, plan_inputs

BASE = {"model": "smollm2-135m", "seq_len": 256, "gpu": "a100-80gb", "objective": "dpo", "batch_size": 2,
        "precompute_ref_log_probs": True}


def _plan(padded=True, **kw):
    inp, warnings = plan_inputs(**{**BASE, **kw})
    if not padded:  # as the step's trace runs it (no attention mask)
        inp = dataclasses.replace(inp, training=dataclasses.replace(inp.training, padded=False))
    return build_plan(inp, warnings).to_dict()


@pytest.mark.parametrize("kw", [
    dict(),  # QLoRA: the head's moment (fp32 head tiles cast to bf16)
    dict(objective="kto", batch_size=4),  # the batch's rows, then the KL rows
    dict(full=True),  # the policy itself, no reference model
    dict(full=True, quant="fp32"),  # and autocast's cached casts of its trained weights
    dict(quant="bf16", model="qwen3-0.6b", seq_len=1024),  # padded
    dict(model="llama-3.2-1b", seq_len=2048, precompute_ref_batch_size=1),  # an MLP's moment: bitsandbytes' fp32 outputs
    dict(precompute_ref_batch_size=8),  # larger batches than training's: the pass is the peak
], ids=["qlora", "kto", "full-bf16", "full-fp32", "bf16-padded", "qlora-layer", "pass-batch-8"])
def test_the_pass_is_trl_s_compute_ref_log_probs_traced(kw):
    plan = _plan(**kw)
    analytic = plan["prediction"]["memory_detail"]["phases"]["precompute"]
    traced = trace_plan(plan, steps=1, precompute_pass=True)
    assert abs(analytic - traced["tensor_peak"]) <= 0.003 * traced["tensor_peak"], (analytic, traced)
    assert traced["breakdown_at_peak"]["optimizer"] == 0 and traced["breakdown_at_peak"]["gradients"] == 0
    if kw.get("precompute_ref_batch_size") == 8:
        assert plan["prediction"]["memory_detail"]["peak_phase"] == "precompute"


@pytest.mark.parametrize("kw", [dict(), dict(quant="bf16", grad_ckpt=False), dict(full=True),
                                dict(objective="kto", batch_size=4)], ids=["qlora", "bf16", "full", "kto"])
def test_the_step_reads_the_precomputed_log_probs(kw):
    """No reference moment, no reference weights: the step traced through ``_compute_loss`` with the collator's
    precomputed columns, against the plan (every moment but the pass)."""
    plan = _plan(padded=False, **kw)
    phases = plan["prediction"]["memory_detail"]["phases"]
    assert "reference" not in phases
    assert "reference" not in plan["prediction"]["memory_detail"]["weights"]
    traced = trace_plan(plan, steps=2)
    step = max(v for k, v in phases.items() if k != "precompute")
    assert abs(step - traced["tensor_peak"]) <= 0.001 * traced["tensor_peak"], (phases, traced)
    assert abs(phases["forward"] - traced["phase_peaks"]["forward"]) <= 0.001 * traced["phase_peaks"]["forward"]
    assert traced["breakdown_at_peak"]["weights"] == plan["prediction"]["memory"]["weights"]


def test_precomputing_drops_the_reference_s_flops_from_the_step():
    """FlopCounterMode over the DPO step that reads precomputed log-probabilities equals it over the SFT step on its
    rows (the same fused head): the plan counts no reference forward."""
    dpo = _plan(padded=False, quant="bf16", grad_ckpt=False)
    sft = dict(dpo, training={**dpo["training"], "objective": "sft", "batch_size": 4})
    sft["training"].pop("precompute_ref_log_probs")
    d = trace_plan(dpo, steps=1, count_flops=True)["flops_per_step"][0]
    s = trace_plan(sft, steps=1, count_flops=True)["flops_per_step"][0]
    assert d == s and dpo["prediction"]["compute"]["flops_per_step"]["reference"] == 0


def test_the_plan_says_it_and_a_trace_takes_the_larger_of_step_and_pass(capsys):
    rc, out, _ = qplan(capsys, "estimate", "--model", "smollm2-135m", "--objective", "dpo", "--precompute-ref-log-probs",
                       "--precompute-ref-batch-size", "8", "--batch-size", "2", "--seq-len", "256", "--gpu",
                       "a100-80gb", "--method", "trace", "--format", "json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["training"]["precompute_ref_log_probs"] is True and doc["training"]["precompute_ref_batch_size"] == 8
    tr = doc["prediction"]["trace"]
    assert any("precompute_ref_log_probs pass" in n for n in tr["notes"])
    pas = doc["prediction"]["memory_detail"]["phases"]["precompute"]
    assert abs(tr["tensor_peak"] - pas) <= 0.003 * pas  # the pass of 8 pairs is larger than the step of 2
    rc, out, _ = qplan(capsys, "estimate", "--model", "smollm2-135m", "--objective", "dpo", "--precompute-ref-log-probs")
    assert rc == 0 and "precompute pass (before training)" in out


@pytest.mark.parametrize(("args", "needle"), [
    (["--objective", "grpo", "--precompute-ref-log-probs"], "an option of --objective dpo or kto"),
    (["--objective", "dpo", "--precompute-ref-batch-size", "4"], "give both"),
    (["--objective", "reward", "--precompute-ref-log-probs"], "not of reward"),
])
def test_what_precomputing_is_not_planned_with_is_one_line(capsys, args, needle):
    rc, out, err = qplan(capsys, "estimate", "--model", "smollm2-135m", *args)
    assert rc == 2 and out == ""
    one_line(err, needle)


def test_precomputing_with_data_is_refused_for_now(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    with pytest.raises(QPlanError, match="with --data is not planned yet"):
        plan_dict(**{**{k: v for k, v in BASE.items() if k != "seq_len"}, "data": str(data)})


def test_a_ddp_rank_s_pass_is_the_one_gpu_pass():
    """The pass runs in the trainer's construction, before DDP wraps the model: no buckets, the same moment."""
    one = plan_dict(**BASE)["prediction"]["memory_detail"]["phases"]
    ddp = plan_dict(**BASE, gpus=2, strategy="ddp")["prediction"]["memory_detail"]["phases"]
    assert ddp["precompute"] == one["precompute"] and ddp["forward"] > one["forward"]


@pytest.mark.parametrize("kw", [dict(), dict(full=True), dict(objective="kto", batch_size=2,
                                                                precompute_ref_batch_size=4)])
def test_an_unsealed_plan_is_re_made_from_its_settings(kw):
    """``qplan run`` re-makes a plan without a seal (the API's) from its settings: the objective and the pass's
    settings are read back, and an edit is caught."""
    from qplan.planner.api import check_consistent

    plan = plan_dict(**{**BASE, **kw})
    check_consistent(plan)
    plan["training"]["batch_size"] += 1
    with pytest.raises(QPlanError, match="edited"):
        check_consistent(plan)
