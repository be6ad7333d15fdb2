"""What exists before a step: the model's own tensors (parameters, buffers, bitsandbytes constants)
and the optimizer's state, each with what it is — for the tracker, and for ``census`` snapshots.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator
from typing import Any


def model_tensors(model: Any) -> Iterator[tuple[Any, str, bool]]:
    """``(tensor, kind, is_quant_state)`` for every tensor the model holds: parameters
    (``trainable``/``frozen``), buffers and other tensor attributes of its modules (``frozen``),
    and bitsandbytes' constants, which are not parameters (``Params4bit.quant_state``: absmax,
    code, offset and the nested state; LLM.int8's ``CB``/``SCB`` on the weight and on
    ``Linear8bitLt.state``). A storage may come up more than once; callers count it once. A frozen
    LoRA tensor (LoRA-FA's ``lora_A``: ``create_lorafa_optimizer`` freezes it) is part of the adapter all the same."""
    import torch

    for n, p in model.named_parameters():
        yield p, "trainable" if (p.requires_grad or ".lora_" in n) else "frozen", False
    for b in model.buffers():
        yield b, "frozen", False
    for m in model.modules():
        for v in list(vars(m).values()):
            if isinstance(v, torch.Tensor):
                yield v, "frozen", False
        w = getattr(m, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                yield t, "frozen", True
            if getattr(qs, "state2", None) is not None:
                yield qs.state2.absmax, "frozen", True
                yield qs.state2.code, "frozen", True
        st = getattr(m, "state", None)
        if st is not None and hasattr(st, "SCB"):
            yield st.CB, "frozen", True
            yield st.SCB, "frozen", True
        if w is not None and hasattr(w, "SCB"):
            yield w.SCB, "frozen", True
            yield getattr(w, "CB", None), "frozen", True


def optimizer_tensors(optimizer: Any) -> Iterator[tuple[str, Any]]:
    """``(state key, tensor)`` of every optimizer state tensor; a tensor subclass that holds its data in inner
    tensors (torchao's ``OptimState8bit``: ``codes``, ``scale``, ``qmap``) gives each of them under its key."""
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    for state in getattr(optimizer, "state", {}).values():
        for k, v in state.items():
            if is_traceable_wrapper_subclass(v):
                for attr in v.__tensor_flatten__()[0]:
                    yield k, getattr(v, attr)
            elif isinstance(v, torch.Tensor):
                yield k, v


def register_model(tracker: Any, model: Any, *, as_weights: bool = False) -> None:
    """Count the model's tensors from the start (``as_weights``: before adapters exist, every
    parameter is a weight whatever its ``requires_grad``)."""
    for t, kind, qs in model_tensors(model):
        rec = tracker.add_existing(t, "frozen" if as_weights else kind)
        if rec is not None and qs:
            rec.quant_state = True


def classify_model(tracker: Any, model: Any, optimizer: Any = None,
                   host_step: bool = False) -> None:
    """After a step: label storages the model or the optimizer now hold (new optimizer state,
    bitsandbytes constants made during the step). ``host_step``: the optimizer keeps ``step`` on
    the host for CUDA parameters (not counted)."""
    for t, kind, qs in model_tensors(model):
        rec = tracker.lookup(t)
        if rec is not None and rec.kind is None:
            rec.kind = kind
            rec.quant_state = rec.quant_state or qs
    if optimizer is not None:
        for k, v in optimizer_tensors(optimizer):
            rec = tracker.lookup(v)
            if rec is None:  # made without an op the tracker sees (torchao's ``qmap``: ``torch.tensor(list)``)
                tracker.reg(v, late=True)
                rec = tracker.lookup(v)
            if rec is not None:
                rec.opt = True
                if host_step and k == "step":
                    rec.host = True


def sweep(tracker: Any, kind: str = "input", keep: Callable[[Any], bool] | None = None) -> None:
    """Count every other live tensor on the tracker's device (the batch, RNG state, caches):
    ``gc.get_objects()``, as torch's ``MemTracker`` does."""
    import torch

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and not obj.is_meta and (keep is None or keep(obj)) \
                        and tracker.lookup(obj) is None:
                    tracker.add_existing(obj, kind)
            except Exception:  # noqa: BLE001 - exotic objects with a failing __class__
                continue


def census(model: Any, device_type: str, adapters: bool = True) -> dict[str, int]:
    """Bytes of the model's own storages on ``device_type`` (each once): ``weights`` (frozen),
    ``adapters`` (trainable; with ``adapters=False`` every parameter is a weight) and, as a
    part of ``weights``' kind reported apart, ``quant_state`` (bitsandbytes constants)."""
    import torch

    seen: dict[int, tuple[int, str]] = {}
    for t, kind, qs in model_tensors(model):
        if not isinstance(t, torch.Tensor) or t.device.type != device_type:
            continue
        t = getattr(t, "_local_tensor", t)  # an FSDP2-sharded DTensor: this rank's shard
        st = t.untyped_storage()
        if id(st) in seen:
            continue
        cat = "quant_state" if qs else ("adapters" if adapters and kind == "trainable" else "weights")
        seen[id(st)] = (st.nbytes(), cat)
    out: dict[str, int] = {}
    for n, cat in seen.values():
        out[cat] = out.get(cat, 0) + n
    return out
