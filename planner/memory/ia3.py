"""(IA)³ (``--peft-type ia3``, ``planner.model.ia3``): what its scaling vectors make a layer keep for backward.

Derived from PEFT 0.21's layer code and checked against the traced step (tests/planner/test_ia3.py). Torch-free.
"""

from __future__ import annotations

from typing import Any

from qplan.planner.memory.lin import Lin, Precision

#: ``planner.memory.activations.Branch`` (not imported: activations imports this module)
Branch = Any

#: PEFT's IA3 vectors are fp32 (``get_peft_model``'s ``autocast_adapter_dtype``)
IA3_BYTES = 4


def ia3_branch_activation(br: Branch, x: int, p: Precision, kernels: str = "cuda") -> Lin:
    """What one (IA)³-adapted linear module saves, per token (``tok``) and per layer (``const``); ``x``: the dtype
    bytes of the module's input.

    ``ia3_scaling = 1; ia3_scaling *= ia3_l.flatten()`` makes a new fp32 vector (``1 * v``) that the scaling ``mul``
    saves for the other operand's gradient: ``4 n`` per module (``const``). The ``mul`` saves the scaled tensor too,
    for ``ia3_l``'s gradient (needed whether or not the input needs one):

    * ``ia3.Linear`` (a 16/32-bit base): a feed-forward module casts its input to the vector's dtype first
      (``x.to(fp32)``): ``4 in``; any other scales the base output (``c`` bytes: autocast's, or the weights' own
      dtype), promoted to fp32 by the fp32 vector and cast back (``.to(result_dtype)``, a transient): ``c out``.
    * ``ia3.bnb.Linear4bit`` / ``Linear8bitLt``: the input is cast to fp32 only without CUDA autocast
      (``requires_conversion = not torch.is_autocast_enabled() and x.dtype != float32``: CUDA's state, so a CPU step
      casts); a feed-forward module saves that input (``4 in`` or ``x in``), any other the base output, which
      bitsandbytes returns in its input's dtype (``4 out`` or ``x out``).
    """
    n = br.in_features if br.ia3 == "ff" else br.out_features
    if not br.kbit:
        per = IA3_BYTES * br.in_features if br.ia3 == "ff" else p.c * br.out_features
    else:
        conv = not (p.amp and kernels == "cuda") and x != 4
        per = (4 if conv else x) * n
    return Lin(tok=per * br.per_layer, const=IA3_BYTES * n * br.per_layer)


def ia3_backward_transient(branches: tuple[Branch, ...]) -> Lin:
    """The largest transient of a layer's (IA)³ backward, per token, beyond what the layer keeps: a feed-forward
    module's ``x_fp32 * ia3`` backward (``MulBackward0``) makes the input's gradient ``grad * ia3`` and ``grad * x``
    (summed into ``ia3_l``'s gradient) at once, both fp32: ``8 in`` (the down projection's backward runs first in a
    layer's, with the whole recomputed layer alive). Measured with the tracker on the traced step (16/32-bit bases; the
    bitsandbytes path is not planned: ``planner.plan.check_ia3``)."""
    ff = [8 * b.in_features for b in branches if b.ia3 == "ff" and not b.kbit]
    return Lin(tok=max(ff)) if ff else Lin()
