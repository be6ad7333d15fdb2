"""Per-rank memory terms of a multi-GPU LoRA / QLoRA step: DDP, FSDP2 full shard, DeepSpeed ZeRO-2/3.

One pure function per term, integer bytes, formula and source in each docstring.  ``W`` is the
world size (GPUs per node x nodes); every term is what *one rank* holds.  The batch options of a
plan are per device (``--batch-size`` is the per-device micro-batch), so the activation terms of
``planner.memory.activations`` apply to each rank unchanged.

Sources (the versions pinned in constraints.txt):

* FSDP2 (``torch.distributed.fsdp.fully_shard``, torch/distributed/fsdp/_fully_shard/
  _fsdp_param.py ``FSDPParam._init_sharded_param``): every parameter is sharded on dim 0 with
  ``torch.chunk``; each rank allocates the padded shard, ``ceil(d0 / W)`` rows (``padded_sharded_size
  = chunks[0].size()``), the last ranks' shards being views into padding.  Buffers are not sharded.
  A unit's parameters are all-gathered in their storage dtype before its forward/backward and freed
  after (``reshard_after_forward=True``); the root unit keeps its all-gathered parameters from
  forward to backward (``FSDPState._lazy_init``: the root's ``reshard_after_forward`` is False),
  and the next unit is prefetched while one computes (implicit forward/backward prefetch: two
  units' all-gather outputs alive at once).  Gradients are reduce-scattered into sharded ``.grad``.
* FSDP-QLoRA: FSDP can only shard a 4-bit ``Params4bit`` stored in a floating dtype, so
  ``BitsAndBytesConfig(bnb_4bit_quant_storage=<compute dtype>)`` (Answer.AI's FSDP-QLoRA, the
  transformers/PEFT FSDP-QLoRA guide): ``quantize_4bit`` packs into ``[(n + 1) // (2 c), 1]``
  elements of ``c`` bytes (bitsandbytes/_ops.py, fake kernel of ``quantize_4bit``).  The quantization
  constants live in ``weight.quant_state``, not in a parameter: FSDP does not shard them, every
  rank keeps all of them.
* DDP (torch/csrc/distributed/c10d/reducer.cpp ``Reducer::initialize_buckets``): one flat tensor
  per bucket holding a copy of every trainable gradient (``gradient_as_bucket_view=False``, the
  default of DDP and of accelerate's ``DistributedDataParallelKwargs``), allocated at wrap time.
* DeepSpeed ZeRO (deepspeed 0.19.8, ``runtime/zero/stage_1_and_2.py`` and ``stage3.py``): the
  engine casts the module to the 16-bit compute dtype (``DeepSpeedEngine._configure_distributed_model``),
  keeps fp32 master weights, fp32 gradients and Adam's two fp32 states of its partition
  (``estimate_zero2_model_states_mem_needs``: ``2 P + 18 P / W`` per GPU; ZeRO-3:
  ``4 * largest_layer + 18 P / W``).  Only trainable parameters enter the optimizer, so ``P`` is the
  trainable count; ZeRO-3 also partitions the frozen base (``ds_tensor``: ``ceil(numel / W)``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from qplan.planner.errors import QPlanError
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import QuantSettings, fp16_kept_fp32, is_quantized, weights_breakdown
from qplan.planner.vocab import BYTES, FOUR_BIT, STRATEGIES

ENGINES = {
    "ddp": "torch DistributedDataParallel",
    "fsdp": "torch FSDP2 fully_shard (full shard)",
    "zero2": "DeepSpeed ZeRO stage 2",
    "zero3": "DeepSpeed ZeRO stage 3",
    "hsdp": "torch FSDP2 fully_shard (hybrid: sharded inside a node, replicated across nodes)",
}
#: DeepSpeed's default ``reduce_bucket_size`` (elements; runtime/zero/config.py ``ZERO_OPTIMIZATION``)
ZERO_REDUCE_BUCKET_ELEMENTS = 500_000_000
#: ``estimate_zero*``'s multipliers per trainable parameter (DeepSpeed's own comments): 16-bit
#: params 2, 16-bit grads 2, fp32 grads 4, fp32 params 4, Adam's momentum and variance 8
ZERO_PARAM16, ZERO_GRAD16, ZERO_GRAD32, ZERO_MASTER32, ZERO_ADAM32 = 2, 2, 4, 4, 8


@dataclass(frozen=True)
class DistSettings:
    """``--gpus``, ``--nodes``, ``--strategy``, ``--cpu-offload``."""

    gpus: int = 1
    nodes: int = 1
    strategy: str = "ddp"
    cpu_offload: bool = False
    network_gbps: float | None = None  # between nodes, per node, one way (``--network-gbps``)

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def shard_world(self) -> int:
        """The ranks one parameter is sharded over: the node's GPUs under hsdp (FSDP2 on a 2-D mesh, replicas
        across nodes), every rank otherwise."""
        return self.gpus if self.strategy == "hsdp" else self.world

    @property
    def shard_strategy(self) -> str:
        """How one rank's memory is laid out: hsdp holds what fsdp over ``shard_world`` ranks holds (its gradient
        all-reduce across nodes runs in place on the reduce-scattered shard: FSDP2 ``foreach_reduce``)."""
        return "fsdp" if self.strategy == "hsdp" else self.strategy

    def validate(self, q: QuantSettings, backend: str) -> None:
        if self.strategy not in STRATEGIES:
            raise QPlanError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.cpu_offload and self.strategy == "ddp":
            raise QPlanError("--cpu-offload needs --strategy fsdp, zero2 or zero3 (DDP keeps everything on the GPU)")
        if backend == "unsloth":
            raise QPlanError("--backend unsloth trains on one GPU: multi-GPU plans use --backend peft")
        if self.network_gbps is not None and self.nodes < 2:
            raise QPlanError(f"--network-gbps {self.network_gbps:g} is the network between nodes: this plan has 1 node "
                             "(the link inside a node is the GPU's, from the catalog)")
        if self.strategy == "hsdp" and self.nodes < 2:
            raise QPlanError("--strategy hsdp shards inside a node and replicates across nodes: give --nodes 2 or "
                             "more (on one node it is --strategy fsdp)")
        if self.strategy == "hsdp" and self.gpus < 2:
            raise QPlanError("--strategy hsdp with 1 GPU per node: FSDP2 then shards over one rank, without its "
                             "all-gather buffers (a layout qplan does not plan); use --strategy ddp (the same replicas) "
                             "or --gpus 2 or more per node")
        if self.strategy in ("fsdp", "zero3", "hsdp") and q.quant == "int8":
            raise QPlanError(f"--strategy {self.strategy} shards 4-bit weights only (bnb_4bit_quant_storage); "
                             "int8 weights cannot be sharded: use --quant nf4, or --strategy ddp/zero2")

    def to_json(self) -> dict[str, Any]:
        out = {"world_size": self.world, "gpus_per_node": self.gpus, "nodes": self.nodes,
               "strategy": self.strategy, "engine": ENGINES[self.strategy], "cpu_offload": self.cpu_offload}
        if self.strategy == "hsdp":
            out.update(shard_group=self.shard_world, replicas=self.nodes)
        if self.network_gbps is not None:
            out["network_gbps"] = self.network_gbps
        return out


# ------------------------------------------------------------------------------ pure terms


def shard_rows(rows: int, world: int) -> int:
    """Rows of one rank's padded FSDP2 shard of a dim-0 size ``rows``: ``ceil(rows / W)``
    (``_chunk_with_empty`` + ``padded_sharded_size = chunks[0].size()``)."""
    return -(-rows // world)


def fsdp_shard_bytes(shape: tuple[int, ...] | list[int], elem_bytes: int, world: int) -> int:
    """Bytes one rank holds of a parameter of ``shape`` under FSDP2: ``ceil(d0 / W) * prod(rest) * b``."""
    if not shape:
        return elem_bytes  # a 0-d parameter is replicated
    return shard_rows(shape[0], world) * math.prod(shape[1:]) * elem_bytes


def zero_partition_bytes(numel: int, elem_bytes: int, world: int) -> int:
    """One rank's ZeRO partition of ``numel`` elements: ``ceil(numel / W) * b`` (DeepSpeed pads each
    partitioned tensor to a multiple of ``W``: ``_partition_param``, ``partition_size``)."""
    return -(-numel // world) * elem_bytes


def quant_storage_shape(numel: int, storage_bytes: int) -> tuple[int, int]:
    """Shape of a 4-bit weight packed into ``bnb_4bit_quant_storage`` of ``storage_bytes`` bytes:
    ``[(n + 1) // (2 c), 1]`` (bitsandbytes/_ops.py, ``quantize_4bit``'s fake kernel; c = 1 is the
    default uint8 packing, ``ceil(n / 2)`` bytes)."""
    return ((numel + 1) // (storage_bytes * 2), 1)


def fsdp_all_gather_bytes(shard_bytes: int, world: int) -> int:
    """Bytes FSDP2 allocates to all-gather a unit whose parameters one rank holds ``shard_bytes``
    of (padded shards): ``W * shard_bytes``.  ``_fsdp_collectives.foreach_all_gather`` allocates
    ``all_gather_output`` of ``sum(padded shard numel) * W`` elements (uint8 views when a unit mixes
    dtypes, e.g. bf16 weights + fp32 LoRA: the same bytes), and ``foreach_all_gather_copy_out``
    copies it into each parameter's ``all_gather_outputs`` (``FSDPParam.init_all_gather_outputs``:
    ``padded shard numel * W`` elements each; the unsharded parameter is a view of it): both are
    the padded size, ``ceil(d0 / W) * W`` rows, not the parameter's own ``d0``."""
    return shard_bytes * world


