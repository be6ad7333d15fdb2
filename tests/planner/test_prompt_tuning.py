"""Prompt tuning (``--peft-type prompt_tuning``): PEFT's ``PromptTuningConfig``, one fp32 prompt of
``num_virtual_tokens × hidden_size`` prepended to every row; and p-tuning (``--peft-type p_tuning``), whose prompt an
fp32 MLP makes (``PromptEncoderConfig``).

Oracles: PEFT itself — ``get_nb_trainable_parameters``, the prompt's dtype and ``token_dim`` on a meta-device model of
every bundled model type, and the adapter file its ``save_pretrained`` writes; the traced training step (PEFT's own
forward on the meta device with the CUDA kernels' allocations: every phase); FlopCounterMode's count. The CPU run is in
tests/backends/test_prompt_tuning_run.py; PEFT's three GPU runs in tests/planner/test_peft_evidence.py. No expected
value comes from qplan's formulas.
"""

from __future__ import annotations

import pytest
from trace_checks import TINY_LLAMA, assert_adapter_file_is_peft_s, assert_plan_is_the_trace, assert_traced_step

from qplan.planner.api import plan_dict
from qplan.planner.errors import QPlanError
from qplan.planner.model.catalog import load_spec

#: one bundled spec per model type (dense, MoE, fused projections, softcapped, MLA)
SPECS = ["llama-3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b", "gemma-2-9b", "phi-4", "mistral-nemo-12b", "gpt-oss-20b",
         "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite"]


#: each method's own options
METHODS = {"prompt_tuning": dict(num_virtual_tokens=24), "p_tuning": dict(num_virtual_tokens=24, encoder_hidden_size=96)}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", SPECS)
def test_the_trainable_count_dtype_and_width_are_peft_s(name, method):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from qplan.hf import method_config, model_from_config

    plan = plan_dict(model=name, peft_type=method, quant="bf16", **METHODS[method])
    model = model_from_config(load_spec(name).config, dtype="bf16", device="meta")
    pm = get_peft_model(model, method_config(method, plan[method]))
    trainable, total = pm.get_nb_trainable_parameters()
    params = plan["prediction"]["params"]
    assert params["trainable"] == trainable and params["total"] == total
    trained = [p for p in pm.parameters() if p.requires_grad]
    assert plan["prediction"]["memory"]["adapters"] == sum(p.numel() * p.element_size() for p in trained)
    assert plan[method]["token_dim"] == pm.peft_config["default"].token_dim
    assert plan["lora"] is None and plan["method"] == method


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_adapter_file_is_peft_s_to_the_byte(tmp_path, method):
    """PEFT saves the prompt (p-tuning: the MLP's output, not the MLP)."""
    pytest.importorskip("peft")
    assert_adapter_file_is_peft_s(tmp_path, TINY_LLAMA, peft_type=method, quant="fp32",
                                  **{**METHODS[method], "num_virtual_tokens": 7})


CASES = [  # PEFT's harness (pure bf16, no checkpointing), bf16 autocast with checkpointing, reentrant checkpointing,
    # fp32 weights under autocast without checkpointing (layer 0's fp32 norm saves the model's input), softcapped
    # Gemma-2 under eager attention with checkpointing, fp32 weights with checkpointing
    dict(model="llama-3.2-1b", quant="bf16", compute_dtype="fp32", grad_ckpt=False),
    dict(model="llama-3.2-1b", quant="bf16"),
    dict(model="qwen3-0.6b", quant="bf16", reentrant=True),
    dict(model="llama-3.2-1b", quant="fp32", compute_dtype="bf16", grad_ckpt=False),
    dict(model="gemma-2-9b", quant="bf16"),
    dict(model="smollm2-135m", quant="fp32"),
]


@pytest.mark.parametrize("options", CASES, ids=range(len(CASES)))
def test_every_phase_of_the_step_equals_the_traced_step(options):
    assert_traced_step(peft_type="prompt_tuning", num_virtual_tokens=20, batch_size=2, seq_len=256, **options)


@pytest.mark.parametrize("options", CASES[:4], ids=range(4))
def test_every_phase_of_a_p_tuning_step_equals_the_traced_step(options):
    """The MLP's saved inputs and, under autocast, its cached weight casts live until its backward, the step's last."""
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan

    plan = plan_dict(peft_type="p_tuning", num_virtual_tokens=20, encoder_hidden_size=1024, batch_size=2, seq_len=256,
                     **options)
    traced = trace_plan(plan, steps=2)
    assert_plan_is_the_trace(plan, traced)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("ckpt", [True, False])
