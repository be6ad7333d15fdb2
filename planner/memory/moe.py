"""Sparse mixture-of-experts layers: what transformers 5's MoE blocks keep for backward.

transformers 5.23 fuses a MoE layer's experts into 3-D parameters and runs them through
``integrations/moe.py`` ``grouped_mm_experts_forward`` (sort the ``T k`` routed rows by expert, one
grouped matmul up, the gated activation, one grouped matmul down, weight, unsort, sum): its tensors
do not depend on the routing, only on ``k``.  Each term is derived op by op from that code and the
families' routers and checked against the exact trace (tests/planner/test_moe.py, per-layer saved
bytes equal on tiny fixtures; reports/accuracy/new-families/ at full size).
"""

from __future__ import annotations

from dataclasses import dataclass

from qplan.planner.memory.lin import ZERO, Lin, Precision, precision
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import QuantSettings

#: Routers whose saved tensors are derived (transformers 5.23 ``modeling_<family>.py``
#: ``<Family>TopKRouter.forward``): ``F.linear`` logits, ``softmax`` in fp32, ``topk``, an optional
#: in-place renormalisation of the top-k values, and whether those routing weights are cast back
#: to the logits' dtype (Qwen) or stay fp32 (Mixtral).  ``normalize``: True, False, or the config
#: key that says (``norm_topk_prob``, default False in both Qwen configs).
SOFTMAX_ROUTERS = {
    "mixtral": {"normalize": True, "cast_back": False},
    "qwen2_moe": {"normalize": "norm_topk_prob", "cast_back": True},
    "qwen3_moe": {"normalize": "norm_topk_prob", "cast_back": True},
}


#: MoE families whose every other layer term is a validated dense family's (the attention of Qwen3-MoE
#: is Qwen3's, Qwen2-MoE's Qwen2's, Mixtral's Mistral's): with ``moe_dims`` their plans are validated
#: (reports/accuracy/new-families/: Qwen3-30B-A3B, Mixtral-8x7B) and carry no approximation warning
DERIVED_MOE = {"qwen3_moe": "qwen3", "qwen2_moe": "qwen2", "mixtral": "mistral"}


@dataclass(frozen=True)
class MoeDims:
    """A sparse MoE block as transformers 5 builds it: ``E`` experts fused into 3-D parameters
    (``gate_up_proj`` [E, 2I, h], ``down_proj`` [E, h, I]; the inventory's 3-D ``params``), ``k``
    experts per token (in every decoder layer: ``moe_dims``); a shared expert MLP of width
    ``shared`` (Qwen2-MoE ``shared_expert`` + its sigmoid ``shared_expert_gate``; 0 if none)."""

    E: int
    k: int
    h: int
    inter: int
    router: str  # the router module's pattern (its ``weight`` is what PEFT may adapt)
    normalize: bool
    cast_back: bool
    shared: int = 0


def moe_dims(spec: ModelSpec) -> MoeDims | None:
    """The MoE block of a model whose router is in ``SOFTMAX_ROUTERS`` and whose every decoder
    layer has one (None otherwise: those plans keep the approximation warning)."""
    c = spec.config
    rule = SOFTMAX_ROUTERS.get(str(c.get("model_type")))
    inv = spec.inventory
    experts = {p.param: p for p in inv.params if len(p.shape) == 3}
    gu, dn = experts.get("gate_up_proj"), experts.get("down_proj")
    if rule is None or gu is None or dn is None or inv.transposed:
        return None
    L = int(inv.num_hidden_layers)
    if gu.instances != L or dn.instances != L:
        return None
    norm = rule["normalize"]
    shared = next((g.out_features for g in inv.linear if g.pattern.endswith("shared_expert.gate_proj")), 0)
    return MoeDims(E=int(gu.shape[0]), k=int(c["num_experts_per_tok"]), h=int(dn.shape[1]), inter=int(dn.shape[2]),
                   router=next((q.pattern for q in inv.params if "Router" in q.module_type), ""),
                   normalize=bool(c.get(norm, False)) if isinstance(norm, str) else bool(norm),
                   cast_back=bool(rule["cast_back"]), shared=int(shared))


