"""LoKr (``--peft-type lokr``): PEFT's ``LoKrConfig``, Kronecker factors per module whose product is a full weight
update built at every forward.

Oracles: PEFT itself — its ``factorization``, ``get_nb_trainable_parameters`` and the factors' dtype on a meta-device
model, the adapter file its ``save_pretrained`` writes; the traced training step (PEFT's LoKr layers on the meta
device with the CUDA kernels' allocations: every phase); FlopCounterMode's count. The CPU run is in
tests/backends/test_loha_run.py; PEFT's GPU run in tests/planner/test_peft_evidence.py. No expected value comes from
qplan's formulas.
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
from qplan.planner.model.lokr import factorization


def test_the_factorization_is_peft_s():
    pytest.importorskip("peft")
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in (1, 7, 64, 127, 128, 512, 896, 1024, 1536, 2048, 2880, 3072, 3584, 5120, 8192, 11008, 14336, 151936):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 100):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("name,r,targets,factor", [
    ("llama-3.2-1b", 8, None, None),  # PEFT's defaults: q_proj, v_proj; factors near the square root
    ("llama-3.2-3b", 32, "q_proj,v_proj", 4),  # PEFT's benchmark run
    ("qwen3-0.6b", 16, "all-linear", None),
    ("gemma-2-9b", 4, "attn", 8),
    ("phi-4", 64, "qkv_proj,o_proj", None),  # r above half a factor: w2 whole
    ("gpt-oss-20b", 8, "q_proj,k_proj,v_proj,o_proj", None),
    ("deepseek-v2-lite", 8, "q_proj,o_proj", 16),
])
def test_the_trainable_count_and_dtype_are_peft_s(name, r, targets, factor):
    pytest.importorskip("peft")
    plan = plan_dict(model=name, peft_type="lokr", r=r, quant="bf16", **({"targets": targets} if targets else {}),
                     **({"decompose_factor": factor} if factor else {}))
    assert_counts_are_peft_s(plan, name)
    assert plan["method"] == "lokr"


def test_the_adapter_file_is_peft_s_to_the_byte(tmp_path):
    pytest.importorskip("peft")
    assert_adapter_file_is_peft_s(tmp_path, TINY_LLAMA, peft_type="lokr", r=2, targets="all-linear", quant="bf16")


#: trace_checks' settings and PEFT's factor 4
CASES = [*ADAPTER_CASES, dict(model="llama-3.2-1b", quant="bf16", compute_dtype="fp32", grad_ckpt=False, decompose_factor=4)]


@pytest.mark.parametrize("options", CASES, ids=range(len(CASES)))
def test_every_phase_of_the_step_equals_the_traced_step(options):
    assert_traced_step(peft_type="lokr", r=8, batch_size=2, seq_len=256, **options)


@pytest.mark.parametrize("targets,batch,seq", [("all-linear", 1, 64), ("mlp", 1, 64), ("all-linear", 2, 128)])
def test_a_layer_s_backward_moment_is_planned_above_the_trace(targets, batch, seq):
    """A tiny vocabulary with checkpointing: the peak is inside a layer's backward or recomputation, around the down
    projection's update (its gradient, ``kron``'s broadcast products; under autocast the input's fp32 copy). The plan
    takes the whole recomputed layer as alive at one moment, which the trace has partly freed: above it, by up to
    12% on this toy model (a known over-estimate of that moment, safe-sided)."""
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan

    tiny = Path(__file__).resolve().parents[1] / "backends" / "data" / "tiny-llama.json"
    plan = plan_dict(model=str(tiny), peft_type="lokr", r=8, targets=targets, quant="bf16", batch_size=batch,
                     seq_len=seq)
    traced = trace_plan(plan, steps=2)
    assert plan["prediction"]["memory_detail"]["peak_phase"] in ("layers", "layers_last")
    assert 0 <= plan["prediction"]["memory"]["tensor_peak"] - traced["tensor_peak"] <= 0.12 * traced["tensor_peak"]


@pytest.mark.parametrize("options", [dict(), dict(grad_ckpt=False), dict(targets="all-linear", grad_ckpt=False),
                                     dict(targets="all-linear", decompose_factor=4)], ids=range(4))
def test_the_flops_are_what_the_flop_counter_counts(options):
    assert_flops_are_the_counter_s("lokr", 8, **options)


@pytest.mark.parametrize("extra,needle", [
    (dict(peft_type="lokr", dropout=0.1), "--dropout is a LoRA option"),
    (dict(peft_type="lokr", targets="embed_tokens"), "LoKr target 'embed_tokens' is an embedding"),
    (dict(peft_type="lokr", quant="nf4"), "bitsandbytes"),
    (dict(peft_type="lokr", backend="unsloth"), "peft backend"),
    (dict(peft_type="loha", decompose_factor=4), "--peft-type lokr"),
    (dict(decompose_factor=4), "--peft-type lokr"),
    (dict(peft_type="lokr", decompose_factor=0), "--decompose-factor 0"),
])
def test_what_lokr_is_not_planned_with_is_one_line(extra, needle):
    with pytest.raises(QPlanError) as e:
        plan_dict(**{"model": "llama-3.2-1b", **extra})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
