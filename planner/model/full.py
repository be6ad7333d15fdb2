"""Full fine-tuning: every parameter of the model trains (``--full``), counted from the spec's module inventory.

A model handed to ``Trainer`` without PEFT trains every parameter (``requires_grad`` is on for every parameter a
model is built or loaded with): each linear weight and bias, each embedding, each norm and any other parameter
(fused MoE experts, routers), a tied weight once (``model.parameters()`` yields a shared parameter once). Each is
one ``ModuleCount`` of kind ``full`` in the dtype the model holds it in (the load dtype; fp32 where the model keeps
a module in fp32), so the gradient, optimizer-state and optimizer-step terms (``planner.memory.terms``) see every
tensor with its own shape — what bitsandbytes' 8-bit state and the foreach step decide per tensor.

Nothing is added to the model: the ``weights`` term holds the trained weights, ``adapters`` is 0. The oracle is the
model itself: ``sum(p.numel() for p in model.parameters() if p.requires_grad)`` on a meta-device model
(tests/planner/test_full.py) and the traced step's ``trainable_params``.
"""

from __future__ import annotations

import math

from qplan.planner.errors import QPlanError
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import QuantSettings, fp16_kept_fp32
from qplan.planner.vocab import KBIT

#: ``ModuleCount.kind`` of a trained base parameter
FULL = "full"


def check_full(q: QuantSettings, backend: str, loss: str = "full", several: bool = False) -> None:
    """One line where full fine-tuning cannot train the plan's model: bitsandbytes' 4/8-bit weights have no gradient
    (``Params4bit`` / ``Int8Params`` are created with ``requires_grad=False``; transformers refuses to train a purely
    quantized model), fp16 weights under fp16 autocast do not train (the ``GradScaler`` of ``Trainer(fp16=True)``
    raises "Attempting to unscale FP16 gradients"); Cut Cross Entropy's and Liger's fused losses compute the trained
    head's gradient in their own chunks, not planned yet (TRL's fused head is, on one GPU: ``loss.trl_terms``); and
    Unsloth's own full fine-tuning path is not planned."""
    if q.quant in KBIT:
        raise QPlanError(f"--full trains the weights themselves: a {q.quant} (bitsandbytes) base cannot be trained; "
                         "use --quant bf16, fp16 or fp32 (or LoRA/QLoRA without --full)")
    if q.quant == "fp16" and q.compute_dtype == "float16":
        raise QPlanError("--full with fp16 weights under fp16 mixed precision does not train: the Trainer's GradScaler "
                         "refuses fp16 gradients ('Attempting to unscale FP16 gradients'); load the weights in fp32 "
                         "(--quant fp32 --compute-dtype fp16), or use bf16 where the GPU has it")
    if loss == "trl" and several:  # traced on one GPU only
        raise QPlanError("--full --loss trl over several GPUs is not planned yet (TRL's fused head gathers and trains the "
                         "whole head; one GPU is traced): use --loss full, or one GPU")
    if loss not in ("full", "trl"):  # TRL's fused head: its chunked head gradient is loss.trl_terms' head_grad
        raise QPlanError(f"--full with --loss {loss}: the fused loss computes the trained head's gradient in its own "
                         "chunks, which is not planned yet: use --loss full (or trl, TRL's fused head)")
    if backend != "peft":
        raise QPlanError(f"--full is planned for the peft backend (HF Trainer): the {backend} backend's full "
                         "fine-tuning is not planned")


def _dtype(spec: ModelSpec, q: QuantSettings, key: str, keep_fp32: bool) -> str:
    return "float32" if keep_fp32 or fp16_kept_fp32(spec, q, key) else q.unquantized_dtype


def count_full(spec: ModelSpec, q: QuantSettings) -> list[ModuleCount]:
    """Every parameter of ``spec`` as a trainable tensor (see the module docstring), in inventory order."""
    inv = spec.inventory
    out: list[ModuleCount] = []
    for g in inv.linear:
        if g.weight_tied:  # the output head tied to the embeddings: one parameter, counted with the embedding
            continue
        dt = _dtype(spec, q, f"{g.pattern}.weight", g.keep_fp32)
        keys: list[tuple[str, list[int]]] = [("weight", [g.out_features, g.in_features])]
        n = g.in_features * g.out_features
        if g.bias:
            keys.append(("bias", [g.out_features]))
            n += g.out_features
        out.append(ModuleCount(g.pattern, FULL, f"{g.in_features}→{g.out_features}", g.instances, n, dt, keys))
    for e in inv.embeddings:
        if e.weight_tied:
            continue
        dt = _dtype(spec, q, f"{e.pattern}.weight", e.keep_fp32)
        out.append(ModuleCount(e.pattern, FULL, f"emb {e.num_embeddings}×{e.embedding_dim}", e.instances,
                               e.num_embeddings * e.embedding_dim, dt, [("weight", [e.num_embeddings, e.embedding_dim])]))
    for p in inv.params:
        dt = _dtype(spec, q, f"{p.pattern}.{p.param}", p.keep_fp32)
        out.append(ModuleCount(f"{p.pattern}.{p.param}", FULL, "×".join(map(str, p.shape)), p.instances,
                               math.prod(p.shape), dt, [(p.param, list(p.shape))]))
    return out


def is_full(counts: list[ModuleCount] | tuple[ModuleCount, ...]) -> bool:
    """Whether ``counts`` are a full fine-tuning's (the base parameters train)."""
    return any(c.kind == FULL for c in counts)
