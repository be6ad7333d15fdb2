"""One rank of a sharded model, on the meta device, with torch's fake process group.

``shard_one_rank(plan)`` builds the plan's model exactly as the single-GPU trace does (transformers
on meta, bitsandbytes' real ``quantize_4bit`` through its fake kernels — with
``bnb_4bit_quant_storage`` = the compute dtype when the plan shards 4-bit weights — the real
``prepare_model_for_kbit_training`` and ``get_peft_model``), then applies the real FSDP2
``fully_shard`` to every decoder layer and to the root, over a ``DeviceMesh`` of the plan's world
size backed by ``torch.testing._internal.distributed.fake_pg`` (``FakeStore`` + the "fake"
backend: collectives return at once, which is all sharding needs).  It then counts the bytes this
rank holds: the padded local shard of every parameter (``DTensor.to_local()``'s storage), the
quantization constants (``Params4bit.quant_state`` tensors, which FSDP does not shard) and the
buffers.  That is the oracle of the plan's per-rank static terms (tests/planner/test_distributed.py),
independent of ``planner.distributed``'s formulas.  Only one rank (rank 0, which holds the largest,
fully padded shards) is built: the fake group never exchanges data.
"""

from __future__ import annotations

import contextlib
from typing import Any

from .settings import TraceSettings


def _settings(plan: dict[str, Any]) -> TraceSettings:
    lora, q, t, d = plan["lora"], plan["quant"], plan["training"], plan["distributed"]
    return TraceSettings(
        quant=q["quant"], double_quant=bool(q.get("double_quant", False)),
        compute_dtype={"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[q["compute_dtype"]],
        upcast_kbit=bool(q.get("prepare_model_for_kbit_training", False)), lora=lora,
        batch_size=t["batch_size"], seq_len=t["seq_len"], grad_ckpt=t["grad_ckpt"] != "off",
        optimizer=t["optimizer"], attn_impl=t["attn_impl"], device="meta",
        quant_storage=d.get("quant_storage"))


@contextlib.contextmanager
def fake_world(world: int):
    """A default process group of ``world`` ranks (this process is rank 0) on torch's fake backend."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        key = (st.data_ptr(), id(st)) if t.device.type != "meta" else id(st)
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def shard_one_rank(plan: dict[str, Any]) -> dict[str, int]:
    """Bytes rank 0 holds after ``fully_shard`` of the plan's PEFT model (FSDP plans only):
    ``params`` (frozen local shards), ``trainable`` (trainable local shards), ``quant_state``,
    ``buffers``, and ``layer_full`` (one decoder layer's unsharded parameters)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from qplan.hf import hf_config

    from . import patches
    from .run import apply_peft, build_model

    if plan.get("distributed", {}).get("strategy") != "fsdp":
        raise ValueError("shard_one_rank traces FSDP plans")
    s = _settings(plan)
    world = plan["distributed"]["world_size"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(patches.bnb_quant_maps_restored())
        stack.enter_context(patches.quiet_libraries())
        model = build_model(hf_config(plan["model"]["config"]), s, stack)
        pm = apply_peft(model, s, [])
        layers = pm.get_base_model().model.layers
        layer_full = sum(p.numel() * p.element_size() for p in layers[0].parameters())
        quant_state = []
        for p in pm.parameters():
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                quant_state.extend(_quant_state_tensors(qs))
        with fake_world(world):
            mesh = init_device_mesh("cpu", (world,))
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(pm, mesh=mesh)
            frozen, trainable = [], []
            for p in pm.parameters():
                local = p.to_local() if isinstance(p, DTensor) else p
                (trainable if p.requires_grad else frozen).append(local)
            out = {"params": _storage_bytes(frozen), "trainable": _storage_bytes(trainable),
                   "quant_state": _storage_bytes(quant_state),
                   "buffers": _storage_bytes(list(pm.buffers())), "layer_full": int(layer_full)}
    del torch
    return out


def _quant_state_tensors(qs: Any) -> list:
    """The tensors of a bitsandbytes ``QuantState`` (absmax, code, offset, nested state)."""
    import torch

    out = [v for v in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(v, torch.Tensor)]
    if getattr(qs, "state2", None) is not None:
        out.extend(_quant_state_tensors(qs.state2))
    return out
