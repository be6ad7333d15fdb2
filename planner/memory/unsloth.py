"""Unsloth's training step on a GPU, term by term: what ``qplan estimate --backend unsloth`` plans.

Unsloth 2026.10.9 / unsloth_zoo 2026.10.9, ``FastLanguageModel`` with the fast path of
``FastLlamaModel.patch_peft_model`` (LoRA on q,k,v / o / gate,up,down without dropout or bias: the
``LoRA_QKV``, ``LoRA_W``, ``LoRA_MLP`` autograd Functions), a sm_80+ NVIDIA GPU. One pure function
per term, integer bytes, the source in each docstring. Checked against the Unsloth mode of the
meta-device trace (``qplan.observe.trace.unsloth_mode``: Unsloth's own code run on meta) in
tests/planner/test_unsloth_trace.py and reports/accuracy/unsloth/.

Notation as in ``planner.memory.terms``: ``T = b s`` tokens, ``c`` compute-dtype bytes, ``R`` bytes of the
residual stream (the load dtype: Unsloth does not upcast), ``h``, ``i``, ``q = nh hd``,
``kv = nkv hd``, ``V``, ``L``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qplan.planner.memory.terms import Dims, dims
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import QuantSettings, is_quantized
from qplan.planner.vocab import BYTES

# unsloth_zoo/gradient_checkpointing.py
#: ``MINIMUM_SIZE``: a layer input is offloaded only when its stored bytes exceed this
OFFLOAD_MIN_BYTES = 2 * 1024 * 1024
#: ``apply_unsloth_gradient_checkpointing`` (unsloth/models/_utils.py): below this
#: ``max_seq_length`` "unsloth" checkpointing is torch's plain (reentrant) checkpointing
OFFLOAD_MIN_SEQ = 512
#: ``INITIAL_GPU_BUFFER_SIZE`` elements of ``GPU_BUFFER_DTYPE`` (bf16 on sm_80+)
INITIAL_GPU_BUFFER_BYTES = 2 * 256 * 2048 * 2
#: ``INITIAL_CPU_BUFFER_COUNT`` pinned host slots of ``INITIAL_CPU_BUFFER_SIZE`` bf16 elements
INITIAL_CPU_BUFFERS = 200
INITIAL_CPU_BUFFER_BYTES = 128 * 1024 * 2
# unsloth_zoo/fused_losses/fused_linear.py
CE_CHUNK_GB = 2.0  # ``_CHUNK_GB``
CE_MIN_LOGITS = 512 * 151936  # ``_MIN_LOGITS``
CE_MAX_ROWS = 4096  # ``_MAX_ROWS``
CE_SPLIT_COLS = 16384  # ``_SPLIT_COLS``
CE_SMALL_CARD_BYTES = int(24.5 * 1024**3)  # ``_SMALL_CARD_BYTES``
CE_FLASH_MIN_ROWS_BIG = 4096  # ``_flash_min_rows_auto`` above the small-card size
CE_BWD_ROWS = 4096  # ``_BWD_ROWS`` (NVIDIA)
CE_TILE_BYTES = 256 * 1024**2  # ``_BWD_TILE_BYTES`` (NVIDIA)
#: the GPU an Unsloth plan assumes when it names none: 80 GiB, 60 GiB free when Unsloth asks
#: ``torch.cuda.mem_get_info`` (it sizes its cross-entropy chunks and double buffering from it)
DEFAULT_TOTAL_BYTES = 80 * 2**30
DEFAULT_FREE_BYTES = 60 * 2**30
# unsloth/models/llama.py LlamaRotaryEmbedding: ``current_rope_size = min(4 * 8192, max_position)``
ROPE_START_ROWS = 4 * 8192
ROPE_GROWTH = 8192


def _pow2(x: float) -> int:
    return 1 << max(int(math.ceil(math.log2(max(x, 1)))), 0)


def offloads(grad_ckpt: str, seq_len: int) -> bool:
    """``use_gradient_checkpointing="unsloth"`` becomes ``UnslothCheckpointFunction`` (offloading)
    only for ``max_seq_length >= 512`` (``apply_unsloth_gradient_checkpointing``); the backend sets
    ``max_seq_length`` to the plan's sequence length."""
    return grad_ckpt == "unsloth" and seq_len >= OFFLOAD_MIN_SEQ


