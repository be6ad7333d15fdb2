"""How qplan measures a real fine-tune, so that predicted and measured bytes mean the same thing.

Protocol (the same for every backend: it is a ``transformers.TrainerCallback``)
-----------------------------------------------------------------------------
1. **Phases while loading.** After ``from_pretrained`` (``after_load``), after k-bit preparation
   (``after_prepare``: ``prepare_model_for_kbit_training`` upcasts; same as after_load when not
   used) and after the adapters are attached (``after_adapters``), each taken after
   ``gc.collect()`` (and ``torch.cuda.empty_cache()`` on CUDA). ``weights`` is the
   ``after_prepare`` figure; ``weights_footprint`` is ``model.get_memory_footprint()`` there.
2. **Warm-up.** Step 1 runs unmeasured: it creates the optimizer state and warms kernels
   and caches, so it is not a steady-state step.
3. **Reset.** At the start of step 2: ``gc.collect()``, empty the CUDA cache, reset the peak
   statistics (CUDA), or start the live-tensor tracker (CPU).
4. **Measure ≥ 2 steps** (steps 2 and 3 by default) and read the peak at the end of the last one.

What each number is
-------------------
* CUDA: ``peak_allocated`` = ``torch.cuda.max_memory_allocated()`` (bytes of live tensors,
  as the caching allocator rounds them); ``peak_reserved`` = ``max_memory_reserved()`` (what
  the allocator holds from the driver); ``device_used`` = NVML's used memory of the whole device
  (``pynvml``; every process on the GPU) or, without pynvml, ``total - free`` from
  ``torch.cuda.mem_get_info()``. ``cuda_context`` = ``device_used - memory_reserved()`` at a
  quiet moment (after the adapters, cache emptied); ``peak`` = ``peak_reserved + cuda_context``.
* CPU: ``tensor_peak`` = the largest sum of the bytes of every live tensor *storage* (views
  counted once) during the measured steps, seen by ``LiveTensorTracker``, a
  ``TorchDispatchMode``. Tensors that exist before it starts (parameters, buffers,
  bitsandbytes quantization constants, optimizer state, and every other live CPU tensor found by
  ``gc.get_objects()``) are counted from the start; every storage an operator returns is added,
  and removed when the storage is freed (a weak reference). It sees what operators return: a
  kernel's internal scratch memory, and anything a C extension allocates without the
  dispatcher, is not seen. The CPU has no caching allocator and no context, so there is no
  ``peak`` beside ``tensor_peak``.
* The tracker labels each byte by what it is, giving ``breakdown_at_peak``: ``weights`` (frozen
  parameters and buffers), ``quant_state`` (bitsandbytes constants), ``adapters`` (trainable
  parameters), ``gradients`` (a storage becomes one when it is accumulated into ``.grad``),
  ``optimizer`` (optimizer state), ``logits`` (tensors made by an operator whose last dimension
  is the vocabulary: the logits, their fp32 copies, log-softmax, their gradients, and the chunks
  of a chunked cross-entropy), ``activations`` (other tensors
  made in the forward pass, or by a checkpointed layer recomputing its forward inside the
  backward pass), ``backward`` (other tensors made in the backward pass — activation
  gradients — and by gradient clipping), ``optimizer_step`` (temporaries of the optimizer step), ``other`` (anything else
  alive before the window: the batch, scalars).
* Always: step time (``time.perf_counter`` around each optimizer step, CUDA synchronised),
  tokens per second = ``batch × seq_len × grad_accum`` / mean step time over steps after the
  warm-up (CPU: steps outside the tracker window when there are any, since the tracker slows
  them), and the loss Trainer logs at every step.
"""

from __future__ import annotations

import gc
import time
import warnings
import weakref
from collections import defaultdict
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary
from transformers import TrainerCallback

CATEGORIES = ("weights", "quant_state", "adapters", "gradients", "optimizer", "logits", "activations",
              "backward", "optimizer_step", "other")
#: tensors made while the step is in this phase get this category (unless they are logits)
PHASE_CATEGORY = {"forward": "activations", "recompute": "activations", "backward": "backward",
                  "optimizer": "optimizer_step"}


class _Rec:
    __slots__ = ("nbytes", "category", "origin")

    def __init__(self, nbytes: int, category: str, origin: str) -> None:
        self.nbytes = nbytes
        self.category = category
        self.origin = origin  # "<aten op> <dtype> <shape>" that made it, or "existing"


