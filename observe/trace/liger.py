"""Liger-Kernel's fused linear cross-entropy on the meta device, as a GPU runs it: Liger's own code, only its Triton
launches stood in.

axolotl's ``LigerPlugin`` (axolotl 067b021c8, ``integrations/liger/plugin.py``; liger-kernel 0.8.0, the version it
pins) calls Liger's ``apply_liger_kernel_to_<model_type>`` before the model is loaded; with
``liger_fused_linear_cross_entropy: true`` that replaces the ``*ForCausalLM`` class's forward with Liger's
``lce_forward``: in training the final hidden states and ``lm_head.weight`` go to ``LigerForCausalLMLoss`` ->
``LigerFusedLinearCrossEntropyFunction``, which computes the loss *and* the hidden states' gradient in the forward,
chunk by chunk of rows, and never makes the ``T x V`` logits. The trace runs that code. What a GPU runs differently
from meta is stood in:

* ``liger_cross_entropy_kernel`` / ``element_mul_kernel``: Triton kernels that write into the tensors they are given
  (the chunk's logits become their gradient in place) — no allocation, so a launch does nothing here;
* ``.item()`` of the count of valid labels (a host number, no device memory) and ``torch.equal`` of the upstream
  gradient with 1 (answered false: the Trainer divides the summed loss by ``num_items_in_batch``) have no meta
  kernel (``meta_scalar_stand_ins``);
* autocast queries about the meta device answer for the emulated one (``patches.EmulatedAutocast``).

Liger is imported from where it is installed (``scripts/setup-oracles.sh`` puts liger-kernel and Triton's Python
front end in ``.oracles/liger``; ``tests/oracles/liger_trace.py`` runs the trace with it on its path).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Any

from .autocast import meta_queries_answer_for
from .stand_ins import TritonLaunch


def apply_fn(model_type: str) -> Any:
    """Liger's ``apply_liger_kernel_to_<model_type>``."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if fn is None:
        raise ValueError(f"Liger-Kernel has no patch for model type {model_type!r}")
    return fn


#: qplan's names of Liger's kernels -> the keyword of ``apply_liger_kernel_to_<type>`` that turns each on
KERNEL_FLAGS = {"flce": "fused_linear_cross_entropy", "rms_norm": "rms_norm", "swiglu": "swiglu", "rope": "rope"}


def only_flags(fn: Any, kernels: tuple[str, ...]) -> dict[str, bool]:
    """The keywords of Liger's patch ``fn`` that turn ``kernels`` (``KERNEL_FLAGS``) on and every other kernel off
    (ValueError for a kernel the patch does not have)."""
    params = inspect.signature(fn).parameters
    flags = {name: False for name in params if name != "model"}
    for k in kernels:
        name = KERNEL_FLAGS.get(k, k)
        if name not in params:
            raise ValueError(f"Liger's patch has no {name} kernel")
        flags[name] = True
    return flags


@contextlib.contextmanager
def liger_patched(hf: Any, kernels: tuple[str, ...] = ("flce",)):
    """While the context is open, the model type of the transformers config ``hf`` trains through Liger's ``kernels``
    (``KERNEL_FLAGS``) and nothing else of Liger's (``apply_liger_kernel_to_<type>`` with every other kernel off,
    before the model is built, as axolotl's plugin calls it). What the patch replaces in the modeling module and
    its classes is put back on exit."""
    fn = apply_fn(hf.model_type)
    modeling = importlib.import_module(f"transformers.models.{hf.model_type}.modeling_{hf.model_type}")
    before = dict(vars(modeling))
    forwards = {cls: cls.__dict__.get("forward") for cls in before.values() if isinstance(cls, type)}
    fn(**only_flags(fn, kernels))
    try:
        yield
    finally:
        for cls, fwd in forwards.items():
            if fwd is None:
                if "forward" in cls.__dict__:
                    delattr(cls, "forward")
            else:
                cls.forward = fwd
        for name in set(vars(modeling)) - set(before):
            delattr(modeling, name)
        for name, value in before.items():
            setattr(modeling, name, value)


#: Liger's modules and the Triton kernels each launches (all write into tensors the Python around them made)
LAUNCHES = {
    "fused_linear_cross_entropy": ("liger_cross_entropy_kernel", "element_mul_kernel"),
    "rms_norm": ("_rms_norm_forward_kernel", "_block_rms_norm_forward_kernel", "_rms_norm_backward_kernel",
                 "_block_rms_norm_backward_kernel"),
    "swiglu": ("_swiglu_forward_kernel", "_swiglu_backward_kernel"),
    "rope": ("_triton_rope",),
}


@contextlib.contextmanager
def gpu_kernels_on_meta(amp_device: str):
    """Liger's Triton launches (``LAUNCHES``) do nothing while the context is open: they write into buffers the Python
    around them made. (RMSNorm's backward sizes its weight-gradient partials by the GPU's SM count, one row on meta:
    ``sm_count x h`` fp32, not planned.)"""
    saved = []
    for module, names in LAUNCHES.items():
        mod = importlib.import_module(f"liger_kernel.ops.{module}")
        for n in names:
            saved.append((mod, n, getattr(mod, n)))
            setattr(mod, n, TritonLaunch())
    try:
        with meta_queries_answer_for(amp_device):
            yield
    finally:
        for mod, n, v in saved:
            setattr(mod, n, v)


def meta_scalar_stand_ins() -> dict:
    """``aten._local_scalar_dense`` (``.item()``) and ``aten.equal`` on meta: a host number, a host bool; neither
    allocates device memory. The count of valid labels only reaches the (stood-in) kernel; the upstream gradient of
    the Trainer's ``loss / num_items_in_batch`` is not 1, so Liger scales its saved gradients (in place)."""
    import torch

    aten = torch.ops.aten
    return {aten._local_scalar_dense.default: lambda reg, t: 1, aten.equal.default: lambda reg, a, b: False}
