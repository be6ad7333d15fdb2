"""VeRA (``--peft-type vera``): PEFT's ``VeraConfig``, shared frozen random projections and two fp32 vectors per module.

Oracles: PEFT itself — ``get_nb_trainable_parameters`` (trainable and total: the projections are buffers) and the
vectors' dtype on a meta-device model, the adapter file its ``save_pretrained`` writes (projections included); the
traced training step (every phase); FlopCounterMode's count. The CPU run is in tests/backends/test_vera_run.py; PEFT's
GPU run in tests/planner/test_peft_evidence.py. No expected value comes from qplan's formulas.
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
)

from qplan.planner.api import plan_dict
from qplan.planner.errors import QPlanError


def test_the_default_targets_are_peft_s():
    pytest.importorskip("peft")
    from peft.utils import constants

    from qplan.planner.model.loha import lora_family_defaults
    from qplan.planner.model.vera import VeraSettings

    ours = {**lora_family_defaults(), **VeraSettings.default_overrides}
    assert ours == constants.TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING


@pytest.mark.parametrize("name,r,targets", [
    ("llama-3.2-1b", 16, None),  # PEFT's defaults: q_proj, v_proj
    ("llama-3.2-3b", 256, "q_proj,v_proj"),  # PEFT's benchmark run
    ("qwen3-0.6b", 32, "all-linear"),  # projections sized for the widest module
    ("gemma-2-9b", 8, "attn"),
    ("phi-4", 16, "qkv_proj,o_proj"),
    ("gpt-oss-20b", 8, "q_proj,k_proj,v_proj,o_proj"),
    ("deepseek-v2-lite", 8, "q_proj,o_proj"),
])
def test_the_trainable_count_total_and_dtype_are_peft_s(name, r, targets):
    pytest.importorskip("peft")
    plan = plan_dict(model=name, peft_type="vera", r=r, quant="bf16", **({"targets": targets} if targets else {}))
    assert_counts_are_peft_s(plan, name, buffers=".vera_")  # the shared projections: buffers on the device
    assert plan["method"] == "vera"


def test_the_adapter_file_is_peft_s_to_the_byte(tmp_path):
    pytest.importorskip("peft")
    assert_adapter_file_is_peft_s(tmp_path, TINY_LLAMA, peft_type="vera", r=8, targets="all-linear", quant="bf16")


#: trace_checks' settings and Gemma-2 with checkpointing
CASES = [*ADAPTER_CASES, dict(model="gemma-2-9b", quant="bf16", targets="attn")]


@pytest.mark.parametrize("options", CASES, ids=range(len(CASES)))
def test_every_phase_of_the_step_equals_the_traced_step(options):
    assert_traced_step(peft_type="vera", r=64, batch_size=2, seq_len=256, **options)


@pytest.mark.parametrize("options", [dict(), dict(grad_ckpt=False), dict(targets="all-linear", grad_ckpt=False)],
                         ids=range(3))
def test_the_flops_are_what_the_flop_counter_counts(options):
    assert_flops_are_the_counter_s("vera", 64, **options)


@pytest.mark.parametrize("extra,needle", [
    (dict(peft_type="vera", alpha=8), "--alpha is a LoRA option"),
    (dict(peft_type="vera", dropout=0.1), "--dropout is a LoRA option"),
    (dict(peft_type="vera", targets="embed_tokens"), "VeRA target 'embed_tokens' is an embedding"),
    (dict(peft_type="vera", quant="nf4"), "bitsandbytes"),
    (dict(peft_type="vera", backend="unsloth"), "peft backend"),
    (dict(model="phi-4", peft_type="vera"), "Please specify `target_modules`"),
])
def test_what_vera_is_not_planned_with_is_one_line(extra, needle):
    with pytest.raises(QPlanError) as e:
        plan_dict(**{"model": "llama-3.2-1b", **extra})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
