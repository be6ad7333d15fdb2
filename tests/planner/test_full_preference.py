"""Full fine-tuning with TRL's fused LM head, and DPO/KTO without PEFT: the trained head's gradient, and the reference
model TRL loads a second time.

TRL 1.16's ``DPOTrainer``/``KTOTrainer`` given a model without PEFT load the policy's checkpoint again as the reference
(``create_model_from_path``, same dtype), prepared by accelerate for evaluation: a second copy of the weights for the
whole run, whose forward runs under autocast with its parameters left requiring grad (so autocast caches its weights'
casts). TRL's fused head trains the head's weight through its own chunks: an fp32 ``grad_weight`` of ``[V, h]`` through
the head's backward, cast to the weight's dtype at its return.

The oracles: the meta-device trace of each trainer's own ``_compute_loss`` with the reference built as TRL builds it
(``observe.trace.run.reference_model``), whose weights the tracker counts as weights; and (tests/backends/
test_preference_run.py) real CPU runs of ``DPOTrainer`` on a full model, whose first loss is ``ln 2`` only if the
reference is the same checkpoint."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

from qplan.observe.trace import trace_plan
from qplan.planner.api import plan_dict
from qplan.planner.errors import QPlanError
from qplan.planner.plan import build_plan, plan_inputs


def _unpadded(**kw):
    """The plan with unpadded rows, as the trace runs them (a padded pair's 4-D mask is ``planner.memory.masks``')."""
    inp, warnings = plan_inputs(**{"model": "smollm2-135m", "seq_len": 256, "gpu": "a100-80gb", "full": True, **kw})
    inp = dataclasses.replace(inp, training=dataclasses.replace(inp.training, padded=False))
    return build_plan(inp, warnings).to_dict()


@pytest.mark.parametrize("kw", [
    dict(objective="dpo", batch_size=2),  # checkpointing: the optimizer step is the peak
    dict(objective="dpo", batch_size=2, grad_ckpt=False),  # the head's backward, with its fp32 weight gradient
    dict(objective="dpo", batch_size=2, quant="fp32", grad_ckpt=False),  # the reference's cached casts
    dict(objective="kto", batch_size=2, grad_ckpt=False),
    dict(loss="trl", batch_size=4, grad_ckpt=False),  # SFTTrainer's fused head on a trained head
    dict(loss="trl", batch_size=4, quant="fp32", grad_ckpt=False),
], ids=["dpo-bf16", "dpo-bf16-no-ckpt", "dpo-fp32-no-ckpt", "kto-bf16-no-ckpt", "sft-trl-bf16", "sft-trl-fp32"])
def test_a_full_fine_tuning_plan_with_trl_s_head_is_its_traced_step(kw):
    plan = _unpadded(**kw)
    traced = trace_plan(plan, steps=2)
    mem, ph = plan["prediction"]["memory"], plan["prediction"]["memory_detail"]["phases"]
    assert abs(mem["tensor_peak"] - traced["tensor_peak"]) <= 0.0005 * traced["tensor_peak"], (mem, traced)
    forward = max(ph["forward"], ph.get("reference", 0))  # the policy's forward moment, then the reference's
    assert abs(forward - traced["phase_peaks"]["forward"]) <= 0.001 * traced["phase_peaks"]["forward"], (ph, traced)
    # the tracker counts the reference's parameters as weights: two copies of the policy's
    assert traced["breakdown_at_peak"]["weights"] == mem["weights"]
    assert traced["breakdown_at_peak"]["logits"] == 0


@pytest.mark.parametrize(("kw", "needle"), [
    (dict(objective="dpo", gpus=2), "--full over several GPUs is not planned yet"),
    (dict(objective="kto", gpus=2, strategy="fsdp"), "--full over several GPUs is not planned yet"),
    (dict(objective="grpo"), "--full is not planned yet"),
    (dict(objective="dpo", quant="nf4"), "cannot be trained"),
    (dict(loss="trl", gpus=2, strategy="fsdp"), "--full --loss trl over several GPUs is not planned yet"),
])
def test_what_full_preference_training_is_not_planned_with_is_one_line(kw, needle):
    with pytest.raises(QPlanError) as exc:
        plan_dict(model="llama-3.2-1b", full=True, **kw)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