class LiveTensorTracker(TorchDispatchMode):
    """Bytes of live tensor storages on one device type: current, peak, and by category.

    Enter it as a context manager (or ``__enter__``/``__exit__`` from callbacks of one thread).
    ``add(t, category)`` counts a tensor that already exists; ``relabel`` changes a storage's
    category. ``vocab`` identifies logits-shaped tensors (see module docstring).
    """

    def __init__(self, device_type: str = "cpu", vocab: int = 0) -> None:
        super().__init__()
        self.device_type = device_type
        self.vocab = vocab
        self._recs: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0
        self.by_category: dict[str, int] = defaultdict(int)
        self.peak_by_category: dict[str, int] = {}
        #: bytes by (category, origin): which operator made the bytes of each category
        self.by_origin: dict[tuple[str, str], int] = defaultdict(int)
        self.peak_by_origin: dict[tuple[str, str], int] = {}
        self.phase = "idle"
        self.step: int | None = None
        self.peak_phase: str | None = None
        self.peak_step: int | None = None
        self.phase_peaks: dict[str, int] = {}
        self._closed = False
        self._orig_resize = None
        self._frees = 0
        self._peak_frees = 0

    # -- bookkeeping ------------------------------------------------------------------------
    def _freed(self, rec: _Rec, _ref: Any) -> None:
        if self._closed:
            return
        self._frees += 1
        self.current -= rec.nbytes
        self.by_category[rec.category] -= rec.nbytes
        self.by_origin[(rec.category, rec.origin)] -= rec.nbytes

    def _note_peak(self, relabelled: bool = False) -> None:
        if self.current > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.current
        # a relabel at the peak (nothing freed since) describes the same bytes: refresh the labels
        if self.current > self.peak or (relabelled and self.current == self.peak and self._frees == self._peak_frees):
            self.peak = self.current
            self._peak_frees = self._frees
            self.peak_by_category = {k: v for k, v in self.by_category.items() if v}
            self.peak_by_origin = {k: v for k, v in self.by_origin.items() if v}
            self.peak_phase = self.phase
            self.peak_step = self.step

    def _track_storage(self, st: torch.UntypedStorage, category: str, origin: str = "existing") -> _Rec | None:
        entry = self._recs.get(st)
        n = st.nbytes()
        if entry is not None:
            rec = entry[0]
            if rec.nbytes != n:  # resized in place (resize_, set_)
                self.current += n - rec.nbytes
                self.by_category[rec.category] += n - rec.nbytes
                self.by_origin[(rec.category, rec.origin)] += n - rec.nbytes
                rec.nbytes = n
            return rec
        rec = _Rec(n, category, origin)
        self._recs[st] = (rec, weakref.ref(st, lambda r, rec=rec: self._freed(rec, r)))
        self.current += n
        self.by_category[category] += n
        self.by_origin[(category, origin)] += n
        return rec

    def _storage(self, t: Any) -> torch.UntypedStorage | None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / wrapper tensors without storage
            return None

    def add(self, t: torch.Tensor, category: str) -> bool:
        """Count an existing tensor under ``category``; False if its storage is already counted."""
        st = self._storage(t)
        if st is None or st in self._recs:
            return False
        self._track_storage(st, category)
        self._note_peak()
        return True

    def relabel(self, t: torch.Tensor, category: str) -> None:
        """Move ``t``'s storage to ``category`` (e.g. a backward output that became ``.grad``)."""
        st = self._storage(t)
        if st is None:
            return
        rec = self._track_storage(st, category)
        if rec is not None and rec.category != category:
            self.by_category[rec.category] -= rec.nbytes
            self.by_category[category] += rec.nbytes
            self.by_origin[(rec.category, rec.origin)] -= rec.nbytes
            self.by_origin[(category, rec.origin)] += rec.nbytes
            rec.category = category
        self._note_peak(relabelled=True)

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    # -- TorchDispatchMode ------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            st = self._storage(t)
            if st is None:
                continue
            cat = PHASE_CATEGORY.get(self.phase, "other")
            if self.vocab and t.dim() >= 2 and t.shape[-1] == self.vocab:
                cat = "logits"
            self._track_storage(st, cat, f"{func.__name__} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}")
        self._note_peak()
        return out

    def __enter__(self):
        # UntypedStorage.resize_ bypasses the dispatcher (as in torch's MemTracker): watch it.
        self._orig_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st, size):
            tracker._orig_resize(st, size)
            if st in tracker._recs:
                tracker._track_storage(st, "other")
                tracker._note_peak()

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        if self._orig_resize is not None:
            torch.UntypedStorage.resize_ = self._orig_resize
            self._orig_resize = None
        return super().__exit__(*exc)

    def close(self) -> None:
        """Stop following frees (call after ``__exit__``; the numbers stay as they are)."""
        self._closed = True

    def breakdown(self) -> dict[str, int]:
        return {k: v for k, v in self.by_category.items() if v}

    def peak_detail(self, top: int = 40) -> list[dict[str, Any]]:
        """The largest (category, operator dtype shape) groups of live bytes at the peak."""
        rows = sorted(self.peak_by_origin.items(), key=lambda kv: -kv[1])[:top]
        return [{"category": c, "origin": o, "bytes": b} for (c, o), b in rows]