def offload_slot_bytes(d: Dims, R: int, T: int) -> int:
    """``new_size`` of one offloaded layer input: ``T h`` elements stored in bf16 when fp32
    (``UNSLOTH_OFFLOAD_FP32`` default ``bf16``), else in their own dtype."""
    return T * d.h * (2 if R == 4 else R)


def offloaded(grad_ckpt: str, d: Dims, R: int, b: int, s: int) -> bool:
    """Whether layer inputs go to host memory: offloading on and ``new_size > MINIMUM_SIZE``."""
    return offloads(grad_ckpt, s) and offload_slot_bytes(d, R, b * s) > OFFLOAD_MIN_BYTES


def checkpoint_inputs_on_device(grad_ckpt: str, d: Dims, R: int, b: int, s: int) -> int:
    """Layer inputs a checkpointed forward keeps on the GPU (from step 2 on): all ``L`` (torch's
    checkpoint, or too small to offload), else the last layer's only (``LAST_GC_INDEX``: the last
    checkpoint is not offloaded after the first pass)."""
    if grad_ckpt == "off":
        return 0
    n = 1 if offloaded(grad_ckpt, d, R, b, s) else d.L
    return n * R * b * s * d.h


def staging_buffer_bytes(grad_ckpt: str, d: Dims, R: int, b: int, s: int) -> int:
    """GPU staging buffers of the offload (``GPU_BUFFERS``, ``GPU_BUFFERS_B``): two, each
    ``max(INITIAL_GPU_BUFFER_SIZE, new_size)`` bytes (B grows from step 2 on, when double buffering
    is on: more than 512 MiB free), alive from the first offload to the end."""
    if not offloaded(grad_ckpt, d, R, b, s):
        return 0
    return 2 * max(INITIAL_GPU_BUFFER_BYTES, offload_slot_bytes(d, R, b * s))


def offload_host_bytes(grad_ckpt: str, d: Dims, R: int, b: int, s: int) -> int:
    """Pinned host memory of the offload: the pool of ``INITIAL_CPU_BUFFER_COUNT`` slots made when
    the checkpointing is patched, and one slot per layer grown to ``new_size`` (the first pass
    offloads every layer) in a block of the next power of two (torch's CachingHostAllocator); a
    grown slot's old block stays cached, page-locked."""
    if not offloads(grad_ckpt, s):
        return 0
    pool = INITIAL_CPU_BUFFERS * INITIAL_CPU_BUFFER_BYTES
    if not offloaded(grad_ckpt, d, R, b, s):
        return pool
    slot = offload_slot_bytes(d, R, b * s)
    return pool + d.L * (_pow2(slot) if slot > INITIAL_CPU_BUFFER_BYTES else 0)


