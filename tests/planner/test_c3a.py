"""C3A (``--peft-type c3a``): PEFT's ``C3AConfig``, one fp32 block-circulant kernel per module applied through FFTs.

Oracles: PEFT itself — ``get_nb_trainable_parameters`` and the kernel's dtype on a meta-device model, the adapter file
its ``save_pretrained`` writes; the traced training step (every phase); FlopCounterMode's count; the traced kernel
launches. The CPU run is in tests/backends/test_c3a_run.py; PEFT's GPU run in tests/planner/test_peft_evidence.py.
No expected value comes from qplan's formulas.
"""

from __future__ import annotations

import pytest
from trace_checks import (
    ADAPTER_CASES,
    TINY_LLAMA,
    assert_adapter_file_is_peft_s,
    assert_counts_are_peft_s,
    assert_traced_step,
    toy_peak_error,
)

from qplan.planner.api import plan_dict
from qplan.planner.errors import QPlanError


def test_the_default_targets_are_peft_s():
    pytest.importorskip("peft")
    from peft.utils import constants

    from qplan.planner.model.c3a import C3aSettings
    from qplan.planner.model.loha import lora_family_defaults

    ours = {**lora_family_defaults(), **C3aSettings.default_overrides}
    assert ours == constants.TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING


def test_the_default_block_size_is_peft_s():
    pytest.importorskip("peft")
    from peft import C3AConfig

    assert plan_dict(model="llama-3.2-1b", peft_type="c3a")["c3a"]["block_size"] == C3AConfig().block_size


@pytest.mark.parametrize("name,options", [
    ("llama-3.2-1b", dict()),  # PEFT's defaults: q_proj, v_proj, block 256
    ("llama-3.2-3b", dict(block_size=64, targets="q_proj,v_proj")),  # PEFT's benchmark run
    ("qwen3-0.6b", dict(block_size=128, targets="all-linear")),
    ("gemma-2-9b", dict(block_size=256, targets="attn")),
    ("phi-4", dict(block_size=256, targets="qkv_proj,o_proj")),
    ("gpt-oss-20b", dict(block_size=64, targets="q_proj,k_proj,v_proj,o_proj")),
    ("deepseek-v2-lite", dict(block_size=64, targets="q_proj,o_proj")),
])
def test_the_trainable_count_total_and_dtype_are_peft_s(name, options):
    pytest.importorskip("peft")
    plan = plan_dict(model=name, peft_type="c3a", quant="bf16", **options)
    assert_counts_are_peft_s(plan, name)
    assert plan["method"] == "c3a"


def test_the_adapter_file_is_peft_s_to_the_byte(tmp_path):
    pytest.importorskip("peft")
    assert_adapter_file_is_peft_s(tmp_path, TINY_LLAMA, peft_type="c3a", block_size=16, targets="all-linear",
                                  quant="bf16")


#: trace_checks' settings; fp32 weights under autocast with the MLP adapted (C3A returns its input's dtype, fp32, to
#: the MLP), with and without checkpointing; PEFT's default block size; Gemma-2 with checkpointing
CASES = [*ADAPTER_CASES,
         dict(model="llama-3.2-1b", quant="fp32", compute_dtype="bf16", grad_ckpt=False, targets="all-linear"),
         dict(model="llama-3.2-1b", quant="fp32", compute_dtype="bf16", targets="all-linear"),
         dict(model="llama-3.2-1b", quant="bf16", targets="all-linear", block_size=256),
         dict(model="gemma-2-9b", quant="bf16", targets="attn")]


@pytest.mark.parametrize("options", CASES, ids=range(len(CASES)))
def test_every_phase_of_the_step_equals_the_traced_step(options):
    assert_traced_step(**{"peft_type": "c3a", "block_size": 64, "batch_size": 2, "seq_len": 256, **options})


