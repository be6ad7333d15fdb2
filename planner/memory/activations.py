"""Activation terms: what autograd keeps for backward, per decoder layer and outside (the loss: ``loss``).

What autograd keeps for backward, derived op by op from the code a training step runs (transformers' Llama-family
decoder layer, PEFT 0.21's layers, bitsandbytes' Linear4bit, torch's CUDA autocast and fused kernels) and checked
against the exact trace of that step (``qplan.observe.trace``; tests/planner/test_memory.py, reports/accuracy/). Every
term is a ``Lin`` (``planner.memory.lin``), so a plan's terms are evaluated for any batch x sequence in a few
multiplications (``qplan fit``). Notation as in ``planner.memory.terms``.
"""

from __future__ import annotations

from qplan.planner.memory.backward import incoming_gradients, reentrant_difference
from qplan.planner.memory.branches import (
    SITES,
    Branch,
    layer_branches,
    lora_branch_activation,
    lora_branches,
    lora_input_dtype,
    lora_weight_cast_bytes,
    site_dtype,
    site_input_bytes,
    site_of,
)
from qplan.planner.memory.dora import dora_activation
from qplan.planner.memory.full import cached_weight_casts, full_head_activation, full_layer_activation, full_layer_grads
from qplan.planner.memory.ia3 import ia3_backward_transient, ia3_branch_activation
from qplan.planner.memory.input_dtype import (
    c3a_backward_transient,
    c3a_branch_activation,
    c3a_forward_transient,
    mlp_promotion,
)
from qplan.planner.memory.lin import ZERO, Lin, Precision, precision
from qplan.planner.memory.ln_tuning import LnSites, ln_final_norm_saved, ln_first_layer_unsaved, ln_norm_saved, ln_sites
from qplan.planner.memory.loha import (
    bat_transients,
    loha_backward_transient,
    loha_branch_activation,
    loha_forward_casts,
    update_recompute_transient,
)
from qplan.planner.memory.loss import loss_time_activation
from qplan.planner.memory.masks import (
    eager_mask_activation,
    embeddings_backward_activation,
    padding_mask_activation,
    rotary_activation,
)
from qplan.planner.memory.moe import moe_activation, moe_moments
from qplan.planner.memory.param_lora import expert_lora_bytes, parameter_lora_activation
from qplan.planner.memory.prompt import (
    prompt_batch_correction,
    prompt_checkpoint_leaf,
    prompt_encoder_saved,
    prompt_forward_activation,
    prompt_input_saved,
)
from qplan.planner.memory.terms import Dims, dims
from qplan.planner.memory.vera import vera_branch_activation, vera_forward_transient
from qplan.planner.model.full import FULL, is_full
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.prompt import PROMPT, PROMPT_MLP
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import QuantSettings, is_quantized
from qplan.planner.vocab import BYTES, HF_CKPT


def norm_activation(d: Dims, p: Precision, first: bool = False, liger: bool = False) -> Lin:
    """RMSNorms of one layer (``x.to(float32)``, ``x * rsqrt(mean(x**2) + eps)``, ``weight * x``).

    Each saves the fp32 ``rsqrt`` per token (4 T) and its fp32 input: for a norm reading the
    residual stream in fp32 that is the residual itself (counted by ``residual_activation``),
    else a fresh fp32 copy (4 h T).  Gemma-2's extra norms after each sublayer read the sublayer's
    output, a new tensor: 4 h T either way.  Gemma's ``1 + weight.float()`` is a new fp32 vector
    per norm (4 h, saved).  The frozen weight's ``mul`` saves nothing new.  ``first``: layer 0
    without checkpointing, whose input norm sees no grad and saves nothing. ``liger``: Liger's RMSNorm
    (``LigerRMSNormFunction``, liger-kernel 0.8.0) saves its input as it is and the fp32 ``rstd`` per row: a 16-bit
    residual sum is kept (``R h T``) instead of its fp32 copy.
    """
    pre = 4 + (0 if p.R == 4 else (p.R if liger else 4) * d.h)
    post = 4 + 4 * d.h
    n_pre = 2 if d.norms >= 4 else d.norms
    n_post = d.norms - n_pre
    tok = pre * (n_pre - (1 if first else 0)) + post * n_post
    const = 4 * d.h * (d.norms - (1 if first else 0)) if d.gemma_norm else 0
    return Lin(tok=tok, const=const)


