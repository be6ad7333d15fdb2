"""The live-tensor tracker: one ``TorchDispatchMode`` for the meta-device trace and for ``qplan run``.

It records the history of every tensor *storage* on one device type — when it was allocated
and freed (an event counter), in which phase and step, inside which checkpoint recomputation,
whether autograd saved it, when it became a ``.grad`` — and nothing else. What the bytes are
(``qplan.planner.vocab.CATEGORIES``) and the peaks are decided afterwards from those histories
by ``qplan.observe.summary``, the same way for a trace and for a measurement.

How it counts
-------------
* Bytes of live storages (``untyped_storage().nbytes()``): views share a storage and count once.
* Every storage an operator returns is opened at that event; a storage is closed when its last
  reference dies (``weakref.finalize`` on the untyped storage: its PyObject lives while any
  tensor, including an autograd-saved one, holds the StorageImpl).
* ``adopt_inputs``: a storage first seen as an operator's *input* was made without an operator
  (``torch.tensor(...)`` from Python data, or before tracking began): before the first phase
  mark it existed from the start; afterwards it counts from its first use.
* ``UntypedStorage.resize_`` bypasses the dispatcher (as in torch's ``MemTracker``): it is
  watched while the tracker is entered, and a resized storage is re-opened with its new size.
* ``stand_ins`` maps an ``OpOverload`` to ``fn(reg, *args, **kwargs)``, which performs that op's
  allocations with sub-ops whose outputs it hands to ``reg`` (the trace mirrors bitsandbytes'
  CUDA kernels on the meta device this way).
* Tensor subclasses that wrap others (``DTensor``: FSDP2's sharded parameters, gradients and
  optimizer states) are counted by their inner tensors (``__tensor_flatten__``), the memory a
  rank holds; the wrapper's own (global-shape) storage is not memory.
* ``logits``: tensors whose last dimension is the vocabulary and whose rows are the step's
  token rows (``LogitsRule``) are flagged as logits when made.

Per-rank use: a tracker watches one process's tensors; each rank of a multi-process run makes
its own. It is not thread-safe (neither is the dispatcher's mode stack).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LogitsRule:
    """``t.dim() >= 2``, ``t.shape[-1] == vocab`` and ``t.numel() // vocab`` in ``rows`` (the
    step's token rows: ``B*S`` and the shifted ``B*(S-1)``); ``rows=None``: any number of rows
    (a chunked cross-entropy makes logits in chunks)."""

    vocab: int | None
    rows: frozenset[int] | None = None

    def __call__(self, t: Any) -> bool:
        if not self.vocab or t.dim() < 2 or t.shape[-1] != self.vocab:
            return False
        return self.rows is None or t.numel() // self.vocab in self.rows

    @classmethod
    def for_step(cls, vocab: int | None, batch: int, seq: int, chunked: bool = False) -> "LogitsRule":
        return cls(vocab, None if chunked else frozenset({batch * seq, batch * (seq - 1)}))


class Rec:
    """History of one untyped storage.

    ``kind``: ``frozen`` (frozen parameter, buffer, quantization constant), ``trainable``
    (trainable parameter), ``input`` (the batch and other tensors alive before the step), or
    None (made during the step); ``seg``: index of the phase mark it was made after;
    ``rc``: id of the checkpoint recomputation that made it; ``saved``: autograd saved it;
    ``grad_at``: event at which it became a parameter's ``.grad``; ``opt``: optimizer state;
    ``host``: host memory standing in for device memory (not counted); ``paged``: CUDA unified
    memory (counted apart); ``quant_state``: a bitsandbytes constant."""

    __slots__ = ("nbytes", "alloc", "free", "phase", "step", "seg", "rc", "kind", "saved", "grad_at", "opt", "host",
                 "paged", "logits", "late", "quant_state", "info")

    def __init__(self, nbytes: int, alloc: int, phase: str, step: int, seg: int, rc: int | None, logits: bool):
        self.nbytes = nbytes
        self.alloc = alloc
        self.free: int | None = None
        self.phase = phase
        self.step = step
        self.seg = seg
        self.rc = rc
        self.kind: str | None = None
        self.saved = False
        self.grad_at: int | None = None
        self.opt = False
        self.host = False
        self.paged = False
        self.logits = logits
        self.late = False
        self.quant_state = False
        self.info: tuple | None = None


#: ATen ops that launch no device kernel: views, aliases, shape metadata, allocation without a fill, host reads
NO_KERNEL = frozenset({
    "_unsafe_view", "view", "_reshape_alias", "detach", "alias", "lift_fresh", "_local_scalar_dense", "empty",
    "empty_strided", "empty_like", "new_empty", "new_empty_strided", "t", "transpose", "expand", "slice", "select",
    "unsqueeze", "squeeze", "permute", "as_strided", "split", "split_with_sizes", "chunk", "unbind", "unfold",
    "view_as_real", "view_as_complex", "diagonal", "narrow", "set_", "resize_", "_has_compatible_shallow_copy_type",
    "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
})


def launches_kernel(func: Any) -> bool:
    """Whether dispatching ``func`` (an ATen op overload) launches a device kernel on a GPU: not a view or alias of
    its input (the schema's returns alias it), not a metadata or host-side op (``NO_KERNEL``). The count of these per
    step is what ``qplan.planner.compute.ops`` predicts (each costs the host a dispatch and the GPU a launch)."""
    name = func.overloadpacket.__name__
    if func.namespace == "profiler" or name in NO_KERNEL:
        return False
    return not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _tracker_cls():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

    def _inner_tensors(t: Any) -> list:
        attrs, _ = t.__tensor_flatten__()
        return [v for v in (getattr(t, a) for a in attrs) if isinstance(v, torch.Tensor)]

    class LiveTensorTracker(TorchDispatchMode):
        """Records every storage on ``device_type`` (see the module docstring)."""

        def __init__(self, device_type: str, *, logits: LogitsRule | None = None,
                     stand_ins: dict[Any, Callable] | None = None, adopt_inputs: bool = True,
                     host_scalars_phase: str | None = None, origins: bool | None = None) -> None:
            super().__init__()
            self.device_type = device_type
            self.logits = logits or LogitsRule(None)
            self.stand_ins = stand_ins or {}
            self.adopt_inputs = adopt_inputs
            #: a 0-dim tensor made from Python data in this phase is host memory (the CPU oracle
            #: of the trace mirrors CUDA, where AdamW's ``torch.tensor(1.0)`` step lives on the host)
            self.host_scalars_phase = host_scalars_phase
            #: keep (shape, dtype, op) of each storage: measurement detail, or QPLAN_TRACE_DEBUG=1
            self.origins = bool(os.environ.get("QPLAN_TRACE_DEBUG")) if origins is None else origins
            self.live: dict[int, Rec] = {}
            self.records: list[Rec] = []
            self.finalizers: list[Any] = []
            self.event = 0
            self.phase = "setup"
            self.step = 0
            #: (event, phase, step) at every phase change; segment i runs from marks[i] to marks[i+1]
            self.marks: list[tuple[int, str, int]] = []
            self.rc: int | None = None
            self.rc_end: dict[int, int | None] = {}
            #: kernel launches (``launches_kernel``) per (step, phase)
            self.launches: dict[tuple[int, str], int] = {}
            #: collectives (``c10d`` ops): the full-size tensor's bytes (an all-gather's output, a reduce-scatter's
            #: input, an all-reduce's tensor) summed per (step, phase, op)
            self.collectives: dict[tuple[int, str, str], int] = {}
            self._launch_cache: dict[Any, bool] = {}
            self._op: str | None = None
            self._orig_resize = None

        # -- phases ---------------------------------------------------------------------
        def set_phase(self, phase: str, step: int | None = None) -> None:
            """Enter ``phase`` (of ``step``); a change is a mark that starts a new segment."""
            if step is not None:
                self.step = step
            if self.marks and self.marks[-1][1] == phase and self.marks[-1][2] == self.step:
                return
            self.phase = phase
            self.marks.append((self.event, phase, self.step))

        def begin_recompute(self) -> int | None:
            """A checkpointed layer starts recomputing its forward inside the backward pass."""
            prev, self.rc = self.rc, len(self.rc_end) + 1
            self.rc_end[self.rc] = None
            return prev

        def end_recompute(self, prev: int | None) -> None:
            if self.rc is not None:
                self.rc_end[self.rc] = self.event
            self.rc = prev

        # -- bookkeeping ----------------------------------------------------------------
        def reg(self, t: Any, late: bool = False) -> Any:
            if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                return t
            if is_traceable_wrapper_subclass(t):  # a DTensor: its local shard is the memory
                for inner in _inner_tensors(t):
                    self.reg(inner, late)
                return t
            out = t
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse / wrapper tensors without storage
                return out
            rec = self.live.get(id(st))
            if rec is not None:
                if st.nbytes() != rec.nbytes:  # resized in place (resize_, set_): same storage, new size
                    self._close(id(st), rec)
                    new = self._open(st, t, late)
                    new.kind, new.opt, new.quant_state = rec.kind, rec.opt, rec.quant_state
                return out
            self._open(st, t, late)
            return out

        def _open(self, st: Any, t: Any, late: bool) -> Rec:
            pre = late and not self.marks
            rec = Rec(st.nbytes(), -1 if pre else self.event, self.phase, self.step, len(self.marks) - 1, self.rc,
                      t is not None and self.logits(t))
            rec.late = late
            if late and not pre and self.phase == self.host_scalars_phase and t.dim() == 0:
                rec.host = True
            if self.origins and t is not None:
                rec.info = (tuple(t.shape), str(t.dtype).removeprefix("torch."), self._op or "existing")
            self.event += 1
            self.live[id(st)] = rec
            self.records.append(rec)
            self.finalizers.append(weakref.finalize(st, self._finalize, id(st), rec))
            return rec

        def _finalize(self, key: int, rec: Rec) -> None:
            if self.live.get(key) is rec:
                self._close(key, rec)

        def _close(self, key: int, rec: Rec) -> None:
            del self.live[key]
            rec.free = self.event
            self.event += 1

        def lookup(self, t: Any) -> Rec | None:
            if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                return None
            if is_traceable_wrapper_subclass(t):
                inner = _inner_tensors(t)
                return self.lookup(inner[0]) if len(inner) == 1 else None
            try:
                return self.live.get(id(t.untyped_storage()))
            except (RuntimeError, NotImplementedError):
                return None

        def add_existing(self, t: Any, kind: str | None, overwrite: bool = True) -> Rec | None:
            """Count a tensor that exists before the step from the start, as ``kind`` (replacing
            an earlier kind of the same storage unless ``overwrite`` is False)."""
            self.reg(t)
            rec = self.lookup(t)
            if rec is not None:
                rec.alloc = -1
                if kind is not None and (overwrite or rec.kind is None):
                    rec.kind = kind
            return rec

        def reg_tree(self, out: Any) -> Any:
            if isinstance(out, torch.Tensor):
                self.reg(out)
            elif isinstance(out, (tuple, list)):
                for o in out:
                    self.reg_tree(o)
            return out

        @property
        def live_bytes(self) -> int:
            """Bytes of the storages alive now (host stand-ins and paged state excluded)."""
            return sum(r.nbytes for r in self.live.values() if not (r.host or r.paged))

        def detach(self) -> None:
            """Stop following frees (the records stay as they are)."""
            for f in self.finalizers:
                f.detach()
            self.finalizers.clear()

        # -- dispatch -------------------------------------------------------------------
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "profiler":  # record_function handles: host-side, not memory
                return func(*args, **kwargs)
            if self.origins:
                self._op = str(func)
            if func.namespace == "c10d":
                sizes = [t.numel() * t.element_size() for a in args
                         for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
                key3 = (self.step, self.phase, func.overloadpacket.__name__)
                self.collectives[key3] = self.collectives.get(key3, 0) + max(sizes, default=0)
            kernel = self._launch_cache.get(func)
            if kernel is None:
                kernel = self._launch_cache[func] = launches_kernel(func)
            if kernel:
                key = (self.step, self.phase)
                self.launches[key] = self.launches.get(key, 0) + 1
            if self.adopt_inputs:
                for a in args:
                    if isinstance(a, torch.Tensor):
                        if a.device.type == self.device_type and self.lookup(a) is None:
                            self.reg(a, late=True)
                    elif isinstance(a, (list, tuple)):
                        for b in a:
                            if isinstance(b, torch.Tensor) and b.device.type == self.device_type \
                                    and self.lookup(b) is None:
                                self.reg(b, late=True)
            stand_in = self.stand_ins.get(func)
            if stand_in is not None:
                return stand_in(self.reg, *args, **kwargs)
            return self.reg_tree(func(*args, **kwargs))

        def __enter__(self):
            self._orig_resize = torch.UntypedStorage.resize_
            tracker = self

            def resize_(st, size):
                tracker._orig_resize(st, size)
                rec = tracker.live.get(id(st))
                if rec is not None and st.nbytes() != rec.nbytes:
                    tracker._close(id(st), rec)
                    new = tracker._open(st, None, False)
                    new.kind, new.opt = rec.kind, rec.opt

            torch.UntypedStorage.resize_ = resize_
            return super().__enter__()

        def __exit__(self, *exc):
            if self._orig_resize is not None:
                torch.UntypedStorage.resize_ = self._orig_resize
                self._orig_resize = None
            return super().__exit__(*exc)

    return LiveTensorTracker


_CLS: list = []


def LiveTensorTracker(device_type: str, **kwargs: Any):
    """A new tracker (the class is made on first use, so importing this module needs no torch)."""
    if not _CLS:
        _CLS.append(_tracker_cls())
    return _CLS[0](device_type, **kwargs)
