"""LoRA-FA (``--optimizer lorafa``): PEFT's ``create_lorafa_optimizer`` freezes every ``lora_A`` and runs AdamW on
``lora_B`` with a projected gradient (PEFT's method comparison trains it: 3,670,016 trainable parameters, not LoRA's
9,175,040).

Oracles: PEFT's own ``get_nb_trainable_parameters`` after its own ``create_lorafa_optimizer`` on a model built on the
meta device; the traced training step (the real ``LoraFAOptimizer`` stepping, on the meta device with the CUDA kernels'
allocations: every phase of the step); torch's FlopCounterMode. The CPU run is in tests/backends/test_lorafa_run.py.
PEFT's GPU run is in tests/planner/test_peft_evidence.py. No expected value here comes from qplan's own formulas.
"""

from __future__ import annotations

import pytest
from trace_checks import assert_plan_is_the_trace

from qplan.planner.api import plan_dict
from qplan.planner.errors import QPlanError
from qplan.planner.model.catalog import load_spec


@pytest.mark.parametrize("name,targets", [("llama-3.2-1b", "all-linear"), ("qwen3-0.6b", "qv"), ("phi-4", "all-linear"),
                                          ("gemma-2-9b", "mlp"), ("llama-3.2-1b", "q_proj,embed_tokens")])
def test_the_trainable_count_is_peft_s_after_its_own_lorafa_optimizer(name, targets):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from qplan.hf import lora_config, model_from_config

    plan = plan_dict(model=name, r=16, targets=targets, optimizer="lorafa", dropout=0.0, quant="bf16")
    model = model_from_config(load_spec(name).config, dtype="bf16", device="meta")
    pm = get_peft_model(model, lora_config(plan["lora"]))
    from qplan.hf import peft_optimizer

    peft_optimizer(pm, "lorafa", plan["lora"], 1e-4)  # freezes lora_A
    trainable, total = pm.get_nb_trainable_parameters()
    params = plan["prediction"]["params"]
    assert params["trainable"] == trainable and params["total"] == total
    lora = plan_dict(model=name, r=16, targets=targets, dropout=0.0, quant="bf16")
    # the frozen A is still on the device: the adapter's bytes are LoRA's (gradients and states: the traced steps)
    assert plan["prediction"]["memory"]["adapters"] == lora["prediction"]["memory"]["adapters"]
    assert plan["prediction"]["memory"]["gradients"] == 4 * trainable


CASES = [  # PEFT's harness (pure bf16, no checkpointing), QLoRA with checkpointing, bf16 autocast with dropout and
    # layer 0 reading the embeddings, reentrant checkpointing with a trained lm_head copy
    dict(model="llama-3.2-1b", quant="bf16", compute_dtype="fp32", targets="qv", dropout=0.0, grad_ckpt=False),
    dict(model="llama-3.2-1b", quant="nf4", targets="all-linear"),
    dict(model="llama-3.2-1b", quant="bf16", targets="all-linear", grad_ckpt=False),
    dict(model="qwen3-0.6b", quant="bf16", targets="all-linear", dropout=0.0, reentrant=True, modules_to_save="lm_head"),
]


@pytest.mark.parametrize("options", CASES, ids=range(len(CASES)))
def test_every_phase_of_the_step_equals_the_traced_step(options):
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan

    plan = plan_dict(r=16, batch_size=2, seq_len=512, optimizer="lorafa", **options)
    # the step: the meta trace takes LoraFAOptimizer's branch without bf16 (its CPU autocast does not reach meta
    # tensors), whose projected gradient is fp32 from the start: one lora_B's 4 bytes per element above a bf16 GPU's
    traced = trace_plan(plan, steps=2)
    assert_plan_is_the_trace(plan, traced)


def test_an_embedding_s_lora_a_gets_a_gradient_and_no_state():
    """``lora_embedding_A`` is not frozen (``create_lorafa_optimizer`` freezes names holding ``lora_A``) and the
    optimizer, pairing it with ``lora_embedding_B``, never steps it: a gradient, no AdamW state (the traced step's)."""
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan

    plan = plan_dict(model="llama-3.2-1b", r=16, batch_size=2, seq_len=512, optimizer="lorafa", quant="nf4",
                     targets="q_proj,embed_tokens", grad_ckpt=False)
    traced = trace_plan(plan, steps=2)
    assert traced["trainable_params"] == plan["prediction"]["params"]["trainable"]
    mem, tp = plan["prediction"]["memory"], traced["phase_peaks"]
    assert mem["optimizer"] == traced["breakdown_at_peak"]["optimizer"]
    assert mem["adapters"] == traced["breakdown_at_peak"]["adapters"]
    assert abs(plan["prediction"]["memory_detail"]["phases"]["optimizer"] - tp["optimizer"]) <= 0.001 * tp["optimizer"]


def test_lorafa_saves_less_than_lora_and_its_flops_are_the_flop_counter_s():
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan

    opts = dict(model="llama-3.2-1b", r=16, batch_size=2, seq_len=512, quant="bf16", targets="all-linear",
                grad_ckpt=False)
    fa, lora = plan_dict(optimizer="lorafa", **opts), plan_dict(**opts)
    assert fa["prediction"]["memory"]["activations"] < lora["prediction"]["memory"]["activations"]
    flops = fa["prediction"]["compute"]["flops_per_step"]
    assert flops["lora"] < lora["prediction"]["compute"]["flops_per_step"]["lora"]
    assert flops["total"] == trace_plan(fa, steps=2, count_flops=True)["flops_per_step"][-1]


@pytest.mark.parametrize("extra,needle", [
    (dict(dora=True), "lora_magnitude_vector"),
    (dict(backend="unsloth"), "peft backend"),
    (dict(gpus=2, strategy="ddp"), "several GPUs"),
    (dict(adapter_dtype="bf16"), "fp32 adapters"),
    (dict(model="qwen3-30b-a3b", targets="q_proj", target_parameters="mlp.experts.gate_up_proj", dropout=0.0),
     "target-parameters"),
])
def test_what_lorafa_is_not_planned_with_is_one_line(extra, needle):
    opts = {"model": "llama-3.2-1b", "optimizer": "lorafa", **extra}
    with pytest.raises(QPlanError) as e:
        plan_dict(**opts)
    assert needle in str(e.value) and "\n" not in str(e.value)
