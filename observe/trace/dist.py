"""One rank of a multi-GPU plan on the meta device, with torch's fake process group.

``trace_rank_step(plan)`` traces the training *step* of one rank: the PEFT model built as below,
sharded by the real FSDP2 ``fully_shard`` (or wrapped by the real ``DistributedDataParallel``), run
through the single-GPU trace's steps, tracker and phases (``qplan.observe.trace.run``).  Every
per-rank tensor is then an op output the tracker sees: FSDP2's all-gather input/output buffers
and the unsharded parameters copied out of them (``_fsdp_collectives.foreach_all_gather`` /
``foreach_all_gather_copy_out``: ``torch.empty`` and ``UntypedStorage.resize_``, FSDP's own
allocations -- ``DefaultAllGather``/``DefaultReduceScatter`` allocate with ``torch.empty``, never
through the process group), the root unit kept gathered, the prefetched next unit, the
reduce-scatter input kept until the next unit's reduce-scatter (``reduce_scatter_states``), the
sharded gradients (views of the reduce-scatter output), the sharded optimizer states, and the
activations of the per-device batch.  The fake backend's collectives return at once without
touching data: memory is what FSDP allocates around them, on every backend alike.  DTensors are
counted by their local shards (``qplan.observe.tracker``).


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
independent of ``planner.memory.sharding``'s formulas.  Only one rank (rank 0, which holds the largest,
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
        upcast_kbit=bool(q.get("prepare_model_for_kbit_training", False)), lora=lora or {},
        full=plan.get("method") == "full",
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


@contextlib.contextmanager
def fsdp_on_meta():
    """FSDP2 running on the meta device (restored on exit).  ``fully_shard`` takes its device from
    the mesh (``_fsdp_init._get_device_from_mesh``: "cpu" for a CPU mesh) and would allocate its
    all-gather and reduce-scatter buffers there: it is told the parameters' device, meta.  Its
    lazy init refuses meta parameters (``FSDPParamGroup._validate_no_meta_params``): skipped.  Its
    streams and events come from ``_get_device_handle(device.type)``, None for meta: torch.cpu's
    (no-op streams, as on the CPU), whose ``record_event`` returns a no-op event (HSDP's all-reduce state needs one
    off the CPU, as a GPU stream records).  Nothing else changes: the buffers, their sizes and when FSDP
    drops its references are FSDP's own code."""
    import torch
    import torch.distributed.fsdp._fully_shard._fsdp_collectives as fc
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as fpg
    import torch.distributed.fsdp._fully_shard._fsdp_state as fst
    import torch.distributed.fsdp._fully_shard._fully_shard as ffs

    saved = [(ffs, "_get_device_from_mesh"), (fpg.FSDPParamGroup, "_validate_no_meta_params"),
             (torch.cpu.Stream, "record_event")]
    saved += [(m, "_get_device_handle") for m in (fc, fpg, fst)]
    old = [(o, n, getattr(o, n)) for o, n in saved]
    orig_handle = fpg._get_device_handle
    try:
        ffs._get_device_from_mesh = lambda mesh: torch.device("meta")
        fpg.FSDPParamGroup._validate_no_meta_params = lambda self: None
        # HSDP keeps each layer's all-reduce buffer with its event (``AllReduceState``) and asserts the event off
        # the CPU, as a GPU stream records one: torch.cpu's streams record None, so a no-op event stands in
        torch.cpu.Stream.record_event = lambda self: torch.cpu.Event()
        for m in (fc, fpg, fst):
            m._get_device_handle = lambda t: torch.cpu if t == "meta" else orig_handle(t)
        yield
    finally:
        for o, n, v in old:
            setattr(o, n, v)


def _wrap(plan: dict[str, Any]):
    """``wrap(model, stack)`` for ``run_trace``: the fake world of the plan's size, then FSDP2
    ``fully_shard`` per decoder layer and at the root (as ``shard_one_rank``), or DDP."""
    strategy, world = plan["distributed"]["strategy"], plan["distributed"]["world_size"]

    def wrap(pm: Any, stack: contextlib.ExitStack) -> Any:
        from .run import base_model

        stack.enter_context(fake_world(world))
        if strategy in ("fsdp", "hsdp"):
            from torch.distributed.fsdp import fully_shard

            stack.enter_context(fsdp_on_meta())
            mesh = fsdp_mesh(plan["distributed"])
            for layer in base_model(pm).model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(pm, mesh=mesh)
            return pm
        raise ValueError(f"strategy {strategy!r} is not traced")

    return wrap


def fsdp_mesh(d: dict[str, Any]) -> Any:
    """The CPU ``DeviceMesh`` FSDP2 shards over: 1-D over every rank (fsdp), or 2-D (nodes, GPUs per node) for hsdp
    (``fully_shard`` on a 2-D mesh replicates over its first dimension and shards over its second: HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    if d["strategy"] == "hsdp":
        return init_device_mesh("cpu", (int(d["nodes"]), int(d["gpus_per_node"])),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (int(d["world_size"]),))


#: strategies whose step ``trace_rank_step`` traces
TRACED_STRATEGIES = ("fsdp", "hsdp")


def trace_rank_step(plan: dict[str, Any], steps: int = 2, count_flops: bool = False) -> dict[str, Any]:
    """The live-tensor trace of ``steps`` training steps of rank 0 of a multi-GPU plan (the same
    result as ``trace_plan``; bytes are one rank's)."""
    import dataclasses

    from .run import run_trace

    strategy = plan.get("distributed", {}).get("strategy")
    if strategy not in TRACED_STRATEGIES:
        raise ValueError(f"the step of --strategy {strategy} is not traced (traced: {', '.join(TRACED_STRATEGIES)})")
    if plan["distributed"].get("cpu_offload"):
        raise ValueError("the step of a --cpu-offload plan is not traced")
    s = dataclasses.replace(_settings(plan), steps=int(steps), count_flops=bool(count_flops))
    res = run_trace(dict(plan["model"]["config"]), s, wrap=_wrap(plan))
    res["notes"].append(f"one rank of {plan['distributed']['world_size']} ({strategy}) on torch's fake process group")
    return res


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
    ``buffers``, ``layer_full`` (one decoder layer's unsharded parameters) and ``layer_shard`` (rank
    0's padded local shards of them)."""
    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from qplan.hf import hf_config

    from . import patches
    from .run import apply_peft, base_model, build_model

    if plan.get("distributed", {}).get("strategy") not in ("fsdp", "hsdp"):
        raise ValueError("shard_one_rank traces FSDP plans")
    s = _settings(plan)
    world = plan["distributed"]["world_size"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(patches.bnb_quant_maps_restored())
        stack.enter_context(patches.quiet_libraries())
        model = build_model(hf_config(plan["model"]["config"]), s, stack)
        pm = apply_peft(model, s, [])
        layers = base_model(pm).model.layers
        layer_full = sum(p.numel() * p.element_size() for p in layers[0].parameters())
        quant_state = []
        for p in pm.parameters():
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                quant_state.extend(_quant_state_tensors(qs))
        with fake_world(world):
            mesh = fsdp_mesh(plan["distributed"])
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(pm, mesh=mesh)
            frozen, trainable = [], []
            for p in pm.parameters():
                local = p.to_local() if isinstance(p, DTensor) else p
                (trainable if p.requires_grad else frozen).append(local)
            layer_shard = sum(p.to_local().numel() * p.element_size() for p in layers[0].parameters())
            out = {"params": _storage_bytes(frozen), "trainable": _storage_bytes(trainable),
                   "layer_shard": int(layer_shard),
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
