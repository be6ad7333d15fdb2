"""LN tuning (``--peft-type ln_tuning``, ``planner.model.ln_tuning``): what trained copies of norms make a step keep.

Derived from transformers' RMSNorm modules (5.23) and PEFT 0.21's ``LNTuningLayer`` (the forward runs the copy), and
checked against the traced step (tests/planner/test_ln_tuning.py). The frozen model's terms are the usual ones with
every layer's input needing a gradient, except below the lowest trained norm of layer 0 (``LnSites.start``).
Notation as in ``planner.memory.terms``. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from qplan.planner.memory.lin import Lin, Precision
from qplan.planner.memory.terms import Dims
from qplan.planner.model.ln_tuning import LN_TUNING
from qplan.planner.model.lora import ModuleCount

#: where layer 0's gradient starts, lowest first: its input norm, its q/k norms, its post-attention norm
STARTS = ("input", "attn", "mlp")


@dataclass(frozen=True)
class LnSites:
    """The trained norms of a plan: per decoder layer (leaf names), the final norm, and the lowest one of layer 0."""

    layer: tuple[str, ...]
    final: bool
    start: str


def ln_sites(counts: list[ModuleCount], layers: int) -> LnSites | None:
    """The trained norms of ``counts`` (None without LN tuning). Each decoder-layer norm is in every layer (``*``)."""
    trained = [c for c in counts if c.kind == LN_TUNING]
    if not trained:
        return None
    leafs = tuple(c.module.rsplit(".", 1)[-1] for c in trained if "*" in c.module)
    final = any("*" not in c.module for c in trained)
    start = ("input" if any(leaf in ("input_layernorm", "ln_1") for leaf in leafs)
             else "attn" if any(leaf in ("q_norm", "k_norm") for leaf in leafs) else "mlp")
    return LnSites(leafs, final, start)


def ln_norm_saved(d: Dims, p: Precision, leafs: tuple[str, ...]) -> Lin:
    """Per layer, what the trained norms save for their weight gradient: transformers' RMSNorm returns
    ``weight * hidden.to(input_dtype)``, whose product saves the normalized ``hidden`` — ``R h`` per token for a
    residual-stream norm (Gemma's ``output * (1 + weight.float())`` saves its fp32 ``output``: ``4 h``); Qwen3's
    per-head ``q_norm`` / ``k_norm`` save theirs in the projections' output dtype, ``M q`` / ``M kv``."""
    tok = 0
    for leaf in leafs:
        if leaf == "q_norm":
            tok += p.M * d.q
        elif leaf == "k_norm":
            tok += p.M * d.kv
        else:
            tok += (4 if d.gemma_norm else p.R) * d.h
    return Lin(tok=tok)


def ln_final_norm_saved(d: Dims, p: Precision) -> Lin:
    """The trained final norm saves its normalized input for its weight gradient, as a layer's (``ln_norm_saved``)."""
    return Lin(tok=(4 if d.gemma_norm else p.R) * d.h)


def ln_first_layer_unsaved(d: Dims, p: Precision, start: str, attention: Lin, qk_norms: Lin) -> Lin:
    """What a layer-0 term counted as ``first`` (its input needs no gradient, nothing below its input norm is saved)
    still counts below where LN tuning's gradient starts, to take away:

    * ``attn`` (the q/k norms are the lowest trained): the q/k projections' outputs need no gradient, so the q/k
      norms' own saved tensors (their fp32 input, ``rsqrt``: ``qk_norms``) are not kept;
    * ``mlp`` (the post-attention norm is the lowest): nothing of the attention block needs a gradient — neither the
      attention core's saved tensors (``attention``), nor the q/k norms', nor the post-attention norm's own: its
      ``rsqrt`` (``4``) and its fp32 input — a copy in 16 bits, in fp32 the residual sum itself (``4 h`` either way)."""
    if start == "input":
        return Lin()
    if start == "attn":
        return qk_norms
    return attention + qk_norms + Lin(tok=4 * d.h + 4)
