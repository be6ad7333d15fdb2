"""The analytic training-memory model (planner.memory.terms) against its oracle, the exact trace.

The oracle is ``qplan estimate --method trace``: the real transformers model built on the meta
device, really quantized by transformers' bitsandbytes integration, wrapped by the real
``get_peft_model`` and run through two complete training steps under a live-tensor tracker (the
trace itself is checked against the same step executed on the CPU in test_trace.py).  Nothing
here compares the model with a copy of its own formulas.

This is the representative subset CI runs; the full matrix of issue 3 (4 architectures at full
size x quant x batch x seq x checkpointing x r x targets x optimizer) is
``python bench/accuracy.py`` -> reports/accuracy/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from qplan.observe.trace import trace_plan as trace_for_plan
from qplan.planner.api import plan_dict

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "configs"
TOLERANCE = 0.03  # issue 3: worst error <= 3%
TINY_LLAMA = str(ROOT / "tests" / "backends" / "data" / "tiny-llama.json")
PHI3 = str(FIXTURES / "phi3-fused.json")


def plan(model: str, **kw) -> dict:
    o = dict(model=model, r=16, alpha=None, dropout=None, targets="all-linear", bias="none", dora=False,
             rslora=False, modules_to_save="", quant="nf4", double_quant=True, compute_dtype="bf16",
             upcast=True, gpu=None, seq_len=512, batch_size=1, grad_accum=1, grad_ckpt=True,
             optimizer="adamw_torch", attn_impl="auto", backend="peft")
    o.update(kw)
    return plan_dict(**o)


CASES = [
    # bundled full-size configs (vocabulary-dominated peaks: loss and start of backward)
    pytest.param("smollm2-135m", dict(quant="nf4", batch_size=2, seq_len=256), id="smollm2-nf4-ckpt"),
    pytest.param("smollm2-135m", dict(quant="bf16", grad_ckpt=False, targets="qv", r=8), id="smollm2-bf16-nockpt-qv"),
    pytest.param("qwen2.5-0.5b", dict(quant="nf4", grad_ckpt=False, optimizer="adamw_8bit", r=64), id="qwen2.5-nf4-nockpt-8bit"),
    pytest.param("qwen2.5-0.5b", dict(quant="bf16", batch_size=4, seq_len=1024, dropout=0.0), id="qwen2.5-bf16-ckpt-nodropout"),
    pytest.param("llama-3.2-1b", dict(quant="nf4", r=64, optimizer="adamw_8bit", dropout=0.0),
                 id="llama1b-nf4-ckpt-8bit-nodropout"),
    pytest.param("llama-3.2-1b", dict(quant="bf16", grad_ckpt=False, batch_size=2, seq_len=2048), id="llama1b-bf16-nockpt"),
    pytest.param("llama-3.2-1b", dict(quant="int8"), id="llama1b-int8-ckpt"),
    pytest.param("llama-3.2-1b", dict(quant="int8", grad_ckpt=False, dropout=0.0), id="llama1b-int8-nockpt"),
    pytest.param("smollm2-135m", dict(quant="fp32", compute_dtype="fp32", grad_ckpt=False, seq_len=1024),
                 id="smollm2-fp32-nockpt"),
    pytest.param("gemma-2-9b", dict(attn_impl="eager", targets="qv"), id="gemma2-9b-eager-nf4-ckpt"),
    pytest.param("gemma-2-9b", dict(attn_impl="eager", quant="bf16", grad_ckpt=False, batch_size=2, seq_len=1024),
                 id="gemma2-9b-eager-bf16-nockpt"),
    # small-vocabulary fixtures: the peak moves into layer 0's backward / recomputation
    pytest.param(PHI3, dict(quant="bf16", grad_ckpt=False, seq_len=64, batch_size=2), id="phi3-fused-bf16-nockpt"),
    pytest.param(PHI3, dict(quant="nf4", seq_len=64, batch_size=2), id="phi3-fused-nf4-ckpt"),
    pytest.param(str(FIXTURES / "qwen2-bias.json"), dict(quant="nf4", grad_ckpt=False, seq_len=128), id="qwen2-bias-nf4-nockpt"),
    pytest.param(TINY_LLAMA, dict(quant="bf16", seq_len=64, batch_size=2), id="tiny-llama-bf16-ckpt"),
    pytest.param(TINY_LLAMA, dict(quant="nf4", seq_len=64, batch_size=2), id="tiny-llama-nf4-ckpt"),
    # reentrant checkpointing (axolotl's, LLaMA-Factory's default): the layer moments move by R h T, and int8's
    # per-layer retained state is gone (the checkpointed forward runs under no_grad)
    pytest.param(TINY_LLAMA, dict(quant="bf16", seq_len=64, batch_size=2, reentrant=True), id="tiny-llama-bf16-reent"),
    pytest.param(TINY_LLAMA, dict(quant="nf4", seq_len=64, batch_size=2, reentrant=True), id="tiny-llama-nf4-reent"),
    pytest.param(TINY_LLAMA, dict(quant="fp32", compute_dtype="fp32", seq_len=64, batch_size=2, reentrant=True),
                 id="tiny-llama-fp32-reent"),
    pytest.param("llama-3.2-1b", dict(quant="int8", reentrant=True), id="llama1b-int8-reent"),
    # a pure 16-bit step: bf16 weights, no autocast (PEFT's benchmark harness, torchtune): matmuls in bf16, the LoRA
    # branches in the fp32 adapters' dtype, flash attention (was +15..46% high: every activation counted fp32)
    pytest.param("llama-3.2-1b", dict(quant="bf16", compute_dtype="fp32", grad_ckpt=False, batch_size=4, seq_len=768,
                                      targets="qv", r=32, dropout=0.0), id="llama1b-pure-bf16-peft-harness"),
    pytest.param("smollm2-135m", dict(quant="bf16", compute_dtype="fp32", grad_ckpt=False, batch_size=2, seq_len=256),
                 id="smollm2-pure-bf16-nockpt"),
    pytest.param(PHI3, dict(quant="bf16", compute_dtype="fp32", grad_ckpt=False, seq_len=64, batch_size=2),
                 id="phi3-fused-pure-bf16-nockpt"),
    pytest.param(TINY_LLAMA, dict(quant="bf16", compute_dtype="fp32", seq_len=64, batch_size=2),
                 id="tiny-llama-pure-bf16-ckpt"),
    # DoRA's saved tensors (planner/memory/dora.py): its products' inputs, the norm's vectors, and with dropout the
    # 16-bit weight copy the recomputed base matmul saves
    pytest.param("smollm2-135m", dict(quant="nf4", dora=True, grad_ckpt=False, batch_size=2, seq_len=256),
                 id="smollm2-dora-nf4-nockpt-dropout"),
    pytest.param("smollm2-135m", dict(quant="bf16", dora=True, grad_ckpt=False, batch_size=2, seq_len=256, dropout=0.0),
                 id="smollm2-dora-bf16-nockpt"),
    pytest.param("smollm2-135m", dict(quant="bf16", compute_dtype="fp32", dora=True, grad_ckpt=False, batch_size=2,
                                      seq_len=256, dropout=0.0, targets="qv", r=32), id="smollm2-dora-pure-bf16"),
]


@pytest.mark.parametrize("model, kw", CASES)
def test_analytic_peak_matches_trace(model, kw):
    p = plan(model, **kw)
    tr = trace_for_plan(p)
    mem = p["prediction"]["memory"]
    err = (mem["tensor_peak"] - tr["tensor_peak"]) / tr["tensor_peak"]
    print(f"\n{model} {kw}: analytic {mem['tensor_peak']:,} ({p['prediction']['memory_detail']['peak_phase']}), "
          f"trace {tr['tensor_peak']:,} {tr['phase_peaks']}, error {err:+.3%}")
    assert p["prediction"]["params"]["trainable"] == tr["trainable_params"]
    assert abs(err) <= TOLERANCE


@pytest.mark.parametrize("model, kw", [
    pytest.param(TINY_LLAMA, dict(quant="bf16"), id="tiny-bf16-all"),
    pytest.param(TINY_LLAMA, dict(quant="nf4"), id="tiny-nf4-all"),
    pytest.param(TINY_LLAMA, dict(quant="nf4", targets="qv", dropout=0.0), id="tiny-nf4-qv"),
    pytest.param(TINY_LLAMA, dict(quant="bf16", targets="attn"), id="tiny-bf16-attn"),
    pytest.param(TINY_LLAMA, dict(quant="bf16", targets="mlp"), id="tiny-bf16-mlp"),
    pytest.param(TINY_LLAMA, dict(quant="fp32", compute_dtype="fp32"), id="tiny-fp32-all"),
    pytest.param(TINY_LLAMA, dict(quant="bf16", compute_dtype="fp32"), id="tiny-pure-bf16-all"),
])
def test_reentrant_checkpointing_changes_the_peak_as_the_trace_does(model, kw):
    """Reentrant against non-reentrant checkpointing on small-vocabulary plans, whose peak is a layer's backward:
    the analytic model moves the peak by exactly the bytes the traced step moves (``reentrant_difference``:
    ``- c h T`` or ``+ R h T``), whatever the baseline's own error."""
    plans = {re_: plan(model, seq_len=64, batch_size=2, reentrant=re_, **kw) for re_ in (False, True)}
    assert plans[True]["training"]["grad_ckpt"] == "reentrant"
    traced = {re_: trace_for_plan(p)["tensor_peak"] for re_, p in plans.items()}
    ours = {re_: p["prediction"]["memory"]["tensor_peak"] for re_, p in plans.items()}
    assert traced[True] != traced[False]
    assert ours[True] - ours[False] == traced[True] - traced[False], (ours, traced)


