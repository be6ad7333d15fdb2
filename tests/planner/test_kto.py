"""``--objective kto``: TRL 1.16's KTOTrainer. The oracle is TRL's own ``KTOTrainer._compute_loss`` traced on meta
(``qplan.observe.trace.kto``): the policy on the KL term's mismatched rows without grad, the policy on the batch
through TRL's fused LM head, then the reference (adapters disabled, ``no_grad``) on the KL rows and on the batch, then
the KTO loss. The plan is the SFT step of the fused head on the batch's rows (no top-1 output), plus the collator's
masks, the KL rows and labels, and the reference's moment; its FLOPs add the three forwards without grad (one of them
with the adapters: the policy's KL forward)."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

from test_dpo import assert_reference_step
from test_trainer_configs import one_line, qplan

from qplan.observe.trace import trace_plan
from qplan.planner.api import plan_dict


def _kto(**kw):
    return plan_dict(**{"model": "llama-3.2-1b", "seq_len": 256, "batch_size": 2, "objective": "kto",
                        "gpu": "a100-80gb", **kw})


def test_a_kto_plan_runs_its_rows_through_trl_s_fused_head():
    plan = _kto()
    t = plan["training"]
    assert (t["objective"], t["loss"], t["padded"], t["batch_size"]) == ("kto", "trl", True, 2)
    assert plan["lora"]["dropout"] == 0.0  # KTOConfig.disable_dropout
    assert plan["lora"]["adapter_dtype"] == "bfloat16"  # KTOTrainer casts a quantized model's adapters
    assert plan["prediction"]["time"]["tokens_per_step"] == 2 * 256  # unpaired: one row a completion
    dpo = plan_dict(model="llama-3.2-1b", seq_len=256, batch_size=1, objective="dpo", gpu="a100-80gb")
    # the same rows as a DPO pair; KTO's batch holds the KL rows and labels too, and its head no top-1
    assert plan["prediction"]["memory_detail"]["phases"]["forward"] > dpo["prediction"]["memory_detail"]["phases"][
        "forward"]


@pytest.mark.parametrize(("kw", "tol"), [
    (dict(quant="bf16", grad_ckpt=False), 0.001),
    # checkpointing at LoRA dropout 0: the last layer's backward planned below the trace, as for DPO and SFT
    (dict(quant="bf16"), 0.007),
    (dict(), 0.025),
])
def test_a_kto_plan_is_its_traced_step(kw, tol):
    assert_reference_step(_kto(**kw), tol)  # the policy's KL rows and forward, then the reference's


def test_the_forwards_without_grad_are_the_trace_s_flops():
    """FlopCounterMode over TRL's KTO step minus the same over the SFT step on its rows: the policy's forward on the KL
    rows (adapters on), the reference's on the KL rows and on the batch (adapters off), as the plan counts them."""
    kto = _kto(quant="bf16", grad_ckpt=False)
    kto["training"]["padded"] = False  # the SFT trace passes no attention mask
    sft = copy.deepcopy(kto)
    sft["training"]["objective"] = "sft"
    k = trace_plan(kto, steps=1, count_flops=True)["flops_per_step"][0]
    s = trace_plan(sft, steps=1, count_flops=True)["flops_per_step"][0]
    assert k - s == kto["prediction"]["compute"]["flops_per_step"]["reference"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--batch-size", "1"], "KTOTrainer refuses it"),
    (["--loss", "cce"], "KTOTrainer always does"),
    (["--gpus", "2", "--strategy", "fsdp"], "--strategy fsdp is not planned yet"),
    (["--dropout", "0.1"], "KTOConfig.disable_dropout"),
    (["--data", "x.jsonl", "--batching", "group_by_length"], "not how KTOTrainer batches its rows"),
])
def test_what_kto_is_not_planned_with_is_one_line(capsys, args, needle):
    rc, out, err = qplan(capsys, "estimate", "--model", "llama-3.2-1b", "--objective", "kto", *args)
    assert rc == 2 and out == ""
    one_line(err, needle)
