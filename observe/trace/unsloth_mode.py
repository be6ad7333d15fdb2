"""The Unsloth mode of the meta-device trace: Unsloth's GPU code path run on the meta device.

Runs inside Unsloth's own virtual environment (``QPLAN_UNSLOTH_PYTHON``; ``trace_unsloth_plan``
starts it as ``python -m qplan.observe.trace.unsloth_mode`` with qplan on a PYTHONPATH shim).
Unsloth 2026.10.9 on a machine without a GPU selects its CPU backend (stock transformers + PEFT),
so its GPU modules are imported and applied here by hand, as ``FastLanguageModel`` does on a GPU:

* ``Fast<Family>Model.pre_patch()`` — Unsloth's decoder layer, attention and model forwards
  (``LlamaDecoderLayer_fast_forward``, ``LlamaAttention_fast_forward``, ``LlamaModel_fast_forward``,
  ``CausalLM_fast_forward``: fast RMSNorm, fast RoPE, the fused linear cross-entropy);
* the model built on meta as ``from_pretrained`` builds it (``qplan.observe.trace.run.build_model``:
  bitsandbytes quantization on meta), PEFT's ``get_peft_model``, then Unsloth's own
  ``FastLlamaModel.patch_peft_model``: its ``prepare_model_for_training`` (only LoRA weights cast to
  fp32) and the fast LoRA autograd Functions (``LoRA_MLP``, ``LoRA_QKV``, ``LoRA_W``) installed on
  every layer whose targets allow it;
* Unsloth's gradient checkpointing as ``apply_unsloth_gradient_checkpointing`` chooses it
  (``"unsloth"`` with ``max_seq_length >= 512``: ``UnslothCheckpointFunction``, offloading each layer
  input to a host buffer; shorter or ``True``: torch's reentrant checkpoint).

The Python of those functions runs for real on meta tensors under the tracker, so every tensor
they allocate or save is counted. What cannot run without a GPU is replaced by stand-ins
(``STAND_INS`` lists them; each allocates exactly what the code it replaces allocates, from the
source cited in its docstring):

* ``triton`` — a stub package: a kernel launch ``kernel[grid](...)`` does nothing (Triton kernels
  write into tensors their Python wrapper allocated; they make no torch tensors);
  ``next_power_of_2``/``cdiv`` are the real arithmetic;
* ``rope cache on meta`` — ``LlamaRotaryEmbedding._build_rope_cache`` runs its own
  ``_set_cos_sin_cache`` with ``device=meta`` (it indexes per-GPU lists by ``device.index``);
* ``rope eviction hint`` — ``rope_embedding._eviction_hints_ok`` (a launch flag; asks
  ``torch.cuda``) is False;
* ``no empty_cache`` — ``clean_gpu_cache`` frees no live tensor; a no-op;
* ``dequantize like CUDA`` — ``fast_dequantize`` is defined at import for the CPU (bitsandbytes'
  ``dequantize_4bit``); the stand-in allocates what the CUDA branch with the NF4 Triton kernels
  (sm_70+, the default; ``unsloth/kernels/utils.py`` ``fast_dequantize``, ``kernels/nf4.py``
  ``dequantize_nf4``) allocates: the dequantized weight ``[out, in]`` in the compute dtype, in a
  per-device scratch buffer reused by every layer when ``use_global_buffer``
  (``_scratch("weight", ...)``: the forward), else a fresh tensor (the backward); the absmax is
  decoded inside the kernel;
* ``offload buffers`` — ``UnslothCheckpointFunction``'s CUDA streams/events become no-ops, its GPU
  staging buffers (``GPU_BUFFERS``, ``GPU_BUFFERS_B``) are meta tensors, and its pinned host buffers
  (``CPU_BUFFERS``) are meta tensors booked as host memory (not device memory), with the same sizes
  and growth as the source; ``torch.cuda.mem_get_info`` answers ``free_bytes`` (double buffering is
  switched on when more than 512 MiB are free);
* ``fused CE on meta`` — ``torch.ops.unsloth_zoo.fused_linear_ce_v2`` runs its real Python
  implementation (``fused_losses/fused_linear.py`` ``_ce_impl``) instead of its fake, with the CUDA
  answers of its device probes (``_use_triton``, ``_flash_ce_ok``: sm_80+, ``_logits_mode``: fp32
  logits, ``_flash_min_rows``: by ``total_bytes``), ``_keep_index`` returning every row but each
  sequence's last (the shifted labels of a full block), and its Triton tiles writing into the
  buffers the wrapper allocated;
* ``Trainer patched`` — ``patch_peft_model`` insists that Unsloth patched ``Trainer`` (done by
  ``from_pretrained``); the guard's name is set.

Autocast and SDPA run through qplan's CUDA emulation (``patches.EmulatedAutocast``): SDPA takes the
kernel CUDA would (flash / memory-efficient: output + logsumexp, no ``s²`` scores). Unsloth picks
flash-attn or xformers when installed; their saved tensors are the same output + logsumexp.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import types
from typing import Any

#: what each stand-in replaces (docs/memory-model.md lists these)
STAND_INS = (
    "triton (kernel launches are no-ops; wrappers allocate as on the GPU)",
    "rope cache on meta (_build_rope_cache -> _set_cos_sin_cache(device=meta))",
    "rope eviction hint (_eviction_hints_ok -> False)",
    "no empty_cache (clean_gpu_cache -> no-op)",
    "dequantize like CUDA (fast_dequantize -> scratch or fresh [out,in], NF4 Triton path)",
    "offload buffers (UnslothCheckpointFunction streams no-op, GPU staging on meta, pinned host buffers as host)",
    "fused CE on meta (fused_linear_ce_v2 -> its _ce_impl with CUDA device answers)",
    "Trainer patched (patch_peft_model's guard)",
)

#: the families whose Unsloth model class this mode applies (``unsloth/models/loader.py`` dispatch)
FAMILIES = {"llama": ("llama", "FastLlamaModel"), "mistral": ("mistral", "FastMistralModel"),
            "qwen2": ("qwen2", "FastQwen2Model")}


def _patch(stack: contextlib.ExitStack, obj: Any, name: str, value: Any) -> None:
    """Set ``obj.name`` until the stack closes (a name the CPU import never defined is removed)."""
    missing = object()
    old = getattr(obj, name, missing)
    setattr(obj, name, value)
    if old is missing:
        stack.callback(delattr, obj, name)
    else:
        stack.callback(setattr, obj, name, old)


def install_triton_stub() -> None:
    """A ``triton`` package whose kernels launch as no-ops (after ``import unsloth``: transformers
    probes triton while Unsloth imports it)."""
    if "triton" in sys.modules and getattr(sys.modules["triton"], "_qplan_stub", False):
        return

    class _Any:
        """Anything a kernel definition touches: callable, subscriptable, attribute-rich."""

        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def __call__(self, *a: Any, **k: Any) -> Any:
            if len(a) == 1 and callable(a[0]) and not k:
                return _Any()  # a decorator: @triton.jit, @triton.autotune(...)
            return _Any()

        def __getitem__(self, k: Any) -> Any:
            return _Any()  # kernel[grid] -> a launcher that does nothing

        def __getattr__(self, k: str) -> Any:
            if k.startswith("__"):
                raise AttributeError(k)
            return _Any()

        def __iter__(self):
            return iter(())

        def __bool__(self) -> bool:
            return False

    def module(name: str) -> types.ModuleType:
        m = types.ModuleType(name)

        def attr(k: str) -> Any:
            if k.startswith("__"):
                raise AttributeError(k)
            return _Any()

        m.__getattr__ = attr  # type: ignore[attr-defined]
        m._qplan_stub = True  # type: ignore[attr-defined]
        return m

    tr = module("triton")
    tr.__version__ = "3.5.0"
    tr.next_power_of_2 = lambda n: 1 << max(int(n) - 1, 0).bit_length()
    tr.cdiv = lambda a, b: -(-int(a) // int(b))
    tr.jit = lambda *a, **k: (_Any() if a and callable(a[0]) else (lambda f: _Any()))
    tr.__path__ = []  # a package
    sys.modules["triton"] = tr
    for sub in ("language", "language.extra", "language.extra.libdevice", "language.extra.cuda",
                "runtime", "runtime.jit", "runtime.driver", "compiler", "testing", "backends"):
        name = "triton." + sub
        m = module(name)
        m.__path__ = []
        sys.modules[name] = m
        parent = sys.modules[name.rsplit(".", 1)[0]]
        setattr(parent, sub.rsplit(".", 1)[-1], m)
    sys.modules["triton.language"].constexpr = _Any


class _PerDevice(list):
    """A per-GPU list indexed by ``device.index``; meta tensors have index None: device 0."""

    def __getitem__(self, i: Any) -> Any:
        return super().__getitem__(0 if i is None else i)

    def __setitem__(self, i: Any, v: Any) -> None:
        super().__setitem__(0 if i is None else i, v)


class _NoStream:
    """A CUDA stream / event that orders nothing (one device, no concurrency on meta)."""

    cuda_stream = 0

    def wait_stream(self, *a: Any) -> None:
        pass

    def wait_event(self, *a: Any) -> None:
        pass

    def record_event(self, *a: Any) -> "_NoStream":
        return self

    def record(self, *a: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def gpu_path_stand_ins(*, n_keep: int, free_bytes: int, total_bytes: int, host: list, current: dict):
    """Enter every stand-in of ``STAND_INS`` (see the module docstring). ``host`` collects the
    tensors that stand for pinned host memory."""
    import torch
    import unsloth.kernels.rope_embedding as ure
    import unsloth.kernels.utils as uku
    import unsloth.models.llama as ul
    import unsloth_zoo.gradient_checkpointing as gc_mod
    from transformers.trainer import Trainer
    from unsloth_zoo.fused_losses import fused_linear as ufl

    meta = torch.device("meta")
    with contextlib.ExitStack() as stack:
        _patch(stack, ul, "clean_gpu_cache", lambda *a, **k: None)
        _patch(stack, ul, "DEVICE_COUNT", 1)
        _patch(stack, ure, "_eviction_hints_ok", lambda device: False)
        _patch(stack, Trainer._inner_training_loop, "__name__", "_fast_inner_training_loop")

        R = ul.LlamaRotaryEmbedding

        def _build_rope_cache(self, device_index):
            # unsloth/models/llama.py LlamaRotaryEmbedding._build_rope_cache, on meta
            for n in ("multi_gpu_cos_cached", "multi_gpu_sin_cached", "_rope_cache_versions",
                      "_rope_rows_ready", "_rope_rebuild_for_grad"):
                if not isinstance(getattr(self, n), _PerDevice):
                    setattr(self, n, _PerDevice(getattr(self, n)))
            current = self.current_rope_size
            with self._rope_build_mode():
                self._set_cos_sin_cache(seq_len=self._rope_cache_rows(), device=meta, dtype=self._rope_cache_dtype)
            self.current_rope_size = current
            self._rope_cache_versions[device_index] = self._rope_cache_version
            self._mark_rope_build(device_index)

        _patch(stack, R, "_build_rope_cache", _build_rope_cache)
        orig_ensure = R._ensure_rope_cache

        def _ensure_rope_cache(self, device_index):
            for n in ("multi_gpu_cos_cached", "multi_gpu_sin_cached", "_rope_cache_versions",
                      "_rope_rows_ready", "_rope_rebuild_for_grad"):
                if not isinstance(getattr(self, n), _PerDevice):
                    setattr(self, n, _PerDevice(getattr(self, n)))
            return orig_ensure(self, 0 if device_index is None else device_index)

        _patch(stack, R, "_ensure_rope_cache", _ensure_rope_cache)

        # -- autocast queries about meta tensors answer for the emulated device (patches.EmulatedAutocast)
        from .autocast import meta_queries_answer_for

        stack.enter_context(meta_queries_answer_for("cuda"))

        # -- dequantization as the CUDA branch allocates (utils.py _fast_dequantize_ctypes)
        scratch: dict[str, Any] = {}

        def _scratch(kind, numel, dtype):
            # utils.py _scratch: one buffer per kind and device, replaced when too small or of another dtype
            buf = scratch.get(kind)
            if buf is None or buf.dtype != dtype or buf.numel() < numel:
                buf = torch.empty(numel, dtype=dtype, device=meta)
                scratch[kind] = buf
            return buf[:numel]

        def fast_dequantize(W, quant_state=None, out=None, use_global_buffer=False, dtype=None):
            # utils.py fast_dequantize with the NF4 Triton kernels (sm_70+, UNSLOTH_BNB_TRITON=1,
            # the default): ``out`` from the per-device scratch when ``use_global_buffer``, else
            # ``dequantize_nf4``'s ``torch.empty(shape, dtype)``; the absmax is decoded inside the
            # kernel (no buffer)
            if quant_state is None:
                return W
            shape, qdtype = quant_state.shape, quant_state.dtype
            if out is None:
                if use_global_buffer:
                    out = _scratch("weight", shape[0] * shape[1], qdtype).view(shape)
                else:
                    out = torch.empty(shape, dtype=qdtype, device=meta)
            return out.t() if W.shape[0] == 1 else out

        for mod in [m for name, m in list(sys.modules.items()) if name.startswith("unsloth")
                    and getattr(m, "__dict__", {}).get("fast_dequantize") is uku.fast_dequantize]:
            _patch(stack, mod, "fast_dequantize", fast_dequantize)
        stack.callback(scratch.clear)

        # -- Unsloth's offloaded checkpointing (gradient_checkpointing.py)
        ns = _NoStream()
        _patch(stack, gc_mod, "_compute_stream", lambda device_index: ns)
        _patch(stack, gc_mod, "_new_extra_stream", lambda device_index: ns)
        _patch(stack, gc_mod, "_main_stream", lambda device_index: ns)
        _patch(stack, gc_mod, "_double_buffer_event_ctor", lambda: _NoStream)
        _patch(stack, gc_mod, "_visible_device_count", lambda: 1)
        _patch(stack, gc_mod, "DEVICE_TYPE", "cuda")

        def _new_gpu_buffer(device_index):
            return torch.empty(gc_mod.INITIAL_GPU_BUFFER_SIZE, dtype=gc_mod.GPU_BUFFER_DTYPE, device=meta)

        def _new_host_buffer(numel, dtype):
            # gradient_checkpointing.py _new_host_buffer: ``torch.empty(numel, dtype, device="cpu",
            # pin_memory=True)``; torch's CachingHostAllocator takes a block of the next power of two
            # (CachingHostAllocator.h ``PowerOf2Ceil``): booked as host memory, that block's bytes
            nbytes = numel * dtype.itemsize
            block = 1 << max(nbytes - 1, 0).bit_length()
            raw = torch.empty(block, dtype=torch.uint8, device=meta)
            buf = raw[:nbytes].view(dtype)
            tr = current.get("tracker")
            rec = tr.lookup(raw) if tr is not None else None
            if rec is not None:
                rec.host = True  # made during the step: pinned host memory from its first byte
            else:
                host.append(raw)  # before the step: booked as host when the step starts
            return buf

        def _grow_host_buffer(buffer, new_size):
            # _grow_host_buffer on a pinned slot: ``buffer.resize_(new_size)`` takes a new pinned block
            # and hands the old one back to the host cache, where it stays page-locked (kept here)
            if new_size <= buffer.numel():
                return buffer
            host_cache.append(buffer)
            return _new_host_buffer(new_size, buffer.dtype)

        host_cache: list = []
        stack.callback(host_cache.clear)
        slots = gc_mod._PerDeviceSlots
        _patch(stack, slots, "__getitem__", lambda self, i, _g=slots.__getitem__: _g(self, 0 if i is None else i))
        _patch(stack, gc_mod, "_new_gpu_buffer", _new_gpu_buffer)
        _patch(stack, gc_mod, "_new_host_buffer", _new_host_buffer)
        _patch(stack, gc_mod, "_grow_host_buffer", _grow_host_buffer)
        _patch(stack, gc_mod, "_reserve_pinned", lambda nbytes: True)
        _patch(stack, gc_mod, "_release_pinned", lambda nbytes: None)
        _patch(stack, gc_mod, "_release_pool_pinned", lambda *a, **k: None)
        _patch(stack, gc_mod, "torch_gpu_stream", lambda s: contextlib.nullcontext())
        _patch(stack, torch.cuda, "mem_get_info", lambda *a, **k: (free_bytes, total_bytes))

        # -- the fused linear cross-entropy, its real implementation with CUDA's answers
        _patch(stack, ufl, "_use_triton", lambda device: True)
        _patch(stack, ufl, "_flash_ce_ok", lambda device: True)
        _patch(stack, ufl, "_logits_mode", lambda device, dtype=torch.float16: (True, False))
        _patch(stack, ufl, "_flash_min_rows", lambda device: 0 if total_bytes <= ufl._SMALL_CARD_BYTES else 4096)
        _patch(stack, ufl, "_budget_bytes", lambda device: max(int(min(ufl._CHUNK_GB, free_bytes / 2**30 * 0.5)
                                                                    * 2**30), 1))

        def _keep_index(targets, mask, vocab_size, ignore_index):
            keep = (targets >= 0) & (targets < vocab_size)  # the real ops, on meta
            if ignore_index is not None:
                keep &= targets != ignore_index
            del keep
            # ``keep.nonzero()``: data dependent; a full block keeps all rows but each sequence's last
            return torch.empty(n_keep, dtype=torch.long, device=targets.device), n_keep

        _patch(stack, ufl, "_keep_index", _keep_index)
        _patch(stack, ufl, "_launch", lambda device, fn: fn())  # ``with torch.cuda.device(device)``

        def _mm_fp32(a, b, out=None):
            # fused_linear.py _mm_fp32, the CUDA branch for half inputs on sm_80+ (``a.is_cuda`` is
            # False on meta): ``torch.mm(a, b, out_dtype=torch.float32[, out=out])``
            if a.dtype in ufl._HALF:
                if out is not None:
                    return out  # written in place
                return torch.empty((a.shape[0], b.shape[1]), dtype=torch.float32, device=a.device)
            return orig_mm_fp32(a, b, out=out)

        def _addmm_fp32(acc, a, b):
            # the CUDA branch: ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)``, in place
            if acc.dtype == torch.float32 and a.dtype in ufl._HALF:
                return None
            return orig_addmm_fp32(acc, a, b)

        def _mm_into(out, a, b):
            # the CUDA branch for half out/inputs: ``torch.mm(a, b, out=out)``, in place
            if out.dtype == torch.float32 or (a.dtype == out.dtype == b.dtype and a.dtype in ufl._HALF):
                return None
            return orig_mm_into(out, a, b)

        orig_mm_fp32, orig_addmm_fp32, orig_mm_into = ufl._mm_fp32, ufl._addmm_fp32, ufl._mm_into
        _patch(stack, ufl, "_mm_into", _mm_into)
        _patch(stack, ufl, "_mm_fp32", _mm_fp32)
        _patch(stack, ufl, "_addmm_fp32", _addmm_fp32)
        _patch(stack, torch.ops.unsloth_zoo, ufl._CE_OP, _ce_op_stand_in(ufl))
        yield


def _ce_op_stand_in(ufl: Any) -> Any:
    """``torch.ops.unsloth_zoo.fused_linear_ce_v2`` as registered (fused_linear.py ``_ce_op``: the
    body ``_ce_checked`` -> ``_ce_impl``, ``_ce_setup`` saving ``grad_h, grad_w, grad_b, scaling``,
    ``_ce_backward`` scaling them with ``fused_linear_scale_rows``), as an autograd Function whose
    body runs in Python, so that its allocations are traced (on meta the op would run its fake)."""
    import torch

    class CE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, divisor, scaling, *rest):
            ignore_index = rest[0]
            V = weight.shape[0]
            # _ce_checked, CUDA branch: the bounds check is an async device assert
            bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
            ok = torch.logical_not(bad.any())
            del bad, ok
            loss, grad_h, grad_w, grad_b = ufl._ce_impl(hidden, weight, bias, targets, divisor, scaling, *rest)
            ctx.mark_non_differentiable(grad_h, grad_w, grad_b)
            ctx.set_materialize_grads(False)
            ctx.need = rest[7:10]
            ctx.save_for_backward(grad_h, grad_w, grad_b, scaling)
            return loss, grad_h, grad_w, grad_b

        @staticmethod
        def backward(ctx, grad_loss, *_):
            if grad_loss is None:
                return (None,) * 18
            grad_h, grad_w, grad_b, scaling = ctx.saved_tensors
            acc = torch.float32  # meta: fused_linear.py takes float64 on cuda/cpu (a 0-dim scalar)
            s = grad_loss.to(acc) / scaling.to(acc)
            need_h, need_w, need_b = ctx.need

            def scale(x):
                return torch.ops.unsloth_zoo.fused_linear_scale_rows(x, s, x.dtype)

            return (scale(grad_h) if need_h else None, scale(grad_w) if need_w else None,
                    scale(grad_b) if need_b else None) + (None,) * 15

    return lambda *args: CE.apply(*args)


@contextlib.contextmanager
def recompute_marked(s: Any, current: dict, amp: Any):
    """``torch.utils.checkpoint.checkpoint`` (Unsloth's ``unsloth_checkpoint`` or torch's, looked up
    by ``LlamaModel_fast_forward`` at call time) with its function wrapped as
    ``qplan.observe.recompute`` wraps a model's: the second run is a recomputation for the tracker,
    and it re-enters the forward's emulated autocast and function mode (a GPU's checkpoint restores
    CUDA autocast itself; on meta the engine runs it without them)."""
    import torch
    import torch.utils.checkpoint as tuc

    from . import autocast as emu

    orig = tuc.checkpoint

    def checkpoint(function, *args, **kwargs):
        state = (torch.is_autocast_enabled(s.amp_device), torch.get_autocast_dtype(s.amp_device),
                 torch.is_autocast_cache_enabled())

        def body(*a, **k):
            tr = current.get("tracker")
            recomputing = tr is not None and tr.phase == "backward"
            prev = tr.begin_recompute() if recomputing else None
            try:
                with contextlib.ExitStack() as st:
                    if recomputing:
                        if amp.fmode not in torch.overrides._get_current_function_mode_stack():
                            st.enter_context(amp.fmode)
                        if state[0]:
                            st.enter_context(emu.AmpContext(s.amp_device, state[1], True, state[2]))
                    return function(*a, **k)
            finally:
                if recomputing:
                    tr.end_recompute(prev)

        return orig(body, *args, **kwargs)

    tuc.checkpoint = checkpoint
    try:
        yield
    finally:
        tuc.checkpoint = orig


def index_meta_as_device_0() -> None:
    """The checkpointer's per-device lists made by ``initialize_unsloth_gradient_checkpointing``,
    indexed by ``device.index`` (None on meta): device 0."""
    import unsloth_zoo.gradient_checkpointing as gc_mod

    for name in ("NEXT_BUFFER_SLOT",):
        v = getattr(gc_mod, name, None)
        if isinstance(v, list) and not isinstance(v, _PerDevice):
            setattr(gc_mod, name, _PerDevice(v))
    for name in ("BUFFER_EVENTS_A", "BUFFER_EVENTS_B"):
        v = getattr(gc_mod, name, None)
        if isinstance(v, tuple):
            setattr(gc_mod, name, _PerDevice(v))


def run_unsloth_trace(config: dict, s: Any, ckpt: Any, *, free_bytes: int, total_bytes: int) -> dict:
    """Trace ``s.steps`` Unsloth training steps of ``config`` on meta (see the module docstring)."""
    import os

    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unsloth  # noqa: F401 - before transformers/peft

    install_triton_stub()
    import importlib

    import torch
    from peft import get_peft_model

    from qplan.hf import hf_config, lora_config

    from ..existing import classify_model, register_model  # noqa: F401
    from . import patches
    from .run import build_model, make_optimizer, recompute_context, run_steps

    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"the Unsloth trace covers {', '.join(FAMILIES)}, not {mt!r}")
    modname, clsname = FAMILIES[mt]
    fam = importlib.import_module(f"unsloth.models.{modname}")
    import unsloth.models._utils as uu
    import unsloth.models.llama as ul

    t0 = time.perf_counter()
    notes: list[str] = []
    paged: list = []
    host: list = []
    current: dict[str, Any] = {"tracker": None}
    n_keep = s.batch_size * (s.seq_len - 1)
    with contextlib.ExitStack() as stack:
        stack.enter_context(gpu_path_stand_ins(n_keep=n_keep, free_bytes=free_bytes, total_bytes=total_bytes,
                                               host=host, current=current))
        stack.enter_context(patches.bnb_quant_maps_restored())
        stack.enter_context(patches.bnb_matmul_cuda_path())
        stack.enter_context(patches.paged_state_stand_in(paged))
        stack.enter_context(patches.quiet_libraries())
        stack.enter_context(patches.fused_adamw_on_meta())
        amp = stack.enter_context(patches.EmulatedAutocast(s.amp_device, s.kernels))
        stack.enter_context(torch.random.fork_rng(devices=[]))
        getattr(fam, clsname).pre_patch()
        hf = hf_config(config)
        model = build_model(hf, s, stack)
        model.config.use_cache = False
        with torch.device("meta"):
            pm = get_peft_model(model, lora_config(s.lora_section))
        pm.max_seq_length = s.seq_len
        # FastLlamaModel.from_pretrained: apply_unsloth_gradient_checkpointing(use_gc, max_seq_length, dtype)
        ckpt = uu.apply_unsloth_gradient_checkpointing(ckpt, s.seq_len, torch.bfloat16)
        index_meta_as_device_0()
        pm = ul.FastLlamaModel.patch_peft_model(pm, use_gradient_checkpointing=ckpt)
        # transformers 5's decoder layers are GradientCheckpointingLayers: LlamaModel_fast_forward calls
        # them directly and they run ``self._gradient_checkpointing_func`` (Unsloth's checkpoint);
        # older layer classes go through ``torch.utils.checkpoint.checkpoint``: both are marked
        recompute_context(pm, s, current, amp)
        stack.enter_context(recompute_marked(s, current, amp))
        trainable, total = pm.get_nb_trainable_parameters()
        opt = make_optimizer(pm, s)
        amp.redirect()
        res = run_steps(pm, opt, hf.get_text_config().vocab_size, s, amp, paged, current, host=host,
                        chunked_logits=True)
        # the pinned pool lives in Unsloth's module globals: reset it, or the next trace in this
        # process would start from this one's buffers
        import unsloth_zoo.gradient_checkpointing as gc_mod

        if getattr(gc_mod, "CPU_BUFFERS", None):
            gc_mod.unpatch_unsloth_smart_gradient_checkpointing()
    res["trainable_params"] = int(trainable)
    res["all_params"] = int(total)
    res["seconds"] = time.perf_counter() - t0
    res["notes"] = notes + [f"unsloth checkpointing in effect: {ckpt!r}"]
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m qplan.observe.trace.unsloth_mode IN.json OUT.json``: IN holds ``config``,
    ``settings`` (``TraceSettings`` fields), ``ckpt`` and the device's ``free_bytes``/``total_bytes``
    — or ``cases``, a list of such documents, traced one after the other in this process (OUT then
    holds a list; a case that fails holds ``{"error": ...}``)."""
    from .settings import TraceSettings

    argv = sys.argv[1:] if argv is None else argv
    doc = json.loads(open(argv[0], encoding="utf-8").read())

    def one(d: dict) -> dict:
        s = TraceSettings(**d["settings"])
        return run_unsloth_trace(d["config"], s, d["ckpt"], free_bytes=int(d["free_bytes"]),
                                 total_bytes=int(d["total_bytes"]))

    if "cases" in doc:
        out: Any = []
        for d in doc["cases"]:
            try:
                out.append(one(d))
            except Exception as exc:  # noqa: BLE001 - one failed case must not lose the others
                out.append({"error": f"{type(exc).__name__}: {exc}"})
            print(f"traced {len(out)}/{len(doc['cases'])}", file=sys.stderr, flush=True)
    else:
        out = one(doc)
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
