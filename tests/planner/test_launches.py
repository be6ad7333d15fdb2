"""Kernel launches per step (issue 31): ``planner.compute.ops.step_launches`` against the traced step.

The oracle is the trace of the step on the meta device (CUDA kernels mirrored): every ATen op it dispatches that
launches a kernel (``qplan.observe.tracker.launches_kernel``: not a view, alias or metadata query), counted over the
second of two steps, forward and backward (the optimizer phase runs torch's per-tensor loops on meta, foreach kernels
on CUDA). The count must be within ``TOLERANCE`` for each family and setting below: dense and mixture-of-experts,
quantized with checkpointing, pure 16-bit, DoRA, eager attention with softcapping, reentrant checkpointing
(the benchmark runs the whole grid).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from qplan.observe.trace import trace_plan
from qplan.planner.api import plan_dict
from qplan.planner.compute.ops import TOLERANCE

SMALL = dict(r=8, batch_size=1, seq_len=64)
PURE16 = dict(quant="bf16", compute_dtype="fp32", grad_ckpt=False, dropout=0.0)
CASES = [
    ("llama-3.2-1b", dict(targets="all-linear")),                                  # nf4, autocast, checkpointing
    ("llama-3.2-1b", dict(PURE16, targets="qv", dora=True)),                       # PEFT's harness, DoRA
    ("qwen3-0.6b", dict(targets="qv", dropout=0.1, reentrant=True)),               # q/k norms, reentrant
    ("gemma-2-9b", dict(PURE16, targets="mlp")),                                   # eager, softcapping, 4 norms
    ("qwen3-30b-a3b", dict(targets="attn", grad_ckpt=False)),                      # mixture of experts
    ("llama-3.2-1b", dict(full=True, r=16, quant="fp32")),                         # full fine-tuning, weight casts
]  # int8, phi-4, mixtral, gpt-oss, mistral and more: bench/op_counts.py (42 cases, reports/benchmarks/op-counts.md)


@pytest.mark.parametrize("model, options", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_launches_match_the_traced_step(model, options):
    plan = plan_dict(model=model, gpu="l40s", **{**SMALL, **options})
    traced = trace_plan(plan, steps=2)["kernel_launches"]
    predicted = plan["prediction"]["compute"]["kernel_launches_per_step"]
    t = traced["forward"] + traced["backward"]
    p = predicted["forward"] + predicted["backward"]
    assert abs(p - t) / t <= TOLERANCE, (traced, predicted)
    assert predicted["total"] == p + predicted["optimizer"]


def test_what_counts_as_a_launch():
    import torch

    from qplan.observe.tracker import launches_kernel

    aten = torch.ops.aten
    for op in (aten.mm.default, aten.add.Tensor, aten._to_copy.default, aten.native_dropout.default,
               aten._scaled_dot_product_flash_attention.default, aten.cat.default):
        assert launches_kernel(op), op
    for op in (aten.view.default, aten.t.default, aten.transpose.int, aten.expand.default, aten.slice.Tensor,
               aten._unsafe_view.default, aten.detach.default, aten.empty.memory_format, aten._local_scalar_dense.default):
        assert not launches_kernel(op), op