def test_phases_are_ordered_like_the_trace():
    """The analytic model names the same peak moment as the trace: loss/backward start for a
    large vocabulary (phi-4-sized logits dominate), layer-0 backward when logits are tiny."""
    big = plan("llama-3.2-1b", quant="bf16", grad_ckpt=False, batch_size=2, seq_len=2048)
    tr = trace_for_plan(big)
    assert big["prediction"]["memory_detail"]["peak_phase"] == "backward"
    assert tr["phase_peaks"]["backward"] == tr["tensor_peak"]
    phases = big["prediction"]["memory_detail"]["phases"]
    assert phases["backward"] == pytest.approx(tr["phase_peaks"]["backward"], rel=TOLERANCE)
    assert phases["optimizer"] == pytest.approx(tr["phase_peaks"]["optimizer"], rel=TOLERANCE)


@pytest.mark.parametrize("model, kw", [
    pytest.param("llama-3.2-1b", dict(quant="nf4", r=64), id="llama1b-nf4-ckpt"),
    pytest.param(TINY_LLAMA, dict(quant="bf16", seq_len=16, r=64), id="tiny-llama-bf16-ckpt-r64"),
])
def test_fused_adamw_state_and_step_match_the_trace(model, kw):
    """``adamw_torch_fused`` (what Unsloth's CPU path switches to): the same two states as AdamW
    plus a device-side fp32 ``step`` per trainable tensor, to the byte (the trace's peak is in
    step 2, when every state exists); the peak within the tolerance."""
    p = plan(model, optimizer="adamw_torch_fused", **kw)
    tr = trace_for_plan(p)
    assert tr["peak_step"] == 2
    n_tensors = sum(2 * e["instances"] for e in p["prediction"]["params"]["per_module"])  # lora_A, lora_B
    assert tr["breakdown_at_peak"]["optimizer"] == p["prediction"]["memory"]["optimizer"]
    assert p["prediction"]["memory"]["optimizer"] == 2 * p["prediction"]["memory"]["adapters"] + 4 * n_tensors
    err = (p["prediction"]["memory"]["tensor_peak"] - tr["tensor_peak"]) / tr["tensor_peak"]
    assert abs(err) <= TOLERANCE


