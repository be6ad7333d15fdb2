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


def rank_env() -> RankEnv | None:
    """The launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, or None outside a multi-process launch."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1:
        return None
    return RankEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_group(device: str) -> None:
    """The default process group: gloo on the CPU, nccl on CUDA (env:// from the launcher)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


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


def shard_fsdp2(model: Any, world: int) -> None:
    """``fully_shard`` each decoder layer, then the root, over a 1-D CPU mesh of ``world`` ranks
    (defaults: ``reshard_after_forward=True``, no mixed-precision policy — autocast computes)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.is_distributed_loading_by_transformers = True


def full_trainable_state(model: Any, rank: int) -> dict[str, Any]:
    """The trainable parameters (the adapters), unsharded, by their ``state_dict`` names: rank 0
    gets them (CPU tensors), the other ranks an empty dict. Collective for sharded parameters
    (``DTensor.full_tensor()``: an all-gather), so every rank must call it; only the adapters are
    gathered, never the frozen base."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        if rank == 0:
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