# ------------------------------------------------------------------------- what exists already


def _tensors_in(obj: Any, depth: int = 2) -> list[torch.Tensor]:
    """Tensors held in the attributes of ``obj`` (bitsandbytes QuantState, MatmulLtState ...)."""
    out: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0 or obj is None:
        return out
    if isinstance(obj, (list, tuple)):
        for v in obj:
            out += _tensors_in(v, depth - 1)
        return out
    if isinstance(obj, dict):
        for v in obj.values():
            out += _tensors_in(v, depth - 1)
        return out
    for v in getattr(obj, "__dict__", {}).values():
        out += _tensors_in(v, depth - 1)
    return out


def quant_state_tensors(model: Any) -> list[torch.Tensor]:
    """bitsandbytes constants, which are not parameters: ``Params4bit.quant_state`` (absmax,
    code, offset, nested state), ``Int8Params.SCB``/``CB`` and ``Linear8bitLt.state``."""
    out: list[torch.Tensor] = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if w is None:
            continue
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            out += _tensors_in(qs, depth=3)
        for attr in ("SCB", "CB"):
            t = getattr(w, attr, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
        st = getattr(m, "state", None)
        if st is not None and type(st).__name__ == "MatmulLtState":
            out += _tensors_in(st, depth=1)
    return out


def register_existing(tracker: LiveTensorTracker, model: Any, optimizer: Any = None, sweep: bool = True,
                      adapters: bool = True) -> None:
    """Count every tensor alive before tracking starts, each under its category.

    ``adapters=False`` (before ``get_peft_model``): every parameter is a weight, whatever its
    ``requires_grad``.
    """
    for p in model.parameters():
        tracker.add(p, "adapters" if (adapters and p.requires_grad) else "weights")
        if p.grad is not None:
            tracker.add(p.grad, "gradients")
    for b in model.buffers():
        tracker.add(b, "weights")
    for t in quant_state_tensors(model):
        tracker.add(t, "quant_state")
    if optimizer is not None:
        for state in getattr(optimizer, "state", {}).values():
            for t in _tensors_in(state, depth=1):
                tracker.add(t, "optimizer")
    if sweep:
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
            warnings.simplefilter("ignore")
            for obj in gc.get_objects():
                try:
                    if isinstance(obj, torch.Tensor) and not obj.is_meta:
                        tracker.add(obj, "other")
                except Exception:  # noqa: BLE001 - exotic objects with a failing __class__
                    continue


def census(model: Any, device_type: str, adapters: bool = True) -> dict[str, int]:
    """Bytes of the model's own storages (no sweep) by category: weights, quant_state, adapters."""
    tr = LiveTensorTracker(device_type)
    register_existing(tr, model, sweep=False, adapters=adapters)
    tr.close()
    return tr.breakdown()


# ---------------------------------------------------------------------------------- probes


def _nvml_used(index: int) -> int | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
    except Exception:  # noqa: BLE001 - NVML missing in containers: fall back
        return None


class Probe:
    """Reads memory on one device per the protocol; ``phase``/``step`` say where a run is."""

    def __init__(self, device: str, vocab: int = 0) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.vocab = vocab
        self.phase = "start"
        self.step: int | None = None
        self.phases: dict[str, dict[str, Any]] = {}
        self.window: dict[str, Any] = {}
        self.weights_footprint: int | None = None
        self._tracker: LiveTensorTracker | None = None
        self._window_open = False

    # -- phases ---------------------------------------------------------------------------
    def set_phase(self, phase: str) -> None:
        self.phase = phase
        if self._tracker is not None:
            self._tracker.set_phase(phase)

    def _device_used(self) -> tuple[int, str]:
        idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
        used = _nvml_used(idx)
        if used is not None:
            return used, "nvml"
        free, total = torch.cuda.mem_get_info(idx)
        return int(total - free), "mem_get_info"

    def snapshot(self, name: str, model: Any, adapters: bool = False) -> dict[str, Any]:
        """Memory after a loading phase (``after_load``, ``after_prepare``, ``after_adapters``);
        ``adapters``: the model has adapters attached (its trainable parameters are adapters)."""
        gc.collect()
        snap: dict[str, Any] = {}
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            used, src = self._device_used()
            snap = {"allocated": int(torch.cuda.memory_allocated(self.device)),
                    "reserved": int(torch.cuda.memory_reserved(self.device)),
                    "device_used": used, "device_used_source": src}
        by_cat = census(model, self.device.type, adapters=adapters)
        snap["model_tensors"] = sum(by_cat.values())
        snap["model_tensors_by_category"] = by_cat
        self.phases[name] = snap
        return snap

    # -- the measured window ----------------------------------------------------------------
    def start_window(self, model: Any, optimizer: Any, step: int) -> None:
        gc.collect()
        self.window = {"first_step": step}
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            tr = LiveTensorTracker(self.device.type, self.vocab)
            tr.step = step
            tr.set_phase(self.phase)
            register_existing(tr, model, optimizer)
            self.window["tracked_at_start"] = tr.current
            self.window["tracked_at_start_by_category"] = tr.breakdown()
            self._hooks = [p.register_post_accumulate_grad_hook(lambda p, tr=tr: tr.relabel(p.grad, "gradients"))
                           for p in model.parameters() if p.requires_grad]
            self._tracker = tr
            tr.__enter__()
        self._window_open = True

    def set_step(self, step: int) -> None:
        self.step = step
        if self._tracker is not None:
            self._tracker.step = step

    def end_window(self, step: int) -> None:
        if not self._window_open:
            return
        self._window_open = False
        self.window["last_step"] = step
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            used, src = self._device_used()
            self.window.update({
                "peak_allocated": int(torch.cuda.max_memory_allocated(self.device)),
                "peak_reserved": int(torch.cuda.max_memory_reserved(self.device)),
                "device_used": used, "device_used_source": src,
            })
        else:
            tr = self._tracker
            assert tr is not None
            tr.__exit__(None, None, None)
            tr.close()
            for h in self._hooks:
                h.remove()
            self._tracker = None
            self.window.update({
                "tensor_peak": tr.peak,
                "tensor_peak_phase": tr.peak_phase,
                "tensor_peak_step": tr.peak_step,
                "breakdown_at_peak": dict(sorted(tr.peak_by_category.items(), key=lambda kv: CATEGORIES.index(kv[0]))),
                "phase_peaks": tr.phase_peaks,
                "peak_detail": tr.peak_detail(),
            })

    @property
    def window_open(self) -> bool:
        return self._window_open

    def memory(self) -> dict[str, Any]:
        """The ``measured.memory`` section: counters named for what they are."""
        out: dict[str, Any] = {"device": str(self.device)}
        prep = self.phases.get("after_prepare") or self.phases.get("after_load")
        if self.is_cuda:
            out["counters"] = "torch.cuda max_memory_allocated/max_memory_reserved; device_used: " + (
                self.window.get("device_used_source") or "nvml or mem_get_info")
            for k in ("peak_allocated", "peak_reserved", "device_used", "device_used_source"):
                if k in self.window:
                    out[k] = self.window[k]
            quiet = self.phases.get("after_adapters")
            if quiet is not None:
                out["cuda_context"] = quiet["device_used"] - quiet["reserved"]
                if "peak_reserved" in out:
                    out["peak"] = out["peak_reserved"] + out["cuda_context"]
            if prep is not None:
                out["weights"] = prep["allocated"]
        else:
            out["counters"] = "live tensor storages seen by a TorchDispatchMode (LiveTensorTracker)"
            for k in ("tensor_peak", "tensor_peak_phase", "tensor_peak_step", "breakdown_at_peak", "phase_peaks",
                      "tracked_at_start", "tracked_at_start_by_category", "peak_detail"):
                if k in self.window:
                    out[k] = self.window[k]
            if prep is not None:
                out["weights"] = prep["model_tensors"]
        if "first_step" in self.window:
            out["window_steps"] = [self.window["first_step"], self.window.get("last_step")]
        out["weights_footprint"] = self.weights_footprint
        out["phases"] = self.phases
        return out


# --------------------------------------------------------------------------------- callback


class MeasureCallback(TrainerCallback):
    """Runs the protocol inside ``Trainer``: phase hooks, warm-up, window, step times, losses."""

    def __init__(self, probe: Probe, tokens_per_step: int, warmup_steps: int = 1, measure_steps: int = 2) -> None:
        if measure_steps < 2:
            raise ValueError("the protocol measures at least 2 steps")
        self.probe = probe
        self.tokens_per_step = tokens_per_step
        self.warmup_steps = warmup_steps
        self.measure_steps = measure_steps
        self.loss: list[float] = []
        self.steps: list[dict[str, Any]] = []
        self._t0 = 0.0
        self._handles: list[Any] = []
        self._unwrap: list[tuple[Any, Any]] = []
        self.current_step = 0
        self.trainer_args: dict[str, Any] | None = None

    def _sync(self) -> None:
        if self.probe.is_cuda:
            torch.cuda.synchronize(self.probe.device)

    def on_train_begin(self, args, state, control, model=None, **kw):
        from .hf_train import effective_arguments

        self.trainer_args = effective_arguments(args)
        if model is not None and not self._handles:
            self._handles = [
                model.register_forward_pre_hook(lambda *a: self.probe.set_phase("forward")),
                model.register_forward_hook(lambda *a: self.probe.set_phase("backward")),
            ]

    def _mark_recomputation(self, model: Any) -> None:
        """Checkpointed layers run their forward again inside the backward pass; label what that
        makes as activations. transformers (and Unsloth) call ``layer._gradient_checkpointing_func(
        fn, *args)``: wrap it so that ``fn`` run during backward is the ``recompute`` phase."""
        probe = self.probe
        for mod in model.modules():
            orig = mod.__dict__.get("_gradient_checkpointing_func")
            if orig is None or getattr(orig, "_qplan_wrapped", False):
                continue

            def wrapped(fn, *args, _orig=orig, **kwargs):
                def run(*a, **k):
                    if probe.phase != "backward":
                        return fn(*a, **k)
                    probe.set_phase("recompute")
                    try:
                        return fn(*a, **k)
                    finally:
                        probe.set_phase("backward")

                return _orig(run, *args, **kwargs)

            wrapped._qplan_wrapped = True
            mod._gradient_checkpointing_func = wrapped
            self._unwrap.append((mod, orig))

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        step = state.global_step + 1
        self.current_step = step
        self.probe.set_step(step)
        self.probe.set_phase("forward")
        if step == self.warmup_steps + 1 and not self.probe.window_open:
            self._mark_recomputation(model)  # checkpointing is enabled by now, whoever enables it
            self.probe.start_window(model, optimizer, step)
        self._sync()
        self._t0 = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.probe.set_phase("optimizer")

    def on_step_end(self, args, state, control, **kw):
        self._sync()
        dt = time.perf_counter() - self._t0
        step = state.global_step
        self.steps.append({"step": step, "seconds": dt, "tracked": self.probe.window_open and not self.probe.is_cuda})
        self.probe.set_phase("between_steps")
        if step == self.warmup_steps + self.measure_steps:
            self.probe.end_window(step)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.loss.append(float(logs["loss"]))

    def on_train_end(self, args, state, control, **kw):
        if self.probe.window_open:
            self.probe.end_window(state.global_step)
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for mod, orig in self._unwrap:
            mod._gradient_checkpointing_func = orig
        self._unwrap = []

    def timing(self) -> dict[str, Any]:
        """Step times; tokens/s over post-warm-up steps (untracked ones when there are any)."""
        after = [s for s in self.steps if s["step"] > self.warmup_steps]
        clean = [s for s in after if not s["tracked"]] or after
        mean = sum(s["seconds"] for s in clean) / len(clean) if clean else None
        return {
            "step_seconds": [round(s["seconds"], 6) for s in self.steps],
            "tracked_steps": [s["step"] for s in self.steps if s["tracked"]],
            "timed_steps": [s["step"] for s in clean],
            "mean_step_seconds": mean,
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_second": (self.tokens_per_step / mean) if mean else None,
        }
