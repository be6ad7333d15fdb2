"""What a layer's backward has in flight besides its saved tensors: the gradients reaching it, and what reentrant
checkpointing changes. Moved out of ``planner.memory.activations``, which calls them. Torch-free.
"""

from __future__ import annotations

from qplan.planner.memory.lin import Lin, Precision
from qplan.planner.memory.terms import Dims


def reentrant_difference(d: Dims, p: Precision, transient: Lin, moe: bool) -> Lin:
    """A layer's backward under reentrant checkpointing less the same under non-reentrant: ``- c h T`` or ``+ R h T``.

    torch 2.13 ``CheckpointFunction.backward`` recomputes the whole layer with grad enabled
    (``outputs = ctx.run_function(*detached_inputs)``), then runs ``torch.autograd.backward(outputs,
    grads)`` and returns. Against non-reentrant checkpointing (which recomputes when the first saved
    tensor is unpacked and stops before the layer's output, ``_checkpoint_early_stop``):

    * at the recomputation's end only the incoming gradient is alive: the second gradient of
      ``incoming_gradients``, the scaled copy of the down projection's LoRA output gradient (``c h T``,
      the compute dtype's) is not made yet — the peak when the recomputation's transients are (LoRA on
      the down projection under autocast: its input's casts, ``recompute_transient``);
    * past it, the recomputed layer output ``R h T`` is held by ``outputs`` until the backward
      returns: one ``R h T`` more — the peak otherwise (no LoRA transient at the recomputation's end;
      a MoE layer, whose backward moments are ``moe_moments``).

    Measured with the tracker (tiny Llama 2 layers, nf4 / bf16 / fp32, targets qv, attn and
    all-linear; CPU run = meta trace to the byte): the reentrant peak is the non-reentrant one
    ``- c h T`` (bf16 and nf4, all-linear) and ``+ R h T`` (nf4 qv, bf16 attn, fp32 all-linear)."""
    lora_transient = p.amp and not moe and transient != Lin(tok=p.M * d.i + p.M * d.h)  # LoRA casts on the down input
    return Lin(tok=-p.c * d.h if lora_transient else p.R * d.h)


def incoming_gradients(d: Dims, p: Precision, lora_down: bool = False, a: int = 4) -> Lin:
    """Gradients in flight while a layer's saved tensors are back (its recomputation's end with
    checkpointing): the gradient reaching the layer ``R h T``, and a second one — without
    checkpointing and with non-reentrant checkpointing (``hf``) the backward of the layer's last ops
    runs *before* anything is recomputed (the recomputation starts when the first saved tensor is
    unpacked, torch/utils/checkpoint.py ``_checkpoint_hook``), and by then the output gradient's
    scaled copy (LoRA's ``* scaling`` on the down projection) or its sum with the residual's is made:
    ``R h T``, except in a pure 16-bit step (no autocast) with LoRA on the down projection, whose branch
    runs in the adapters' dtype ``a`` (PEFT casts its input to ``lora_A``'s dtype; fp32 unless
    ``--adapter-dtype``): ``a h T``. ``reentrant_difference`` is what the reentrant checkpoint changes."""
    second = a if (lora_down and not p.amp) else p.R
    return Lin(tok=(p.R + second) * d.h)