def test_the_flops_are_what_the_flop_counter_counts(ckpt, method):
    """The model runs on seq_len + virtual tokens, layer 0's input gradient included; p-tuning's MLP over one row of
    the virtual tokens (FlopCounterMode's count)."""
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan

    plan = plan_dict(model="llama-3.2-1b", peft_type=method, quant="bf16", batch_size=2, seq_len=256, grad_ckpt=ckpt,
                     **{**METHODS[method], "num_virtual_tokens": 20})
    flops = plan["prediction"]["compute"]["flops_per_step"]
    assert flops["total"] == trace_plan(plan, steps=2, count_flops=True)["flops_per_step"][-1]


def test_the_virtual_tokens_lengthen_every_row_but_are_not_the_user_s_tokens():
    """The step's cost grows with the prompt; the throughput counts the data's tokens (as PEFT's harness does)."""
    base = dict(model="llama-3.2-1b", quant="bf16", batch_size=2, seq_len=256, gpu="l40s")
    short = plan_dict(peft_type="prompt_tuning", num_virtual_tokens=1, **base)
    long = plan_dict(peft_type="prompt_tuning", num_virtual_tokens=256, **base)
    assert long["prediction"]["memory"]["tensor_peak"] > short["prediction"]["memory"]["tensor_peak"]
    t_short, t_long = short["prediction"]["time"], long["prediction"]["time"]
    assert t_long["step_seconds"] > t_short["step_seconds"]
    assert t_long["tokens_per_second"] * t_long["step_seconds"] == pytest.approx(2 * 256)
    assert long["training"]["seq_len"] == 256 and "virtual_tokens" not in long["training"]


@pytest.mark.parametrize("extra,needle", [
    (dict(peft_type="prompt_tuning"), "needs --num-virtual-tokens"),
    (dict(num_virtual_tokens=8), "--peft-type prompt_tuning"),
    (dict(peft_type="ia3", quant="bf16", num_virtual_tokens=8), "--peft-type prompt_tuning"),
    (dict(peft_type="prompt_tuning", num_virtual_tokens=8, feedforward_modules="down_proj"), "--peft-type ia3"),
    (dict(peft_type="prompt_tuning", num_virtual_tokens=8, r=8), "--r is a LoRA option"),
    (dict(peft_type="prompt_tuning", num_virtual_tokens=8, targets="q_proj"), "--targets is a LoRA option"),
    (dict(peft_type="prompt_tuning", num_virtual_tokens=8, quant="nf4"), "bitsandbytes"),
    (dict(peft_type="prompt_tuning", num_virtual_tokens=8, backend="unsloth"), "peft backend"),
    (dict(peft_type="prompt_tuning", num_virtual_tokens=8, gpus=2), "several GPUs"),
    (dict(peft_type="prompt_tuning", num_virtual_tokens=8, optimizer="lorafa"), "LoRA-FA"),
    (dict(peft_type="prompt_tuning", num_virtual_tokens=8, loss="cce"), "--loss cce"),
    (dict(peft_type="prompt_tuning", num_virtual_tokens=8, full=True), "--full"),
    (dict(peft_type="prompt_tuning", num_virtual_tokens=8, seq_len=131072), "virtual tokens exceeds"),
    (dict(peft_type="prompt_tuning", num_virtual_tokens=0), "num-virtual-tokens"),
    (dict(peft_type="prompt_tuning", num_virtual_tokens=8, encoder_hidden_size=64), "--peft-type p_tuning"),
    (dict(peft_type="p_tuning", num_virtual_tokens=8), "needs --encoder-hidden-size"),
    (dict(peft_type="p_tuning", encoder_hidden_size=64), "needs --num-virtual-tokens"),
    (dict(peft_type="p_tuning", num_virtual_tokens=8, encoder_hidden_size=64, quant="int8"), "bitsandbytes"),
])
def test_what_prompt_tuning_is_not_planned_with_is_one_line(extra, needle):
    with pytest.raises(QPlanError) as e:
        plan_dict(**{"model": "llama-3.2-1b", **extra})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_prompt_tuning_with_data_is_refused_in_one_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n', encoding="utf-8")
    with pytest.raises(QPlanError, match="not planned yet"):
        plan_dict(model="llama-3.2-1b", peft_type="prompt_tuning", num_virtual_tokens=8, data=str(data))