def moe_router_activation(m: MoeDims, p: Precision, router_grad: bool) -> Lin:
    """What the router saves per token (``<Family>TopKRouter.forward``): ``F.linear`` saves its input
    only when the router weight needs a gradient (PEFT's ``all-linear`` on a MoE adapts it as a
    parameter): the autocast copy, ``c h`` (``R h`` without autocast); ``softmax(..., dtype=float32)``
    saves its fp32 output ``4 E``; ``topk`` its int64 indices ``8 k``; the in-place renormalisation
    ``top /= top.sum(-1, keepdim=True)`` a copy of the fp32 values and the fp32 sum (``4 k + 4``)."""
    per = 4 * m.E + 8 * m.k
    if m.normalize:
        per += 4 * m.k + 4
    if router_grad:
        per += (p.c if p.amp else p.R) * m.h
    return Lin(tok=per)


def moe_experts_activation(m: MoeDims, p: Precision, up_grad: bool, down_grad: bool) -> Lin:
    """What transformers' ``grouped_mm_experts_forward`` (integrations/moe.py, the path the trace
    and CUDA run) saves per token, ``S = k T`` routed rows, experts stored in ``w = R`` bytes
    (the load dtype; fp32 after ``prepare_model_for_kbit_training``, whose upcast reaches them):

    * int64 indices of the three gathers: ``hidden[perm // k]``, ``weights[perm]``,
      ``out[inv_perm]``: ``24 k``;
    * the up projection's output ``[S, 2I]`` (kept whole: ``silu`` saves its ``gate`` view, the
      product its ``up`` view), the activation's output ``[S, I]`` (saved by the product):
      ``3 I w k``;
    * the down projection's output ``[S, h]`` and the routing weights ``[S]``, both saved by their
      product (``sw`` bytes: the logits' dtype when cast back, else fp32): ``(h w + sw) k``;
    * ``grouped_mm`` saves its input only when the weight needs a gradient (LoRA on that
      parameter: PEFT's ``W + s B A``): ``h w k`` for ``gate_up_proj``, ``I w k`` for ``down_proj``.
    """
    w = p.R
    sw = (p.c if p.amp else p.R) if m.cast_back else 4
    per = 24 + 3 * m.inter * w + m.h * w + sw
    if up_grad:
        per += m.h * w
    if down_grad:
        per += m.inter * w
    return Lin(tok=m.k * per)


def moe_backward_moments(m: MoeDims, p: Precision, up_grad: bool, down_grad: bool, recompute: bool,
                         lora: tuple[int, int, int, int] = (0, 0, 0, 0)) -> tuple[Lin, ...]:
    """The moments of a MoE layer's backward, beyond its saved tensors (``moe_activation``), per
    token, as the autograd engine walks ``grouped_mm_experts_forward`` backwards (``S = k T`` rows;
    ``x``: the block input's dtype ``R``; ``w``: the experts' ``R``; ``ww``: the weighted rows', the
    promotion of ``w`` and the routing weights' ``sw``).  ``lora``: with LoRA on the experts, the
    bytes PEFT's fold saves per layer for ``gate_up_proj`` and ``down_proj`` (``W'`` and the cast
    factors, ``parameter_lora_activation``) and the gradients of their ``W'`` (``w * numel``):
    constants each moment holds as far as the backward has come.

    * the first nodes (``sum`` and ``view`` backward) turn the incoming ``[T, h]`` gradient into an
      ``[S, h]`` copy; the gather ``out[inv_perm]`` is the first node that unpacks a saved tensor:
      with checkpointing that runs the layer's recomputation, which stops (non-reentrant early
      stop) after the last saved tensor and leaves its not-saved locals alive until it unwinds:
      the gathered rows ``[S, h]`` (unless saved for a LoRA gradient), the weighted rows
      ``[S, h]``, the sorted expert ids (int64) and ``histc``'s int32 copy of them, and the
      ``[T, k]`` routing weights: ``copy + leftovers``;
    * the gather's backward: ``new_zeros`` + ``index_put`` ``[S, h]`` beside the copy: ``3 h ww``;
    * the routing product's backward: its gradient, ``grad * sw`` and ``grad * out`` (before its
      row sum), ``[S, h]`` each, with ``inv_perm`` freed: ``3 h ww - 8``;
    * the down projection's backward: its ``[S, h]`` gradient in, the ``[S, I]`` input gradient out
      (down output, routing weights, ``inv_perm`` freed) and, with LoRA on ``down_proj``, the
      gradient of its ``W'``: ``I w - sw - 8``;
    * the gated product's backward: three ``[S, I]`` gradients, ``3 I w - (h w + sw + 8)`` (less
      the saved product with LoRA on ``down_proj``, whose fold's backward, next in the engine's
      order, has freed ``W'`` of ``down_proj`` and its gradient);
    * the up projection's backward with LoRA on ``gate_up_proj``: the gradient of its ``W'``.
    ``layer_moments`` evaluates each at ``T`` and the plan takes the largest."""
    x = w = p.R
    logits = p.c if p.amp else p.R
    sw = logits if m.cast_back else 4
    ww = max(w, sw)
    h, inter, k = m.h, m.inter, m.k
    s_up, s_down, g_up, g_down = lora
    before = s_up + s_down
    out = [Lin(const=before, tok=k * 3 * h * ww), Lin(const=before, tok=k * (3 * h * ww - 8)),
           Lin(const=before + (g_down if down_grad else 0), tok=k * (inter * w - sw - 8)),
           Lin(const=s_up, tok=k * (3 * inter * w - (h * w + sw + 8) - (inter * w if down_grad else 0)))]
    if up_grad:
        out.append(Lin(const=s_up + g_up, tok=k * (-inter * w - sw - 8 - (inter * w if down_grad else 0))))
    if recompute:
        leftovers = (0 if up_grad else h * x) + h * ww + 8 + 4
        out.append(Lin(const=before, tok=k * (h * ww + leftovers + sw)))
    return tuple(out)


