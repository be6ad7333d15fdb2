"""MiSS (``--peft-type miss``): PEFT's ``MissConfig``, one block per module (``true``/``false``: ``(r, out)``;
``mini``: ``(r, mini_r)`` repeated along the output; ``bat``: ``(out/r, r, r)``, the whole weight rebuilt every
forward).

Oracles: PEFT itself — ``get_nb_trainable_parameters`` and the block's dtype on a meta-device model, the adapter file
its ``save_pretrained`` writes; the traced training step (every phase); FlopCounterMode's count; the traced kernel
launches. The CPU run is in tests/backends/test_miss_run.py; PEFT's GPU runs in tests/planner/test_peft_evidence.py.
No expected value comes from qplan's formulas.
"""

from __future__ import annotations

import pytest
from trace_checks import (
    ADAPTER_CASES,
    TINY_LLAMA,
    assert_adapter_file_is_peft_s,
    assert_counts_are_peft_s,
    assert_flops_are_the_counter_s,
    assert_traced_step,
    toy_peak_error,
)

from qplan.planner.api import plan_dict
from qplan.planner.errors import QPlanError


def test_the_default_targets_are_peft_s():
    pytest.importorskip("peft")
    from peft.utils import constants

    from qplan.planner.model.loha import lora_family_defaults

    assert lora_family_defaults() == constants.TRANSFORMERS_MODELS_TO_MISS_TARGET_MODULES_MAPPING


@pytest.mark.parametrize("name,options", [
    ("llama-3.2-1b", dict()),  # PEFT's defaults: q_proj, v_proj
    ("llama-3.2-3b", dict(r=64, targets="q_proj,v_proj")),  # PEFT's benchmark run
    ("llama-3.2-3b", dict(r=64, targets="q_proj,v_proj", miss_init="mini", mini_r=64)),  # and its mini run
    ("llama-3.2-3b", dict(r=64, targets="q_proj,v_proj", miss_init="bat")),  # and its bat run
    ("qwen3-0.6b", dict(r=64, targets="all-linear", miss_init="bat")),
    ("qwen3-0.6b", dict(r=32, targets="all-linear", miss_init="false")),
    ("gemma-2-9b", dict(r=8, targets="attn", miss_init="mini", mini_r=8)),
    ("phi-4", dict(r=16, targets="qkv_proj,o_proj")),
    ("gpt-oss-20b", dict(r=8, targets="q_proj,k_proj,v_proj,o_proj")),
    ("deepseek-v2-lite", dict(r=8, targets="q_proj,o_proj")),
])
def test_the_trainable_count_total_and_dtype_are_peft_s(name, options):
    pytest.importorskip("peft")
    plan = plan_dict(model=name, peft_type="miss", quant="bf16", **options)
    assert_counts_are_peft_s(plan, name)
    assert plan["method"] == "miss"


@pytest.mark.parametrize("options", [dict(), dict(miss_init="mini", mini_r=16), dict(miss_init="bat")],
                         ids=["default", "mini", "bat"])
def test_the_adapter_file_is_peft_s_to_the_byte(tmp_path, options):
    pytest.importorskip("peft")
    assert_adapter_file_is_peft_s(tmp_path, TINY_LLAMA, peft_type="miss", r=8, targets="all-linear", quant="bf16",
                                  **options)


#: trace_checks' settings; MiSS-mini; fp32 weights under autocast with the MLP adapted (MiSS returns its input's dtype,
#: fp32, to the MLP); an input width r does not divide (PEFT pads it); Gemma-2 with checkpointing
CASES = [*ADAPTER_CASES,
         dict(model="llama-3.2-1b", quant="bf16", compute_dtype="fp32", grad_ckpt=False, targets="all-linear",
              miss_init="mini", mini_r=32),
         dict(model="llama-3.2-1b", quant="fp32", compute_dtype="bf16", grad_ckpt=False, miss_init="mini", mini_r=32),
         dict(model="llama-3.2-1b", quant="fp32", compute_dtype="bf16", grad_ckpt=False, targets="all-linear"),
         dict(model="llama-3.2-1b", quant="bf16", compute_dtype="fp32", grad_ckpt=False, targets="all-linear", r=48),
         dict(model="gemma-2-9b", quant="bf16", targets="attn")]
#: MiSS-bat: its rebuilt weights (their blocks' copy, the weight, the input's fp32 copy) in the same settings, and fp32
#: weights under autocast with every linear layer (their base layers never run: no autocast copy of them)
BAT_CASES = [*({**c, "miss_init": "bat"} for c in ADAPTER_CASES),
             dict(model="llama-3.2-1b", quant="fp32", compute_dtype="bf16", grad_ckpt=False, targets="all-linear",
                  miss_init="bat"),
             dict(model="gemma-2-9b", quant="bf16", targets="attn", miss_init="bat")]