def test_committed_accuracy_report_meets_the_goal():
    """reports/accuracy/matrix.json (made by bench/accuracy.py) covers the issue-3 matrix and
    its worst error is within 3%."""
    doc = json.loads((ROOT / "reports" / "accuracy" / "matrix.json").read_text())
    cases = doc["cases"]
    assert len({c["model"] for c in cases}) >= 4
    assert {c["quant"] for c in cases} >= {"nf4", "bf16"}
    assert {(c["b"], c["s"]) for c in cases} >= {(1, 512), (4, 2048), (8, 4096)}
    assert {c["r"] for c in cases} >= {8, 64} and {c["optimizer"] for c in cases} >= {"adamw_torch", "adamw_8bit"}
    worst = max(abs(c["error"]) for c in cases)
    assert doc["summary"]["worst_abs_error"] == pytest.approx(worst)
    assert worst <= TOLERANCE
    for c in cases:
        assert c["error"] == pytest.approx((c["analytic_tensor_peak"] - c["trace_tensor_peak"]) / c["trace_tensor_peak"])


def test_unvalidated_families_are_flagged():
    """Families whose activation terms are not derived (GPT-2, gpt-oss and DeepSeek MoE layers) say
    so in the plan; the bundled specs of validated families carry no such warning, nor do the MoE
    families whose block is derived (planner.memory.moe: Qwen3-MoE, Mixtral), the others do."""
    from qplan.planner.memory.moe import DERIVED_MOE
    from qplan.planner.memory.terms import VALIDATED_FAMILIES
    from qplan.planner.model.catalog import bundled_model_names, load_spec

    gpt2 = plan(str(FIXTURES / "gpt2-conv1d.json"), seq_len=64)
    moe = plan(str(FIXTURES / "gpt-oss-moe.json"), seq_len=64, targets="attn")
    assert any("gpt2 family" in w and "--method trace" in w for w in gpt2["warnings"])
    assert any("mixture-of-experts" in w for w in moe["warnings"])
    for name in bundled_model_names():
        inv = load_spec(name).inventory
        experts = any(len(p.shape) == 3 for p in inv.params)
        validated = (inv.model_type in VALIDATED_FAMILIES and not experts) or inv.model_type in DERIVED_MOE
        assert any("approximated" in w for w in plan(name)["warnings"]) != validated, name