@pytest.mark.parametrize("options,bounds", [
    (dict(targets="all-linear"), (-0.01, 0.03)),  # the down projection's backward first: exact but for the forward
    (dict(targets="all-linear", grad_ckpt=False), (-0.01, 0.03)),
    (dict(targets="q_proj,v_proj,down_proj", grad_ckpt=False), (-0.01, 0.03)),
    (dict(quant="fp32", compute_dtype="bf16", targets="all-linear"), (-0.01, 0.03)),
    (dict(targets="gate_proj,up_proj"), (0.0, 0.15)),  # later modules' backward: an upper bound
    (dict(targets="q_proj,v_proj"), (0.0, 0.15)),
], ids=range(6))
def test_where_c3a_s_ffts_are_the_peak_the_plan_bounds_the_traced_step(tmp_path, options, bounds):
    """Where a layer's backward is the peak (a small vocabulary), C3A's FFT transients decide it: exact for the down
    projection (the first module a layer's backward runs), an upper bound for the others."""
    plan, error = toy_peak_error(tmp_path, peft_type="c3a", block_size=16, **options)
    assert plan["prediction"]["memory_detail"]["peak_phase"] in ("layers", "layers_last")
    assert bounds[0] <= error <= bounds[1], error


@pytest.mark.parametrize("options", [dict(), dict(grad_ckpt=False), dict(targets="all-linear", grad_ckpt=False),
                                     dict(targets="all-linear"), dict(targets="down_proj"),
                                     dict(reentrant=True, targets="all-linear", block_size=256)], ids=range(6))
def test_the_flops_are_what_the_flop_counter_counts(options):
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan

    plan = plan_dict(**{"model": "llama-3.2-1b", "peft_type": "c3a", "block_size": 64, "quant": "bf16",
                        "batch_size": 2, "seq_len": 256, **options})
    flops = plan["prediction"]["compute"]["flops_per_step"]
    assert flops["total"] == trace_plan(plan, steps=2, count_flops=True)["flops_per_step"][-1]


@pytest.mark.parametrize("options", [dict(quant="bf16", compute_dtype="fp32", grad_ckpt=False),
                                     dict(quant="bf16", targets="all-linear")], ids=range(2))
def test_the_launches_are_within_tolerance_of_the_traced_step(options):
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan
    from qplan.planner.compute.ops import TOLERANCE

    plan = plan_dict(**{"model": "qwen3-0.6b", "peft_type": "c3a", "block_size": 64, "batch_size": 1, "seq_len": 64,
                        **options})
    traced = trace_plan(plan, steps=2)["kernel_launches"]
    predicted = plan["prediction"]["compute"]["kernel_launches_per_step"]
    t, p = traced["forward"] + traced["backward"], predicted["forward"] + predicted["backward"]
    assert abs(p - t) / t <= TOLERANCE, (traced, predicted)


@pytest.mark.parametrize("extra,needle", [
    (dict(peft_type="c3a", r=8), "--r is a LoRA option"),
    (dict(peft_type="c3a", dropout=0.1), "--dropout is a LoRA option"),
    (dict(peft_type="c3a", block_size=48), "the block size to divide both in_features and out_features"),
    (dict(peft_type="lora", block_size=64), "--block-size is an option of c3a"),
    (dict(peft_type="c3a", targets="embed_tokens"), "C3A target 'embed_tokens' is an embedding"),
    (dict(peft_type="c3a", quant="nf4"), "bitsandbytes"),
    (dict(peft_type="c3a", backend="unsloth"), "peft backend"),
])
def test_what_c3a_is_not_planned_with_is_one_line(extra, needle):
    with pytest.raises(QPlanError) as e:
        plan_dict(**{"model": "llama-3.2-1b", **extra})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_plan_is_re_made_from_its_own_sections():
    """``plan_settings`` reads a C3A plan back (its block size too), so an unsealed plan is not "edited"."""
    from qplan.planner.api import plan_settings

    for options in (dict(), dict(block_size=64, targets="all-linear")):
        plan = plan_dict(model="llama-3.2-1b", peft_type="c3a", quant="bf16", **options)
        again = plan_dict(**plan_settings(plan))
        assert again["c3a"] == plan["c3a"] and again["prediction"] == plan["prediction"]