def rope_cache_bytes(spec: ModelSpec, c: int, s: int) -> int:
    """Unsloth's RoPE cache (``LlamaRotaryEmbedding._set_cos_sin_cache``): cos and sin, ``rows x
    hd`` each in the model dtype, built on the first forward and kept; ``rows`` =
    ``min(32768, max_position_embeddings)``, grown in steps of 8192 for longer sequences."""
    d = dims(spec)
    mp = int(spec.config.get("max_position_embeddings") or s)
    rows = min(ROPE_START_ROWS, mp)
    if s > rows:
        rows = -(-s // ROPE_GROWTH) * ROPE_GROWTH
    return 2 * rows * d.hd * c


def dequant_scratch_bytes(spec: ModelSpec, q: QuantSettings, c: int, fast_path: bool) -> int:
    """The dequantization scratch (``kernels/utils.py`` ``_scratch("weight")``): the forward's
    ``matmul_lora(..., use_global_buffer=True)`` dequantizes every 4-bit weight into one
    per-device buffer, grown to the largest: ``c * max(out * in)``, kept (the fast path only)."""
    if not (q.kbit and fast_path):
        return 0
    sizes = [g.in_features * g.out_features for g in spec.inventory.linear if is_quantized(g, q)]
    return c * max(sizes, default=0)


def peft_qkv_saved_bytes(spec: ModelSpec, counts: list[ModuleCount], q: QuantSettings, c: int, R: int, T: int) -> int:
    """What q, k, v save per layer when they stay on PEFT's ``lora.Linear.forward`` (a base bias, as
    Qwen2's: ``patch_peft_model`` installs ``LoRA_QKV`` only for bias-free projections), beyond the
    ``LoRA_QKV`` input ``layer_saved_bytes`` counts (``R h T``):

    * PEFT 0.21 casts the input to the fp32 adapter dtype and, under autocast, ``lora_A``'s
      ``F.linear`` saves a fresh ``c``-byte copy of that: ``c h T`` per projection, and the norm output
      itself is saved by nobody (``- R h T``); a bitsandbytes 4-bit layer skips the cast under
      autocast, so its ``lora_A`` saves the shared norm output, which is what is already counted;
    * ``lora_B`` saves ``lora_A``'s output, ``c r T`` per projection;
    * autocast's ``c``-byte casts of the fp32 LoRA weights, saved by their ``F.linear``:
      ``c r (in + out)`` per projection.
    Checked against the Unsloth trace (Qwen2.5-7B rows of reports/accuracy/unsloth/)."""
    if not biased_qkv(spec):
        return 0
    d = dims(spec)
    lora = {c_.module.rsplit(".", 1)[-1]: c_ for c_ in counts if c_.kind == "lora"}
    L = max(1, int(spec.inventory.num_hidden_layers or 1))
    out = 0 if q.kbit else (3 * c * d.h - R * d.h) * T
    for name in FAST_TARGETS[:3]:
        g = next(g for g in spec.inventory.linear if g.pattern.rsplit(".", 1)[-1] == name)
        r = lora[name].params_per_instance // (g.in_features + g.out_features)
        out += c * r * T + c * r * (g.in_features + g.out_features) * max(1, g.instances // L)
    return out


def layer_saved_bytes(d: Dims, c: int, R: int, b: int, s: int) -> int:
    """What one decoder layer saves for backward on the fast path (``LlamaDecoderLayer_fast_forward``):
    ``fast_rms_layernorm`` saves its input and fp32 ``1/rms`` per row (twice: ``R h T + 4 T``
    each); ``LoRA_QKV`` its input (the norm output, ``R h T``); the attention its q, k, v and
    output (``c T (2q + 2kv)``) and the fp32 logsumexp (``4 b nh s``, plus a 16+8-byte RNG
    state); ``LoRA_W`` (o) the attention output (the same storage); ``LoRA_MLP`` its input
    ``R h T`` and ``e``, ``g`` (``2 c i T``)."""
    T = b * s
    return (4 * R * d.h * T + 8 * T + c * T * (2 * d.q + 2 * d.kv + 2 * d.i)
            + 4 * b * d.nh * s + 24)


def ce_rows(n_rows: int, d: Dims, total_bytes: int, free_bytes: int) -> int:
    """Rows per chunk of the fused cross-entropy (``fused_linear_rows`` with 4-byte logits): the
    power of two at or below ``n h / V``, at least ``min(max(pow2(_MIN_LOGITS / V), 512), 4096)``,
    at most 4096 and ``budget / (4 V)``; the budget is ``min(2 GiB, free / 2)``."""
    V, H = d.V, d.h
    x = n_rows * H / max(V, 1)
    rows = _pow2(x)
    if rows > x:
        rows //= 2
    m = _pow2(CE_MIN_LOGITS / V)
    if m > CE_MIN_LOGITS / V:
        m //= 2
    min_rows = min(max(m, 512), CE_MAX_ROWS)
    rows = min(max(rows, min_rows), CE_MAX_ROWS)
    rows = min(rows, max(ce_budget_bytes(free_bytes) // max(V * 4, 1), 2))
    return max(min(rows, max(n_rows, 1)), 1)


def ce_flash(n_keep: int, d: Dims, total_bytes: int) -> bool:
    """The tiled ("flash") forward that needs no ``[rows, V]`` buffer: a frozen head, more than two
    16384-column splits, and ``n_keep >= _flash_min_rows`` (0 on cards of at most 24.5 GiB, else
    4096)."""
    min_rows = 0 if total_bytes <= CE_SMALL_CARD_BYTES else CE_FLASH_MIN_ROWS_BIG
    return -(-d.V // CE_SPLIT_COLS) > 2 and n_keep >= min_rows


def ce_budget_bytes(free_bytes: int) -> int:
    """``_budget_bytes``: ``min(_CHUNK_GB, free / 2)`` GiB (``_default_target_gb``: half the free memory)."""
    return max(int(min(CE_CHUNK_GB, free_bytes / 2**30 * 0.5) * 2**30), 1)


def ce_forward_bytes(d: Dims, c: int, R: int, b: int, s: int, total_bytes: int, free_bytes: int) -> dict[str, int]:
    """The fused linear cross-entropy (``fused_losses/fused_linear.py`` ``_ce_impl``), which takes
    the gradient in the forward and never holds ``T x V`` logits. ``saved``: ``grad_h`` (``R h T``,
    kept for backward). ``transient`` at a chunk: the shifted targets (``8 T``), the kept-row index
    and fp32 log-probs (``12 n``, ``n = b (s - 1)``), and

    * the tiled ("flash") forward (``_tiled_forward``): an fp32 buffer of ``rows x tile`` (``rows =
      min(4096, n, 256 MiB / (16384 * 4))``, ``tile`` the budget's columns, at most ``V`` rounded up
      to 16384), the fp32 gradient accumulator ``rows x h`` and running max, the fp32 logsumexp of
      every row (``4 n``), and per chunk the gathered hidden rows (``c h rows``), targets (``8
      rows``) and split partials (``32 splits rows``);
    * else (``_Buffers``): the fp32 logits buffer ``rows x V8`` (``ce_rows``), and per chunk the
      gathered hidden rows and targets, the row logsumexp (``4 rows``), split partials (``28 splits
      rows`` when more than two 16384-column splits), ``dz @ w``'s fp32 result (``4 h rows``) and
      either the previous chunk's (two chunks or more) or its cast for ``index_copy_`` (``R h rows``)."""
    T, n = b * s, b * (s - 1)
    saved = R * d.h * T
    base = 8 * T + 12 * n
    splits = -(-d.V // CE_SPLIT_COLS)
    if ce_flash(n, d, total_bytes):
        budget = min(CE_TILE_BYTES, ce_budget_bytes(free_bytes))
        rows = max(min(CE_BWD_ROWS, n, budget // (CE_SPLIT_COLS * 4)), 1)
        tile = max(budget // (rows * 4), CE_SPLIT_COLS)
        if total_bytes <= CE_SMALL_CARD_BYTES:  # ``_flash_min_rows == 0``: 16384-column tiles
            tile = min(tile, CE_SPLIT_COLS)
        tile = min(tile - tile % CE_SPLIT_COLS, splits * CE_SPLIT_COLS)
        stride = -(-tile // 8) * 8
        chunk = c * d.h * rows + 8 * rows + 32 * splits * rows
        return {"saved": saved, "transient": base + 4 * rows * stride + 4 * rows * d.h + 4 * rows + 4 * n + chunk}
    rows = ce_rows(n, d, total_bytes, free_bytes)
    stride = -(-d.V // 8) * 8
    sp = 1 if splits <= 2 else splits
    # with two chunks or more the peak is at ``gh = _dz_w(dz, w)`` while the previous chunk's ``gh``
    # is still bound; with one, at its ``.to(grad_h.dtype)`` for ``index_copy_``
    gh = 2 * 4 * d.h * rows if n > rows else 4 * d.h * rows + R * d.h * rows
    chunk = c * d.h * rows + 8 * rows + 4 * rows + (28 * sp * rows if sp > 1 else 0) + gh
    return {"saved": saved, "transient": base + 4 * rows * stride + chunk}


@dataclass(frozen=True)
class UnslothTerms:
    """The Unsloth-specific device terms of one plan (bytes) and its host bytes."""

    buffers: int  # RoPE cache + dequantization scratch + offload staging buffers: alive all step
    ckpt_inputs: int
    layer_saved: int
    ce_saved: int
    ce_transient: int
    host_offload: int


def unsloth_terms(spec: ModelSpec, counts: list[ModuleCount], q: QuantSettings, grad_ckpt: str, b: int, s: int,
                  fast_path: bool, total_bytes: int, free_bytes: int) -> UnslothTerms:
    d = dims(spec)
    c = BYTES[q.compute_dtype] if q.compute_dtype in ("bfloat16", "float16") else 4
    R = BYTES[q.unquantized_dtype]
    ce = ce_forward_bytes(d, c, R, b, s, total_bytes, free_bytes)
    return UnslothTerms(
        buffers=rope_cache_bytes(spec, c, s) + dequant_scratch_bytes(spec, q, c, fast_path)
        + staging_buffer_bytes(grad_ckpt, d, R, b, s),
        ckpt_inputs=checkpoint_inputs_on_device(grad_ckpt, d, R, b, s),
        layer_saved=layer_saved_bytes(d, c, R, b, s) + peft_qkv_saved_bytes(spec, counts, q, c, R, b * s),
        ce_saved=ce["saved"], ce_transient=ce["transient"],
        host_offload=offload_host_bytes(grad_ckpt, d, R, b, s),
    )


def layer_backward_transient(spec: ModelSpec, q: QuantSettings, c: int, R: int, b: int, s: int) -> int:
    """Inside a layer's backward, beyond what the layer saved: the gradient arriving and the one
    leaving (``2 R h T``), ``LoRA_MLP.backward``'s ``DW`` (``c i T``, the SwiGLU backward then works
    in place in ``DW, e, g``) and, 4-bit, the up/gate weight it dequantizes fresh
    (``fast_dequantize(upW.t(), ...)``: ``c i h``)."""
    d = dims(spec)
    T = b * s
    dq = c * d.i * d.h if q.kbit else 0
    return 2 * R * d.h * T + c * d.i * T + dq


def unsloth_phases(spec: ModelSpec, counts: list[ModuleCount], q: QuantSettings, grad_ckpt: str, b: int, s: int,
                   static: int, gradients: int, optimizer_step_temp: int, fast_path: bool,
                   total_bytes: int, free_bytes: int) -> tuple[dict[str, int], UnslothTerms, int]:
    """The moments of an Unsloth step (from step 2 on: optimizer state exists; ``static`` = weights +
    adapters + device optimizer state):

    * ``forward`` — at the fused loss: static + buffers + the batch (``16 T``) + the saved
      activations (every layer's without checkpointing, the checkpoint inputs kept on the GPU with
      it) + the final norm's input and ``1/rms`` and its output + the loss's ``grad_h`` and chunk;
    * ``layers`` — a layer's backward: static + buffers + the gradients + the checkpoint inputs +
      that layer's saved activations (recomputed with checkpointing) + its backward's transients;
    * ``optimizer`` — static + buffers + gradients + the step's temporaries.
    """
    d = dims(spec)
    c = BYTES[q.compute_dtype] if q.compute_dtype in ("bfloat16", "float16") else 4
    R = BYTES[q.unquantized_dtype]
    u = unsloth_terms(spec, counts, q, grad_ckpt, b, s, fast_path, total_bytes, free_bytes)
    T = b * s
    base = static + u.buffers
    x_in = R * d.h * T  # one layer's input
    acts = d.L * u.layer_saved if grad_ckpt == "off" else u.ckpt_inputs
    final = 2 * R * d.h * T + 4 * T
    trans = layer_backward_transient(spec, q, c, R, b, s)
    if grad_ckpt == "off":
        # the first layer whose backward runs (the last one) holds every layer's activations
        layers_grads = gradients // d.L
        layers = base + layers_grads + acts + trans
    else:
        # the last layer's backward: every input still on the GPU, that layer's gradients; the
        # first layer's: its input only (or a view of the staging buffer), every gradient
        last = u.ckpt_inputs + gradients // d.L
        first = (x_in if u.ckpt_inputs else 0) + gradients
        layers_grads = gradients if first >= last else gradients // d.L
        layers = base + max(last, first) + u.layer_saved - x_in + trans
    # a layer's MLP forward (the last layer's: every earlier layer's activations or checkpoint inputs
    # exist): e, g and h = swiglu(e, g) (``3 c i T``) beside the residual stream's live tensors:
    # the layer input, the attention residual h1, the MLP input (norm output) and o_proj's output;
    # offloading also leaves the embeddings output referenced by the model's forward
    mlp_t = 3 * c * d.i * T
    if grad_ckpt == "off":
        mlp = acts + c * d.i * T + x_in  # the earlier layers' and this one's saved; h and the down output
    else:
        mlp = u.ckpt_inputs + 3 * x_in + mlp_t + (x_in if offloaded(grad_ckpt, d, R, b, s) else 0)
    phases = {
        # offloading leaves the embeddings output referenced (the model's forward holds it)
        "forward": base + 16 * T + acts + final + u.ce_saved + u.ce_transient
        + (x_in if offloaded(grad_ckpt, d, R, b, s) else 0),
        "mlp_forward": base + 16 * T + mlp,
        "layers": layers + 16 * T,
        "optimizer": base + gradients + optimizer_step_temp,
    }
    return phases, u, layers_grads


#: families whose Unsloth model class the terms (and the Unsloth trace) follow
UNSLOTH_FAMILIES = ("llama", "mistral", "qwen2")
#: the projections the fast LoRA Functions need adapted together (``patch_peft_model``)
FAST_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fast_path(spec: ModelSpec, counts: list[ModuleCount], dropout: float, bias: str, dora: bool) -> bool:
    """``patch_peft_model`` installs ``LoRA_QKV``/``LoRA_W``/``LoRA_MLP`` on every layer when
    ``lora_dropout == 0`` (with dropout it takes the same Functions with dropout masks, not modelled
    here), ``bias == "none"``, no DoRA, and q,k,v / o / gate,up,down are adapted without biases in
    the base layers (Qwen2's q,k,v have biases: they stay on PEFT's forward); the terms here are
    derived for that path."""
    adapted = {c.module.rsplit(".", 1)[-1] for c in counts if c.kind == "lora"}
    # ``patch_peft_model`` leaves a projection whose base layer has a bias on PEFT's forward: Qwen2's
    # q,k,v (``peft_qkv_saved_bytes``); o and the MLP must be bias-free for ``LoRA_W``/``LoRA_MLP``
    biased = {g.pattern.rsplit(".", 1)[-1] for g in spec.inventory.linear if g.bias}
    return (spec.config.get("model_type") in UNSLOTH_FAMILIES and dropout == 0 and bias == "none" and not dora
            and set(FAST_TARGETS) <= adapted and not (biased & set(FAST_TARGETS[3:])))


def biased_qkv(spec: ModelSpec) -> bool:
    """q, k and v have base biases (Qwen2): ``patch_peft_model`` keeps them on PEFT's forward."""
    biased = {g.pattern.rsplit(".", 1)[-1] for g in spec.inventory.linear if g.bias}
    return set(FAST_TARGETS[:3]) <= biased


#: ``optim`` of Unsloth's patched TRL configs (``unsloth/models/rl.py`` replacements: ``"optim":
#: "adamw_8bit"``, ``weight_decay`` 0.001); on its CPU backend it forces ``adamw_torch_fused``
UNSLOTH_DEFAULT_OPTIMIZER = "adamw_8bit"


def optimizer_note(optimizer: str) -> str | None:
    """A plan whose optimizer is not the one Unsloth's trainer configs default to says so."""
    if optimizer == UNSLOTH_DEFAULT_OPTIMIZER:
        return None
    return (f"Unsloth's SFTConfig defaults to optim={UNSLOTH_DEFAULT_OPTIMIZER!r}; this plan uses {optimizer!r} "
            f"(`--optimizer {UNSLOTH_DEFAULT_OPTIMIZER}` plans Unsloth's default; qplan run passes the plan's)")


def fast_path_warning(spec: ModelSpec, counts: list[ModuleCount], dropout: float, bias: str, dora: bool) -> str | None:
    if fast_path(spec, counts, dropout, bias, dora):
        return None
    return ("Unsloth terms are derived for its fast LoRA path (llama/mistral/qwen2, all of q,k,v,o,gate,up,down "
            "adapted, none with a base bias as Qwen2's q,k,v have, dropout 0, no LoRA bias, no DoRA); this plan is "
            "off it and approximate: `--method trace` runs Unsloth's code")


def unsloth_memory(spec: ModelSpec, counts: list[ModuleCount], q: QuantSettings, grad_ckpt: str, b: int, s: int,
                   weights: int, optimizer: str, grad_accum: int, fast: bool, total_bytes: int,
                   free_bytes: int) -> dict:
    """``training_memory``'s document for an Unsloth plan (same keys), plus ``host_offload``."""
    from qplan.planner.memory.terms import (
        adapter_bytes,
        gradient_bytes,
        optimizer_state_bytes,
        optimizer_step_temp_bytes,
        overhead_bytes,
    )
    from qplan.planner.vocab import CATEGORIES

    opt = optimizer_state_bytes(counts, optimizer)
    adapters, grads = adapter_bytes(counts), gradient_bytes(counts)
    dev_opt = opt["device"]
    temps_opt = optimizer_step_temp_bytes(counts, optimizer)
    static = weights + adapters + dev_opt
    g = grads if grad_accum > 1 else 0
    phases, u, lgrads = unsloth_phases(spec, counts, q, grad_ckpt, b, s, static + g, grads - g, temps_opt, fast,
                                       total_bytes, free_bytes)
    d = dims(spec)
    R = BYTES[q.unquantized_dtype]
    T = b * s
    acts = (d.L * u.layer_saved if grad_ckpt == "off" else u.ckpt_inputs) + 2 * R * d.h * T + 4 * T + u.ce_saved
    stat = {"weights": weights, "adapters": adapters, "optimizer": dev_opt}
    fwd_acts = acts + 16 * T
    lgrads += g
    lay_acts = phases["layers"] - static - lgrads - u.buffers - layer_backward_transient(
        spec, q, BYTES[q.compute_dtype] if q.compute_dtype != "float32" else 4, R, b, s)
    parts = {
        "forward": {"gradients": g, "activations": fwd_acts,
                    "temporaries": phases["forward"] - static - g - fwd_acts},
        "mlp_forward": {"gradients": g, "activations": min(fwd_acts - u.ce_saved, phases["mlp_forward"] - static - g),
                        "temporaries": phases["mlp_forward"] - static - g
                        - min(fwd_acts - u.ce_saved, phases["mlp_forward"] - static - g)},
        "layers": {"gradients": lgrads, "activations": lay_acts,
                   "temporaries": phases["layers"] - static - lgrads - lay_acts},
        "optimizer": {"gradients": grads, "temporaries": phases["optimizer"] - static - grads},
    }
    order = [c for c in CATEGORIES if c != "optimizer_paged"]
    composition = {m: {c: int({**stat, **p}.get(c, 0)) for c in order} for m, p in parts.items()}
    tensor_peak = max(phases.values())
    over = overhead_bytes(tensor_peak)
    return {
        "adapters": adapters, "gradients": grads, "optimizer": dev_opt + opt["paged"], "optimizer_paged": opt["paged"],
        "activations": acts, "logits": u.ce_transient, "temporaries": max(u.buffers, temps_opt),
        "overhead": sum(over.values()), "cuda_context": over["cuda_context"], "allocator_slack": over["allocator_slack"],
        "tensor_peak": tensor_peak, "peak": tensor_peak + sum(over.values()),
        "peak_phase": next(k for k, v in phases.items() if v == tensor_peak), "phases": phases,
        "composition": composition, "host_offload": u.host_offload,
    }
