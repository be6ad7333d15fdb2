"""FLOPs and bytes moved by one optimizer step: one pure function per term, formula and source in each.

FLOPs are counted the way ``torch.utils.flop_counter.FlopCounterMode`` counts them (the oracle,
run over the traced step on the meta device, tests/planner/test_compute.py): ``2 m k n`` per
matrix product (``mm``/``addmm``/``bmm``; bias adds, norms, activations, softmax, the loss and the
optimizer are not counted), and ``sdpa_flop_count`` for fused attention: ``2 b h s^2 d`` for
``q k^T`` plus the same for ``p v`` (causality is ignored, as torch does), the backward kernel
``5`` such products (torch/utils/flop_counter.py).

Notation: ``T = b s`` tokens of a micro-batch; a linear module ``in -> out`` costs ``2 T in out``
forward. With a frozen base, the backward of a linear layer is one product (the input
gradient, ``2 T in out``) and only when its input needs a gradient; LoRA's ``A`` (``r x in``) and
``B`` (``out x r``) cost ``2 T r (in + out)`` forward and, backward, their two weight gradients
plus the gradient reaching ``A``'s output (``2 T r out``) and, if the input needs one, its input
gradient (``2 T r in``). Which inputs need gradients follows autograd: the embeddings' output
does only with checkpointing (``enable_input_require_grads``); from there on a tensor needs one
when anything upstream is trainable. Gradient checkpointing runs every layer's forward again in
the backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qplan.planner.memory.branches import Branch, layer_branches, site_dtype
from qplan.planner.memory.lin import precision
from qplan.planner.memory.ln_tuning import ln_sites
from qplan.planner.memory.terms import dims
from qplan.planner.model.full import is_full
from qplan.planner.model.lora import FROZEN_A, UNSTEPPED, ModuleCount
from qplan.planner.model.prompt import PROMPT, PROMPT_MLP
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import QuantSettings
from qplan.planner.vocab import BYTES, optimizer

#: FLOP terms of ``prediction.compute.flops`` (per optimizer step); full fine-tuning adds ``weight_gradients``
FLOP_TERMS = ("base_forward", "input_gradients", "lora", "attention", "recomputation", "head")


@dataclass(frozen=True)
class LayerGrads:
    """Which tensors of one decoder layer need gradients (autograd's ``requires_grad``)."""

    x: bool  # the layer's input
    q: bool
    k: bool
    v: bool
    attn_out_in: bool  # o_proj's input (the attention output)
    mlp_in: bool  # the normed residual after attention
    mlp_out_in: bool  # down_proj's input (the MLP product)
    out: bool  # the layer's output


def layer_grads(sites: list[Branch], x: bool) -> LayerGrads:
    """Propagate ``requires_grad`` through a Llama-family layer: a projection's output needs a
    gradient when its input does or it carries LoRA or (IA)³; the attention output when q, k or v does;
    residual sums when either side does."""
    def trains(s: Branch) -> bool:  # LoRA or LoHa on it, or an (IA)³ vector scaling it
        return bool(s.r or s.ia3 or s.update or s.vera or s.c3a)

    def out_rg(site: str) -> bool:
        return any(trains(s) for s in sites if s.site == site)

    attn_in = [s for s in sites if s.site == "attn_in"]
    if len(attn_in) == 1:  # one fused projection (Phi-3 qkv_proj, GPT-2 c_attn): q, k, v are views of it
        q = k = v = x or trains(attn_in[0])
    else:  # separate projections, named q..., k..., v...
        q, k, v = (x or any(trains(s) for s in attn_in if s.leaf.startswith(c)) for c in "qkv")
    attn = q or k or v
    o = attn or out_rg("attn_out")
    h1 = x or o
    mlp = h1 or out_rg("mlp_in")
    down_in = mlp
    down = down_in or out_rg("mlp_out")
    return LayerGrads(x, q, k, v, attn, h1, down_in, h1 or down)


def ln_first_layer_grads(sites: list[Branch], start: str) -> LayerGrads:
    """Layer 0 under LN tuning (``planner.memory.ln_tuning``), whose input needs no gradient: from a trained input
    norm on, everything does (as if its input did); from trained q/k norms, q and k and all after them; from a
    trained post-attention norm, the MLP only."""
    if start == "input":
        return layer_grads(sites, True)
    attn = start == "attn"
    return LayerGrads(False, attn, attn, False, attn, True, True, True)


def linear_forward_flops(T: int, s: Branch) -> int:
    """Base projection forward: ``2 T in out`` per instance (``F.linear`` -> ``mm``/``addmm``; the
    4-bit path dequantizes, then ``F.linear``)."""
    return 2 * T * s.in_features * s.out_features * s.per_layer


def linear_input_grad_flops(T: int, s: Branch, input_rg: bool) -> int:
    """Base projection backward: only the input gradient ``grad_y W`` (``2 T in out``), and only
    when the input needs a gradient; frozen weights get none."""
    return linear_forward_flops(T, s) if input_rg else 0


def linear_weight_grad_flops(T: int, s: Branch) -> int:
    """A trained projection's weight gradient (full fine-tuning): ``grad_y^T x``, ``2 T in out`` per instance."""
    return linear_forward_flops(T, s)


def lora_flops(T: int, s: Branch, input_rg: bool) -> tuple[int, int]:
    """LoRA on ``s`` (forward, backward): ``2 T r (in + out)`` forward; backward the gradients of
    ``B`` (``2 T r out``), of ``A``'s output (``2 T r out``, if ``A`` or the input needs one), of ``A``
    (``2 T r in``, not with LoRA-FA's frozen ``A``) and, if the input needs one, of the input (``2 T r in``). MiSS
    (``planner.model.miss``) is LoRA-FA whose ``A`` is the sum of the input's ``r``-wide slices: no ``in`` terms."""
    if not s.r:
        return 0, 0
    i = 0 if s.miss else s.in_features  # MiSS: its frozen "A" is a sum of the input's slices, no matmul
    fwd = 2 * T * s.r * (i + s.out_features) * s.per_layer
    a_out = 0 if (s.frozen_a and not input_rg) else 2 * T * s.r * s.out_features
    bwd = (2 * T * s.r * s.out_features + a_out
           + 2 * T * s.r * i * ((0 if s.frozen_a else 1) + (1 if input_rg else 0))) * s.per_layer
    return fwd, bwd


def update_flops(T: int, s: Branch, input_rg: bool) -> tuple[int, int]:
    """A full-size weight update built at every forward (``planner.memory.loha``): ``F.linear(input, update)``
    (``2 T in out``) and, backward, the update's gradient (``2 T in out``) and the input's when it needs one; plus the
    rank products that build the update. LoHa: ``w1_a w1_b`` and ``w2_a w2_b`` (``2 · 2 out r in``) forward, and
    ``HadaWeight.backward``'s six rank-``r`` matmuls (``6 · 2 out r in``); LoKr: each factored ``w = w_a w_b``
    (``2 a r b``) forward and its two gradients backward (``kron`` is elementwise: no FLOPs counted); MiSS-bat: the
    weight's ``r × r`` blocks times the trained blocks (``2 out in r``) and the trained blocks' gradient (the same), its
    ``F.linear`` in place of the base layer's."""
    if not s.update:
        return 0, 0
    dense = 2 * T * s.in_features * s.out_features
    if s.update == "loha":
        rank = 2 * s.out_features * dict(s.factors)["hada_w1_a"][1] * s.in_features  # hada_w1_a: (out, r)
        fwd_rank, bwd_rank = 2 * rank, 6 * rank
    elif s.update == "miss_bat":  # the weight's r × r blocks times the trained blocks, and that product's gradient
        fwd_rank = bwd_rank = 2 * s.out_features * s.in_features * dict(s.factors)["miss_block"][1]
    else:
        shapes = dict(s.factors)
        products = [2 * shapes[f"lokr_{w}_a"][0] * shapes[f"lokr_{w}_a"][1] * shapes[f"lokr_{w}_b"][1]
                    for w in ("w1", "w2") if f"lokr_{w}_a" in shapes]
        fwd_rank, bwd_rank = sum(products), 2 * sum(products)
    return (fwd_rank + dense) * s.per_layer, (bwd_rank + dense * (2 if input_rg else 1)) * s.per_layer


def vera_flops(T: int, s: Branch, input_rg: bool) -> tuple[int, int]:
    """VeRA on one module (``planner.memory.vera``): forward ``F.linear(x, A)`` and ``F.linear(·, B)``
    (``2 T r (in + out)``); backward the gradient through ``B`` (``2 T r out``, ``lambda_d`` trains) and, when the
    module's input needs one, through ``A`` (``2 T r in``); the frozen projections get none."""
    if not s.vera:
        return 0, 0
    fwd = 2 * T * s.vera * (s.in_features + s.out_features) * s.per_layer
    return fwd, (2 * T * s.vera * s.out_features + (2 * T * s.vera * s.in_features if input_rg else 0)) * s.per_layer


def c3a_flops(T: int, s: Branch) -> tuple[int, int]:
    """C3A on one module (``planner.model.c3a``, PEFT's ``BlockCircularConvolution``): its einsums are complex
    ``bmm``s over the ``b`` frequencies, ``(T, in/b) @ (in/b, out/b)``: ``2 T in out / b`` forward; backward the input's
    and the kernel's, both always (the custom backward computes both): ``4 T in out / b``. The FFTs are not matmuls
    (FlopCounterMode counts none)."""
    if not s.c3a:
        return 0, 0
    f = 2 * T * s.in_features * s.out_features // s.c3a * s.per_layer
    return f, 2 * f


def attention_flops(b: int, s: int, nh: int, hd: int, attn_impl: str, fused_kernel: bool,
                    g: LayerGrads) -> tuple[int, int]:
    """Attention core (forward, backward) of one layer. Forward: ``q k^T`` and ``p v``, ``2 b h s^2 d``
    each (causal masking does not change the count). Backward: a fused kernel (flash /
    memory-efficient, ``fused_kernel``) recomputes the scores and makes all of dq, dk, dv: 5
    products; eager (and the math fallback) runs autograd's products for the inputs that need a
    gradient: ``grad_p = grad_o v^T`` (if q or k), ``dv = p^T grad_o`` (if v), ``dq``, ``dk``."""
    one = 2 * b * nh * s * s * hd
    fwd = 2 * one
    if not (g.q or g.k or g.v):
        return fwd, 0
    if fused_kernel:
        return fwd, 5 * one
    return fwd, one * ((g.q or g.k) + g.v + g.q + g.k)


def embedding_lora_flops(T: int, r: int, h: int) -> int:
    """LoRA on an embedding (PEFT ``lora.Embedding``): ``A`` is a lookup (no matmul), then
    ``after_A @ B``: ``2 T r h`` forward; backward the gradient of ``B`` and of ``after_A``
    (``2 x 2 T r h``; ``A``'s own gradient is an index-add, not a matmul)."""
    return 6 * T * r * h


def head_flops(T: int, h: int, V: int, hidden_rg: bool, head_r: int = 0, head_trainable: bool = False) -> tuple[int, int]:
    """Output head (forward, backward): ``2 T h V``; backward the input gradient when the final
    hidden state needs one, a full weight gradient with ``modules_to_save``, LoRA on the head as
    ``lora_flops``."""
    s = Branch("head", h, V, 1, False, "lm_head", head_r)
    fwd = 2 * T * h * V
    bwd = fwd * (hidden_rg + head_trainable)
    lf, lb = lora_flops(T, s, hidden_rg)
    return fwd + lf, bwd + lb


def fused_head_flops(T: int, h: int, V: int, hidden_rg: bool) -> tuple[int, int]:
    """A fused loss in place of the head and its loss (forward, backward): Cut Cross Entropy's forward computes every
    logit block once (``2 T h V``) and the target logits (``2 T h``), its backward recomputes the logits (``2 T h V``)
    and, when the final hidden state needs a gradient, multiplies their softmax gradient by the head (``2 T h V``) —
    an upper bound: it skips blocks whose softmax gradient is below ``eps / 32`` (gradient filtering,
    data-dependent). TRL's fused LM head does the same tiles without the filter (its forward reads the target logit
    from the tile: ``2 T h`` fewer)."""
    fwd = 2 * T * h * V + 2 * T * h
    return fwd, 4 * T * h * V if hidden_rg else 0  # no gradient wanted: the loss is not in the graph


def reference_forward_flops(spec: ModelSpec, counts: list[ModuleCount], r: int, q: QuantSettings, b: int, s: int,
                            attn_impl: str, grad_accum: int = 1, adapters: bool = False) -> int:
    """A forward without grad through TRL's fused LM head on the ``b`` rows of the step — DPO's reference (TRL 1.16
    ``DPOTrainer._compute_loss``: the policy with its adapters disabled), KTO's reference on the KL rows and on the
    batch's, and (``adapters``) KTO's policy on the KL rows (``KTOTrainer._compute_kl_logps``): every base projection
    (``linear_forward_flops``), the adapters' forward with ``adapters`` (``lora_flops``), the attention core's forward
    and the head's tiles' forward (``2 n h V``) on the ``n = b (s - 1)`` rows it scores (the positions with a next
    token); nothing is recomputed, no backward. Per micro-batch, times ``grad_accum``."""
    d = dims(spec)
    T = b * s
    fused, hd = attention_kernel(spec, q, attn_impl)
    none = LayerGrads(*([False] * 8))  # no tensor of the reference needs a gradient
    sites = layer_branches(spec, counts, r, q)
    per_layer = (sum(linear_forward_flops(T, site) + (lora_flops(T, site, False)[0] if adapters else 0)
                     for site in sites) + attention_flops(b, s, d.nh, hd, attn_impl, fused, none)[0])
    n = b * (s - 1)
    return (d.L * per_layer + 2 * n * d.h * d.V) * grad_accum  # TRL's tiles read the target logit from the tile


def recompute_skipped(T: int, sites: list[Branch], norms: int) -> int:
    """What checkpointing does *not* recompute: torch's non-reentrant checkpoint stops the
    recomputation as soon as every tensor the backward needs is back (``_checkpoint_early_stop``),
    and the op that saves the last of them does not run. A layer that ends with the MLP's down
    projection (no norm after it) therefore skips its last matmul: LoRA's ``B`` on the down
    projection (``2 T r out``), else the down projection itself (plain or 4-bit; checked against
    the traced count). Gemma-2's sandwich norm after the MLP (4 norms per layer) saves later
    tensors: nothing is skipped; nor with C3A on the down projection, whose custom Function saves its tensors only
    once its forward (and the base matmul before it) has run."""
    if norms >= 4:
        return 0
    down = [s for s in sites if s.site == "mlp_out"]
    if not down:
        return 0
    last = down[-1]
    if last.c3a:
        return 0
    if last.r:
        return 2 * T * last.r * last.out_features * last.per_layer
    return linear_forward_flops(T, last)


def attention_kernel(spec: ModelSpec, q: QuantSettings, attn_impl: str) -> tuple[bool, int]:
    """Whether the attention core runs a fused kernel (``uses_fused_attention``), and the head dim its products
    count: flash attention pads it to a multiple of 8 for 16-bit inputs up to 256."""
    d = dims(spec)
    amp = q.compute_dtype in ("bfloat16", "float16")
    fused = uses_fused_attention(attn_impl, amp, d.hd, d.nh, d.nkv)
    return fused, d.hd + (-d.hd) % 8 if (fused and amp and d.hd <= 256) else d.hd


def uses_fused_attention(attn_impl: str, amp: bool, hd: int, nh: int, nkv: int) -> bool:
    """sdpa on a GPU: flash attention for 16-bit inputs with head dim <= 256 (GQA native), the
    memory-efficient kernel for equal heads otherwise, else the math composite (torch 2.13
    sdp_utils, as the trace routes it)."""
    if attn_impl == "eager":
        return False
    if amp and hd <= 256:
        return True
    return nh == nkv


def step_flops(spec: ModelSpec, counts: list[ModuleCount], r: int, q: QuantSettings, b: int, s: int,
               grad_ckpt: str, attn_impl: str, grad_accum: int = 1, loss: str = "full") -> dict[str, int]:
    """FLOPs of one optimizer step (``grad_accum`` micro-batches) by term; ``total`` is their sum (``loss``: the
    head as a linear layer, or Cut Cross Entropy's kernels, ``cce_head_flops``)."""
    d = dims(spec)
    T = b * s
    ckpt = grad_ckpt != "off"
    sites = layer_branches(spec, counts, r, q)
    fused, hd = attention_kernel(spec, q, attn_impl)
    out = dict.fromkeys(FLOP_TERMS, 0)
    # the embeddings' output needs a gradient with checkpointing (enable_input_require_grads), or
    # when the embedding itself trains (LoRA on it, or a full copy in modules_to_save)
    emb_patterns = {e.pattern for e in spec.inventory.embeddings}
    emb_counts = [c for c in counts if c.module in emb_patterns]
    full = is_full(counts)  # full fine-tuning: every weight gets a gradient (``weight_gradients``)
    if full:
        out["weight_gradients"] = 0
    x_rg = ckpt or bool(emb_counts) or any(c.kind == PROMPT for c in counts)  # prompt tuning: the prompt trains
    out["lora"] += prompt_encoder_flops(counts)
    for c in emb_counts:
        if c.kind == "lora":
            out["lora"] += embedding_lora_flops(T, r, d.h) * c.instances
    ln = ln_sites(counts, d.L)  # LN tuning: the trained norms make the gradient flow
    for layer in range(d.L):
        g = ln_first_layer_grads(sites, ln.start) if (ln is not None and layer == 0 and not x_rg) else layer_grads(
            sites, x_rg)
        fwd = 0
        for site in sites:
            input_rg = {"attn_in": g.x, "attn_out": g.attn_out_in, "mlp_in": g.mlp_in, "mlp_out": g.mlp_out_in}[site.site]
            # MiSS-bat runs F.linear with its rebuilt weight instead of the base layer (update_flops counts it)
            f = linear_forward_flops(T, site) if site.update != "miss_bat" else 0
            out["base_forward"] += f
            fwd += f
            # an (IA)³ input-scaled module's base input needs a gradient whatever its own input does
            out["input_gradients"] += linear_input_grad_flops(T, site, input_rg or site.ia3 == "ff") if f else 0
            if full:
                out["weight_gradients"] += linear_weight_grad_flops(T, site)
            lf, lb = lora_flops(T, site, input_rg)
            hf, hb = update_flops(T, site, input_rg)
            vf, vb = vera_flops(T, site, input_rg)
            cf, cb = c3a_flops(T, site)
            out["lora"] += lf + lb + hf + hb + vf + vb + cf + cb
            fwd += lf + hf + vf + cf
        af, ab = attention_flops(b, s, d.nh, hd, attn_impl, fused, g)
        out["attention"] += af + ab
        fwd += af
        if ckpt:  # reentrant checkpointing recomputes the whole layer (CheckpointFunction.backward)
            out["recomputation"] += fwd - (0 if grad_ckpt == "reentrant" else recompute_skipped(T, sites, d.norms))
        x_rg = g.out
    head_counts = {c.kind: c for c in counts if c.module == spec.inventory.output_head}
    # CCE and TRL recompute the logits in the backward; Liger computes the input gradient in the forward (the same
    # two matmuls as a plain head)
    if loss in ("cce", "trl"):
        hf, hb = fused_head_flops(T, d.h, d.V, x_rg)
    else:
        hf, hb = head_flops(T, d.h, d.V, x_rg, r if "lora" in head_counts else 0,
                            "modules_to_save" in head_counts or full)
    out["head"] = hf + hb
    out = {k: v * grad_accum for k, v in out.items()}
    out["lora"] += lorafa_step_flops(counts)  # once per optimizer step
    out["total"] = sum(out.values())
    return out


def prompt_encoder_flops(counts: list[ModuleCount]) -> int:
    """P-tuning's MLP per micro-batch: its three matmuls over the ``n`` virtual tokens of one row (PEFT runs it once
    and expands the output), ``2 n in out`` each, forward, weight gradient and input gradient (the embedding it reads
    trains, so every layer's input needs one): ``6 n Σ in out``. Checkpointing does not recompute it (it runs before
    the decoder layers)."""
    n = next((c.save_keys[0][1][0] for c in counts if c.kind == PROMPT), 0)
    return sum(6 * n * math.prod(c.save_keys[0][1]) for c in counts if c.kind == PROMPT_MLP)


def lorafa_step_flops(counts: list[ModuleCount]) -> int:
    """LoRA-FA's optimizer step (``LoraFAOptimizer.step``, peft/optimizers/lorafa.py), per ``lora_A`` ``(r, in)`` and
    ``lora_B`` ``(out, r)`` pair: ``A @ A.T`` (``2 r² in``) and ``grad_B @ pinv(...)`` (``2 out r²``); the ``r × r``
    pseudo-inverse (an SVD) is not counted, as FlopCounterMode does not count it. 0 without LoRA-FA."""
    a = {c.module: c for c in counts if c.kind in (FROZEN_A, UNSTEPPED)}
    total = 0
    for c in counts:
        if c.kind == "lora" and c.module in a:
            (_, (o, r)), (_, (_, i)) = c.save_keys[0], a[c.module].save_keys[0]
            total += 2 * r * r * (i + o) * c.instances
    return total


def not_counted(spec: ModelSpec, use_dora: bool) -> list[str]:
    """What ``step_flops`` leaves out for this plan, said rather than silently under-counted:
    fused mixture-of-experts tensors (``grouped_mm``, which FlopCounterMode does not count
    either) and DoRA's weight-norm products. (LLM.int8's forward matmuls are counted like 16-bit
    ones, ``2 m k n``; FlopCounterMode does not see them: they run as ``int8_linear_matmul``.)"""
    out = []
    experts = [p for p in spec.inventory.params if len(p.shape) == 3]
    if experts:
        out.append("mixture-of-experts expert matmuls (fused 3-D expert tensors: "
                   + ", ".join(sorted({p.pattern.rsplit('.', 1)[-1] + '.' + p.param for p in experts})) + ")")
    if use_dora:
        out.append("DoRA's weight-norm products (lora_B @ lora_A per adapted module and step)")
    return out


def flops_form(spec: ModelSpec, counts: list[ModuleCount], r: int, q: QuantSettings, grad_ckpt: str,
               attn_impl: str, loss: str = "full", term: str = "total") -> tuple[int, int]:
    """``(a, c)`` with ``step_flops(b, s)[term] == a b s + c b s^2`` (every matmul is linear in
    the tokens, attention in ``b s^2``): read off two evaluations, for ``qplan fit``'s inner loop."""
    f1 = step_flops(spec, counts, r, q, 1, 1, grad_ckpt, attn_impl, loss=loss)[term]
    f2 = step_flops(spec, counts, r, q, 1, 2, grad_ckpt, attn_impl, loss=loss)[term]
    c = (f2 - 2 * f1) // 2
    return f1 - c, c


#: passes over a trainable element (in units of its dtype's bytes) of torch's AdamW step, foreach and fused, and of
#: ``clip_grad_norm_`` (see ``step_bytes``)
ADAMW_FOREACH_ACCESSES, ADAMW_FUSED_ACCESSES, CLIP_ACCESSES = 21, 7, 3


def optimizer_bytes(counts: list[ModuleCount], optimizer_name: str, trainable_numel: int) -> int:
    """The optimizer step's and the gradient clipping's bytes moved (``step_bytes``' ``optimizer`` term)."""
    row = optimizer(optimizer_name)
    if row.state == "adamw":
        accesses = (ADAMW_FOREACH_ACCESSES if row.foreach else ADAMW_FUSED_ACCESSES) + CLIP_ACCESSES
        return sum(accesses * c.total * BYTES[c.dtype] for c in counts)
    per_elem = {"bnb8bit": 16, "bnb32bit": 28, "none": 12, "factored": 20, "torchao8bit": 16,
                "torchao4bit": 14, "schedulefree": 28}[row.state]
    if row.states == 1:  # Lion, schedule-free SGD: one state read and written instead of two
        per_elem -= {"bnb8bit": 2, "bnb32bit": 8, "schedulefree": 8}[row.state]
    if row.state in ("schedulefree", "none"):  # the states are like the parameter
        return sum(per_elem * c.total * BYTES[c.dtype] // 4 for c in counts)
    return per_elem * trainable_numel


def step_bytes(spec: ModelSpec, counts: list[ModuleCount], r: int, q: QuantSettings, grad_ckpt: str,
               optimizer_name: str, trainable_numel: int, grad_accum: int = 1,
               shape: tuple[int, int] = (0, 0)) -> dict[str, int]:
    """Bytes moved in device memory per optimizer step, by term (an estimate for the roofline;
    no oracle counts bytes):

    * ``weights``: every stored base weight of the decoder layers read once per pass that uses it —
      forward, backward (input gradients) and, with checkpointing, the recomputation:
      ``passes x stored bytes``; the output head twice (forward, input gradient);
    * ``dequantization``: a 4-bit weight is dequantized to the compute dtype for each use and that
      copy written and read: ``2 c n`` per use (bitsandbytes' CUDA dequantize + matmul path);
    * ``adapter_updates``: LoHa's and LoKr's full-size weight updates (``loha_update_bytes``), C3A's FFT passes over
      each micro-batch's ``shape`` (batch, sequence; ``c3a_fft_bytes``), absent without them;
    * ``optimizer``: per trainable element of ``b`` bytes (the tensor's dtype, its torch states' too), the passes over
      memory of the optimizer step and of ``clip_grad_norm_`` before it (``_foreach_norm`` reads the gradient,
      ``_foreach_mul_`` reads and writes it: ``3 b``). torch's foreach AdamW (``_multi_tensor_adam``, torch 2.13, not
      capturable, decoupled weight decay) is one kernel per op, each a pass: ``mul_`` of the parameters (2),
      ``lerp_`` of ``exp_avg`` (3), ``mul_`` and ``addcmul_`` of ``exp_avg_sq`` (2 + 4), ``sqrt`` into a new tensor,
      ``div_``, ``add_`` (2 + 2 + 2), ``addcdiv_`` of the parameters (4): ``21 b``; fused AdamW reads the parameter,
      gradient and two states and writes three in one kernel: ``7 b``. Fixed per fp32 element: 8-bit states
      ``16 B``; SGD ``12 B``; Adafactor ``20 B``; torchao's 4-bit states ``14 B`` (reads and writes half a byte
      each); Lion's one state: ``20 B`` in fp32, ``14 B`` in 8-bit; schedule-free AdamW/RAdam ``28 B`` (``z`` and
      ``exp_avg_sq`` for AdamW's two moments), schedule-free SGD ``20 B`` (torch-state ones scaled to ``b``).
      Full fine-tuning also writes every weight's gradient: one more pass over the weights.
    """
    c = 2 if q.compute_dtype in ("bfloat16", "float16") else 4
    full = is_full(counts)
    passes = 2 + (grad_ckpt != "off") + full  # full fine-tuning writes each weight's gradient
    sites = layer_branches(spec, counts, r, q)
    L = max(1, spec.inventory.num_hidden_layers)
    weights = sum(x.weight_bytes * x.per_layer * L for x in sites) * passes * grad_accum
    d = dims(spec)
    head = spec.inventory.output_head
    head_dtype = next((("float32" if g.keep_fp32 else q.unquantized_dtype) for g in spec.inventory.linear
                       if g.pattern == head), q.unquantized_dtype)
    weights += 2 * d.V * d.h * BYTES[head_dtype] * grad_accum  # the output head: forward and input gradient
    dq = sum(2 * c * x.in_features * x.out_features * x.per_layer * L for x in sites if x.kbit and q.quant != "int8")
    dq *= passes * grad_accum
    opt = optimizer_bytes(counts, optimizer_name, trainable_numel)
    out = {"weights": weights, "dequantization": dq, "optimizer": opt}
    updates = sum(loha_update_bytes(x, c if c == 2 else 4, grad_ckpt != "off", BYTES[q.unquantized_dtype]) * L
                  for x in sites) * grad_accum
    p = precision(q)
    updates += sum(c3a_fft_bytes(x, shape[0] * shape[1], site_dtype(x.site, p), p.c, grad_ckpt != "off") * L
                   for x in sites) * grad_accum
    if updates:
        out["adapter_updates"] = updates
    out["total"] = sum(out.values())
    return out


def c3a_fft_bytes(s: Branch, T: int, x: int, o: int, ckpt: bool) -> int:
    """C3A's passes over memory per module and micro-batch of ``T`` tokens (``planner.model.c3a``: PEFT 0.21's
    ``C3ALinear.forward`` and ``BlockCircularConvolution``, op by op as dispatched; ``x`` the input's dtype bytes, ``o``
    the base output's), memory-bound and not matmuls, so serial in the roofline. Forward: the input's fp32 copy (read
    ``x``, write 4; none when it is fp32), its FFT (read 4, write 8 complex), the einsum's ``bmm`` (read 8 ``in``, write
    8 ``out``), the inverse FFT (8 + 8), the scale reading the real parts (8 + 4), the cast to the output's dtype
    (4 + ``o``) and the in-place sum (3 ``o``): ``(20 [+ x + 4]) in + (48 + 4 o) out``; again when checkpointing
    recomputes it. Backward: the gradient's fp32 cast and scale (``o + 4``, 8), its FFT (4 + 8), the two einsums
    (read 8 ``out`` each, write and read 8 ``in``), the inverse FFTs of the result and of the input (16, 12) and the
    cast of the input gradient (8 + ``x``, when it was cast): ``(44 [+ 8 + x]) in + (40 + o) out``. The kernel's own
    FFTs (``out in / b`` elements) are left out. No oracle counts bytes: derived, and checked only through PEFT's L40S
    run's step time (reports/time)."""
    if not s.c3a:
        return 0
    cast = x + 4 if x != 4 else 0
    fwd = (20 + cast) * s.in_features + (48 + 4 * o) * s.out_features
    bwd = (44 + (8 + x if x != 4 else 0)) * s.in_features + (40 + o) * s.out_features
    return (fwd * (2 if ckpt else 1) + bwd) * T * s.per_layer


def loha_update_bytes(s: Branch, e: int, ckpt: bool, w: int) -> int:
    """The elementwise passes over a full-size update (``E = out × in`` per module and micro-batch), ``e`` its forward
    dtype bytes (the compute dtype under autocast, else fp32).

    LoHa (``HadaWeight``, PEFT 0.21): the forward writes both rank-``r`` products, reads them into their product,
    scales it and ``F.linear`` reads it (``8 e E``; again when checkpointing recomputes it); the backward writes the
    update's gradient and its scaled copy, rebuilds each product in fp32 and multiplies the gradient by it (read
    ``e + 4``, write ``4``) and reads each ``temp`` into two matmuls, and ``F.linear``'s input gradient reads the
    update (``(6 e + 40) E``).

    LoKr (``make_kron``): the forward writes ``kron(w1, w2)`` in fp32, scales it (read and write) and, under autocast,
    casts it for ``F.linear`` (``6``), which reads it (``12 + 6 [autocast] + e``); the backward writes the update's
    gradient (and its fp32 cast under autocast), scales it, multiplies it by each broadcast factor and sums each
    product (``3 × 8``), and ``F.linear``'s input gradient reads the update (``2 e + 32 + (e + 4) [autocast]``).

    MiSS-bat (``w``: the base weight's bytes): the forward clones the weight (``2 w``), copies it to fp32 (``w + 4``),
    makes it contiguous for the batched matmul (8), which reads and writes it (8), adds the blocks (8), makes the sum
    contiguous (8), adds it to the clone (``w + 8``) and ``F.linear`` reads the result (4): ``4 w + 48``; the backward
    writes the weight's gradient (4), makes it contiguous (8), the batched matmul's gradient (12), sums it (4) and reads
    the rebuilt weight for the input gradient (4): ``32``. Autocast's casts are left out."""
    if not s.update:
        return 0
    E = s.out_features * s.in_features * s.per_layer
    if s.update == "loha":
        return (8 * e * (2 if ckpt else 1) + 6 * e + 40) * E
    if s.update == "miss_bat":
        return ((4 * w + 48) * (2 if ckpt else 1) + 32) * E
    amp = e != 4
    fwd = 12 + (6 if amp else 0) + e
    return (fwd * (2 if ckpt else 1) + 2 * e + 32 + ((e + 4) if amp else 0)) * E
