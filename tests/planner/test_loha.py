"""LoHa (``--peft-type loha``): PEFT's ``LoHaConfig``, four fp32 factors per module whose Hadamard product is a full
weight update built at every forward.

Oracles: PEFT itself — its default targets, ``get_nb_trainable_parameters`` and the factors' dtype on a meta-device
model, the adapter file its ``save_pretrained`` writes; the traced training step (PEFT's LoHa layers and
``HadaWeight`` on the meta device with the CUDA kernels' allocations: every phase); FlopCounterMode's count. The CPU
run is in tests/backends/test_loha_run.py; PEFT's GPU run in tests/planner/test_peft_evidence.py. No expected value
comes from qplan's formulas.
"""

from __future__ import annotations

from pathlib import Path

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
from qplan.planner.model.loha import lora_family_defaults


def test_the_default_targets_are_peft_s():
    pytest.importorskip("peft")
    from peft.utils import constants

    assert lora_family_defaults() == constants.TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING
    assert lora_family_defaults() == constants.TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING


@pytest.mark.parametrize("name,r,targets", [
    ("llama-3.2-1b", 8, None),  # PEFT's defaults: q_proj, v_proj
    ("qwen3-0.6b", 16, "all-linear"),
    ("gemma-2-9b", 4, "attn"),
    ("phi-4", 8, "qkv_proj,o_proj"),  # fused projections, no PEFT default for phi3
    ("mistral-nemo-12b", 32, None),
    ("gpt-oss-20b", 8, "q_proj,k_proj,v_proj,o_proj"),
    ("qwen3-30b-a3b", 8, "q_proj,v_proj"),
    ("deepseek-v2-lite", 8, "q_proj,o_proj"),
])
def test_the_trainable_count_and_dtype_are_peft_s(name, r, targets):
    pytest.importorskip("peft")
    plan = plan_dict(model=name, peft_type="loha", r=r, quant="bf16", **({"targets": targets} if targets else {}))
    assert_counts_are_peft_s(plan, name)
    assert plan["method"] == "loha"


def test_the_adapter_file_is_peft_s_to_the_byte(tmp_path):
    pytest.importorskip("peft")
    assert_adapter_file_is_peft_s(tmp_path, TINY_LLAMA, peft_type="loha", r=4, targets="all-linear", quant="bf16")


#: trace_checks' settings and Gemma-2 with checkpointing
CASES = [*ADAPTER_CASES, dict(model="gemma-2-9b", quant="bf16", targets="attn")]


@pytest.mark.parametrize("options", CASES, ids=range(len(CASES)))
def test_every_phase_of_the_step_equals_the_traced_step(options):
    assert_traced_step(peft_type="loha", r=8, batch_size=2, seq_len=256, **options)


@pytest.mark.parametrize("targets,batch,seq", [("all-linear", 1, 64), ("mlp", 1, 64), ("all-linear", 2, 128)])
def test_a_layer_s_backward_holds_the_update_s_gradient_and_hadaweight_s_products(targets, batch, seq):
    """A tiny vocabulary with checkpointing: the peak is inside a layer's backward, where the down projection's
    ``HadaWeight.backward`` holds its update's gradient, its scaled copy and fp32 products of the update's size. The
    plan takes the whole recomputed layer as alive then; the trace has freed some of it: the plan is above the trace,
    by up to 10% on this toy model (a known over-estimate of that moment, safe-sided)."""
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan

    tiny = Path(__file__).resolve().parents[1] / "backends" / "data" / "tiny-llama.json"
    plan = plan_dict(model=str(tiny), peft_type="loha", r=8, targets=targets, quant="bf16", batch_size=batch,
                     seq_len=seq)
    traced = trace_plan(plan, steps=2)
    assert plan["prediction"]["memory_detail"]["peak_phase"] in ("layers", "layers_last")
    assert 0 <= plan["prediction"]["memory"]["tensor_peak"] - traced["tensor_peak"] <= 0.10 * traced["tensor_peak"]


@pytest.mark.parametrize("options", [dict(), dict(grad_ckpt=False), dict(reentrant=True),
                                     dict(targets="all-linear", grad_ckpt=False)], ids=range(4))
def test_the_flops_are_what_the_flop_counter_counts(options):
    assert_flops_are_the_counter_s("loha", 8, **options)


@pytest.mark.parametrize("extra,needle", [
    (dict(peft_type="loha", dropout=0.1), "--dropout is a LoRA option"),
    (dict(peft_type="loha", dora=True), "--dora is a LoRA option"),
    (dict(peft_type="loha", targets="embed_tokens"), "embedding"),
    (dict(peft_type="loha", targets="foo"), "matches no linear module"),
    (dict(peft_type="loha", quant="nf4"), "bitsandbytes"),
    (dict(peft_type="loha", backend="unsloth"), "peft backend"),
    (dict(peft_type="loha", gpus=2), "several GPUs"),
    (dict(peft_type="loha", optimizer="lorafa"), "LoRA-FA"),
    (dict(model="phi-4", peft_type="loha"), "Please specify `target_modules`"),
])
def test_what_loha_is_not_planned_with_is_one_line(extra, needle):
    with pytest.raises(QPlanError) as e:
        plan_dict(**{"model": "llama-3.2-1b", **extra})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
