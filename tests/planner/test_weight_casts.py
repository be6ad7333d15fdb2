"""Frozen 16/32-bit weights in another dtype than autocast's: every matmul casts its frozen weight anew (autocast
caches only casts of leaves that require grad) and saves the copy for the input gradient, so without checkpointing
each decoder layer keeps a compute-dtype copy of its weights, and the output head one of its own. The plan was 17%
(fp32 weights, bf16 autocast: the Trainer's default mixed precision on an fp32 load) to 28% (fp16 weights, bf16
autocast) low; the oracle is the meta trace of the same step (autocast emulated with torch's own cast lists)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from qplan.observe.trace import trace_plan
from qplan.planner.api import plan_dict


@pytest.mark.parametrize(("model", "quant", "compute", "targets"), [
    ("llama-3.2-1b", "fp32", "bf16", "all-linear"),
    ("llama-3.2-1b", "fp16", "bf16", "all-linear"),
    ("llama-3.2-1b", "bf16", "fp16", "qv"),      # layer 0: only what follows the first LoRA site keeps its copy
    ("qwen2.5-0.5b", "fp32", "fp16", "attn"),    # biases: cast but not saved
])
def test_frozen_weight_casts_without_checkpointing_are_the_traced_step(model, quant, compute, targets):
    plan = plan_dict(model=model, quant=quant, compute_dtype=compute, targets=targets, seq_len=512, batch_size=2,
                     grad_ckpt=False, gpu="a100-80gb")
    a, t = plan["prediction"]["memory"]["tensor_peak"], trace_plan(plan, steps=2)["tensor_peak"]
    assert abs(a - t) <= 1e-4 * t, (a, t)


def test_weights_in_the_compute_dtype_make_no_copies():
    same = plan_dict(model="llama-3.2-1b", quant="bf16", compute_dtype="bf16", grad_ckpt=False)
    other = plan_dict(model="llama-3.2-1b", quant="fp16", compute_dtype="bf16", grad_ckpt=False)
    # the same weights' bytes, a different dtype: the copies are what the activations gain
    gain = other["prediction"]["memory"]["activations"] - same["prediction"]["memory"]["activations"]
    params = other["prediction"]["params"]["base"]
    assert 0.9 * 2 * params < gain < 2 * params  # about one bf16 copy of every weight (the embeddings are not cast)
