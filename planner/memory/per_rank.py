"""A multi-GPU plan: the per-rank memory of ``planner.memory.sharding`` put into the phases of
``planner.memory.phases.MemoryModel`` and into the plan document (``distributed`` section; ``prediction.memory``
per rank; ``fits``/``headroom`` per GPU).  A single-GPU plan never comes here: it stays byte-identical.

Moments with FSDP2 (where its all-gathered parameters are alive; see ``planner.memory.sharding``):
``forward`` (the loss): the root unit and the last layer's all-gather output; ``backward`` (its start):
the root + one prefetched layer; ``attention``: the root + two decoder layers; ``layers`` (layer 0's
backward): the root + layer 0 + its unsharded gradients and the reduce-scatter input; ``layers_last``
(the last layer's backward, with checkpointing; ``fsdp_last_layer_backward_weights``): the root, the
layer and the next layer's prefetched all-gather; ``unshard``: layer 0's first all-gather beside the
root's; ``optimizer``: everything resharded.  DDP: its buckets in every moment.  ZeRO-2: the reduction
bucket in the backward moments; ZeRO-3: DeepSpeed's all-gathered working set in the forward and
backward moments.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qplan.planner.memory.full import full_layer_grads, grad_parts
from qplan.planner.memory.phases import MemoryModel
from qplan.planner.memory.sharding import (
    DistSettings,
    ddp_bucket_bytes,
    fsdp_all_gather_bytes,
    fsdp_first_unshard_bytes,
    lora_layer_bytes,
    rank_weights,
    sharded_counts,
    zero3_gathered_bytes,
    zero_model_states,
    zero_reduce_bucket_bytes,
)
from qplan.planner.memory.terms import (
    adapter_bytes,
    dims,
    gradient_bytes,
    optimizer_state_bytes,
    optimizer_step_temp_bytes,
    overhead_bytes,
)
from qplan.planner.model.full import is_full
from qplan.planner.model.weights import QuantSettings, weights_bytes

FORWARD_MOMENTS = ("forward", "backward", "layers", "layers_last", "attention", "mlp_forward", "embeddings", "reference",
                   "generation")


def engine_quant(q: QuantSettings, strategy: str) -> QuantSettings:
    """The quantization the engine trains with: DeepSpeed casts the module to its 16-bit dtype
    (``DeepSpeedEngine._configure_distributed_model``: ``module.bfloat16()``/``half()``), undoing
    ``prepare_model_for_kbit_training``'s fp32 upcast; DDP and FSDP2 keep the dtypes PEFT left."""
    if strategy in ("zero2", "zero3") and q.kbit and q.upcast_kbit:
        return QuantSettings(q.quant, q.double_quant, q.compute_dtype, False)
    return q