def qk_norm_activation(d: Dims, p: Precision, liger: bool = False) -> Lin:
    """Per-head RMSNorms of q and k (Qwen3 ``q_norm``/``k_norm`` on ``q_proj(x).view(..., hd)``):
    each saves its fp32 input (``to(float32)`` makes a copy of a 16-bit projection output, and an
    fp32 one is itself a tensor nothing else saves) and the fp32 ``rsqrt`` per head:
    ``4 (q + kv) T + 4 (nh + nkv) T``; its 16-bit output feeds the rotary embedding, which saves
    only ``cos``/``sin``. 0 for models without them. ``liger``: Liger's RMSNorm saves the projection output as it is
    (``M`` bytes) instead of an fp32 copy."""
    if not d.qk_norm:
        return ZERO
    x = p.M if liger else 4
    return Lin(tok=x * (d.q + d.kv) + 4 * (d.nh + d.nkv))


def residual_activation(d: Dims, p: Precision) -> Lin:
    """The two residual sums of a layer (after attention, after the MLP) are the next norms'
    inputs; in fp32 the norm's ``pow``/``mul`` save them as they are (``4 h T`` each).  In 16-bit
    the norm saves its fp32 copy instead and the sum itself is freed."""
    return Lin(tok=2 * 4 * d.h) if p.R == 4 else ZERO


def _padded(hd: int) -> int:
    return hd + (-hd) % 8


FUSED_QKV = {"qkv_proj", "query_key_value", "c_attn", "W_pack", "Wqkv"}


def fused_qkv_kbit(spec: ModelSpec, q: QuantSettings) -> bool | None:
    """None if the model has separate q/k/v projections; else whether the fused one is k-bit."""
    for g in spec.inventory.linear:
        if g.pattern.rsplit(".", 1)[-1] in FUSED_QKV:
            return is_quantized(g, q)
    return None


def fused_qkv_activation(d: Dims, p: Precision, fused_kbit: bool | None) -> Lin:
    """A fused q/k/v projection (Phi-3 ``qkv_proj``) whose output is already in the compute dtype:
    sdpa saves ``v``, a view of that output, which keeps the whole output alive next to the
    rotated q and k: ``c (q + kv) T`` more than separate projections.  A k-bit projection returns
    the stream dtype (fp32 after upcasting), and autocast's copy of ``v`` is what is saved."""
    if fused_kbit is None or not p.low:
        return ZERO
    out_dtype = p.R if fused_kbit else p.c
    return Lin(tok=p.c * (d.nh + d.nkv) * d.hd) if out_dtype == p.c else ZERO


def _int8_sites(spec: ModelSpec, q: QuantSettings) -> set[str]:
    """Sites of the layer's projections that bitsandbytes converts to int8 under ``q``."""
    if q.quant != "int8":
        return set()
    return {site for g in spec.inventory.linear if (site := site_of(g)) and is_quantized(g, q)}


def int8_retained_activation(spec: ModelSpec, q: QuantSettings, p: Precision, ckpt: bool, first: bool,
                             counted: set[str]) -> Lin:
    """bitsandbytes ``MatMul8bitLt.forward`` keeps its input as a plain ``ctx.tensors`` attribute
    (not ``save_for_backward``) whenever the input or weight needs grad, so checkpointing does
    not drop it: every int8 projection's input stays alive until its backward, once per distinct
    input tensor — the normed stream for q/k/v (``R h T``) and for gate/up (``R h T``), the
    attention output (``c q T``) and the MLP product (``M i T``).  Without checkpointing the
    attention output is saved by sdpa anyway, and inputs already saved (``counted``) add nothing;
    layer 0's first projections read the embeddings, which need no grad."""
    d = dims(spec)
    tok = 0
    for site in _int8_sites(spec, q):
        if first and site == "attn_in":
            continue
        if not ckpt and (site == "attn_out" or site in counted):
            continue
        tok += site_input_bytes(site, d, p)
    return Lin(tok=tok)


