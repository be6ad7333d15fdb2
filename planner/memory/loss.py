"""The loss's terms: what computing the loss adds at the end of the forward and at the start of the backward.

* ``full``: transformers' ``ForCausalLMLoss`` over the head's ``T x V`` logits (``logits_terms``);
* ``unsloth``: Unsloth's chunked cross-entropy (no fp32 copies of the logits);
* ``cce``: Cut Cross Entropy (``cce_terms``) — the loss from the final hidden states and the head's weight, never
  the logits: Apple's ml-cross-entropy as axolotl's ``CutCrossEntropyPlugin`` runs it (the fork
  axolotl-ai-cloud/ml-cross-entropy at 5f0c7a7, which axolotl 067b021c8's plugin pins);
* ``trl``: TRL's fused LM head (``trl_terms``), which TRL 1.16's ``SFTTrainer`` always trains with: the valid rows'
  hidden states projected through the head in ``[4096, 32768]`` tiles;
* ``liger``: Liger-Kernel's fused linear cross-entropy (``liger_terms``; liger-kernel 0.8.0, which axolotl 067b021c8's
  ``LigerPlugin`` pins): the loss and the hidden states' gradient both computed in the forward, a chunk of rows at
  a time.

Every term is a ``Lin`` (``planner.memory.lin``); ``T`` tokens, ``V`` the head's rows, ``h`` the hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

from qplan.planner.memory.lin import Lin, precision
from qplan.planner.memory.terms import dims, trainable_tensors
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.prompt import PROMPT, PROMPT_MLP
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import QuantSettings

#: what each loss kind is called where a plan says it (``vocab.LOSSES`` plus the Unsloth profile's own)
LOSS_KINDS = ("full", "cce", "trl", "liger", "unsloth")

#: the model types liger-kernel 0.8.0 patches (``liger_kernel.transformers.monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN``;
#: tests/planner/test_liger.py checks this list against Liger's own)
LIGER_MODEL_TYPES = (
    "exaone4", "falcon_h1", "gemma", "gemma2", "gemma3", "gemma3_text", "gemma4_text", "glm4", "glm4v", "glm4v_moe",
    "gpt_oss", "granite", "hunyuan_v1_dense", "hunyuan_v1_moe", "internvl", "llama", "llama4", "llama4_text", "llava",
    "ministral", "mistral", "mixtral", "mllama", "mllama_text_model", "nemotron", "olmo2", "olmo3", "paligemma", "phi3",
    "pixtral", "qwen2", "qwen2_5_vl", "qwen2_5_vl_text", "qwen2_vl", "qwen2_vl_text", "qwen3", "qwen3_5", "qwen3_5_moe",
    "qwen3_5_moe_text", "qwen3_5_text", "qwen3_moe", "qwen3_next", "qwen3_vl", "qwen3_vl_moe", "qwen3_vl_moe_text",
    "qwen3_vl_text", "smollm3", "smolvlm")

#: TRL 1.16 ``trl/kernels/chunked_logprob.py``: tokens per projection tile; ``trl/trainer/utils.py``
#: ``_CHUNKED_LOGPROB_CHUNK_SIZE``: vocabulary columns per tile (the tile buffer has this many whatever the vocabulary)
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768


@dataclass(frozen=True)
class Tiled:
    """``lin`` plus buffers that grow with the tokens only up to a tile: ``sum(per_row * clamp(T - lo, 0, hi - lo))``
    for each ``(per_row, lo, hi)`` of ``pieces`` (a ``[min(T, 4096), 32768]`` buffer is ``(32768 c, 0, 4096)``), and
    ``bytes`` for each ``(bytes, above)`` of ``steps`` once ``T > above`` (a buffer a second tile brings).
    Evaluated like a ``Lin`` (``at``), so a loss moment may be either."""

    lin: Lin
    pieces: tuple[tuple[int, int, int], ...] = ()
    steps: tuple[tuple[int, int], ...] = ()

    def at(self, T: int, s: int) -> int:
        return (self.lin.at(T, s) + sum(per * max(0, min(T, hi) - lo) for per, lo, hi in self.pieces)
                + sum(b for b, above in self.steps if T > above))


def loss_terms(spec: ModelSpec, q: QuantSettings, loss: str = "full", kernels: str = "cuda", top1: bool = True,
               head_grad: int = 0) -> dict[str, tuple[Lin | Tiled, ...]]:
    """The loss's bytes at the end of the forward (``forward``) and the start of the backward (``backward``), on top
    of the saved activations, each the largest of a few moments (``lin.most``): ``logits_terms`` for ``full`` and
    ``unsloth``, ``cce_terms`` for ``cce``; ``kernels``: where the step runs (TRL's head folds its tiles otherwise on
    the CPU; ``top1``: whether it computes ``is_top1``, as SFTTrainer's and DPOTrainer's do and KTOTrainer's does not;
    ``head_grad``: the bytes of an element of a trained head's weight, 0 when the head is frozen: ``trl_terms``)."""
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {LOSS_KINDS}, got {loss!r}")
    if loss == "cce":
        return cce_terms(spec, q)
    if loss == "trl":
        return trl_terms(spec, q, kernels, top1, head_grad)
    if loss == "liger":
        return liger_terms(spec, q)
    return {k: (v,) for k, v in logits_terms(spec, q, chunked=loss == "unsloth").items()}


def logits_terms(spec: ModelSpec, q: QuantSettings, chunked: bool = False) -> dict[str, Lin]:
    """Logits and loss (transformers ``ForCausalLMLoss``: ``logits.float()``, ``cross_entropy``).

    * end of the forward: the head's ``c T V`` logits, the fp32 copy ``4 T V`` (freed after
      ``log_softmax``) or accelerate's ``convert_to_fp32`` copy of the outputs, and
      ``log_softmax``'s fp32 output ``4 T V`` (saved): ``(c + 8) T V`` (``8 T V`` in fp32);
    * start of backward (Trainer has dropped the outputs): ``log_softmax``'s output, the
      gradient ``nll_loss`` writes into it, and ``log_softmax``'s input gradient, three fp32
      ``T V``: ``12 T V`` — the peak of most plans.
    Unsloth's chunked cross-entropy never materialises the fp32 copies: ``c T V`` at both.
    Gemma-2's final softcapping adds its saved ``tanh`` output, ``c T V``.
    """
    d = dims(spec)
    p = precision(q)
    # Gemma-2 ``final_logit_softcapping``: ``tanh(logits / cap) * cap`` keeps the tanh output
    cap = p.c * d.V if d.final_softcap else 0
    if chunked:
        return {"forward": Lin(tok=p.c * d.V + cap), "backward": Lin(tok=p.c * d.V + cap)}
    fwd = (p.c + 8) * d.V if p.low else 8 * d.V
    return {"forward": Lin(tok=fwd + cap), "backward": Lin(tok=12 * d.V + cap)}


def cce_terms(spec: ModelSpec, q: QuantSettings) -> dict[str, tuple[Lin, Lin]]:
    """Cut Cross Entropy's bytes (axolotl-ai-cloud/ml-cross-entropy 5f0c7a7: ``transformers/utils.apply_lce``,
    ``cce.cce_linear_cross_entropy`` / ``LinearCrossEntropyFunction``, ``cce_lse_forward``, ``indexed_dot``,
    ``cce_backward``), with ``n`` target rows (``B (s - 1)`` after the shift; planned as ``T``, at most 28 B bytes
    high).  The final hidden state ``e`` (the final norm's output, ``R h T``) and the head's weight are passed as
    they are, both in the unquantized dtype as PEFT leaves them (fp32 after the k-bit upcast: the kernels take fp32
    with Triton >= 3.2). The fork casts ``e`` only for an fp32 ``e`` with a bf16 head — axolotl's own k-bit
    preparation keeps the head in bf16, so there the saved ``e`` is a bf16 copy and ``de`` bf16 then cast back: the
    plan's ``8 h T`` at the backward kernel is about ``2 h T`` high, as its weights are (the reader warns).

    * end of the forward — the larger of ``_build_flat_valids``' transients (``nonzero`` of the ``n`` valid rows:
      int64 ``16 n`` and its int32 copy ``8 n``: ``24 n``) and the loss kernels' tensors (``valids``, the int32
      copy's row sums, int64 by torch's promotion: ``8 n``,
      ``lse`` fp32 ``4 n``, ``logit_avg`` fp32 ``4 V`` for the gradient filter, the target logits ``neg_dot``
      fp32 ``4 n``, Gemma-2's softcapped copy of them ``4 n``): the larger of ``24 n`` and ``16 n + 4 V``; ``e`` itself is counted
      by the loss-time activations (``loss_time_activation``);
    * start of the backward — the saved ``e`` (``R h T``, now kept by the loss), ``valids`` and ``lse`` (``12 n``),
      ``logit_avg`` (``4 V``), and the larger of ``sort_logit_avg``'s ``argsort`` (int64 ``8 V`` and its int32
      copy ``4 V``) and the backward kernel's ``vocab_ordering`` (``4 V``) with ``de`` (``zeros_like(e)``,
      ``R h T``) and its locks (int32, ``ceil(n / 128) x ceil(h / 64)``: planned per token, rounded up).
      The head is frozen (a trained head is refused), so there is no weight gradient.
    """
    d = dims(spec)
    p = precision(q)
    softcap = 4 if d.final_softcap else 0
    fwd = (Lin(tok=24), Lin(tok=16 + softcap, const=4 * d.V))
    locks = -(-4 * -(-d.h // 64) // 128)  # bytes of de's locks per row: an int32 per 128 rows and 64 columns
    saved = Lin(tok=p.R * d.h + 12, const=4 * d.V)
    bwd = (saved + Lin(const=12 * d.V), saved + Lin(const=4 * d.V, tok=p.R * d.h + locks))
    return {"forward": fwd, "backward": bwd}


def trl_terms(spec: ModelSpec, q: QuantSettings, kernels: str = "cuda", top1: bool = True,
              head_grad: int = 0) -> dict[str, tuple[Tiled, ...]]:
    """TRL 1.16's fused LM head on a GPU (``trl/trainer/utils.py`` ``add_fused_lm_head``, ``trl/kernels/chunked_logprob.py``
    ``ChunkedLogProbFunction`` with its Triton folds, which write into existing buffers), ``n`` valid rows (planned as
    ``T``), the final hidden state in ``R`` bytes, the tile dtype ``c`` (autocast's, else the hidden state's), the head
    in ``R`` bytes:

    * before the function: the valid rows' hidden states ``hidden[mask]`` (``R h n``, saved), their labels (int64
      ``8 n``) and the mask (``n``);
    * forward: seven fp32 per-row statistics (``28 n``), the tile buffer ``[min(n, 4096), 32768]`` in ``c``, each token
      tile's hidden rows cast to ``c`` (``c h`` a row when ``R != c``; while the next tile's cast is made the previous
      one is alive) and each vocabulary tile of the head cast to ``c`` (``32768 h c``, freed after its matmul); after
      the tiles, ``log_z``, the log-probabilities, the entropy and its quotient (``16 n``);
    * backward: the saved rows, labels, ``log_z``, entropy and mask (``(R h + 17) n``), the log-probabilities' gradient
      (``4 n``), ``grad_hidden`` (fp32, ``4 h n``), the tile buffer again, the rows' cast, and the head tile's cast held
      in a local (two while the next is made: from the second vocabulary tile, or with a vocabulary of one tile from
      the second token tile; the cast being made is the next tile's, ``min(32768, V - 32768)`` columns when the
      vocabulary ends inside the second tile); at the return ``grad_hidden.to(R)`` (``R h n`` when ``R != 4``).  Not planned: CUDA
      scratch of boolean indexing (its int64 row indices) and of ``index_put``'s sort in the backward of
      ``hidden[mask]`` (about ``16 n`` to ``32 n`` bytes).

    On the CPU (``kernels="cpu"``: no Triton) every position is projected (``hidden.reshape(-1, h)``, the same bytes
    as ``hidden[mask]`` for a batch of several rows) and each tile is folded by torch ops (``_forward_tile``,
    ``_backward_tile``), whose fp32 temporaries of a tile of ``n`` rows and ``k = min(V, 32768)`` columns add a
    moment to each phase:

    * forward, at ``e = exp(z - new_m)``: ``z`` (the transformed tile, ``4 n k``), ``is_top1``'s ``before_target``
      mask (bool, ``n k``; only with ``top1``), ``z - new_m`` and ``e`` (``8 n k``): ``13 n k`` (``12 n k`` without
      ``top1``; ``e * z`` for the entropy replaces the difference: as high), beside the tile buffer and the rows' cast;
    * backward, at ``grad_logprobs * (is_target - p)``: ``y``, ``z``, ``log_p``, ``p`` and ``grad`` (``20 n k``),
      ``is_target`` (bool, ``n k``), the difference and the product (``8 n k``): ``29 n k`` (Gemma-2's softcap keeps
      its ``tanh``, ``4 n k`` more), beside the head tile's cast held in ``w_chunk``.  The fp32 copies
      ``_addmm_fp32`` makes afterwards (``4 n k`` and ``4 k h``) are below that.

    A trained head (full fine-tuning: ``head_grad``, the bytes of an element of its weight): the backward accumulates
    the weight's gradient in an fp32 ``grad_weight`` of ``[V, h]``, made with ``grad_hidden`` and alive through every
    tile (``4 V h``), and returns it cast to the weight's dtype (``grad_weight.to(weight.dtype)``: ``head_grad V h``
    more beside the fp32 one at the return, none for an fp32 weight).
    """
    d = dims(spec)
    p = precision(q)
    c, R = p.c, p.R
    # the rows and head tiles are cast when the tile dtype differs (bf16 weights under fp16 autocast too)
    cast = (q.compute_dtype if p.amp else q.unquantized_dtype) != q.unquantized_dtype
    K, rows = TRL_VOCAB_TILE, TRL_TOKEN_TILE
    wtile = min(K, d.V) * d.h * c if cast else 0
    # the backward keeps the previous head tile (a named local) while casting the next: two from the second vocabulary
    # tile on, or, with one vocabulary tile, from the second token tile on
    # (the second vocabulary tile is ``V - K`` columns wide when the vocabulary ends inside it)
    second = (min(K, d.V - K) * d.h * c if cast else 0, 0) if d.V > K else (wtile, rows)
    mm = (c * K, 0, rows)
    chunk = (c * d.h, 0, rows) if cast else (0, 0, 0)
    chunk2 = (c * d.h, rows, 2 * rows) if cast else (0, 0, 0)
    fwd_base = Lin(tok=R * d.h + 9 + 28)
    fwd = (Tiled(fwd_base + Lin(const=wtile), (mm, chunk)),
           Tiled(fwd_base, (mm, chunk, chunk2)),
           Tiled(fwd_base + Lin(tok=16), (mm, chunk)))
    gw = 4 * d.V * d.h if head_grad else 0  # a trained head's fp32 gradient accumulator
    bwd_base = Lin(tok=R * d.h + 17 + 4 + 4 * d.h, const=gw)
    ret = head_grad * d.V * d.h if head_grad not in (0, 4) else 0
    bwd = (Tiled(bwd_base + Lin(const=wtile), (mm, chunk), (second,)),
           Tiled(bwd_base + Lin(const=wtile), (mm, chunk, chunk2)),
           Tiled(bwd_base + Lin(const=wtile + ret, tok=R * d.h if R != 4 else 0), (mm, chunk)))
    if kernels == "cpu":  # torch's folds of a tile (the docstring's last paragraph)
        k = min(K, d.V)
        fwd += (Tiled(fwd_base, (mm, chunk, ((12 + top1) * k, 0, rows))),)
        bwd += (Tiled(bwd_base + Lin(const=wtile), (mm, chunk, ((29 + 4 * d.final_softcap) * k, 0, rows))),)
    return {"forward": fwd, "backward": bwd}


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class LigerChunk:
    """``lin`` plus Liger's chunk of rows at its largest moment, and 8 bytes a sequence (the labels' padding column).
    ``fused_linear_cross_entropy_forward`` takes ``inc = ceil(V / h)`` and chunks of ``k = min(T, next_power_of_2(
    ceil(T / inc)))`` rows (their logits about the size of the hidden states). A chunk's logits (``c k V``) are alive
    with either the rows' autocast copy (``c k h``, when ``in_cast``) or the gradient rows ``logits @ W`` (``c k h``);
    from the second chunk on, the previous chunk's logits are still bound while the next chunk's are made: two
    chunks' logits and the rows' copy. Evaluated like a ``Lin`` (``at``)."""

    lin: Lin
    c: int
    V: int
    h: int
    in_cast: bool

    def rows(self, T: int) -> int:
        return min(T, _next_power_of_2(-(-T // -(-self.V // self.h))))

    def at(self, T: int, s: int) -> int:
        k = self.rows(T)
        one = self.c * k * (self.V + self.h)
        k2 = min(k, T - k)  # the second chunk's rows (none with one chunk)
        two = self.c * ((k + k2) * self.V + (k2 * self.h if self.in_cast else 0)) if k2 > 0 else 0
        return self.lin.at(T, s) + max(one, two) + 8 * (T // s)


def liger_terms(spec: ModelSpec, q: QuantSettings) -> dict[str, tuple[LigerChunk | Lin, ...]]:
    """Liger-Kernel 0.8.0's fused linear cross-entropy as axolotl's ``LigerPlugin`` installs it (``lce_forward`` ->
    ``LigerForCausalLMLoss`` -> ``LigerFusedLinearCrossEntropyFunction``, ``ops/fused_linear_cross_entropy.py``), on
    all ``T`` rows (the labels are shifted by padding, not by dropping a row), the final hidden state in ``R`` bytes,
    matmuls in ``c`` (autocast's, else the operands'), the frozen head in the unquantized dtype:

    * forward — the padded labels (int64, ``8 (T + B)``) and their shifted copy (``8 T``); the hidden states'
      gradient ``grad_input`` (``zeros_like``: ``R h T``, saved for backward), the per-row loss (fp32 ``4 T``) and
      the label mask (``T``); then per chunk of ``k`` rows (``LigerChunk``) the logits ``c k V`` (Triton turns them into
      their gradient in place), and either the rows' autocast copy or the gradient rows ``logits @ W``, ``c k h``
      (from the second chunk: the previous chunk's logits too), each matmul with autocast's copy of the head
      ``c V h`` when the head is in another dtype (freed after it);
    * backward — only ``grad_input`` (``R h T``), scaled in place by the upstream gradient and returned: the head
      is frozen (a trained head is refused), so there is no weight gradient and nothing is recomputed.
    """
    d = dims(spec)
    p = precision(q)
    c = p.c
    head = q.unquantized_dtype
    cast = p.amp and (q.compute_dtype != head)
    wcast = c * d.V * d.h if cast else 0
    in_cast = p.amp and p.R != c
    fwd = LigerChunk(Lin(tok=8 + 8 + p.R * d.h + 4 + 1, const=wcast), c, d.V, d.h, in_cast)
    return {"forward": (fwd,), "backward": (Lin(tok=p.R * d.h),)}


def loss_time_activation(spec: ModelSpec, counts: list[ModuleCount], q: QuantSettings, grad_ckpt: str) -> Lin:
    """Alive while the loss is computed (inside the model's forward) but not saved for backward:
    the final norm's output ``R h T`` (still referenced by the model's output object), and, with
    checkpointing, autocast's cached ``c``-byte copies of every fp32 adapter weight: the cache
    lives until the outermost autocast exits after the loss, and without checkpointing those
    copies are saved anyway (``lora_weight_cast_bytes``).  LoRA on 3-D expert parameters is folded
    with autocast off (``_LoraFactorsProxy``: explicit casts, ``parameter_lora_activation``): no
    cached copies of those."""
    d = dims(spec)
    p = precision(q)
    lin = Lin(tok=p.R * d.h)
    if grad_ckpt != "off" and p.amp:
        # not the prompt's (an embedding is not cast), p-tuning's MLP (outside the checkpoints: its casts are saved,
        # planner.memory.prompt), VeRA's (its vectors scale by elementwise products, its projections are buffers) nor
        # MiSS-mini's (the repeated block, not the leaf, is cast) nor C3A's (its kernel goes through FFTs in fp32)
        cast = [c for c in counts if not (c.kind == "lora_param" and "×(" in c.shape)
                and c.kind not in (PROMPT, PROMPT_MLP, "vera", "vera_projection", "miss_mini", "c3a")]
        lin = lin + Lin(const=sum(p.c * n for n, dt in trainable_tensors(cast) if dt == "float32"))
    return lin
