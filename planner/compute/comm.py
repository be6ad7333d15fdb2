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
and FSDP overlap part of it with the backward). No GPU run has checked it. CPU offload (PCIe traffic of the offloaded
states) is not predicted: said in ``not_in_time``.

Several nodes need the network's bandwidth, which the catalog does not know: ``--network-gbps`` (each node's NICs
together, one way). Without it the communication is not predicted (``not_in_time``). With it (``across_nodes``):

* ddp / fsdp / zero2 / zero3 run their rings over all ``W`` ranks: every ring edge carries the bytes above (the
  formulas with ``N = W``), and the edges between nodes go over the network, so the ring moves at the slower of the
  link and the network (one GPU per node: the network only);
* hsdp gathers and reduce-scatters inside the node (the formulas with ``N`` = the node's GPUs, over the link), then
  all-reduces each gradient shard across the ``M`` nodes: ``G`` rings of ``M`` ranks, each ``2 (M-1)/M x shard``
  through the network, ``G x 2 (M-1)/M x shard`` per node and micro-batch (FSDP2's ``foreach_reduce``, the
  reduce-scatter output all-reduced in place), after the reduce-scatter: the seconds add up.
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


def network_bytes(strategy: str, gpus: int, nodes: int, grad_accum: int, flat_total: int, grad_shard_bytes: int) -> int:
    """Bytes through one node's network per optimizer step (see the module docstring): a flat ring's edge bytes
    (``flat_total``, the per-rank formula over every rank), or hsdp's all-reduces of the gradient shards across nodes,
    ``grad_accum x G x 2 (M-1)/M x shard``."""
    if nodes < 2:
        return 0
    if strategy == "hsdp":
        return grad_accum * gpus * all_reduce_bytes(grad_shard_bytes, nodes)
    return flat_total


def comm_time(dist: Any, device: dict[str, Any] | None, grad_accum: int, grad_bytes: int,
              gathered: tuple[int, int], grad_shard_bytes: int = 0) -> tuple[dict[str, Any] | None, list[str]]:
    """(``prediction.time.communication``, what is not in the time) for a plan on ``dist`` (None: one GPU).
    ``gathered``: over the ranks one parameter is sharded on (a node's, for hsdp); ``grad_shard_bytes``: hsdp's
    padded gradient shard of one rank, all-reduced across nodes."""
    if dist is None or dist.world < 2:
        return None, []
    notes = []
    if dist.nodes > 1 and not getattr(dist, "network_gbps", None):
        notes.append("communication across nodes (the network: give --network-gbps; the catalog knows only the link "
                     "inside a node)")
    if dist.cpu_offload:
        notes.append("the PCIe traffic of CPU offload (states and gradients to and from the host)")
    if notes:
        return None, ["communication between the GPUs: " + "; ".join(notes)]
    link = (device or {}).get("interconnect_gb_s")
    inside = dist.shard_world if dist.strategy == "hsdp" else dist.world  # the ranks of the link's rings
    if not link and dist.gpus > 1:
        return None, [f"communication between the GPUs ({(device or {}).get('name')} has no interconnect in the "
                      "catalog)"]
    link_bw = link * 1e9 / 2 if link else None
    moved = comm_bytes(dist.shard_strategy, inside, grad_accum, grad_bytes, gathered)
    out = {"link": (device or {}).get("interconnect"), "link_bytes_per_second_one_way": link_bw,
           "bytes_per_step": moved, "seconds": 0.0,
           "note": "ring collectives at the link's peak, not overlapped with compute: a bound, not measured"}
    if dist.nodes < 2:
        out["seconds"] = moved["total"] / link_bw
        return out, []
    net_bw = dist.network_gbps * 1e9 / 8
    across = network_bytes(dist.strategy, dist.gpus, dist.nodes, grad_accum, moved["total"], grad_shard_bytes)
    if dist.strategy == "hsdp":  # inside the node over the link, then across nodes over the network
        inter = across / net_bw
        out["seconds"] = (moved["total"] / link_bw if link_bw else 0.0) + inter
    else:  # one ring over every rank: it moves at its slowest edge
        slowest = min(net_bw, link_bw) if link_bw and dist.gpus > 1 else net_bw
        inter = moved["total"] / slowest
        out["seconds"] = inter
    out["across_nodes"] = {"network_bytes_per_second_one_way": net_bw, "bytes_per_step_per_node": across,
                           "seconds": inter}
    out["note"] = ("ring collectives at the link's and the network's peak (--network-gbps), not overlapped with "
                   "compute: a bound, not measured")
    return out, []