def attention_activation(d: Dims, p: Precision, attn_impl: str) -> Lin:
    """Attention core per layer.

    fp32 (no autocast): see the branches below (math composite for GQA, memory-efficient else).

    sdpa/flash (CUDA, 16-bit, head dim <= 256: ``_scaled_dot_product_flash_attention``, GQA
    native, head dim padded to a multiple of 8): saves q, k, v in the compute dtype (autocast
    copies of fp32 projections, or the rotated projections themselves), the output, the fp32
    log-sum-exp per head and token, and the RNG state (24 B): ``c T (2 nh + 2 nkv) hd' + 4 nh T``.

    eager (``eager_attention_forward``): q, and k and v repeated to all heads (``repeat_kv``), in
    the compute dtype (``3 c q T``); the fp32 softmax ``4 b nh s^2`` and its ``c``-byte copy for the
    value matmul; Gemma-2's softcapped scores (``tanh`` output, ``c b nh s^2``).  The output's
    contiguous copy is saved only by a LoRA on ``o_proj`` (counted there).
    """
    hdp = _padded(d.hd)
    if attn_impl == "eager":
        # q, k and v repeated to all heads, each in the compute dtype (autocast copies, or the
        # rotated / repeated tensors themselves); the fp32 softmax and the compute-dtype copy the
        # value matmul saves (none without autocast); Gemma-2's ``tanh`` softcap output
        quad = 4 * d.nh + (p.c * d.nh if p.low else 0) + (p.c * d.nh if d.attn_softcap else 0)
        return Lin(tok=3 * p.c * d.nh * d.hd, quad=quad)
    if not p.low:
        if d.nkv != d.nh:
            # fp32 + GQA: the math composite (flash needs 16-bit, memory-efficient equal heads):
            # q * scale, the repeated k (scaled, transposed) and v, and the fp32 softmax
            return Lin(tok=4 * 3 * d.nh * d.hd, quad=4 * d.nh)
        # fp32, equal heads: memory-efficient attention saves q, k, v, out and an fp32
        # log-sum-exp per head (padded to 32 tokens, taken per token here) + seed/offset
        return Lin(tok=4 * 4 * d.nh * d.hd + 4 * d.nh, const=16)
    return Lin(tok=p.c * (2 * d.nh + 2 * d.nkv) * hdp + 4 * d.nh, const=24)


def eager_forward_transient(d: Dims, p: Precision) -> Lin:
    """Eager attention's largest forward moment, per layer: the masked scores (``c``, or fp32 when
    the mask is fp32 or there is no autocast), ``softmax(..., dtype=float32)``'s fp32 copy of them
    (ATen ``softmax`` converts with ``toType`` unless fp16 on CUDA) and its fp32 output:
    ``(A + [4 if A != 4] + 4) b nh s^2``.  With checkpointing nothing of it is saved, so it is the
    peak of the forward at long sequences."""
    a = 4 if (p.R == 4 or not p.low) else p.c
    return Lin(quad=(a + (0 if a == 4 else 4) + 4) * d.nh)


def eager_backward_quad(d: Dims, p: Precision) -> Lin:
    """Eager attention's largest backward moment, per layer: the saved fp32 softmax output, the
    gradient of the probabilities cast back to fp32, and ``_softmax_backward_data``'s fp32 output
    (``12 b nh s^2``), plus Gemma-2's saved ``tanh`` of the scores."""
    tanh = p.c * d.nh if d.attn_softcap else 0
    return Lin(quad=12 * d.nh + tanh)


