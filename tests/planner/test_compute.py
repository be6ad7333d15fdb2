"""FLOPs of a training step (issue 12) against torch's FlopCounterMode over the traced step.

The oracle is ``torch.utils.flop_counter.FlopCounterMode`` run over the second of two training
steps traced on the meta device (CUDA kernels mirrored: flash attention, bitsandbytes'
dequantize + matmul), ``qplan estimate --method trace`` with FLOP counting on. The analytic count
(``planner.compute.flops.step_flops``) must equal it within 1% for every bundled family, with and
without checkpointing; it is exact to the FLOP on these cases.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from qplan.observe.trace import trace_plan
from qplan.planner.api import plan_dict

TOLERANCE = 0.01

CASES = [
    # (model, family, options): every bundled family, checkpointing on and off
    ("smollm2-135m", dict(quant="bf16", grad_ckpt=True)),
    ("llama-3.2-1b", dict(quant="nf4", grad_ckpt=False, targets="qv")),
    ("qwen2.5-0.5b", dict(quant="nf4", grad_ckpt=True)),
    ("qwen2.5-0.5b", dict(quant="bf16", grad_ckpt=False, targets="mlp")),
    ("mistral-nemo-12b", dict(quant="nf4", grad_ckpt=True, targets="attn")),
    ("mistral-nemo-12b", dict(quant="bf16", grad_ckpt=False, targets="qv")),
    ("phi-4", dict(quant="nf4", grad_ckpt=True)),
    ("phi-4", dict(quant="bf16", grad_ckpt=False, targets="qv")),
    ("gemma-2-9b", dict(quant="nf4", grad_ckpt=True, targets="qv")),
    ("gemma-2-9b", dict(quant="bf16", grad_ckpt=False)),
    ("llama-3.2-1b", dict(quant="bf16", grad_ckpt=True, attn_impl="eager", targets="mlp")),
    ("smollm2-135m", dict(quant="fp32", compute_dtype="fp32", grad_ckpt=False)),
    # a trainable embedding makes its output need a gradient even without checkpointing
    ("smollm2-135m", dict(quant="bf16", grad_ckpt=False, targets="embed_tokens")),
    ("smollm2-135m", dict(quant="bf16", grad_ckpt=False, targets="qv", modules_to_save="embed_tokens")),
    ("smollm2-135m", dict(quant="bf16", grad_ckpt=True, targets="q_proj,v_proj,embed_tokens")),
    # reentrant checkpointing recomputes the whole layer (no early stop): the down projection too
    ("smollm2-135m", dict(quant="nf4", grad_ckpt=True, reentrant=True)),
    ("llama-3.2-1b", dict(quant="bf16", grad_ckpt=True, reentrant=True, targets="qv")),
]


@pytest.mark.parametrize("model, kw", CASES, ids=[f"{m}-{'-'.join(str(v) for v in kw.values())}" for m, kw in CASES])
def test_step_flops_match_flop_counter_mode(model, kw):
    plan = plan_dict(model=model, batch_size=1, seq_len=256, **kw)
    ours = plan["prediction"]["compute"]["flops_per_step"]
    traced = trace_plan(plan, count_flops=True)["flops_per_step"]
    assert traced[0] == traced[1]  # every step does the same work
    err = (ours["total"] - traced[-1]) / traced[-1]
    assert abs(err) <= TOLERANCE, (ours, traced)
    assert ours["total"] == sum(v for k, v in ours.items() if k != "total")


def test_flops_scale_with_accumulation_and_the_form_is_exact():
    """grad_accum multiplies the step; the (a, c) form fit uses equals the full count."""
    from qplan.planner.compute.flops import flops_form, step_flops
    from qplan.planner.model.catalog import load_spec
    from qplan.planner.model.lora import LoraSettings, count_lora
    from qplan.planner.model.weights import QuantSettings

    one = plan_dict(model="llama-3.2-1b", batch_size=2, seq_len=512)["prediction"]["compute"]["flops_per_step"]
    four = plan_dict(model="llama-3.2-1b", batch_size=2, seq_len=512, grad_accum=4)["prediction"]["compute"]
    assert four["flops_per_step"]["total"] == 4 * one["total"]
    spec = load_spec("llama-3.2-1b")
    q = QuantSettings("nf4", True, "bfloat16", True)
    counts = count_lora(spec, LoraSettings(r=16, alpha=32))
    a, c = flops_form(spec, counts, 16, q, "hf", "sdpa")
    for b, s in ((1, 128), (3, 1000), (8, 4096)):
        assert a * b * s + c * b * s * s == step_flops(spec, counts, 16, q, b, s, "hf", "sdpa")["total"]


def test_time_and_cost_follow_the_roofline_formula():
    from qplan.planner.compute.timing import DEFAULT_EFFICIENCY, SECONDS_PER_LAUNCH

    p = plan_dict(model="llama-3.1-8b", gpu="h100-80gb", tokens=10_000_000, price_per_hour=2.5)["prediction"]
    t, c, comp = p["time"], p["cost"], p["compute"]
    f, m = comp["flops_per_step"], comp["bytes_per_step"]
    ideal = max(f["total"] / 989e12, m["weights"] / 3350e9) + (m["dequantization"] + m["optimizer"]) / 3350e9
    assert t["ideal_step_seconds"] == pytest.approx(ideal)
    launches = comp["kernel_launches_per_step"]["total"]
    assert t["kernel_launches"] == launches and t["seconds_per_launch"] == SECONDS_PER_LAUNCH
    assert t["step_seconds"] == pytest.approx(ideal / DEFAULT_EFFICIENCY + launches * SECONDS_PER_LAUNCH)
    assert t["steps"] == -(-10_000_000 // 512) and t["total_seconds"] == pytest.approx(t["steps"] * t["step_seconds"])
    assert c["total"] == pytest.approx(t["total_seconds"] / 3600 * 2.5)
    assert "not calibrated" in t["efficiency_source"] and "uncertainty" in t


def test_what_is_not_counted_is_said():
    """MoE expert tensors and DoRA's extra products are outside the count: the plan says so."""
    from pathlib import Path

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
    moe = plan_dict(model=str(fixtures / "qwen2-moe.json"), seq_len=64)["prediction"]["compute"]
    assert any("mixture-of-experts" in n for n in moe["not_counted"])
    dora = plan_dict(model="smollm2-135m", dora=True)["prediction"]["compute"]
    assert any("DoRA" in n for n in dora["not_counted"])
    assert "not_counted" not in plan_dict(model="smollm2-135m")["prediction"]["compute"]
