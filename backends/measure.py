"""How qplan measures a real fine-tune, so that predicted and measured bytes mean the same thing.

Protocol (the same for every backend: it is a ``transformers.TrainerCallback``)
-----------------------------------------------------------------------------
1. **Phases while loading.** After ``from_pretrained`` (``after_load``), after k-bit preparation
   (``after_prepare``: ``prepare_model_for_kbit_training`` upcasts; same as after_load when not
   used) and after the adapters are attached (``after_adapters``), each taken after
   ``gc.collect()`` (and ``torch.cuda.empty_cache()`` on CUDA). ``weights`` is the
   ``after_prepare`` figure; ``weights_footprint`` is ``model.get_memory_footprint()`` there.
   A rank of an FSDP run on the CPU adds ``after_shard`` (after ``fully_shard``): its ``weights``
   are this rank's frozen shards, replicated buffers and quantization constants (adapters apart).
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
* The tracker is ``qplan.observe``'s, the same that traces a step on the meta device, and it
  labels bytes with the same vocabulary (``qplan.planner.vocab.CATEGORIES``, decided after the
  window from each storage's history by ``qplan.observe.summary``), giving ``breakdown_at_peak``:
  ``weights`` (frozen parameters, buffers, quantization constants), ``adapters`` (trainable
  parameters), ``gradients`` (a storage becomes one when it is accumulated into ``.grad``),
  ``optimizer`` (optimizer state), ``logits`` (``[rows, vocabulary]`` tensors of the step: the
  logits, their fp32 copies, log-softmax, their gradients; with Unsloth's chunked cross-entropy,
  its chunks), ``activations`` (the batch and other tensors alive before the window, and tensors
  made in a forward pass or a checkpoint recomputation that autograd saved or that outlived it),
  ``temporaries`` (everything else: activation gradients in flight, optimizer scratch).
  ``peak_detail`` lists the largest (category, operator, dtype, shape) groups at the peak;
  ``timeline`` is the live bytes over the measured steps (x: the tracker's allocation/free
  events, downsampled to at most 1,000 runs of events, each kept as its lowest and highest
  bytes, so no peak is lost), the phase segments and the peak (report.html draws it).
* Always: step time (``time.perf_counter`` around each optimizer step, CUDA synchronised),
  tokens per second = ``batch × seq_len × grad_accum`` / mean step time over steps after the
  warm-up (CPU: steps outside the tracker window when there are any, since the tracker slows
  them), and the loss Trainer logs at every step.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import TrainerCallback

from qplan.observe.existing import census, classify_model, register_model, sweep
from qplan.observe.recompute import wrap_recompute
from qplan.observe.summary import Curve
from qplan.observe.tracker import LiveTensorTracker, LogitsRule
from qplan.planner.vocab import PHASES

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
        #: full fine-tuning: the model's trainable parameters are its weights (the tracker's ``weights``)
        self.full = False
        #: which tensors are logits (``LogitsRule.for_step`` of the plan; set by the worker)
        self.logits: LogitsRule | None = None
        self._tracker: Any = None
        self._saved: Any = None
        self._hooks: list[Any] = []
        self._window_open = False
        #: passes outside the training steps (``measured_pass``), by name
        self.passes: dict[str, dict[str, Any]] = {}

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

    @contextlib.contextmanager
    def measured_pass(self, name: str, model: Any) -> Iterator[None]:
        """A pass that runs before training (TRL's ``precompute_ref_log_probs``, inside the trainer's construction),
        measured as the window measures steps: on CUDA the peak statistics reset before it and read after it
        (``peak_allocated``); on the CPU the live-tensor tracker over it, the model's tensors and every other live
        tensor counted from the start (``tensor_peak``, ``breakdown_at_peak``). Saved in ``passes[name]``."""
        gc.collect()
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.passes[name] = {"peak_allocated": int(torch.cuda.max_memory_allocated(self.device))}
            return
        tr = LiveTensorTracker(self.device.type, logits=self.logits or LogitsRule(self.vocab or None), origins=True)
        register_model(tr, model, as_weights=self.full)
        sweep(tr, "input")
        with tr:
            tr.set_phase("forward", 0)
            yield
            tr.set_phase("end")
        tr.detach()
        curve = Curve(tr)
        res = curve.summarize()
        self.passes[name] = {"tensor_peak": res["tensor_peak"], "breakdown_at_peak": res["breakdown_at_peak"],
                             "peak_detail": curve.detail(res["peak_event"])}

    # -- the measured window ----------------------------------------------------------------
    def start_window(self, model: Any, optimizer: Any, step: int) -> None:
        gc.collect()
        self.window = {"first_step": step}
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            tr = LiveTensorTracker(self.device.type, logits=self.logits or LogitsRule(self.vocab or None),
                                   origins=True)
            register_model(tr, model, as_weights=self.full)
            for p in model.parameters():
                if p.grad is not None:  # accumulated gradients from an unfinished step
                    rec = tr.add_existing(p.grad, None)
                    if rec is not None:
                        rec.grad_at = -1
            if optimizer is not None:
                for state in getattr(optimizer, "state", {}).values():
                    for v in state.values():
                        tr.add_existing(v, None)
            classify_model(tr, model, optimizer)
            sweep(tr, "input")  # the batch and every other live tensor on the device

            def grad_hook(p, tr=tr):
                rec = tr.lookup(p.grad)
                if rec is not None and rec.grad_at is None:
                    rec.grad_at = tr.event

            def pack(t, tr=tr):
                rec = tr.lookup(t)
                if rec is not None:
                    rec.saved = True
                return t

            self._hooks = [p.register_post_accumulate_grad_hook(grad_hook) for p in model.parameters() if p.requires_grad]
            self._saved = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            self._tracker = tr
            self._saved.__enter__()
            tr.__enter__()
            tr.set_phase(self.phase, step)
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
            tr.set_phase("end")
            tr.__exit__(None, None, None)
            self._saved.__exit__(None, None, None)
            for h in self._hooks:
                h.remove()
            tr.detach()
            self._tracker = None
            curve = Curve(tr)
            # a GRPO run marks its generation (backends.grpo_train): its own phase peak then
            marked = ("generation",) if any(ph == "generation" for _, ph, _ in tr.marks) else ()
            res = curve.summarize(PHASES + marked)
            first = next(ev for ev, ph, _ in tr.marks if ph == "forward")
            start = curve.breakdown(first - 1)
            self.window.update({
                "tensor_peak": res["tensor_peak"],
                "tensor_peak_phase": res["peak_phase"],
                "tensor_peak_step": res["peak_step"],
                "breakdown_at_peak": res["breakdown_at_peak"],
                "phase_peaks": res["phase_peaks"],
                "peak_detail": curve.detail(res["peak_event"]),
                "tracked_at_start": res["baseline"],
                "tracked_at_start_by_category": {k: v for k, v in start.items() if v},
                # live bytes over the measured steps, downsampled (report.html draws it)
                "timeline": curve.timeline(first),
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
                      "tracked_at_start", "tracked_at_start_by_category", "peak_detail", "timeline"):
                if k in self.window:
                    out[k] = self.window[k]
            shard = self.phases.get("after_shard")
            if shard is not None:
                out["weights"] = shard["model_tensors"] - shard["model_tensors_by_category"].get("adapters", 0)
            elif prep is not None:
                out["weights"] = prep["model_tensors"]
        if "first_step" in self.window:
            out["window_steps"] = [self.window["first_step"], self.window.get("last_step")]
        if self.passes:
            out["passes"] = self.passes
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
        self._unwrap: list[Any] = []
        self.current_step = 0
        self.trainer_args: dict[str, Any] | None = None

    def _sync(self) -> None:
        if self.probe.is_cuda:
            torch.cuda.synchronize(self.probe.device)

    def on_train_begin(self, args, state, control, model=None, **kw):
        from .hf_train import effective_arguments

        self.trainer_args = effective_arguments(args)
        opt = getattr(kw.get("optimizer"), "optimizer", kw.get("optimizer"))  # under accelerate's AcceleratedOptimizer
        if opt is not None and type(opt).__module__.startswith("peft."):  # handed to the Trainer (LoRA-FA)
            self.trainer_args["optim"] = f"peft {type(opt).__name__}"
        if model is not None and not self._handles:
            self._handles = [
                model.register_forward_pre_hook(lambda *a: self.probe.set_phase("forward")),
                model.register_forward_hook(lambda *a: self.probe.set_phase("backward")),
            ]

    def _mark_recomputation(self, model: Any) -> None:
        """Checkpointed layers run their forward again inside the backward pass: tell the tracker
        (``qplan.observe.recompute``, the wrapper the trace uses too)."""
        self._unwrap.append(wrap_recompute(model, lambda: self.probe._tracker))

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
        for restore in self._unwrap:
            restore()
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
            # every step after the warm-up (tracked ones are slowed by the tracker: see timed_steps)
            "tokens_per_second_per_step": [round(self.tokens_per_step / s["seconds"], 3) for s in after
                                           if s["seconds"] > 0],
        }
