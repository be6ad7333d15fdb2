"""One rank of a multi-process run: what a worker started by a launcher (torchrun, ``accelerate
launch``) does differently from a single-process worker.

The launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (torch.distributed.run / accelerate
launch). Each rank loads the whole model the way the plan says, then:

* ``ddp``: nothing here — ``transformers.Trainer`` (through accelerate's ``MULTI_CPU`` /
  ``MULTI_GPU``) wraps the model in ``DistributedDataParallel`` with its defaults.
* ``fsdp`` on the CPU: ``shard_fsdp2`` applies torch's ``fully_shard`` to every decoder layer and
  then to the root (the layout accelerate's FSDP2 plugin builds with ``TRANSFORMER_BASED_WRAP`` on
  ``_no_split_modules``, and the one ``observe.trace.dist`` traces), over the gloo process group,
  and marks the model ``is_distributed_loading_by_transformers`` — transformers' own flag for a model
  that "owns its placement and gradient reduction": the Trainer then neither wraps it in DDP nor
  shards it again (transformers/trainer.py ``_prepare_for_training``), and clips the sharded
  gradients itself. On a GPU accelerate's FSDP2 plugin shards the model (the generated config).
* saving: ``full_trainable_state`` all-gathers the sharded adapters (``DTensor.full_tensor()``) to
  rank 0, which alone writes them with PEFT's ``save_pretrained(state_dict=...)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world: int
    local_rank: int
    node: int = 0  # the node qplan started this rank on (``--node-rank``; 0 on one machine)

    @property
    def saver(self) -> bool:
        """The rank that writes the adapter: node 0's first (c10d numbers the ranks its own way)."""
        return self.node == 0 and self.local_rank == 0


def rank_env() -> RankEnv | None:
    """The launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and qplan's node (``QPLAN_NODE_RANK``), or None
    outside a multi-process launch."""
    from .nodes import NODE_ENV

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        node = int(os.environ.get(NODE_ENV, "0"))
    except ValueError:
        return None
    if world <= 1:
        return None
    return RankEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), node)


def init_group(device: str) -> None:
    """The default process group: gloo on the CPU, nccl on CUDA (env:// from the launcher; each rank on the GPU of
    its local rank first, as nccl's collectives need)."""
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


#: the failure kind of ranks whose nodes were started with different plans
PLAN_MISMATCH = "plan_mismatch"


_SIDE: list[Any] = []


def _side_group() -> Any:
    """A gloo group beside an nccl default group (None on gloo): qplan's own small exchanges (the plan check, the
    rank files) then start no nccl communicator, whose buffers the GPU measurement would count before the model."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    if not _SIDE:
        _SIDE.append(dist.new_group(backend="gloo"))
    return _SIDE[0]


def check_same_plan(plan_bytes: bytes, node: int) -> None:
    """Every rank's plan.json must be node 0's, byte for byte (sha256, exchanged over the process group right
    after the rendezvous): nodes started with different plans would train a run no plan predicts."""
    import hashlib

    import torch.distributed as dist

    from qplan.planner.errors import QPlanError

    mine = hashlib.sha256(plan_bytes).hexdigest()
    got: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(got, (node, mine), group=_side_group())
    ref_node, ref = min(got)
    differ = sorted({n for n, h in got if h != ref})
    if differ:
        other = next(h for n, h in got if n == differ[0])
        err = QPlanError(f"node {differ[0]}'s plan.json differs from node {ref_node}'s (sha256 {other[:12]}… vs "
                         f"{ref[:12]}…): every node must run the same plan file")
        err.kind = PLAN_MISMATCH  # type: ignore[attr-defined]
        raise err


def gather_docs(doc: dict[str, Any]) -> list[Any]:
    """Every rank's measurement document, on every rank (a collective of a run that ended well; [] if it fails)."""
    import torch.distributed as dist

    try:
        got: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(got, doc, group=_side_group())
        return got
    except Exception:  # noqa: BLE001 - the rank files this node wrote stay; only the copies are missing
        return []


def sync_trainable(model: Any) -> None:
    """Every rank starts from rank 0's adapters (LoRA's random ``lora_A``), as DDP does at wrap time."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def decoder_layers(model: Any) -> list[Any]:
    """The modules FSDP wraps one by one: those whose class is in the model's ``_no_split_modules``
    (accelerate's ``TRANSFORMER_BASED_WRAP`` default)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        from qplan.planner.errors import QPlanError

        raise QPlanError(f"cannot find the decoder layers of {type(base).__name__} to shard (no _no_split_modules)")
    return layers


def shard_fsdp2(model: Any, dist_section: dict[str, Any]) -> None:
    """``fully_shard`` each decoder layer, then the root, over a CPU mesh of the plan's ranks: 1-D (fsdp) or
    (nodes, ranks per node) for hsdp (``observe.trace.dist.fsdp_mesh``: replicated across nodes, sharded inside one;
    torchrun numbers a node's ranks contiguously, so each row is one node) (defaults: ``reshard_after_forward=True``,
    no mixed-precision policy — autocast computes)."""
    from torch.distributed.fsdp import fully_shard

    from qplan.observe.trace.dist import fsdp_mesh

    mesh = fsdp_mesh(dist_section)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.is_distributed_loading_by_transformers = True


def full_trainable_state(model: Any, keep: bool) -> dict[str, Any]:
    """The trainable parameters (the adapters), unsharded, by their ``state_dict`` names: the saving
    rank (``keep``) gets them (CPU tensors), the other ranks an empty dict. Collective for sharded parameters
    (``DTensor.full_tensor()``: an all-gather), so every rank must call it; only the adapters are
    gathered, never the frozen base."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        if keep:
            out[name] = full.detach().cpu().clone()
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
