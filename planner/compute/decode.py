"""GRPO's generation in the step's compute (``--objective grpo``): FLOPs, bytes and kernel launches of the generation
batches of one optimizer step (transformers' ``generate`` as TRL 1.16's ``GRPOTrainer`` runs it; the memory is
``planner.memory.generation``'s).

Per generation batch of ``N`` rows, ``P`` prompt and ``C`` completion tokens:

* **prefill**: one forward without grad over the ``N P`` prompt tokens (the base projections, LoRA's and attention's
  forward: ``reference_forward_flops`` with the adapters), the head on the last position only (``2 N h V``);
* **decode**: ``C - 1`` forwards of one token a row. Decoding is memory-bound: each reads every stored weight and
  adapter once (``W``) and the KV cache so far (``2 L kv R N p`` bytes at ``p`` cached positions), so the bytes are
  ``(C - 1) W + 2 L kv R N (P + ... + P + C - 2)``; its FLOPs (``2 x`` parameters a token, and attention's) are counted;
* **launches**: each of the ``C`` forwards launches a forward's kernels (``ops.step_launches``' forward per micro-batch);
* **scoring** (``_generate_and_score_completions``, no grad, ``per_device_train_batch_size`` rows at a time over the
  ``N`` rows of ``P + C`` tokens): with ``beta > 0`` the reference (the adapters disabled), and when
  ``grad_accum % steps_per_generation != 0`` or under vLLM (its importance-sampling correction) the policy's old
  log-probabilities (``reference_forward_flops``). Their
  memory is not a moment of its own: no activation is kept, so each is below the training forward over as many rows.

A step runs ``grad_accum / steps_per_generation`` generation batches (one every ``steps_per_generation`` micro-batches;
the default, ``steps_per_generation = grad_accum``, is one per optimizer step). Not checked against a GPU run."""

from __future__ import annotations

from typing import Any

from qplan.planner.compute.flops import reference_forward_flops
from qplan.planner.memory.terms import TrainingSettings, dims
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import BYTES, QuantSettings


def generation_compute(spec: ModelSpec, counts: list[ModuleCount], r: int, q: QuantSettings, t: TrainingSettings,
                       weights: int, adapters: int, forward_launches: int, kv_dtype_bytes: int | None = None
                       ) -> dict[str, Any]:
    """FLOPs, bytes moved and kernel launches of one optimizer step's generation batches (the module docstring):
    ``weights``/``adapters``: the bytes each decode step reads (vLLM: its own copy, the adapters merged into it);
    ``forward_launches``: one micro-batch's forward (0 under vLLM's CUDA graphs); ``kv_dtype_bytes``: the cache's
    element (default: the weights' dtype, as transformers' generate keeps it; vLLM: 16-bit)."""
    g = t.grpo
    assert g is not None
    d = dims(spec)
    N, P, C = g.sequences(t.batch_size), g.prompt_length, g.max_completion_length
    per_step = t.grad_accum / g.steps_per_generation  # generation batches per optimizer step
    head_all = 2 * N * (P - 1) * d.h * d.V  # reference_forward_flops' head rows, of which generate scores the last
    prefill = reference_forward_flops(spec, counts, r, q, N, P, t.attn_impl, 1, adapters=True) - head_all
    prefill += 2 * N * d.h * d.V
    one = reference_forward_flops(spec, counts, r, q, N, 1, t.attn_impl, 1, adapters=True)  # a token a row, no cache
    kv_row = 2 * d.L * d.kv * (kv_dtype_bytes or BYTES[q.unquantized_dtype]) * N  # cache bytes a cached position
    steps = max(0, C - 1)
    attention = 4 * d.L * d.nh * d.hd * N * (steps * P + steps * (steps - 1) // 2)  # q k^T and p v over the cache
    scoring = 0
    if g.beta > 0:  # the reference's log-probabilities
        scoring += reference_forward_flops(spec, counts, r, q, N, P + C, t.attn_impl, 1)
    # the old policy's: when a generation batch spans optimizer steps, and under vLLM for its importance-sampling
    # correction (TRL's default: vllm_importance_sampling_correction)
    if t.grad_accum % g.steps_per_generation or g.vllm is not None:
        scoring += reference_forward_flops(spec, counts, r, q, N, P + C, t.attn_impl, 1, adapters=True)
    return {
        "flops": round((prefill + steps * (one + 2 * N * d.h * d.V) + attention + scoring) * per_step),
        "bytes": round((steps * (weights + adapters) + kv_row * (steps * P + steps * (steps - 1) // 2)) * per_step),
        "launches": round(C * forward_launches * per_step),
        "per_step": per_step,
    }
