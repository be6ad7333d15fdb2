"""TRL's fused LM head on the meta device, as a GPU runs it: TRL's own code, only its Triton launches stood in.

TRL 1.16's ``SFTTrainer`` patches the causal LM with ``trl.trainer.utils.add_fused_lm_head(model, outputs=("log_probs",
"entropy", "is_top1"))`` and calls it with ``fused_lm_head=True``; the loss is ``ChunkedLogProbFunction``
(``trl/kernels/chunked_logprob.py``). The trace runs that code. What a GPU runs differently from meta is stood in:

* ``_use_triton``: true (a CUDA device: only the valid rows are projected, ``hidden[mask]``);
* ``_forward_kernel`` / ``_backward_kernel``: Triton folds that update the statistics and the tile in place — no
  allocation, so a launch does nothing here;
* ``_addmm_fp32``: on CUDA, ``torch.addmm(..., out_dtype=torch.float32, out=acc)`` from 16-bit tiles, in place (the
  fallback would make fp32 copies of both operands);
* autocast queries about the meta device answer for the emulated one (``patches.EmulatedAutocast``);
* boolean-mask indexing and ``masked_select`` (data-dependent sizes, no meta kernel): every entry true — the traced
  batch's labels are all tokens (``boolean_mask_stand_ins``).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

from .autocast import meta_queries_answer_for
from .stand_ins import TritonLaunch

#: what TRL's SFTTrainer asks the fused head for (trl/trainer/sft_trainer.py, 1.16)
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")


def add_sft_fused_head(model: Any) -> None:
    """``add_fused_lm_head`` on the causal LM under the PEFT wrapper, as ``SFTTrainer.__init__`` does."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=SFT_OUTPUTS)


@contextlib.contextmanager
def gpu_kernels_on_meta(amp_device: str):
    """The CUDA branches of ``trl.kernels.chunked_logprob`` while the context is open."""
    import torch
    import trl.kernels.chunked_logprob as ck

    missing = object()
    names = ("_use_triton", "_forward_kernel", "_backward_kernel", "triton", "_addmm_fp32")
    saved = {n: getattr(ck, n, missing) for n in names}
    orig_addmm = ck._addmm_fp32

    def addmm_fp32(acc: Any, a: Any, b: Any) -> None:
        if a.dtype in (torch.float16, torch.bfloat16):
            return  # CUDA: one addmm with an fp32 output into acc, no copies
        orig_addmm(acc, a, b)

    import trl.trainer.utils as tu

    saved_compact = tu._use_triton  # the fused head's own copy: on CUDA it projects the valid rows only (hidden[mask])
    ck._use_triton = tu._use_triton = lambda device: True
    ck._forward_kernel = ck._backward_kernel = TritonLaunch()
    if saved["triton"] is missing:
        ck.triton = types.SimpleNamespace(cdiv=lambda a, b: -(-a // b))
    ck._addmm_fp32 = addmm_fp32
    try:
        with meta_queries_answer_for(amp_device):
            yield
    finally:
        tu._use_triton = saved_compact
        for n, v in saved.items():
            if v is missing:
                delattr(ck, n)
            else:
                setattr(ck, n, v)


def boolean_mask_stand_ins(keep: int = 0) -> dict:
    """``aten.index.Tensor`` with a boolean mask and ``aten.masked_select`` on meta, every mask entry true (their
    sizes depend on the data; the traced batch has no ignored label), or, with ``keep``, the last ``keep`` entries of
    each row of a 2-D mask (GRPO's ``logits_to_keep``: the completion positions). Integer indices go to the meta
    kernel."""
    import torch

    aten = torch.ops.aten

    def index(reg: Any, self: Any, indices: Any) -> Any:
        masks = [i for i in indices if i is not None and i.dtype == torch.bool]
        if not masks:
            return reg(aten.index.Tensor(self, indices))
        if len(indices) != 1:
            raise NotImplementedError("a boolean mask with other indices is not stood in")
        mask = indices[0]
        n = mask.shape[0] * min(keep, mask.shape[1]) if keep and mask.dim() == 2 else mask.numel()
        shape = (n, *self.shape[mask.dim():])
        return reg(torch.empty(shape, dtype=self.dtype, device=self.device))

    def masked_select(reg: Any, self: Any, mask: Any) -> Any:
        shape = torch.broadcast_shapes(self.shape, mask.shape)
        n = shape[0] * min(keep, shape[1]) if keep and len(shape) == 2 else shape.numel()
        return reg(torch.empty((n,), dtype=self.dtype, device=self.device))

    def index_put(reg: Any, self: Any, indices: Any, values: Any, accumulate: bool = False, *rest: Any) -> Any:
        if not any(i is not None and i.dtype == torch.bool for i in indices):
            return reg(aten.index_put.default(self, indices, values, accumulate))
        return reg(torch.empty_like(self))

    def index_put_(reg: Any, self: Any, indices: Any, values: Any, accumulate: bool = False, *rest: Any) -> Any:
        if not any(i is not None and i.dtype == torch.bool for i in indices):
            return aten.index_put_.default(self, indices, values, accumulate)
        return self  # in place: nothing new

    return {aten.index.Tensor: index, aten.masked_select.default: masked_select, aten.index_put.default: index_put,
            aten.index_put_.default: index_put_, aten._index_put_impl_.default: index_put_}