def fsdp_first_unshard_bytes(root_gathered: int, layer_gathered: int) -> int:
    """FSDP2's all-gathered bytes when the first decoder layer unshards at the start of the forward:
    ``2 * root + 2 * layer``.  The root's all-gather output stays referenced after its copy-out
    (``comm_ctx.all_gather_state``, deferred in the forward) until the next unit's
    ``FSDPParamGroup.wait_for_unshard`` returns -- its local ``prev_all_gather_state`` holds it
    through that unit's copy-out -- so the root's all-gather output and unsharded parameters, and
    layer 0's all-gather output and unsharded parameters, are alive at once (torch 2.13
    ``_fsdp_param_group.py``).  With a large root (the embedding and head, fp32 after
    ``prepare_model_for_kbit_training``) this is the step's peak at short sequences.  Not counted:
    the batch and the embedding output made before layer 0 (< 0.1% of the peak on Llama-3.2-1B)."""
    return 2 * root_gathered + 2 * layer_gathered


def ddp_bucket_bytes(gradient_bytes: int) -> int:
    """DDP's gradient buckets: a flat copy of every trainable gradient, alive from wrap time
    (``Reducer::initialize_buckets``, ``gradient_as_bucket_view=False``)."""
    return gradient_bytes


def zero_model_states(trainable: int, world: int, stage: int, offload: bool) -> dict[str, int]:
    """ZeRO-2/3 bytes per rank of the trainable parameters' model states, split by where they live:
    what ``estimate_zero2/3_model_states_mem_needs`` counts (deepspeed 0.19.8, the multipliers in its
    comments), with each partition padded to ``ceil(P / W)`` as DeepSpeed allocates it.

    * stage 2: 16-bit params replicated ``2 P``; partitioned 16-bit grads 2, fp32 grads 4, fp32
      master 4, Adam's two states 8: ``18 ceil(P / W)``.  Optimizer offload: the GPU keeps the 16-bit
      params only (``gpu = 2 P``), the host the fp32 grads, master and states (16 a parameter).
    * stage 3: 16-bit param partition 2, fp32 grads 4, master 4, states 8: ``18 ceil(P / W)`` (the
      16-bit grads are part of the gathered working set, ``zero3_gathered_bytes``); offload keeps the
      16-bit partition on the GPU (``2 P / W``) and 16 a parameter of the partition on the host.
    """
    part = -(-trainable // world)
    params16 = ZERO_PARAM16 * (trainable if stage == 2 else part)
    grads = (ZERO_GRAD16 if stage == 2 else 0) * part + ZERO_GRAD32 * part
    states = (ZERO_MASTER32 + ZERO_ADAM32) * part
    if offload:
        return {"params16": params16, "gradients": 0, "optimizer": 0,
                "host": (ZERO_GRAD32 + ZERO_MASTER32 + ZERO_ADAM32) * part}
    return {"params16": params16, "gradients": grads, "optimizer": states, "host": 0}


def zero3_gathered_bytes(largest_layer_params: int) -> int:
    """ZeRO-3's all-gathered working set: ``4 * largest_layer_params`` (16-bit params and grads of
    the largest module, ``estimate_zero3_model_states_mem_needs``'s ``largest_layer_memory``)."""
    return 4 * largest_layer_params


def zero_reduce_bucket_bytes(elem_bytes: int = 2, overlap_comm: bool = False) -> int:
    """ZeRO-2's gradient reduction bucket: ``reduce_bucket_size * 2`` bytes, whatever the number of
    trainable parameters -- DeepSpeed 0.19.8 ``stage_1_and_2.py`` ``setup_buckets`` allocates
    ``torch.empty(reduce_bucket_size)`` in the gradient dtype per bucket (``contiguous_gradients=True``),
    and a second one with ``overlap_comm`` (its default is off for stage 2, on for stage 3)."""
    return ZERO_REDUCE_BUCKET_ELEMENTS * elem_bytes * (2 if overlap_comm else 1)


# ------------------------------------------------------------------------------ base weights per rank


def _layer_share(pattern: str, instances: int, L: int) -> tuple[int, int]:
    """(instances in one decoder layer, instances in the root unit) of a group: groups whose
    pattern has a layer index (``*``) belong to the wrapped decoder layers, the rest to the root."""
    if "*" in pattern and L:
        return instances // L, 0
    return 0, instances


def rank_weights(spec: ModelSpec, q: QuantSettings, world: int, strategy: str) -> dict[str, int]:
    """Base-model bytes one rank holds, and the all-gathered sizes of one decoder layer and the root.

    ``sharded`` (parameters: FSDP2 dim-0 shards, ZeRO-3 flat partitions; all of them for DDP/ZeRO-2),
    ``quant_state`` (replicated: not parameters), ``buffers`` (replicated), ``layer_full`` and
    ``root_full`` (the unsharded parameters of one wrapped decoder layer / of the root unit),
    ``layer_shard`` and ``root_shard`` (one rank's padded shards of them: ``fsdp_all_gather_bytes``
    makes them what an FSDP2 all-gather allocates), ``largest_param`` (elements of the largest
    module's parameter as stored).
    Quantized 4-bit weights under fsdp/zero3 are stored in the compute dtype (``quant_storage_shape``).
    """
    shard = strategy in ("fsdp", "zero3")
    c = BYTES[q.compute_dtype]
    L = int(spec.inventory.num_hidden_layers)
    out = {"sharded": 0, "quant_state": 0, "buffers": 0, "layer_full": 0, "root_full": 0, "layer_shard": 0,
           "root_shard": 0, "largest_param": 0}

    def param(shape: tuple[int, ...], b: int, per_layer: int, root: int) -> None:
        n = per_layer * L + root
        if shard and strategy == "fsdp":
            one = fsdp_shard_bytes(shape, b, world)
        elif shard:
            one = zero_partition_bytes(math.prod(shape), b, world)
        else:
            one = math.prod(shape) * b
        out["sharded"] += n * one
        out["layer_shard"] += per_layer * one
        out["root_shard"] += root * one
        full = math.prod(shape) * b
        out["layer_full"] += per_layer * full
        out["root_full"] += root * full
        out["largest_param"] = max(out["largest_param"], math.prod(shape) if n else 0)

    wb = weights_breakdown(spec, q)
    for g in spec.inventory.linear:
        per_layer, root = _layer_share(g.pattern, g.instances, L)
        fp32 = g.keep_fp32 or fp16_kept_fp32(spec, q, f"{g.pattern}.weight")
        bias_dt = "float32" if fp32 else q.unquantized_dtype
        if g.bias:
            param((g.out_features,), BYTES[bias_dt], per_layer, root)
        if g.weight_tied:
            continue
        n = g.in_features * g.out_features
        if is_quantized(g, q) and q.quant in FOUR_BIT:
            storage = c if shard else 1
            param(quant_storage_shape(n, storage), storage, per_layer, root)
        elif is_quantized(g, q):  # int8 (DDP / ZeRO-2 only): int8 [out, in]
            param((g.out_features, g.in_features), 1, per_layer, root)
        else:
            param((g.out_features, g.in_features), BYTES[bias_dt], per_layer, root)
    for e in spec.inventory.embeddings:
        if e.weight_tied:
            continue
        dt = "float32" if e.keep_fp32 or fp16_kept_fp32(spec, q, f"{e.pattern}.weight") else q.unquantized_dtype
        per_layer, root = _layer_share(e.pattern, e.instances, L)
        param((e.num_embeddings, e.embedding_dim), BYTES[dt], per_layer, root)
    for p in spec.inventory.params:
        dt = "float32" if p.keep_fp32 or fp16_kept_fp32(spec, q, f"{p.pattern}.{p.param}") else q.unquantized_dtype
        per_layer, root = _layer_share(p.pattern, p.instances, L)
        param(tuple(p.shape), BYTES[dt], per_layer, root)
    out["quant_state"] = wb["quant_state"]
    out["buffers"] = wb["buffers"]
    return out


def sharded_counts(counts: list[ModuleCount], world: int) -> list[ModuleCount]:
    """The trainable tensors as one FSDP2 rank holds them: each ``save_keys`` shape with dim 0
    sharded to ``ceil(d0 / W)`` rows (LoRA A ``[r, in]``, B ``[out, r]``), so the single-GPU
    adapter, gradient and optimizer functions of ``planner.memory.terms`` give the per-rank bytes."""
    out = []
    for c in counts:
        keys = [(k, [shard_rows(s[0], world), *s[1:]] if s else list(s)) for k, s in c.save_keys]
        out.append(dataclasses.replace(c, save_keys=keys))
    return out


def lora_layer_bytes(counts: list[ModuleCount], L: int) -> int:
    """Trainable bytes of one decoder layer (unsharded): what a unit's backward produces before its
    reduce-scatter: ``sum(numel * b) / L`` over the per-layer trainable modules."""
    per = 0
    for c in counts:
        if "*" in c.module:
            per += sum(math.prod(s) for _, s in c.save_keys) * BYTES[c.dtype] * (c.instances // max(1, L))
    return per
