"""LoRA on parameters (PEFT's ``target_parameters``, ``ParamWrapper``: MoE experts, routers): what its folded weight
``W' = W + scaling * B A`` keeps for backward. Moved out of ``planner.memory.activations``, which calls it. Torch-free.
"""

from __future__ import annotations

from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.weights import QuantSettings
from qplan.planner.vocab import BYTES


def parameter_lora_activation(counts: list[ModuleCount], q: QuantSettings) -> tuple[int, int, int]:
    """LoRA on parameters (``target_parameters``, PEFT's ``ParamWrapper``; MoE experts): bytes per
    model, per layer, and a layer backward's transient.

    In the forward, PEFT parametrizes the wrapped parameter with its adapter
    (``ParamWrapper._activate_lora``): ``W' = W + scaling * B A`` is materialised whole, in the
    parameter's dtype ``w``, and the experts' ``grouped_mm`` saves ``W'`` for the input gradient:
    ``w * numel`` per wrapped parameter and layer, saved for backward (all layers without
    checkpointing; the recomputed layer with it).  A 3-D (experts) parameter with one adapter is
    folded by ``_LoraFactorsProxy``: ``baddbmm(W, lhs, rhs)`` with ``get_delta_factors``' factors
    cast ``.to(W.dtype)``, which copies the fp32 LoRA weights when ``W`` is 16-bit, and ``baddbmm``
    saves both copies: ``w`` bytes per LoRA parameter of that wrapper (none when ``W`` is fp32).
    In that layer's backward the gradient of
    each ``W'`` is as large again; the wrapped parameters are used in order (``gate_up_proj`` before
    ``down_proj``), so the backward holds at most ``max_j (sum_{k<=j} S_k + S_j)``, the transient
    beyond the layer's saved ``sum_k S_k`` being that minus ``sum_k S_k``.
    Returns (``sum`` over every layer, ``sum_k S_k`` of the largest layer, that transient).
    """
    wrapped = [c for c in counts if c.kind == "lora_param"]
    if not wrapped:
        return 0, 0, 0
    w = {c.module + c.shape: _param_lora_bytes(c, q)[0] for c in wrapped}
    total = sum(w[c.module + c.shape] * c.instances for c in wrapped)
    # one layer: the wrapped parameters of the layers with the most of them (instances = layers)
    most = max(c.instances for c in wrapped)
    sizes = [w[c.module + c.shape] for c in wrapped if c.instances == most]
    layer = sum(sizes)
    peak = max(sum(sizes[: j + 1]) + sizes[j] for j in range(len(sizes)))
    return total, layer, peak - layer


def _param_lora_bytes(c: ModuleCount, q: QuantSettings) -> tuple[int, int]:
    """(bytes one layer's fold of a wrapped parameter saves, bytes of its ``W'`` gradient): ``W'`` in
    the parameter's dtype, plus the cast factors of a 16-bit 3-D parameter (see
    ``parameter_lora_activation``)."""
    wb = 4 if c.base_fp32 else BYTES[q.unquantized_dtype]
    factors = wb * c.params_per_instance if ("×(" in c.shape and wb != BYTES[c.dtype]) else 0
    return wb * c.base_numel + factors, wb * c.base_numel


def expert_lora_bytes(counts: list[ModuleCount], q: QuantSettings) -> dict[str, tuple[int, int]]:
    """``_param_lora_bytes`` of each adapted 3-D (experts) parameter, by parameter name."""
    return {c.shape.split()[0]: _param_lora_bytes(c, q) for c in counts if c.kind == "lora_param" and "×(" in c.shape}