CASES = CASES + BAT_CASES


@pytest.mark.parametrize("options", CASES, ids=range(len(CASES)))
def test_every_phase_of_the_step_equals_the_traced_step(options):
    assert_traced_step(**{"peft_type": "miss", "r": 64, "batch_size": 2, "seq_len": 256, **options})


@pytest.mark.parametrize("options", [dict(), dict(grad_ckpt=False), dict(targets="all-linear", grad_ckpt=False),
                                     dict(targets="all-linear", miss_init="mini", mini_r=64),
                                     dict(miss_init="bat"), dict(targets="all-linear", miss_init="bat", reentrant=True)],
                         ids=range(6))
def test_the_flops_are_what_the_flop_counter_counts(options):
    assert_flops_are_the_counter_s("miss", 64, **options)


@pytest.mark.parametrize("options", [dict(quant="bf16", compute_dtype="fp32", grad_ckpt=False),
                                     dict(quant="bf16", targets="all-linear", miss_init="mini", mini_r=32),
                                     dict(quant="bf16", targets="all-linear", miss_init="bat")], ids=range(3))
def test_the_launches_are_within_tolerance_of_the_traced_step(options):
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan
    from qplan.planner.compute.ops import TOLERANCE

    plan = plan_dict(**{"model": "qwen3-0.6b", "peft_type": "miss", "r": 32, "batch_size": 1, "seq_len": 64, **options})
    traced = trace_plan(plan, steps=2)["kernel_launches"]
    predicted = plan["prediction"]["compute"]["kernel_launches_per_step"]
    t, p = traced["forward"] + traced["backward"], predicted["forward"] + predicted["backward"]
    assert abs(p - t) / t <= TOLERANCE, (traced, predicted)


@pytest.mark.parametrize("extra,needle", [
    (dict(peft_type="miss", alpha=8), "--alpha is a LoRA option"),
    (dict(peft_type="miss", dropout=0.1), "--dropout is a LoRA option"),
    (dict(peft_type="miss", miss_init="bat", r=48), "divisible by r=48"),
    (dict(peft_type="miss", miss_init="maybe"), "MissConfig.init_weights is one of"),
    (dict(peft_type="miss", miss_init=" "), "MissConfig.init_weights is one of"),
    (dict(peft_type="miss", mini_r=4), "give --miss-init mini"),
    (dict(peft_type="miss", miss_init="mini", mini_r=5), "out_features divisible by mini_r"),
    (dict(peft_type="miss", r=4096), "r <= in_features (2048)"),
    (dict(peft_type="lora", miss_init="mini"), "--miss-init is an option of miss"),
    (dict(peft_type="miss", targets="embed_tokens"), "MiSS target 'embed_tokens' is an embedding"),
    (dict(peft_type="miss", quant="nf4"), "bitsandbytes"),
    (dict(peft_type="miss", backend="unsloth"), "peft backend"),
])
def test_what_miss_is_not_planned_with_is_one_line(extra, needle):
    with pytest.raises(QPlanError) as e:
        plan_dict(**{"model": "llama-3.2-1b", **extra})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_plan_is_re_made_from_its_own_sections():
    """``plan_settings`` reads a MiSS plan back (its form and width too), so an unsealed plan is not "edited"."""
    from qplan.planner.api import plan_settings

    for options in (dict(r=32), dict(r=32, miss_init="mini", mini_r=16), dict(r=8, miss_init="false"),
                    dict(r=64, miss_init="bat")):
        plan = plan_dict(model="llama-3.2-1b", peft_type="miss", quant="bf16", **options)
        again = plan_dict(**plan_settings(plan))
        assert again["miss"] == plan["miss"] and again["prediction"] == plan["prediction"]


@pytest.mark.parametrize("options", [dict(targets="all-linear"), dict(targets="all-linear", grad_ckpt=False),
                                     dict(quant="fp32", compute_dtype="bf16", targets="all-linear"),
                                     dict(targets="q_proj,v_proj"), dict(targets="down_proj"),
                                     dict(targets="down_proj", grad_ckpt=False),
                                     dict(targets="gate_proj,up_proj", grad_ckpt=False)], ids=range(7))
def test_where_bat_s_rebuilt_weights_are_the_peak_the_plan_is_an_upper_bound(tmp_path, options):
    """Where a layer is the peak (a small vocabulary), MiSS-bat's weight-sized transients decide it: the plan counts the
    largest module's at every layer moment, an upper bound (at most 1% under the traced step, at most 25% over: the
    forward's rebuild counted beside the module's own saved weight and input without checkpointing)."""
    error = toy_peak_error(tmp_path, peft_type="miss", miss_init="bat", r=16, **options)[1]
    assert -0.01 <= error <= 0.25, error
