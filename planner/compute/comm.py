"""What the ranks of a data-parallel step send each other, and how long the catalog's link takes to carry it.

Ring collectives, as NCCL runs them within a node (the bus-bandwidth definitions of nccl-tests,
``doc/PERFORMANCE.md``): over ``N`` ranks an all-reduce of ``S`` bytes moves ``2 (N-1)/N x S`` through each GPU's
link, an all-gather or a reduce-scatter of a full tensor of ``S`` bytes ``(N-1)/N x S``. Per optimizer step of
``grad_accum`` micro-batches, by strategy (``planner.memory.sharding``):

* ``ddp``: one all-reduce of the gradients (accelerate skips the sync of the accumulation micro-batches, ``no_sync``);
* ``zero2``: a reduce-scatter of the gradients per micro-batch (DeepSpeed reduces every micro-batch's) and an
  all-gather of the updated trainable parameters after the optimizer step;
* ``fsdp`` / ``zero3``: per micro-batch every unit's weights (and adapters) all-gathered for the forward, the
  decoder layers' again for the backward (each layer resharded after its forward, the root kept), and the gradients
  reduce-scattered: FSDP2's own collectives, to the byte (the meta trace); ZeRO-3 is planned the same way (DeepSpeed
  keeps parameters under its persistence threshold gathered: a little less).

Seconds: those bytes over the link's bandwidth one way (``interconnect_gb_s / 2``: the catalog gives the
bidirectional figure of the datasheet), at its peak and not overlapped with compute: a bound, not a measurement (DDP
and FSDP overlap part of it with the backward). No GPU run has checked it. Several nodes (the network, which the
catalog does not know) and CPU offload (PCIe traffic of the offloaded states) are not predicted: said in
``not_in_time``.
"""

from __future__ import annotations

from typing import Any


def all_reduce_bytes(size: int, world: int) -> int:
    """``2 (N-1)/N x size``: bytes through each rank's link for a ring all-reduce (nccl-tests ``busBw``)."""
    return 2 * (world - 1) * size // world


def gather_bytes(size: int, world: int) -> int:
    """``(N-1)/N x size``: bytes through each rank's link for a ring all-gather or reduce-scatter of ``size`` bytes."""
    return (world - 1) * size // world


def comm_bytes(strategy: str, world: int, grad_accum: int, grad_bytes: int, gathered: tuple[int, int]) -> dict[str, int]:
    """Bytes one rank's link carries per optimizer step, by collective (see the module docstring). ``grad_bytes``: the
    trainable parameters' gradients (the same bytes as the parameters); ``gathered``: the bytes a sharded step
    all-gathers in the forward (every unit: the decoder layers and the root) and in the backward (the layers: FSDP2
    keeps the root unsharded after its forward), padded shards x world (``gathered_bytes``)."""
    if world < 2:
        return {"total": 0}
    if strategy == "ddp":
        out = {"gradient_all_reduce": all_reduce_bytes(grad_bytes, world)}
    elif strategy == "zero2":
        out = {"gradient_reduce_scatter": grad_accum * gather_bytes(grad_bytes, world),
               "parameter_all_gather": gather_bytes(grad_bytes, world)}
    else:  # fsdp, zero3
        out = {"weight_all_gather": grad_accum * sum(gather_bytes(g, world) for g in gathered),
               "gradient_reduce_scatter": grad_accum * gather_bytes(grad_bytes, world)}
    out["total"] = sum(out.values())
    return out


def gathered_bytes(spec: Any, q: Any, counts: list, world: int, strategy: str) -> tuple[int, int]:
    """(forward, backward) bytes a sharded step all-gathers per micro-batch: every unit's padded shards x world in the
    forward (the base weights as stored, ``planner.memory.sharding.rank_weights``, and the adapters), the decoder
    layers' again in the backward. Equal to the all-gather outputs of FSDP2's own step (the meta trace's
    ``c10d._allgather_base_``, tests/planner/test_comm.py)."""
    from qplan.planner.memory.sharding import rank_weights, sharded_counts
    from qplan.planner.memory.terms import adapter_bytes

    rw = rank_weights(spec, q, world, strategy)
    layers = int(spec.inventory.num_hidden_layers) * rw["layer_shard"]
    lora = adapter_bytes(sharded_counts(counts, world))  # LoRA modules live in the decoder layers
    return (layers + rw["root_shard"] + lora) * world, (layers + lora) * world


def comm_time(dist: Any, device: dict[str, Any] | None, grad_accum: int, grad_bytes: int,
              gathered: tuple[int, int]) -> tuple[dict[str, Any] | None, list[str]]:
    """(``prediction.time.communication``, what is not in the time) for a plan on ``dist`` (None: one GPU)."""
    if dist is None or dist.world < 2:
        return None, []
    notes = []
    if dist.nodes > 1:
        notes.append("communication across nodes (the network; the catalog knows only the link inside a node)")
    if dist.cpu_offload:
        notes.append("the PCIe traffic of CPU offload (states and gradients to and from the host)")
    if notes:
        return None, ["communication between the GPUs: " + "; ".join(notes)]
    link = (device or {}).get("interconnect_gb_s")
    if not link:
        return None, [f"communication between the GPUs ({(device or {}).get('name')} has no interconnect in the "
                      "catalog)"]
    moved = comm_bytes(dist.strategy, dist.world, grad_accum, grad_bytes, gathered)
    seconds = moved["total"] / (link * 1e9 / 2)
    return {"link": device.get("interconnect"), "link_bytes_per_second_one_way": link * 1e9 / 2,
            "bytes_per_step": moved, "seconds": seconds,
            "note": "ring collectives at the link's peak, not overlapped with compute: a bound, not measured"}, []