def rank_memory(spec, counts, lora_r, dropout, q: QuantSettings, t, dist: DistSettings, loss: str = "full",
                kernels: str = "cuda", calibration: dict | None = None, dora: bool = False) -> dict[str, Any]:
    """Per-rank phases, peak and terms of one plan under ``dist``."""
    W, strat = dist.shard_world, dist.shard_strategy  # hsdp: fsdp over a node's ranks
    full = is_full(counts)
    qe = engine_quant(q, strat)
    rw = rank_weights(spec, qe, W, strat)
    L = dims(spec).L
    host = 0
    resident = rw["sharded"] + rw["quant_state"] + rw["buffers"]
    if dist.cpu_offload and strat in ("fsdp", "zero3"):
        host += rw["sharded"]  # FSDP2 CPUOffloadPolicy / ZeRO-3 offload_param: parameter shards on the host
        resident -= rw["sharded"]
    mm = MemoryModel.build(spec, counts, lora_r, dropout, qe, t.grad_ckpt, t.optimizer, t.attn_impl, resident,
                           loss, kernels, t.padded, dora, t.liger_kernels, t.objective, t.grpo, t.grad_accum,
                           t.precompute_rows)
    extras = {m: {"weights": 0, "gradients": 0} for m in (*FORWARD_MOMENTS, "optimizer")}
    terms: dict[str, int] = {"weights_sharded": rw["sharded"], "quant_state_replicated": rw["quant_state"],
                             "buffers_replicated": rw["buffers"]}
    trainable = sum(n for c in counts for _, s in c.save_keys for n in [_numel(s)] for _ in range(c.instances))
    if strat == "ddp":
        bucket = ddp_bucket_bytes(mm.gradients)
        for m in extras:
            extras[m]["gradients"] += bucket
        terms["ddp_buckets"] = bucket
    elif strat == "fsdp":
        sc = sharded_counts(counts, W)
        a, g = adapter_bytes(sc), gradient_bytes(sc)
        opt = optimizer_state_bytes(sc, t.optimizer)
        o = opt["device"] + opt["paged"]
        if dist.cpu_offload:
            host += a + g + o  # CPUOffloadPolicy: sharded params, grads and the optimizer step on the CPU
            a = g = o = 0
        mm = dataclasses.replace(mm, adapters=a, gradients=g, optimizer=o, optimizer_paged=0 if dist.cpu_offload
                                 else opt["paged"], layers_grads=g * (L - 1) // max(1, L),
                                 temps_opt=0 if dist.cpu_offload else optimizer_step_temp_bytes(sc, t.optimizer, kernels))
        lora_layer = lora_layer_bytes(counts, L)
        lora_layer_shard = lora_layer_bytes(sc, L)
        root_lora_shard = 0 if full else adapter_bytes(sc) - L * lora_layer_shard  # `a` is 0 with --cpu-offload
        root = fsdp_all_gather_bytes(rw["root_shard"] + root_lora_shard, W)
        layer = fsdp_all_gather_bytes(rw["layer_shard"] + (0 if full else lora_layer_shard), W)
        rs_input = fsdp_all_gather_bytes(lora_layer_shard, W)  # padded like the all-gather
        if full:
            mm = fsdp_full_moments(mm, counts, sc, L, dims(spec).tied, rs_input, root, extras)
        # the loss (end of the forward): the root kept gathered, and the last layer's all-gather
        # output, whose free FSDP defers to the root's post-forward (``comm_ctx.all_gather_state``);
        # the start of backward: the root, and the last layer prefetched by the root's pre-backward
        extras["forward"]["weights"] += root + layer
        extras["backward"]["weights"] += root + layer
        extras["attention"]["weights"] += root + 2 * layer
        extras["layers"]["weights"] += root + layer
        extras["layers"]["gradients"] += lora_layer + rs_input  # unsharded grads + reduce-scatter input
        # the last layer's backward (checkpointing): the next layer's all-gather prefetched alive
        extras["layers_last"]["weights"] += fsdp_last_layer_backward_weights(root, layer)
        terms.update(gathered_root=root, gathered_layer=layer, reduce_scatter=lora_layer + rs_input)
    else:
        stage = 2 if strat == "zero2" else 3
        st = zero_model_states(trainable, W, stage, dist.cpu_offload)
        host += st["host"]
        mm = dataclasses.replace(mm, adapters=st["params16"], gradients=st["gradients"], optimizer=st["optimizer"],
                                 optimizer_paged=0, temps_opt=0, layers_grads=st["gradients"] * (L - 1) // max(1, L))
        if stage == 2:
            bucket = zero_reduce_bucket_bytes()
            extras["backward"]["gradients"] += bucket
            extras["layers"]["gradients"] += bucket
            extras["layers_last"]["gradients"] += bucket
            terms["reduce_bucket"] = bucket
        else:
            gathered = zero3_gathered_bytes(rw["largest_param"])
            for m in FORWARD_MOMENTS:
                extras[m]["weights"] += gathered
            terms["gathered"] = gathered
    # the precompute_ref_log_probs pass runs in the trainer's __init__, before DDP wraps the model: nothing added
    extras["precompute"] = {"weights": 0, "gradients": 0}
    ev = mm.evaluate(*t.shape, t.grad_accum)
    phases = {k: v + sum(extras[k].values()) for k, v in ev["phases"].items()}
    comp = {k: {c: v + extras[k].get(c, 0) for c, v in parts.items()} for k, parts in ev["composition"].items()}
    if strat == "fsdp":
        static = {"weights": mm.weights, "adapters": mm.adapters, "optimizer": mm.optimizer - mm.optimizer_paged,
                  "gradients": mm.gradients if t.grad_accum > 1 else 0}
        gather = fsdp_first_unshard_bytes(root, layer)
        phases["unshard"] = sum(static.values()) + gather
        comp["unshard"] = {c: static.get(c, 0) + (gather if c == "weights" else 0) for c in comp["forward"]}
    tensor_peak = max(phases.values())
    phase = next(k for k, v in phases.items() if v == tensor_peak)
    cal = calibration if calibration and ("cuda_context_bytes" in calibration
                                          or "allocator_slack_fraction" in calibration) else None
    over = overhead_bytes(tensor_peak, cal)
    terms.update(adapters=mm.adapters, gradients=mm.gradients, optimizer=mm.optimizer)
    return {**ev, "weights": resident, "phases": phases, "composition": comp, "tensor_peak": tensor_peak,
            "peak_phase": phase, **over, "overhead": sum(over.values()), "peak": tensor_peak + sum(over.values()),
            "temporaries": max(ev["temporaries"], *(sum(e.values()) for e in extras.values())),
            "weights_footprint": resident - rw["quant_state"], "host_offload": host, "terms": terms,
            "weights_detail": {k: int(v) for k, v in rw.items()}}


def fsdp_full_moments(mm: MemoryModel, counts, sc, L: int, tied: bool, rs_input: int, root: int,
                      extras: dict[str, dict[str, int]]) -> MemoryModel:
    """Full fine-tuning under FSDP2: the gradients inside the backward. Each decoder layer's are made unsharded
    and reduce-scattered by its post-backward (its reduce-scatter input kept until the next unit's); the root unit's
    (head, final norm, embeddings) stay unsharded until the root's post-backward at the very end: the head's from
    the start of the backward, the embedding's from its backward — and the root's reduce-scatter input then."""
    (total, layers, emb), (total_s, layers_s, emb_s) = grad_parts(counts), grad_parts(sc)
    emb_extra = emb - emb_s  # an embedding gradient unsharded rather than sharded
    # the root's gradients before the embeddings' (head, final norm; a tied weight's head part), unsharded
    head_extra = (total - layers - emb) - (total_s - layers_s - emb_s) + (emb_extra if tied else 0)
    extras["embeddings"]["gradients"] += head_extra + rs_input + (2 if tied else 1) * emb_extra
    extras["embeddings"]["weights"] += root
    extras["layers"]["gradients"] += head_extra
    extras["layers_last"]["gradients"] += head_extra
    fg = full_layer_grads(sc, L, tied)
    return dataclasses.replace(mm, layers_grads=fg[0], last_grads=fg[1], end_grads=fg[2:4], end_in_grad=fg[4:])


def fsdp_last_layer_backward_weights(root: int, layer: int) -> int:
    """Gathered bytes in the backward of the *last* decoder layer under FSDP2 (the ``layers_last``
    moment: every checkpointed layer input alive, no other layer's gradient yet):
    ``root + 2 layer``.

    torch 2.13 ``torch/distributed/fsdp/_fully_shard/_fsdp_state.py`` ``_pre_backward`` unshards the
    layer and then ``_backward_prefetch`` issues the all-gather of the layer that runs next in backward
    (``FSDPParamGroup.unshard(async_op=True)``: its all-gather output, one layer's unsharded bytes, is
    alive until that layer's ``wait_for_unshard`` copies it out, i.e. through this layer's whole
    recomputation and backward); the root stays unsharded.  Measured on the CPU with 2 gloo ranks
    (tests/backends/test_distributed_run.py): the peak of an FSDP step of the tiny Llama is inside the last
    layer's backward with the prefetched all-gather output alive.
    """
    return root + 2 * layer


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def distributed_section(spec, q: QuantSettings, dist: DistSettings, mem: dict[str, Any],
                        single: dict[str, int]) -> dict[str, Any]:
    """plan.json's ``distributed`` section: the engine, the per-rank terms of ``mem`` (``rank_memory``), the
    host bytes offloaded per node, and ``single`` (the single-GPU weights, tensor peak and peak)."""
    W, strat = dist.shard_world, dist.shard_strategy
    # the single-GPU weights in the dtypes the engine trains with (DeepSpeed undoes the fp32 upcast)
    engine_weights = weights_bytes(spec, engine_quant(q, strat))
    return {
        **dist.to_json(),
        "wrapping_unit": "decoder layer" if strat == "fsdp" else None,
        "quant_storage": q.compute_dtype if (q.quant in ("nf4", "fp4") and strat in ("fsdp", "zero3")) else None,
        "memory_is": "per rank (one GPU)",
        "per_rank": {k: int(v) for k, v in mem["terms"].items()},
        "host_offload_per_node": int(mem["host_offload"]) * dist.gpus,
        "single_gpu": {k: int(v) for k, v in single.items()},
        # what sharding costs beyond an even split of the single-GPU weights: replicated quantization
        # constants and buffers, shard padding, and the 4-bit storage rounded to whole compute-dtype elements
        "sharding_cost": int(mem["weights"] - (-(-engine_weights // W)))
        if strat in ("fsdp", "zero3") and not dist.cpu_offload else None,
    }
