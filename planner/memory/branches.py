"""The linear modules of a decoder layer as the activation terms see them (``Branch``: where each reads from, its
adapter), and what a LoRA branch saves (``lora_branch_activation``) and autocast casts of its weights
(``lora_weight_cast_bytes``). Split from ``planner.memory.activations``; notation as in ``planner.memory.terms``.
"""

from __future__ import annotations

from dataclasses import dataclass

from qplan.planner.memory.lin import Lin, Precision
from qplan.planner.memory.terms import Dims, idle_in_step
from qplan.planner.model.c3a import C3A
from qplan.planner.model.ia3 import IA3, IA3_FF
from qplan.planner.model.loha import LOHA
from qplan.planner.model.lokr import LOKR
from qplan.planner.model.lora import FROZEN_A, ModuleCount
from qplan.planner.model.miss import MISS, MISS_BAT, MISS_MINI
from qplan.planner.model.spec import LinearGroup, ModelSpec
from qplan.planner.model.vera import VERA
from qplan.planner.model.weights import QuantSettings, is_quantized, linear_weight_bytes
from qplan.planner.vocab import BYTES

#: leaf names of the projections that take the attention output / the MLP hidden state; the
#: other linear modules of a layer read the (normed) residual stream.
ATTN_OUT = {"o_proj", "out_proj", "dense", "c_proj", "wo"}
MLP_OUT = {"down_proj", "w2", "dense_4h_to_h", "fc2", "c_proj", "wo"}


def site_of(g: LinearGroup) -> str | None:
    """Where a linear group of a decoder layer reads from: ``attn_in`` / ``mlp_in`` (the normed
    residual stream), ``attn_out`` (the attention output), ``mlp_out`` (the MLP hidden state);
    None outside the layers (output head, ...)."""
    leaf = g.pattern.rsplit(".", 1)[-1]
    role = g.role
    if role == "attn":
        return "attn_out" if leaf in ATTN_OUT else "attn_in"
    if role == "mlp":
        return "mlp_out" if leaf in MLP_OUT else "mlp_in"
    return None


SITES = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def site_dtype(site: str, p: Precision) -> int:
    """dtype bytes of the tensor a module at ``site`` receives."""
    return {"attn_in": p.R, "attn_out": p.c, "mlp_in": p.R, "mlp_out": p.M}[site]


def site_input_bytes(site: str, d: Dims, p: Precision) -> int:
    """Bytes per token of the tensor a module at ``site`` receives."""
    return site_dtype(site, p) * {"attn_in": d.h, "attn_out": d.q, "mlp_in": d.h, "mlp_out": d.i}[site]


def lora_input_dtype(br: "Branch", p: Precision, kernels: str = "cuda") -> int:
    """dtype bytes of a LoRA branch's input after PEFT's cast to the adapter dtype (fp32 unless
    ``--adapter-dtype``), which bitsandbytes' LoRA layers skip under CUDA autocast (``requires_conversion = not
    torch.is_autocast_enabled()``: CUDA's state, so a CPU step casts)."""
    return site_dtype(br.site, p) if (br.kbit and p.amp and kernels == "cuda") else BYTES[br.adapter]


@dataclass(frozen=True)
class Branch:
    """One linear group of a decoder layer (the activation terms see the LoRA-adapted ones; the
    FLOP and bytes model, ``planner.compute.flops``, all of them)."""

    site: str  # attn_in | attn_out | mlp_in | mlp_out
    in_features: int
    out_features: int
    per_layer: int
    kbit: bool
    leaf: str = ""
    r: int = 0  # LoRA rank on it, 0 if none
    weight_bytes: int = 0  # stored bytes of one instance's weight and its quantization constants
    adapter: str = "float32"  # its LoRA tensors' dtype
    frozen_a: bool = False  # LoRA-FA: its lora_A is frozen (no weight gradient: its input is not saved)
    ia3: str = ""  # (IA)³ on it: "ff" (scales its input), "out" (its output), "" none
    #: "loha" / "lokr" / "miss_bat": a full-size weight built at every forward (planner.memory.loha)
    update: str = ""
    factors: tuple = ()  # its trained tensors: (name, shape) pairs
    vera: int = 0  # VeRA's rank on it, 0 if none
    #: MiSS (``planner.model.miss``) on it: "miss" / "miss_mini" (a LoRA-FA-like branch: ``sum(x in r-wide slices)``
    #: for the frozen A, the block for B, no dropout); "" none
    miss: str = ""
    c3a: int = 0  # C3A's block size on it (planner.model.c3a), 0 if none


