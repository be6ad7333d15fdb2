"""``--objective reward``: TRL 1.16's RewardTrainer on ``AutoModelForSequenceClassification`` (one label).

Oracles: transformers' own reward model built on meta (its module inventory, against the spec qplan derives from the
causal LM's without torch: ``planner.model.seq_cls``); PEFT's trainable count on that model (``task_type="SEQ_CLS"``,
which trains a copy of ``score``); TRL's ``RewardTrainer.compute_loss`` traced on meta (``observe.trace.reward``)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

from test_trainer_configs import one_line, qplan

from qplan.observe.trace import trace_plan
from qplan.planner.api import plan_dict
from qplan.planner.model.catalog import load_spec
from qplan.planner.model.seq_cls import SCORE_HEAD_TYPES, reward_spec

#: a bundled spec of every model type whose reward model qplan derives (tied and untied heads)
FAMILIES = ["smollm2-135m", "llama-3.1-8b", "qwen2.5-0.5b", "qwen3-0.6b", "phi-4", "mistral-nemo-12b"]


def test_every_derived_model_type_has_a_bundled_family_checked():
    assert {load_spec(m).inventory.model_type for m in FAMILIES} == set(SCORE_HEAD_TYPES)


@pytest.mark.parametrize("model", FAMILIES)
def test_the_derived_reward_model_is_transformers_own(model):
    from qplan.planner.model.inventory import build_inventory

    spec = load_spec(model)
    derived = json.loads(json.dumps(reward_spec(spec).to_json()["inventory"]))
    real = build_inventory(spec.config, task="seq_cls")
    assert derived["architecture"] == real["architecture"]
    assert derived["total_params"] == real["total_params"]
    assert derived["tied"] == real["tied"] == []
    for key in ("embeddings", "params", "buffers"):
        assert derived[key] == real[key], key

    def linear(inv):  # the score head's role is the planner's ("head"; transformers has no output embeddings)
        return sorted(({k: v for k, v in g.items() if k != "role"} for g in inv["linear"]), key=lambda g: g["pattern"])

    assert linear(derived) == linear(real)
    assert derived["output_head"] == "score" and real["output_head"] is None


@pytest.mark.parametrize("model, targets", [("smollm2-135m", "all-linear"), ("qwen2.5-0.5b", "qv"),
                                            ("phi-4", "all-linear")])
def test_trainable_counts_are_pefts_on_the_reward_model(model, targets):
    import torch
    from peft import get_peft_model

    from qplan.hf import hf_config, lora_config, seq_cls_config

    plan = plan_dict(model=model, objective="reward", targets=targets, r=8)
    with torch.device("meta"):
        from transformers import AutoModelForSequenceClassification

        m = AutoModelForSequenceClassification.from_config(seq_cls_config(hf_config(load_spec(model).config)))
    # the plan's LoRA as hf/ maps it, without the score copy the plan counts: PEFT's SEQ_CLS must add it itself
    pm = get_peft_model(m, lora_config({**plan["lora"], "modules_to_save": []}, "SEQ_CLS"))
    trainable, total = pm.get_nb_trainable_parameters()
    assert (plan["prediction"]["params"]["trainable"], plan["prediction"]["params"]["total"]) == (trainable, total)
    assert plan["model"]["architecture"].endswith("ForSequenceClassification")


@pytest.mark.parametrize(("kw", "tol"), [
    # checkpointing at LoRA dropout 0: the last layer's backward planned below the trace (as for SFT, DPO and KTO);
    # without checkpointing the last layer's MLP forward with the padded batch's mask, 0.5% under
    (dict(quant="bf16"), 0.006),
    (dict(quant="bf16", grad_ckpt=False), 0.006),
])
def test_a_reward_plan_is_its_traced_step(kw, tol):
    plan = plan_dict(model="llama-3.2-1b", seq_len=512, batch_size=2, objective="reward", gpu="a100-80gb", **kw)
    traced = trace_plan(plan, steps=2)
    a, t = plan["prediction"]["memory"]["tensor_peak"], traced["tensor_peak"]
    assert abs(a - t) <= tol * t, (a, t)
    assert traced["trainable_params"] == plan["prediction"]["params"]["trainable"]
    ph, tp = plan["prediction"]["memory_detail"]["phases"], traced["phase_peaks"]
    assert abs(ph["optimizer"] - tp["optimizer"]) <= 0.001 * tp["optimizer"], (ph, tp)


def test_a_reward_plan_has_no_logits_and_two_rows_a_pair():
    plan = plan_dict(model="llama-3.2-1b", seq_len=512, batch_size=2, objective="reward", gpu="a100-80gb")
    sft = plan_dict(model="llama-3.2-1b", seq_len=512, batch_size=4, gpu="a100-80gb", quant="bf16")
    t, m = plan["training"], plan["prediction"]["memory"]
    assert (t["objective"], t.get("loss", "full"), t["padded"], plan["quant"]["quant"]) == ("reward", "full", True, "bf16")
    assert plan["lora"]["dropout"] == 0.0 and "score" in plan["lora"]["modules_to_save"]
    assert plan["prediction"]["time"]["tokens_per_step"] == 2 * 2 * 512
    assert m["logits"] < 2 ** 20 < sft["prediction"]["memory"]["logits"]  # one score a token, not the vocabulary
    # llama-3.2-1b's head is tied to the embeddings: the reward model only adds score (2048 x 1, bf16); the untied 8B
    # also loses its vocabulary head
    assert m["weights"] == sft["prediction"]["memory"]["weights"] + 2048 * 2
    big = plan_dict(model="llama-3.1-8b", objective="reward")
    big_sft = plan_dict(model="llama-3.1-8b", quant="bf16")
    assert big_sft["prediction"]["params"]["base"] - big["prediction"]["params"]["base"] == 128256 * 4096 - 4096


@pytest.mark.parametrize(("args", "needle"), [
    (["--quant", "nf4"], "a quantized base is not planned yet"),
    (["--loss", "trl"], "no logits to fuse"),
    (["--model", "gemma-2-9b"], "model_type 'gemma2' is not planned yet"),
    (["--gpus", "2", "--strategy", "fsdp"], "--strategy fsdp is not planned yet"),
    (["--dropout", "0.1"], "RewardConfig.disable_dropout"),
    (["--data", "x.jsonl"], "not read as RewardTrainer reads it yet"),
])
def test_what_a_reward_model_is_not_planned_with_is_one_line(capsys, args, needle):
    model = [] if "--model" in args else ["--model", "llama-3.2-1b"]
    rc, out, err = qplan(capsys, "estimate", *model, "--objective", "reward", *args)
    assert rc == 2 and out == ""
    one_line(err, needle)


@pytest.mark.parametrize("ckpt", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_a_reward_step_s_flops_are_flop_counter_mode_s(ckpt):
    """The reward model's step counted by FlopCounterMode over RewardTrainer.compute_loss and its backward: the head's
    one column (forward, input gradient and the trained copy's weight gradient) and the LoRA step, as planned."""
    plan = plan_dict(model="llama-3.2-1b", seq_len=256, batch_size=2, objective="reward", gpu="a100-80gb",
                     grad_ckpt=ckpt)
    plan["training"]["padded"] = False  # FLOPs do not depend on the mask; the unpadded trace passes none
    traced = trace_plan(plan, steps=1, count_flops=True)["flops_per_step"][0]
    assert traced == plan["prediction"]["compute"]["flops_per_step"]["total"]
