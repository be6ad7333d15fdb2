"""LN tuning (``--peft-type ln_tuning``): PEFT's ``LNTuningConfig``, a trained copy of each targeted norm in the
norm's own dtype.

Oracles: PEFT itself — its per-model-type defaults, ``get_nb_trainable_parameters`` (trainable and total) and the
copies' dtype on a meta-device model, the adapter file its ``save_pretrained`` writes; the traced training step
(PEFT's ``LNTuningLayer`` on the meta device with the CUDA kernels' allocations: every phase, where layer 0's gradient
starts at each kind of norm); FlopCounterMode's count. The CPU run is in tests/backends/test_ln_tuning_run.py; PEFT's
GPU run in tests/planner/test_peft_evidence.py. No expected value comes from qplan's formulas.
"""

from __future__ import annotations

import pytest
from trace_checks import TINY_LLAMA, assert_adapter_file_is_peft_s, assert_counts_are_peft_s, assert_traced_step

from qplan.planner.api import plan_dict
from qplan.planner.errors import QPlanError
from qplan.planner.model.ln_tuning import ln_tuning_defaults


def test_the_default_targets_are_peft_s():
    pytest.importorskip("peft")
    from peft.utils import constants

    assert ln_tuning_defaults() == constants.TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING


@pytest.mark.parametrize("name,targets", [
    ("llama-3.2-1b", None),  # PEFT's defaults: input, post-attention and final norms
    ("qwen2.5-0.5b", None),  # post-attention norms only
    ("qwen3-0.6b", None),
    ("gemma-2-9b", None),  # four norms per layer
    ("mistral-nemo-12b", None),
    ("qwen3-0.6b", "q_norm,k_norm,norm"),
    ("phi-4", "input_layernorm,post_attention_layernorm"),  # no PEFT default for phi3
    ("qwen3-30b-a3b", "post_attention_layernorm,norm"),
    ("gpt-oss-20b", "input_layernorm"),
    ("mixtral-8x7b", "input_layernorm,post_attention_layernorm"),
    ("deepseek-v2-lite", "input_layernorm"),
])
def test_the_trainable_count_total_and_dtype_are_peft_s(name, targets):
    pytest.importorskip("peft")
    plan = plan_dict(model=name, peft_type="ln_tuning", quant="bf16", **({"targets": targets} if targets else {}))
    assert_counts_are_peft_s(plan, name)
    assert plan["method"] == "ln_tuning"


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_the_adapter_file_is_peft_s_to_the_byte(tmp_path, model_type):
    pytest.importorskip("peft")
    assert_adapter_file_is_peft_s(tmp_path, {**TINY_LLAMA, "model_type": model_type}, peft_type="ln_tuning", quant="bf16")


CASES = [  # PEFT's harness (pure bf16, no checkpointing), checkpointing, reentrant checkpointing, fp32 weights under
    # autocast, layer 0's gradient starting at its post-attention norm (Qwen's default, Llama's by --targets) and at
    # its q/k norms (without and with autocast), Gemma-2's four norms, fp32 weights with checkpointing
    dict(model="llama-3.2-1b", quant="bf16", compute_dtype="fp32", grad_ckpt=False),
    dict(model="llama-3.2-1b", quant="bf16"),
    dict(model="qwen3-0.6b", quant="bf16", reentrant=True),
    dict(model="llama-3.2-1b", quant="fp32", compute_dtype="bf16", grad_ckpt=False),
    dict(model="qwen3-0.6b", quant="bf16", grad_ckpt=False),
    dict(model="qwen3-0.6b", quant="fp32", compute_dtype="bf16", grad_ckpt=False),
    dict(model="llama-3.2-1b", quant="bf16", grad_ckpt=False, targets="post_attention_layernorm"),
    dict(model="qwen3-0.6b", quant="bf16", grad_ckpt=False, targets="q_norm,k_norm"),
    dict(model="qwen3-0.6b", quant="fp32", compute_dtype="bf16", grad_ckpt=False, targets="q_norm,k_norm"),
    dict(model="gemma-2-9b", quant="bf16"),
    dict(model="smollm2-135m", quant="fp32"),
]


@pytest.mark.parametrize("options", CASES, ids=range(len(CASES)))
def test_every_phase_of_the_step_equals_the_traced_step(options):
    assert_traced_step(peft_type="ln_tuning", batch_size=2, seq_len=256, **options)


@pytest.mark.parametrize("options", [dict(), dict(grad_ckpt=False), dict(model="qwen3-0.6b", grad_ckpt=False),
                                     dict(model="qwen3-0.6b", grad_ckpt=False, targets="q_norm,k_norm")],
                         ids=range(4))
def test_the_flops_are_what_the_flop_counter_counts(options):
    """The frozen model's matmuls, with the gradient flowing down to layer 0's lowest trained norm."""
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan

    plan = plan_dict(**{"model": "llama-3.2-1b", "peft_type": "ln_tuning", "quant": "bf16", "batch_size": 2,
                        "seq_len": 256, **options})
    flops = plan["prediction"]["compute"]["flops_per_step"]
    assert flops["total"] == trace_plan(plan, steps=2, count_flops=True)["flops_per_step"][-1]


@pytest.mark.parametrize("extra,needle", [
    (dict(peft_type="ln_tuning", r=8), "--r is a LoRA option"),
    (dict(peft_type="ln_tuning", targets="norm"), "final norm alone"),
    (dict(peft_type="ln_tuning", targets="q_proj"), "a linear layer or an embedding"),
    (dict(peft_type="ln_tuning", targets="embed_tokens"), "a linear layer or an embedding"),
    (dict(peft_type="ln_tuning", targets="foo"), "matches no norm"),
    (dict(model="deepseek-v2-lite", peft_type="ln_tuning", targets="kv_a_layernorm"), "kv_a_layernorm is not planned"),
    (dict(model="gemma-2-9b", peft_type="ln_tuning", targets="post_attention_layernorm"), "without input_layernorm"),
    (dict(model="phi-4", peft_type="ln_tuning"), "Please specify `target_modules`"),
    (dict(peft_type="ln_tuning", quant="nf4"), "bitsandbytes"),
    (dict(peft_type="ln_tuning", backend="unsloth"), "peft backend"),
    (dict(peft_type="ln_tuning", gpus=2), "several GPUs"),
    (dict(peft_type="ln_tuning", optimizer="lorafa"), "LoRA-FA"),
    (dict(peft_type="ln_tuning", num_virtual_tokens=4), "--peft-type prompt_tuning"),
])
def test_what_ln_tuning_is_not_planned_with_is_one_line(extra, needle):
    with pytest.raises(QPlanError) as e:
        plan_dict(**{"model": "llama-3.2-1b", **extra})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