def moe_shared_activation(m: MoeDims, p: Precision) -> Lin:
    """Qwen2-MoE's shared expert (``Qwen2MoeSparseMoeBlock.forward``): a gated MLP of width
    ``shared`` (``mlp_activation``'s ``3 M shared``), then ``sigmoid(shared_expert_gate(x)) * out``:
    the sigmoid saves its ``[T, 1]`` output, the product the expert's ``[T, h]`` output, both in
    the linear layers' output dtype ``M``."""
    if not m.shared:
        return ZERO
    return Lin(tok=3 * p.M * m.shared + p.M + p.M * m.h)


def _moe_adapted(m: MoeDims, counts: list[ModuleCount]) -> tuple[bool, bool, bool]:
    """Which of the router weight, ``gate_up_proj`` and ``down_proj`` need a gradient: carry LoRA
    (``target_parameters``), or train themselves (full fine-tuning: all three)."""
    if any(c.kind == "full" for c in counts):
        return True, True, True
    adapted = {(c.module, c.shape.split()[0]) for c in counts if c.kind == "lora_param"}
    params = {name for _, name in adapted}
    return (m.router, "weight") in adapted, "gate_up_proj" in params, "down_proj" in params


def moe_activation(spec: ModelSpec, counts: list[ModuleCount], q: QuantSettings) -> Lin | None:
    """A sparse MoE block's saved tensors per layer (router, routed experts, shared expert), in
    place of the dense MLP's; None for a dense model or a MoE block not derived here (``moe_dims``)."""
    m = moe_dims(spec)
    if m is None:
        return None
    router, up, down = _moe_adapted(m, counts)
    p = precision(q)
    return moe_router_activation(m, p, router) + moe_experts_activation(m, p, up, down) + moe_shared_activation(m, p)


def moe_moments(spec: ModelSpec, counts: list[ModuleCount], q: QuantSettings, recompute: bool,
                lora_bytes: dict[str, tuple[int, int]] | None = None) -> tuple[Lin, ...] | None:
    """``moe_backward_moments`` for the plan's model; None for a dense model.  ``lora_bytes``: per
    adapted expert parameter name, (bytes saved per layer, bytes of its ``W'`` gradient)."""
    m = moe_dims(spec)
    if m is None:
        return None
    _, up, down = _moe_adapted(m, counts)
    lb = lora_bytes or {}
    s_up, g_up = lb.get("gate_up_proj", (0, 0))
    s_down, g_down = lb.get("down_proj", (0, 0))
    return moe_backward_moments(m, precision(q), up, down, recompute, (s_up, s_down, g_up, g_down))