def test_meta_trace_leaves_no_meta_quantization_maps():
    """A meta trace of a double-quantized plan must not leave bitsandbytes' process-wide map
    cache on the meta device: a real quantization later in the same process would fail."""
    import bitsandbytes.functional as bnb_F

    trace_for_plan(plan(str(FIXTURES / "llama-tied.json"), seq_len=32, quant="nf4", double_quant=True))
    assert all(getattr(v, "device", None) is None or v.device.type != "meta" for v in bnb_F.name2qmap.values())


@pytest.mark.parametrize("model, kw", [
    pytest.param("llama-3.2-1b", dict(quant="nf4", attn_impl="eager", seq_len=16384), id="llama1b-eager-16k-nf4-ckpt"),
    pytest.param("qwen2.5-0.5b", dict(quant="bf16", attn_impl="eager", seq_len=16384, dropout=0.0),
                 id="qwen-eager-16k-bf16-ckpt"),
])
def test_eager_checkpointed_long_sequences_within_5_percent(model, kw):
    """Eager attention + checkpointing at long sequences: the s^2 softmax tensors of one layer's
    forward (nothing saves them) and backward make the peak; modelled within 5%."""
    p = plan(model, **kw)
    tr = trace_for_plan(p)
    err = (p["prediction"]["memory"]["tensor_peak"] - tr["tensor_peak"]) / tr["tensor_peak"]
    print(f"\n{model} {kw}: error {err:+.3%}, phases {p['prediction']['memory_detail']['phases']}")
    assert abs(err) <= 0.05
    # the forward's in-layer moment (no logits) is the forward's peak here, modelled within 1%
    ph = p["prediction"]["memory_detail"]["phases"]
    assert ph["attention"] > ph["forward"]
    assert ph["attention"] == pytest.approx(tr["phase_peaks"]["forward"], rel=0.01)
