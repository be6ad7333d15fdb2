"""``--loss trl``: TRL 1.16's SFTTrainer trains through its fused LM head (``add_fused_lm_head``,
``ChunkedLogProbFunction``): the valid rows projected through the head in [4096, 32768] tiles, never the logits.
The oracle is TRL's own code traced on meta as a GPU runs it — only its Triton launches (which write into the buffers
they are given) and CUDA's fp32-output addmm are stood in (``qplan.observe.trace.trl_head``). The loss's moments equal
the trace to the rows the plan rounds up (``T`` for ``B (s - 1)``); whole steps within 0.5%."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

from test_trainer_configs import one_line, qplan

from qplan.observe.trace import trace_plan
from qplan.planner.api import plan_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kw", [
    dict(model="llama-3.2-1b", seq_len=512, batch_size=2),                     # fp32 rows cast to bf16 tiles
    dict(model="llama-3.2-1b", seq_len=5120, grad_ckpt=False),                 # two token tiles
    dict(model="qwen2.5-0.5b", seq_len=6000, quant="bf16", grad_ckpt=False),   # bf16 rows: no casts
    dict(model="gemma-2-9b", seq_len=128),                                     # softcapping, eager attention
    dict(model="small-vocab", seq_len=6000, grad_ckpt=False),  # one vocabulary tile, two token tiles
    # 49,152 tokens: the second vocabulary tile is 16,384 wide, so is the head tile cast beside the first's
    dict(model="smollm2-135m", seq_len=256, batch_size=2),
])
def test_a_trl_plan_is_its_traced_step(kw, tmp_path):
    if kw["model"] == "small-vocab":  # SmolLM2-135M with a 32,000-token vocabulary: the head is one tile
        cfg = json.loads((ROOT / "model_specs" / "smollm2-135m.json").read_text())["config"]
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 32000}))
        kw = {**kw, "model": str(tmp_path / "config.json")}
    plan = plan_dict(loss="trl", gpu="a100-80gb", **kw)
    assert plan["training"]["loss"] == "trl"
    traced = trace_plan(plan, steps=2)
    a, t = plan["prediction"]["memory"]["tensor_peak"], traced["tensor_peak"]
    assert abs(a - t) <= 0.005 * t, (a, t)
    assert traced["breakdown_at_peak"]["logits"] == 0  # no [T, V] tensor
    # the loss's backward (the start of backward) against the trace's backward: in these cases it is the backward's peak
    phases = plan["prediction"]["memory_detail"]["phases"]
    assert phases["backward"] >= max(phases.get("layers", 0), phases.get("layers_last", 0))
    tb = traced["phase_peaks"]["backward"]
    # an upper bound: T rows for B (s - 1), and the backward's two head tiles counted with a full token tile's rows
    assert 0 <= phases["backward"] - tb <= 5e-4 * tb, (phases["backward"], tb)


@pytest.mark.parametrize(("args", "needle"), [
    (["--backend", "unsloth"], "the unsloth backend computes its own fused cross-entropy"),
    (["--targets", "q_proj,lm_head"], "reads lm_head.weight as it is"),
])
def test_a_trl_plan_it_cannot_run_is_one_line(capsys, args, needle):
    rc, out, err = qplan(capsys, "estimate", "--model", "llama-3.2-1b", "--loss", "trl", *args)
    assert rc == 2 and out == ""
    one_line(err, needle)


def test_the_fused_head_plans_far_less_than_the_full_logits_on_a_t4():
    """The case TRL's SFTTrainer exists for: Llama-3.2-3B QLoRA on a free T4 at 2 x 4096 tokens (Triton runs there)."""
    full = plan_dict(model="llama-3.2-3b", gpu="t4", seq_len=4096, batch_size=2)
    fused = plan_dict(model="llama-3.2-3b", gpu="t4", seq_len=4096, batch_size=2, loss="trl")
    assert full["prediction"]["fits"] is False and fused["prediction"]["fits"] is True


def test_zero3_plans_the_fused_head_and_says_what_it_leaves_out():
    plan = plan_dict(model="llama-3.2-1b", quant="bf16", gpus=2, strategy="zero3", loss="trl")
    assert plan["training"]["loss"] == "trl"
    assert any("ZeRO-3" in w and "gathers the whole head" in w for w in plan["warnings"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
@pytest.mark.parametrize("loss", ["full", "trl"])
def test_a_multi_gpu_plan_without_checkpointing_has_every_moment(strategy, loss):
    """The last layer's MLP forward (a moment without checkpointing) is a moment of every rank too."""
    plan = plan_dict(model="llama-3.2-1b", quant="bf16", gpus=2, strategy=strategy, grad_ckpt=False, loss=loss)
    single = plan_dict(model="llama-3.2-1b", quant="bf16", grad_ckpt=False, loss=loss)
    assert "mlp_forward" in plan["prediction"]["memory_detail"]["phases"]
    assert "mlp_forward" in single["prediction"]["memory_detail"]["phases"]


def test_fit_max_gpus_says_why_a_fused_loss_cannot_be_planned():
    from qplan.planner.errors import QPlanError
    from qplan.planner.search.fit import fit_document

    with pytest.raises(QPlanError, match="needs an Ampere or newer GPU"):
        fit_document({"model": "llama-3.2-1b", "gpu": "t4", "max_gpus": 2, "loss": "cce"})
    out = fit_document({"model": "llama-3.2-1b", "gpu": "a100-80gb", "max_gpus": 2, "loss": "trl"})
    assert out["loss"] == "trl" and out["world_size"] == 1
