"""(IA)³ (``--peft-type ia3``): PEFT's ``IA3Config``, one fp32 vector per targeted module.

Oracles: PEFT itself — its ``PeftType`` names, its per-model-type defaults, ``get_nb_trainable_parameters`` and the
parameters' dtype on a meta-device model; the traced training step (PEFT's IA3 layers on the meta device with the
CUDA kernels' allocations: every phase). The CPU run is in tests/backends/test_ia3_run.py; PEFT's three GPU runs (and
their adapter files, to the byte) in tests/planner/test_peft_evidence.py. No expected value comes from qplan's formulas.
"""

from __future__ import annotations

import pytest
from trace_checks import assert_traced_step

from qplan.planner.api import plan_dict
from qplan.planner.errors import QPlanError
from qplan.planner.model.catalog import load_spec
from qplan.planner.model.ia3 import ia3_defaults
from qplan.planner.vocab import PEFT_TYPES


def test_the_method_names_and_the_ia3_defaults_are_peft_s():
    peft = pytest.importorskip("peft")
    from peft.utils import constants

    assert sorted(t.value.lower() for t in peft.PeftType) == sorted(PEFT_TYPES)
    d = ia3_defaults()
    assert d["target_modules"] == constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    assert d["feedforward_modules"] == constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING


@pytest.mark.parametrize("name,targets,ff", [
    ("llama-3.2-3b", None, None),  # PEFT's defaults: k_proj, v_proj, down_proj (down_proj feed-forward)
    ("qwen3-0.6b", None, None),
    ("gemma-2-9b", "attn", "o_proj"),  # a preset
    ("llama-3.2-1b", "all-linear", None),
    ("phi-4", "qkv_proj,gate_up_proj,down_proj", "gate_up_proj,down_proj"),  # fused projections
    ("qwen3-30b-a3b", "q_proj,k_proj,v_proj,o_proj", "none"),  # no PEFT default for qwen3_moe
])
def test_the_trainable_count_and_dtype_are_peft_s(name, targets, ff):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from qplan.hf import method_config, model_from_config

    opts = {"model": name, "peft_type": "ia3", "quant": "bf16",
            **({"targets": targets} if targets else {}), **({"feedforward_modules": ff} if ff else {})}
    plan = plan_dict(**opts)
    model = model_from_config(load_spec(name).config, dtype="bf16", device="meta")
    pm = get_peft_model(model, method_config("ia3", plan["ia3"]))
    trainable, total = pm.get_nb_trainable_parameters()
    params = plan["prediction"]["params"]
    assert params["trainable"] == trainable and params["total"] == total
    trained = [p for p in pm.parameters() if p.requires_grad]
    assert plan["prediction"]["memory"]["adapters"] == sum(p.numel() * p.element_size() for p in trained)
    assert plan["lora"] is None and plan["method"] == "ia3"


CASES = [  # PEFT's harness (pure bf16, no checkpointing), bf16 autocast with checkpointing, reentrant checkpointing,
    # fp32 weights under autocast without checkpointing, every linear module scaled
    dict(model="llama-3.2-1b", quant="bf16", compute_dtype="fp32", grad_ckpt=False),
    dict(model="llama-3.2-1b", quant="bf16"),
    dict(model="qwen3-0.6b", quant="bf16", reentrant=True),
    dict(model="llama-3.2-1b", quant="fp32", compute_dtype="bf16", grad_ckpt=False, targets="all-linear"),
]


@pytest.mark.parametrize("options", CASES, ids=range(len(CASES)))
def test_every_phase_of_the_step_equals_the_traced_step(options):
    assert_traced_step(peft_type="ia3", batch_size=2, seq_len=512, **options)


def test_a_layer_s_backward_holds_the_feed_forward_scaling_s_gradients():
    """A tiny vocabulary with checkpointing: the peak is inside a layer's backward, where the down projection's
    ``x_fp32 * ia3`` backward makes two fp32 tensors of its input's size (the traced step's peak)."""
    pytest.importorskip("peft")
    from pathlib import Path

    from qplan.observe.trace import trace_plan

    tiny = Path(__file__).resolve().parents[1] / "backends" / "data" / "tiny-llama.json"
    plan = plan_dict(model=str(tiny), peft_type="ia3", quant="bf16", batch_size=4, seq_len=256)
    traced = trace_plan(plan, steps=2)
    assert plan["prediction"]["memory_detail"]["peak_phase"] in ("layers", "layers_last")
    assert abs(plan["prediction"]["memory"]["tensor_peak"] - traced["tensor_peak"]) <= 0.003 * traced["tensor_peak"]


@pytest.mark.parametrize("extra,needle", [
    (dict(peft_type="boft"), "PEFT's boft is not planned yet"),
    (dict(peft_type="lorax"), "not one of PEFT's methods"),
    (dict(peft_type="ia3", r=8), "--r is a LoRA option"),
    (dict(peft_type="ia3", dora=True), "--dora is a LoRA option"),
    (dict(peft_type="ia3", quant="nf4"), "bitsandbytes"),
    (dict(peft_type="ia3", quant="bf16", backend="unsloth"), "peft backend"),
    (dict(peft_type="ia3", quant="bf16", gpus=2), "several GPUs"),
    (dict(peft_type="ia3", quant="bf16", optimizer="lorafa"), "LoRA-FA"),
    (dict(peft_type="ia3", quant="bf16", targets="k_proj,v_proj"), "subset of target_modules"),
    (dict(peft_type="ia3", quant="bf16", targets="embed_tokens"), "embedding"),
    (dict(peft_type="ia3", full=True), "--full"),
    (dict(feedforward_modules="down_proj"), "--peft-type ia3"),
    (dict(model="qwen3-30b-a3b", peft_type="ia3", quant="bf16"), "Please specify `target_modules`"),
])
def test_what_ia3_is_not_planned_with_is_one_line(extra, needle):
    with pytest.raises(QPlanError) as e:
        plan_dict(**{"model": "llama-3.2-1b", **extra})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_flops_are_what_the_flop_counter_counts():
    """(IA)³'s scalings are elementwise: the step's matmuls are the frozen model's (FlopCounterMode's count)."""
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan

    plan = plan_dict(model="llama-3.2-1b", peft_type="ia3", quant="bf16", batch_size=2, seq_len=512)
    flops = plan["prediction"]["compute"]["flops_per_step"]
    assert flops["total"] == trace_plan(plan, steps=2, count_flops=True)["flops_per_step"][-1]
