"""The process-global patches a trace needs, each a named context manager that undoes itself.

They change library state while a trace runs (not thread-safe) and restore it on exit:

* ``bnb_quant_maps_restored`` — bitsandbytes caches its quantization maps process-wide on the
  device of their first use (functional.py ``name2qmap["dynamic"] = create_dynamic_map().to(A.device)``,
  used by double quantization): a map first made on meta would break every later real
  quantization in the process ("Cannot copy out of meta tensor");
* ``bnb_matmul_cuda_path`` — ``bitsandbytes.matmul`` always takes ``MatMul8bitLt`` (the CUDA path;
  bitsandbytes switches to ``MatMul8bitFp`` for CPU inputs in training);
* ``paged_state_stand_in`` — ``Optimizer8bit.get_state_buffer``'s CUDA branch: paged optimizers
  allocate states of >= 1e5 elements with ``cudaMallocManaged``; the stand-in allocates the same
  bytes with ``torch.zeros_like`` and lists them, to be booked as ``optimizer_paged``;
* ``quiet_libraries`` — bitsandbytes' and transformers' logging, progress bars, warnings;
* ``fused_adamw_on_meta`` — ``adamw_torch_fused`` runs ``aten._fused_adamw_``'s meta kernel;
* ``EmulatedAutocast`` — the autocast/SDPA emulation (``autocast.MetaFunctionMode``), plus:
  ``torch.clear_autocast_cache`` also drops the emulated caches, ``torch.autocast("meta")``
  (PEFT's ``_LoraFactorsProxy`` for MoE expert tensors) means the emulated device, and every
  transformers module's ``maybe_autocast`` (a no-op on meta) stands for the emulated device;
* ``torchao_step_on_meta`` — torchao's low-bit AdamW (``adamw_torch_8bit`` / ``4bit``) makes its states with its
  own ``_new_buffer`` (real ``OptimState8bit`` / ``OptimState4bit`` on meta) and updates each tensor through
  ``torch.compile(single_param_adam)``, which has nothing to compile on meta: a stand-in makes the compiled
  step's two fp32 dequantized states of the parameter (the planner's ``compiled`` step temporaries, derived
  from ``single_param_adam``; the tracker never sees a compiled kernel's buffers) and frees them;
* ``packed_sequences_on_meta`` — transformers' ``find_packed_sequence_indices`` does a
  data-dependent ``.all()`` on the position ids; on meta it returns None, the answer for the
  unpacked rows traced here.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Any

from . import autocast as emu


def _patch(stack: contextlib.ExitStack, obj: Any, name: str, value: Any) -> None:
    old = getattr(obj, name)
    setattr(obj, name, value)
    stack.callback(setattr, obj, name, old)


@contextlib.contextmanager
def bnb_quant_maps_restored():
    import bitsandbytes.functional as bnb_F

    qmaps = dict(bnb_F.name2qmap)
    try:
        yield
    finally:
        bnb_F.name2qmap.clear()
        bnb_F.name2qmap.update(qmaps)


@contextlib.contextmanager
def bnb_matmul_cuda_path():
    import bitsandbytes
    from bitsandbytes.autograd import _functions as bnb_fn

    def matmul(A, B, out=None, state=None, threshold=0.0, bias=None):
        state = state or bnb_fn.MatmulLtState()
        if threshold > 0.0:
            state.threshold = threshold
        return bnb_fn.MatMul8bitLt.apply(A, B, out, bias, state)

    with contextlib.ExitStack() as stack:
        _patch(stack, bitsandbytes, "matmul", matmul)
        _patch(stack, bnb_fn, "matmul", matmul)
        yield


@contextlib.contextmanager
def paged_state_stand_in(pending: list):
    import bitsandbytes.optim.optimizer as bnb_optim
    import torch

    def get_state_buffer(self, p, dtype=torch.float32):
        # bitsandbytes/optim/optimizer.py Optimizer8bit.get_state_buffer, CUDA branch.
        buf = torch.zeros_like(p, dtype=dtype, device=p.device)
        if self.is_paged and p.numel() >= 1e5:
            pending.append(buf)
        return buf

    with contextlib.ExitStack() as stack:
        _patch(stack, bnb_optim.Optimizer8bit, "get_state_buffer", get_state_buffer)
        yield


@contextlib.contextmanager
def quiet_libraries():
    import logging

    import transformers

    with contextlib.ExitStack() as stack:
        lg = logging.getLogger("bitsandbytes.autograd._functions")
        stack.callback(lg.setLevel, lg.level)
        lg.setLevel(logging.ERROR)
        tlog = transformers.utils.logging
        stack.callback(tlog.set_verbosity, tlog.get_verbosity())
        tlog.set_verbosity_error()
        if tlog.is_progress_bar_enabled():  # save_pretrained / from_pretrained of the cpu oracle
            tlog.disable_progress_bar()
            stack.callback(tlog.enable_progress_bar)
        try:
            from huggingface_hub import utils as hub_utils

            if not hub_utils.are_progress_bars_disabled():
                hub_utils.disable_progress_bars()
                stack.callback(hub_utils.enable_progress_bars)
        except ImportError:  # pragma: no cover
            pass
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        # what a library prints while the trace runs goes to stderr: stdout is the plan (`--format json`). A logger
        # made meanwhile keeps the stream (DeepSpeed's, which TRL's import sets up, wrote its accelerator line there)
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        yield


@contextlib.contextmanager
def fused_adamw_on_meta():
    import torch.optim.optimizer as torch_optim

    orig = torch_optim._get_fused_kernels_supported_devices
    with contextlib.ExitStack() as stack:
        _patch(stack, torch_optim, "_get_fused_kernels_supported_devices", lambda: [*orig(), "meta"])
        yield


@contextlib.contextmanager
def torchao_step_on_meta():
    import torch

    try:
        import torchao.optim.adam as tao_adam
    except ImportError:  # no torchao: a plan with its optimizer fails at make_optimizer, with the fix
        yield
        return

    def single_param_adam(p, grad, step, exp_avg, exp_avg_sq, *rest):
        exp_avg_f32 = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        exp_avg_sq_f32 = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        del exp_avg_f32, exp_avg_sq_f32

    compile_ = torch.compile

    def compile_stand_in(fn=None, **kwargs):
        return fn if fn is single_param_adam else compile_(fn, **kwargs)

    with contextlib.ExitStack() as stack:
        _patch(stack, tao_adam, "single_param_adam", single_param_adam)
        _patch(stack, torch, "compile", compile_stand_in)
        yield


@contextlib.contextmanager
def packed_sequences_on_meta():
    from transformers import masking_utils

    orig = masking_utils.find_packed_sequence_indices

    def find_packed_sequence_indices(position_ids):
        if position_ids.device.type == "meta":
            return None
        return orig(position_ids)

    with contextlib.ExitStack() as stack:
        _patch(stack, masking_utils, "find_packed_sequence_indices", find_packed_sequence_indices)
        yield


@contextlib.contextmanager
def padding_on_meta(padded: bool):
    """transformers' ``fast_all`` (is every position of a 2-D attention mask real?) on a meta mask, which has no
    values: the traced batch's answer — False for a padded one, so SDPA/eager attention get the 4-D mask a padded
    batch makes; True otherwise (the mask is dropped, as for an unpadded batch)."""
    from transformers import masking_utils

    orig = masking_utils.fast_all

    def fast_all(tensor):
        if tensor.device.type == "meta":
            return not padded
        return orig(tensor)

    with contextlib.ExitStack() as stack:
        _patch(stack, masking_utils, "fast_all", fast_all)
        yield


class EmulatedAutocast:
    """Enter to emulate ``amp_device``'s autocast (and SDPA/dropout kernels) on meta tensors;
    ``fmode`` is the function mode to enter around the step; ``redirect()`` points transformers'
    modeling modules imported since (they are imported lazily) at the emulated ``maybe_autocast``."""

    def __init__(self, amp_device: str, kernels: str) -> None:
        self.amp_device = amp_device
        self.kernels = kernels
        self.fmode = None
        self._stack = contextlib.ExitStack()
        self._orig_maybe = None

    def __enter__(self) -> "EmulatedAutocast":
        import torch
        from transformers.utils import generic

        stack = self._stack
        if self.kernels == "cuda":
            tables = dict(emu.CUDA_AUTOCAST, lower=emu.CUDA_AUTOCAST["lower"] + emu.CUDA_AUTOCAST_EXTRA["lower"],
                          banned=emu.CUDA_AUTOCAST_EXTRA["banned"])
        else:
            tables = emu.CPU_AUTOCAST
        self.fmode = emu.meta_function_mode_cls()(self.amp_device, tables, self.kernels)
        orig_clear = torch.clear_autocast_cache

        def clear_autocast_cache():  # a real torch.autocast exiting to nesting 0
            emu.clear_emulated_caches()
            orig_clear()

        _patch(stack, torch, "clear_autocast_cache", clear_autocast_cache)
        emu._META_AMP.append(self.amp_device)
        stack.callback(emu._META_AMP.pop)
        if not emu._ORIG_MAYBE_AUTOCAST:
            emu._ORIG_MAYBE_AUTOCAST.append(generic.maybe_autocast)
        self._orig_maybe = emu._ORIG_MAYBE_AUTOCAST[0]
        stack.callback(self._unredirect)  # runs last: modules imported meanwhile bound the patch
        self.redirect()
        orig_autocast = torch.autocast
        amp_device = self.amp_device

        def autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
            # torch.autocast("meta") is unsupported; meta stands for the emulated device
            if device_type == "meta":
                return emu.AmpContext(amp_device, dtype, enabled, cache_enabled)
            return orig_autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

        _patch(stack, torch, "autocast", autocast)
        return self

    def __exit__(self, *exc: Any) -> bool:
        self._stack.close()
        return False

    def redirect(self) -> None:
        """Point every loaded transformers module's ``maybe_autocast`` (imported by name) at the
        emulated one (again after the model is built: modeling modules are imported lazily)."""
        for mod in list(sys.modules.values()):
            # the module's own namespace: a lazy module's getattr would import (Unsloth's venv lacks
            # torchvision, which some lazily exported transformers modules need)
            if getattr(mod, "__name__", "").startswith("transformers") and \
                    getattr(mod, "__dict__", {}).get("maybe_autocast") is self._orig_maybe:
                mod.maybe_autocast = emu.maybe_autocast
                self._stack.callback(setattr, mod, "maybe_autocast", self._orig_maybe)

    def _unredirect(self) -> None:
        for mod in list(sys.modules.values()):
            if getattr(mod, "__dict__", {}).get("maybe_autocast") is emu.maybe_autocast:
                mod.maybe_autocast = self._orig_maybe