def layer_branches(spec: ModelSpec, counts: list[ModuleCount], r: int, q: QuantSettings) -> list[Branch]:
    """Every linear group inside the decoder layers, in inventory order, with its LoRA rank (a
    multimodal wrapper's vision tower does not run in a text-only step: its layers are not here)."""
    miss = {c.module: c.kind for c in counts if c.kind in (MISS, MISS_MINI)}
    ranks = {c.module: r for c in counts if c.kind == "lora" or c.module in miss}
    adapters = {c.module: c.dtype for c in counts if c.kind == "lora" or c.module in miss}
    frozen = {c.module for c in counts if c.kind == FROZEN_A} | set(miss)
    ia3 = {c.module: "ff" if c.kind == IA3_FF else "out" for c in counts if c.kind in (IA3, IA3_FF)}
    update = {c.module: c.kind for c in counts if c.kind in (LOHA, LOKR, MISS_BAT)}
    factors = {c.module: tuple((k, tuple(s)) for k, s in c.save_keys) for c in counts if c.kind in update.values()}
    vera = {c.module: c.save_keys[1][1][0] for c in counts if c.kind == VERA}
    c3a = {c.module: c.save_keys[0][1][2] for c in counts if c.kind == C3A}
    L = max(1, int(spec.inventory.num_hidden_layers or 1))
    out = []
    for g in spec.inventory.linear:
        site = site_of(g)
        if site is None or idle_in_step(spec, g.pattern):  # output head / other, or a vision tower
            continue
        out.append(Branch(site, g.in_features, g.out_features, max(1, g.instances // L), is_quantized(g, q),
                          g.pattern.rsplit(".", 1)[-1], ranks.get(g.pattern, 0), sum(linear_weight_bytes(g, q)),
                          adapters.get(g.pattern, "float32"), g.pattern in frozen, ia3.get(g.pattern, ""),
                          update.get(g.pattern, ""), factors.get(g.pattern, ()),
                          vera.get(g.pattern, 0), miss.get(g.pattern, ""), c3a.get(g.pattern, 0)))
    return out


def lora_branches(spec: ModelSpec, counts: list[ModuleCount], q: QuantSettings) -> list[Branch]:
    """The LoRA-adapted linear groups of the decoder layers (what the activation terms count)."""
    return [b for b in layer_branches(spec, counts, 1, q) if b.r]  # r=1 marks them; the terms take r apart


def lora_branch_activation(br: Branch, p: Precision, r: int, dropout: float, input_grad: bool,
                           kernels: str = "cuda") -> tuple[Lin, bool]:
    """What one LoRA branch saves, per token; and whether it saves its input tensor itself.

    PEFT 0.21 ``lora.Linear.forward`` casts the input to the adapter dtype first
    (``_cast_input_dtype(x, lora_A.weight.dtype)``, fp32); bitsandbytes' ``Linear4bit``/``8bitLt``
    LoRA layers do so only without autocast.  Then ``lora_B(lora_A(dropout(x))) * scaling``:

    * dropout (``p > 0``) on CUDA is the fused ``native_dropout``: it saves a bool mask (1 byte per
      input element), only if its input requires grad; on the CPU (``kernels="cpu"``,
      Dropout.cpp ``_dropout_impl``) the mask is noise in the input's dtype, saved by ``x * noise``;
    * ``lora_A`` saves its input for its weight gradient: under autocast a ``c``-byte copy when the
      input is not already in the compute dtype (a new tensor per module: autocast caches only
      casts of leaf parameters), else the (dropped-out) input itself — a new tensor with dropout,
      the module's input without it (returned as ``shares_input``, counted once per input);
    * ``lora_B`` saves ``lora_A``'s output, ``c * r`` (the adapter dtype without autocast).

    LoRA-FA (``br.frozen_a``): ``lora_A`` has no weight gradient, so nothing saves its input (its input gradient
    needs only the weight, or autocast's copy of it, ``lora_weight_cast_bytes``).

    MiSS (``br.miss``, PEFT 0.21 ``MissLinear.forward``): ``sum(x.reshape(…, in / r, r), -2) @ block`` after the same
    fp32 cast, no dropout: the sum (``r`` wide) is what the matmul saves, as LoRA-FA's ``lora_A`` output (``sum`` saves
    nothing). MiSS-mini repeats its ``(r, mini_r)`` block to ``(r, out)`` at every forward: without autocast the
    matmul saves that fp32 copy when its input needs a gradient (``4 r out``); under autocast it saves its cast, as
    the default block's cached cast (``lora_weight_cast_bytes``).
    """
    if br.miss:
        dropout = 0.0
    mini = 4 * r * br.out_features * br.per_layer if (br.miss == MISS_MINI and not p.amp and input_grad) else 0
    x = site_dtype(br.site, p)
    t1 = lora_input_dtype(br, p, kernels)
    per = 0
    shares = False
    if dropout > 0 and input_grad:
        per += br.in_features * (1 if kernels == "cuda" else t1)  # the mask
    if br.frozen_a:  # LoRA-FA: nothing saves A's input
        pass
    elif p.amp and t1 != p.c:
        per += p.c * br.in_features
    elif dropout > 0 or t1 != x:
        per += t1 * br.in_features
    else:
        shares = True
    per += (p.c if p.amp else BYTES[br.adapter]) * r
    return Lin(tok=per * br.per_layer, const=mini), shares


def lora_weight_cast_bytes(branches: list[Branch], p: Precision, r: int) -> int:
    """Per layer: autocast's casts of the fp32 adapter weights, ``c * r * (in + out)`` per module.

    ``cached_cast`` (aten/src/ATen/autocast_mode.cpp) caches the lower-precision copy of an fp32
    leaf that requires grad for the whole forward, and ``F.linear`` saves it for backward, so each
    copy lives until its module's backward.  None without autocast, and none for adapters already in the
    compute dtype (``--adapter-dtype``: autocast has nothing to cast). bf16 adapters under fp16 autocast (TRL's QLoRA on a
    card without bf16) are cast by every matmul, not cached (only fp32 leaves are), and ``F.linear`` saves the copy:
    the same bytes per module. MiSS has no A: ``c r out`` (its block, or MiSS-mini's repeated block, cast anew).
    """
    if not p.amp:
        return 0
    return sum(p.c * r * ((0 if b.miss else b.in_features) + b.out_features) * b.per_layer
               for b in branches if b.adapter != p.compute)