def mlp_activation(d: Dims, p: Precision, liger: bool = False) -> Lin:
    """Gated MLP (SwiGLU/GeGLU; Phi-3's fused ``gate_up_proj`` keeps the same bytes through views):
    the gate output (saved by the activation), the activation's output and the up output (saved
    by their product): ``3 M i T``.  Plain MLP: the fc output and the activation output, ``2 M i T``.
    ``liger``: Liger's SwiGLU (``LigerSiLUMulFunction``) saves the gate and up outputs only, ``2 M i T``, and writes
    their gradients into them in the backward."""
    return Lin(tok=(2 if liger or not d.gated else 3) * p.M * d.i)


def frozen_weight_casts(spec: ModelSpec, q: QuantSettings, first: bool, lora_sites: set[str],
                        input_sites: frozenset[str] = frozenset(), rebuilt: frozenset[str] = frozenset()) -> Lin:
    """Autocast's copies of a layer's frozen 16/32-bit weights in another dtype (fp32 or fp16 weights under bf16
    autocast, bf16 weights under fp16): ``cached_cast`` caches only leaves that require grad, so each matmul casts its
    frozen weight anew and saves the copy for its input gradient (aten/src/ATen/autocast_mode.cpp) — ``c`` bytes per
    weight element of every decoder-layer linear whose input needs a gradient. In layer 0 without checkpointing that
    is the projections after the first LoRA-adapted (or (IA)³ output-scaled) site (the embeddings need no grad), and
    from an (IA)³ input-scaled site (``input_sites``: its base weight's input is scaled, so it needs a gradient) on.
    None for k-bit weights (bitsandbytes dequantizes them itself) or when the weights are in the compute dtype, and none
    for the projections whose weight a MiSS-bat module rebuilds (``rebuilt``, leaf names: its base layer never runs)."""
    p = precision(q)
    if not p.amp or q.kbit or q.unquantized_dtype == q.compute_dtype:
        return ZERO
    d = dims(spec)
    order = {site: i for i, site in enumerate(SITES)}
    first_lora = min([order[s_] for s_ in lora_sites] + [order[s_] - 1 for s_ in input_sites], default=len(SITES))
    total = 0
    for g in spec.inventory.linear:
        site = site_of(g)
        if site is None or g.bnb_quantized is False and g.keep_fp32 or g.pattern.rsplit(".", 1)[-1] in rebuilt:
            continue
        if first and order[site] <= first_lora:
            continue
        total += g.in_features * g.out_features * g.instances * p.c
    return Lin(const=total // max(1, d.L))


def layer_activation(spec: ModelSpec, branches: list[Branch], q: QuantSettings, r: int, dropout: float,
                     attn_impl: str, first: bool = False, kernels: str = "cuda", mlp: Lin | None = None,
                     dora: bool = False, liger: tuple[str, ...] = (), full: bool = False,
                     ia3: tuple[Branch, ...] = (), ln: LnSites | None = None, loha: tuple[Branch, ...] = (),
                     vera: tuple[Branch, ...] = (), c3a: tuple[Branch, ...] = ()) -> Lin:
    """Everything one decoder layer keeps for backward (no checkpointing); ``full``: its weights train
    (``planner.memory.full``); ``ln``: LN tuning's trained norms (``planner.memory.ln_tuning``). ``first``: layer 0
    without checkpointing reads the embeddings, which need no grad: its input norm saves nothing, dropout masks on
    that input are not kept.
    ``mlp``: the feed-forward block's own term when not a dense MLP (``moe_activation``); ``dora``: DoRA's extras;
    ``liger``: Liger-Kernel's kernels in place of transformers' RMSNorm / SwiGLU MLP (``vocab.LIGER_KERNELS``)."""
    d = dims(spec)
    p = precision(q)
    total = norm_activation(d, p, first, "rms_norm" in liger) + residual_activation(d, p)
    total = total + attention_activation(d, p, attn_impl) + (
        mlp_activation(d, p, "swiglu" in liger) + mlp_promotion([*branches, *c3a, *loha], d.i, d.gated, p) if mlp is None
        else mlp)
    total = total + fused_qkv_activation(d, p, fused_qkv_kbit(spec, q))
    total = total + qk_norm_activation(d, p, "rms_norm" in liger)
    shared = set()
    for br in branches:
        lin, shares = lora_branch_activation(br, p, r, dropout, not (first and br.site == "attn_in"), kernels)
        total = total + lin
        if shares:
            shared.add(br.site)
    for br in vera:  # VeRA's scaled projections (planner.memory.vera)
        total = total + vera_branch_activation(br, p, not (first and br.site == "attn_in"))
    for br in c3a:  # C3A's fp32 input copies (planner.memory.input_dtype)
        lin, shares = c3a_branch_activation(br, site_dtype(br.site, p))
        total = total + lin
        if shares:
            shared.add(br.site)
    for br in loha:  # LoHa's input copies and weight updates (planner.memory.loha)
        lin, shares = loha_branch_activation(br, site_dtype(br.site, p), p, not (first and br.site == "attn_in"))
        total = total + lin
        if shares:
            shared.add(br.site)
    # a shared input is saved once; the attention output is saved by sdpa anyway
    total = total + Lin(tok=sum(site_input_bytes(s_, d, p) for s_ in shared if s_ != "attn_out"))
    if q.quant == "int8":
        total = total + int8_retained_activation(spec, q, p, False, first, shared)
    for br in ia3:  # (IA)³'s scaling vectors (planner.memory.ia3)
        total = total + ia3_branch_activation(br, site_dtype(br.site, p), p, kernels)
    if dora:
        total = total + dora_activation(branches, p, dropout, first, {s: site_dtype(s, p) for s in SITES})
    grad_sites = ({br.site for br in branches} | {b.site for b in ia3 if b.ia3 == "out"} | {b.site for b in loha}
                  | {b.site for b in vera} | {b.site for b in c3a})
    input_sites = {b.site for b in ia3 if b.ia3 == "ff"}
    if ln is not None:  # the trained norms' saved inputs; in layer 0 nothing below the lowest of them is kept
        total = total + ln_norm_saved(d, p, ln.layer)
        if first:
            unsaved = ln_first_layer_unsaved(d, p, ln.start, attention_activation(d, p, attn_impl),
                                             qk_norm_activation(d, p, "rms_norm" in liger))
            total = total + (-1) * unsaved
        # the first projections whose input needs a gradient: q/k/v (an input norm), o (q/k norms), the MLP's
        {"input": input_sites, "attn": grad_sites, "mlp": input_sites}[ln.start].add(
            "mlp_in" if ln.start == "mlp" else "attn_in")
    total = total + frozen_weight_casts(spec, q, first, grad_sites, frozenset(input_sites),
                                        frozenset(b.leaf for b in loha if b.update == "miss_bat"))
    if full:
        sites = [(b.site, b.in_features, b.per_layer) for b in layer_branches(spec, [], 0, q)]
        total = total + full_layer_activation(d, p, sites, d.gemma_norm, attn_impl)
    # LoRA-FA in layer 0 without checkpointing: nothing before the attention's B needs a gradient, so neither A's nor
    # B's weight cast is saved (B's, cached by autocast, is gone with the cache at the forward's end)
    cast = [b for b in branches if not (first and b.frozen_a and b.site == "attn_in")]
    return total + Lin(const=lora_weight_cast_bytes(cast, p, r))


def head_activation(spec: ModelSpec, p: Precision, ckpt: bool, linear: bool = True, other_dtype: bool = False,
                    liger_norm: bool = False) -> Lin:
    """Outside the decoder layers: the batch (``input_ids`` and ``labels``, int64: 16 T), the
    rotary ``cos``/``sin`` (``rotary_activation``), the final norm (as
    ``norm_activation``; with checkpointing also its input, the last layer's output ``4 h T``,
    which without checkpointing the last layer's ``residual_activation`` counted), and the output
    head's autocast copy of its weight when that weight is fp32, or in the other 16-bit dtype (``other_dtype``)
    (``c V h``, saved for the input gradient) — unless the head never runs as a linear layer (``linear=False``: the
    fused losses read its weight as it is). ``liger_norm``: Liger's RMSNorm keeps its input as it is, ``R h T``."""
    d = dims(spec)
    head_w = p.c * d.V * d.h if (linear and p.amp and (p.R != p.c or other_dtype)) else 0
    norm_in = 0 if p.R == 4 and not ckpt else (p.R if liger_norm else 4) * d.h
    return Lin(const=head_w, tok=16 + 4 + norm_in) + rotary_activation(d, p)


def activation_terms(spec: ModelSpec, counts: list[ModuleCount], r: int, dropout: float,
                     q: QuantSettings, grad_ckpt: str, attn_impl: str, kernels: str = "cuda",
                     padded: bool = False, dora: bool = False, head_linear: bool = True,
                     liger: tuple[str, ...] = ()) -> dict[str, Lin]:
    """Activations alive at the end of the forward pass, and at the other moments that hold some
    (``head_linear``: the output head runs as a linear layer, as for every loss but Cut Cross Entropy).

    * no checkpointing: layer 0 (``first``) + ``L - 1`` full layers + the head;
    * HF checkpointing (``torch.utils.checkpoint``, non-reentrant ``hf`` or ``reentrant``): each layer keeps only
      its input ``R h T`` (the embeddings output included) + the head; backward recomputes one layer
      (``incoming_gradients``: what differs between the two);
    * Unsloth (``use_gradient_checkpointing="unsloth"``): the layer inputs are offloaded to
      CPU RAM, so only the recomputed layer and the head are on the device.

    ``layers`` is layer 0's backward (the other layers' LoRA gradients exist, counted by the caller);
    ``ckpt_inputs`` what the *last* layer's backward holds on top of it instead: the other ``L - 1``
    layers' checkpointed inputs (HF checkpointing; no gradient exists yet then).  Which is larger
    depends on ``T``: a MoE layer's backward transient at long sequences makes the last layer's the peak.
    """
    d = dims(spec)
    p = precision(q)
    if kernels == "cpu" and grad_ckpt == "unsloth":
        grad_ckpt = "hf"  # offloading to CPU RAM moves nothing when the device is the CPU
    ckpt_inputs = ZERO
    br = lora_branches(spec, counts, q)
    sites = layer_branches(spec, counts, 0, q)  # the other PEFT methods' modules: (IA)³, LoHa / LoKr, VeRA
    i3, lh, vr = (tuple(b for b in sites if b.ia3), tuple(b for b in sites if b.update), tuple(b for b in sites if b.vera))
    c3 = tuple(b for b in sites if b.c3a)
    ln = ln_sites(counts, d.L)  # LN tuning's trained norms (planner.memory.ln_tuning)
    i3_bwd = ia3_backward_transient(i3) + loha_backward_transient(lh, p, p.M)  # the layer backward's method transients
    method_temps = update_recompute_transient(lh, p) + vera_forward_transient(vr, p)  # and the layer forward's
    bat_fwd, bat_bwd = bat_transients(lh, BYTES[q.unquantized_dtype])  # MiSS-bat's rebuilt weights
    method_temps = method_temps + c3a_forward_transient(c3)
    # MiSS-bat: the forward's rebuilt weight in the forward's last layer; its backward's, or with checkpointing the
    # larger of the recomputation's and the backward's, in each layer's backward
    i3_bwd = i3_bwd + (Lin(const=max(bat_fwd.const, bat_bwd.const)) if grad_ckpt != "off" else bat_bwd)
    mlp = moe_activation(spec, counts, q)
    trained = is_full(counts)  # full fine-tuning: the weights train (planner.memory.full)
    # the embeddings' output needs a gradient: full fine-tuning, or prompt tuning's prompt is part of it
    input_grad = bool(prompt := next((c.save_keys[0][1][0] for c in counts if c.kind == PROMPT), 0)) or trained
    full = layer_activation(spec, br, q, r, dropout, attn_impl, kernels=kernels, mlp=mlp, dora=dora, liger=liger,
                            full=trained, ia3=i3, ln=ln, loha=lh, vera=vr, c3a=c3)
    head = head_activation(spec, p, grad_ckpt != "off", head_linear, q.unquantized_dtype != q.compute_dtype,
                           "rms_norm" in liger)
    loss_extra = loss_time_activation(spec, [c for c in counts if c.kind != FULL], q, grad_ckpt)
    if ln is not None and ln.final:  # a trained final norm saves its normalized input
        head = head + ln_final_norm_saved(d, p)
    if lh and grad_ckpt == "off":  # autocast's cached copies of LoHa's factors (with checkpointing: loss_extra's)
        loss_extra = loss_extra + d.L * loha_forward_casts(lh, p)
    if trained:
        head_saved, loss_time = full_head_activation(d, p, d.gemma_norm, head_linear, grad_ckpt != "off")
        head, loss_extra = head + head_saved, loss_extra + loss_time
        if grad_ckpt != "off":
            loss_extra = loss_extra + Lin(const=cached_weight_casts(spec, p, q.unquantized_dtype))
    layer_inputs = Lin(tok=d.L * p.R * d.h)  # what HF checkpointing keeps of every layer
    rotary = rotary_activation(d, p)  # cos/sin, alive through backward
    down = [b for b in br if b.site == "mlp_out"]
    grads_in = incoming_gradients(d, p, bool(down), BYTES[down[0].adapter] if down else 4)
    # C3A: its backward's FFTs replace the layer's second incoming gradient and, with checkpointing, the recomputation's
    # end (planner.memory.input_dtype)
    c3_bwd = c3a_backward_transient(c3, d.h, p.R)  # the second is R h: C3A has no LoRA down projection
    mlp_fwd_temps = ZERO
    if grad_ckpt == "off":
        first = layer_activation(spec, br, q, r, dropout, attn_impl, first=not input_grad, kernels=kernels, mlp=mlp,
                                 dora=dora, liger=liger, full=trained, ia3=i3, ln=ln, loha=lh, vera=vr, c3a=c3)
        saved = first + (d.L - 1) * full + head
        layers = first + grads_in + rotary + i3_bwd + Lin(tok=c3_bwd)
        layers_temps = grads_in + i3_bwd + Lin(tok=c3_bwd)
        if c3_bwd or bat_bwd != ZERO:  # C3A's, MiSS-bat's backward transients in the last layer, every layer's activations alive
            ckpt_inputs = (d.L - 1) * full
        if mlp is None:  # the last layer's down projection in the forward: (about) every saved activation + its inputs
            mlp_fwd_temps = recompute_transient(spec, br, p, dropout, kernels) + method_temps + bat_fwd
    else:
        saved = (layer_inputs if grad_ckpt in HF_CKPT else ZERO) + head
        if attn_impl == "eager":
            saved = saved + eager_mask_activation(spec, p)
        if q.quant == "int8" and grad_ckpt != "reentrant":  # reentrant: the forward runs under no_grad
            saved = saved + d.L * int8_retained_activation(spec, q, p, True, False, set())
        rt = recompute_transient(spec, br, p, dropout, kernels) + method_temps if mlp is None else ZERO
        if c3_bwd > rt.tok:
            rt = Lin(tok=c3_bwd)
        layers_temps = grads_in + rt + i3_bwd  # i3_bwd: the down projection's (IA)³ backward (0 without it)
        if grad_ckpt == "reentrant":
            layers_temps = layers_temps + reentrant_difference(d, p, rt, mlp is not None)
        layers = Lin(tok=p.R * d.h) + full + rotary + layers_temps
        # the last layer's backward (the first one backward runs) has every other layer's checkpoint
        if grad_ckpt in HF_CKPT:
            ckpt_inputs = Lin(tok=(d.L - 1) * p.R * d.h)
    p_total, p_layer, p_temp = parameter_lora_activation(counts, q)
    experts = expert_lora_bytes(counts, q)
    moments = moe_moments(spec, counts, q, grad_ckpt != "off", experts)
    if p_total:
        saved = saved + Lin(const=p_total if grad_ckpt == "off" else 0)
        if moments is None:
            layers = layers + Lin(const=p_layer + p_temp)
            layers_temps = layers_temps + Lin(const=p_temp)
        else:  # the experts' folds are in the MoE moments; the rest (the router's W') is saved
            layers = layers + Lin(const=p_layer - sum(saved_ for saved_, _ in experts.values()))
    attn_fwd = attn_fwd_temps = ZERO
    if attn_impl == "eager":
        # inside layer 0's backward the saved s^2 tensors give way to the backward's own
        layers = layers + eager_backward_quad(d, p) + Lin(quad=-full.quad)
        layers_temps = layers_temps + eager_backward_quad(d, p)
        if grad_ckpt != "off":
            attn_fwd_temps = eager_forward_transient(d, p)
            attn_fwd = layer_inputs + eager_mask_activation(spec, p) + attn_fwd_temps
    if padded and attn_impl == "sdpa":
        kept, per_layer = padding_mask_activation(spec, p)
        if grad_ckpt == "off":
            saved = saved + d.L * per_layer
        else:  # the bool mask is every checkpoint's input, so it lives until layer 0's backward ends
            saved = saved + kept
            layers = layers + kept + per_layer
    if prompt:  # prompt tuning's own tensors (planner.memory.prompt)
        leaf = prompt_checkpoint_leaf(d, p, prompt) if grad_ckpt != "off" else ZERO
        leaf = leaf + prompt_input_saved(d, p, grad_ckpt != "off")  # both alive until layer 0's backward
        fwd = prompt_forward_activation(d, p, prompt, grad_ckpt != "off")
        # p-tuning's MLP (its backward is the step's last): alive through every moment
        mlp_layers = [(c.save_keys[0][1][1], c.save_keys[0][1][0]) for c in counts if c.kind == PROMPT_MLP]
        leaf = leaf + prompt_encoder_saved(p, prompt, mlp_layers) if mlp_layers else leaf
        saved, layers = saved + prompt_batch_correction(prompt) + leaf, layers + leaf
        loss_extra = loss_extra + fwd
        if attn_fwd != ZERO:
            attn_fwd = attn_fwd + fwd + leaf
        if mlp_fwd_temps != ZERO:
            mlp_fwd_temps = mlp_fwd_temps + fwd
    # ``*_temps``: the part of ``layers`` / ``attn_fwd`` that is transient (gradients in flight,
    # a recomputation's or a softmax's scratch): what a tracker calls temporaries at that moment
    return {"saved": saved, "layers": layers, "attn_fwd": attn_fwd, "ckpt_inputs": ckpt_inputs,
            "mlp_fwd": saved + mlp_fwd_temps if mlp_fwd_temps != ZERO else ZERO, "mlp_fwd_temps": mlp_fwd_temps,
            "layer_moments": moments or (),
            "layers_temps": layers_temps, "attn_fwd_temps": attn_fwd_temps,
            "loss_extra": loss_extra,
            "grads": full_layer_grads(counts, d.L, d.tied, sum(b.weight_bytes * b.per_layer for b in layer_branches(
                spec, [], 0, q) if b.site == "mlp_out") if mlp is None else 0) if trained else None,
            "end": embeddings_backward_activation(spec, p, d, kernels, grad_ckpt, attn_impl, padded) if trained
            else (ZERO, ZERO)}


def recompute_transient(spec: ModelSpec, branches: list[Branch], p: Precision, dropout: float,
                        kernels: str = "cuda") -> Lin:
    """Forward temporaries at the end of a layer's recomputation, when its saved activations are
    all back: the MLP product feeding the down projection (``M i T``), that projection's output
    and, if it is LoRA-adapted, the branch's transient copies (PEFT's fp32 cast of the input and
    the dropout output, which autocast's saved copy replaces)."""
    d = dims(spec)
    lin = Lin(tok=p.M * d.i + p.M * d.h)
    for br in branches:
        if br.site != "mlp_out":
            continue
        x = p.M
        t1 = lora_input_dtype(br, p, kernels)
        extra = 0
        if t1 != x:
            extra += t1 * br.in_features
        if dropout > 0 and not br.miss and p.amp and t1 != p.c:
            extra += t1 * br.in_features
        lin = lin + Lin(tok=extra * br.per_layer)
    return lin
