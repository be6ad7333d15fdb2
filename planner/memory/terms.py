"""Training-memory terms that do not depend on the batch: the model's dimensions, adapters, gradients,
optimizer states and the optimizer step's temporaries, the CUDA overheads; and the plan's
training settings.  One pure function per term, integer bytes, formula and source in each.

Notation: ``T = batch_size * seq_len`` tokens per micro-batch, ``h`` hidden size, ``i`` MLP
intermediate size, ``V`` vocabulary, ``L`` decoder layers, ``c`` bytes of the compute dtype.
The terms that grow with the batch are in ``planner.memory.activations``; the moments of a step and
the peak in ``planner.memory.phases``.

Everything here is checked against an independent oracle: the live-tensor trace of one real
training step (``qplan.observe.trace``, on the meta device for full-size models and on the CPU
against real tensors), see tests/planner/test_memory.py and reports/accuracy/.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from qplan.planner.errors import QPlanError
from qplan.planner.model.lora import FROZEN_KINDS, UNSTEPPED, ModuleCount
from qplan.planner.model.spec import ModelSpec
from qplan.planner.model.weights import QuantSettings, is_quantized
from qplan.planner.vocab import ATTN_IMPLS, BYTES, GRAD_CKPT, LOSSES, OPTIMIZERS, optimizer

#: bitsandbytes 8-bit optimizers keep tensors with fewer elements in 32-bit state
#: (``Optimizer2State(min_8bit_size=4096)``, bitsandbytes/optim/optimizer.py).
BNB_MIN_8BIT_SIZE = 4096
#: torchao's low-bit AdamW quantizes a state only for tensors with at least this many elements and a whole number of
#: blocks (torchao 0.18.0 ``optim/adam.py`` ``_AdamBase._new_buffer``: ``numel() >= 4096 and numel() % block_size
#: == 0``); transformers passes ``block_size`` 256 to both the 8-bit and the 4-bit one (``trainer_optimizer.py``
#: ``_get_torchao_optimizer``: ``optim_args.get("block_size", 256)``)
TORCHAO_MIN_SIZE = 4096
TORCHAO_BLOCK = 256
#: block size of the blockwise 8-bit optimizer state (``init_state``: ``blocksize = 256``).
BNB_OPTIM_BLOCKSIZE = 256
#: bitsandbytes' quantization map of an 8-bit state: 256 fp32 entries (``F.create_dynamic_map``)
BNB_QMAP_BYTES = 256 * 4
#: paged optimizers page only tensors with at least this many elements (``init_state``:
#: ``if not self.is_paged or p.numel() < 1e5``); smaller ones are ordinary device tensors.
BNB_PAGED_MIN_NUMEL = 100_000

#: CUDA context + cuBLAS/cuDNN handles and workspaces, outside PyTorch's allocator counters.
#: Uncalibrated: a typical figure for a CUDA 12 context with cuBLAS loaded. Issue 5 fits it
#: from GPU runs (reports/gpu/); until then it is a named assumption, printed with the plan.
CUDA_CONTEXT_BYTES = 512 * 2**20
#: Caching-allocator slack (``max_memory_reserved - max_memory_allocated``) as a fraction of
#: the tensor peak: block rounding (512 B, 2 MiB segments) and fragmentation. Uncalibrated
#: assumption, to be fitted on the GPU runs of issue 5.
ALLOCATOR_SLACK_FRACTION = 0.05


@dataclass(frozen=True)
class GrpoSettings:
    """TRL 1.16 ``GRPOConfig``'s generation settings (``--objective grpo``): ``num_generations`` completions of each
    prompt, prompts of up to ``prompt_length`` tokens (TRL 1.16 does not truncate them: the longest), each completion
    ``max_completion_length`` tokens at most, one generation batch every ``steps_per_generation`` micro-batches (its
    ``per_device_train_batch_size x steps_per_generation`` completions generated at once), ``beta`` the KL
    coefficient (0: no reference forward)."""

    num_generations: int = 8
    prompt_length: int = 512
    max_completion_length: int = 512
    steps_per_generation: int = 1
    beta: float = 0.0
    #: vLLM (``colocate`` or ``server``) instead of transformers' generate; colocate: the bytes vLLM holds on this GPU
    #: (``vllm_gpu_memory_utilization x`` the GPU's total), and whether it sleeps during the step
    vllm: str | None = None
    vllm_reserved: int = 0
    vllm_sleep: bool = False

    @property
    def vllm_held(self) -> int:
        """Bytes colocated vLLM holds on this GPU through the training step (0 asleep, in server mode, or without)."""
        return self.vllm_reserved if self.vllm == "colocate" and not self.vllm_sleep else 0

    def sequences(self, batch_size: int) -> int:
        """The completions one rank generates at once: ``per_device_train_batch_size x steps_per_generation``."""
        return batch_size * self.steps_per_generation


@dataclass(frozen=True)
class TrainingSettings:
    batch_size: int = 1
    seq_len: int = 512
    grad_accum: int = 1
    grad_ckpt: str = "hf"
    optimizer: str = "adamw_torch"
    attn_impl: str = "sdpa"
    #: batches padded to their longest (``--data`` with padding), or packed rows whose documents are told apart by
    #: position ids under SDPA/eager: attention gets a 4-D mask (``padding_mask_activation``)
    padded: bool = False
    #: padding-free packing (TRL's ``bfd``): the micro-batch's packs flattened into one row of this many tokens (the
    #: worst batch's); 0: batches are ``batch_size × seq_len``
    flat_tokens: int = 0
    #: ``vocab.LOSSES``: the full logits, or Cut Cross Entropy
    loss: str = "full"
    #: ``vocab.LIGER_KERNELS`` in the decoder layers (in that order)
    liger_kernels: tuple[str, ...] = ()
    #: prompt tuning: the trained virtual tokens PEFT prepends to every row (``planner.model.prompt``; the plan's
    #: ``prompt_tuning`` section says it, so plan.json's ``training`` does not)
    virtual_tokens: int = 0
    #: ``vocab.TRAINING_OBJECTIVES``: ``dpo`` runs each of the ``batch_size`` pairs as two rows (chosen, rejected)
    objective: str = "sft"
    #: ``grpo``: how its completions are generated (``seq_len`` is then the prompt plus the completion)
    grpo: GrpoSettings | None = None
    #: DPO/KTO: the reference's log-probabilities computed in a pass before training (TRL's
    #: ``precompute_ref_log_probs``), on batches of ``precompute_ref_batch_size`` pairs (rows for KTO; 0: ``batch_size``)
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: int = 0

    @property
    def precompute_rows(self) -> int:
        """The rows of a batch of the ``precompute_ref_log_probs`` pass (DPO: two a pair); 0 without the pass."""
        if not self.precompute_ref_log_probs:
            return 0
        return (self.precompute_ref_batch_size or self.batch_size) * (2 if self.objective == "dpo" else 1)

    @property
    def shape(self) -> tuple[int, int]:
        """The ``(rows, tokens per row)`` the model's tensors have: ``(1, flat_tokens)`` for padding-free packs;
        ``seq_len + virtual_tokens`` per row under prompt tuning; two rows a pair under DPO (``DataCollatorForPreference``
        concatenates the chosen and the rejected rows)."""
        if self.flat_tokens:
            return (1, self.flat_tokens)
        return (self.batch_size * (2 if self.objective in ("dpo", "reward") else 1), self.seq_len + self.virtual_tokens)

    def validate(self, spec: ModelSpec) -> None:
        if self.batch_size <= 0:
            raise QPlanError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.seq_len <= 0:
            raise QPlanError(f"--seq-len must be >= 1, got {self.seq_len}")
        if self.grad_accum <= 0:
            raise QPlanError(f"--grad-accum must be >= 1, got {self.grad_accum}")
        if self.optimizer not in OPTIMIZERS:
            raise QPlanError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.attn_impl not in ATTN_IMPLS:
            raise QPlanError(f"unknown attention implementation {self.attn_impl!r}: choose one of auto, {', '.join(ATTN_IMPLS)}")
        supported = spec.inventory.attn_implementations
        if supported and self.attn_impl not in supported:
            raise QPlanError(
                f"{spec.name} ({spec.inventory.architecture}) does not support --attn {self.attn_impl} "
                f"in transformers: use {' or '.join(supported)} (or auto)"
            )
        if self.loss not in LOSSES:
            raise QPlanError(f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.grad_ckpt not in GRAD_CKPT:
            raise QPlanError(f"unknown gradient checkpointing mode {self.grad_ckpt!r}: choose one of {', '.join(GRAD_CKPT)}")
        ctx = max_context(spec)
        if ctx and self.seq_len + self.virtual_tokens > ctx:
            extra = f" + {self.virtual_tokens} virtual tokens" if self.virtual_tokens else ""
            raise QPlanError(
                f"--seq-len {self.seq_len}{extra} exceeds {spec.name}'s context of {ctx} tokens "
                f"(max_position_embeddings)"
            )

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        if not self.padded:  # plan.json says "padded" only for padded batches
            out.pop("padded")
        if not self.flat_tokens:
            out.pop("flat_tokens")
        out.pop("virtual_tokens")
        if self.objective == "sft":  # plan.json names the objective only when it is not SFT
            out.pop("objective")
        if self.loss == "full":  # plan.json names the loss only when it is not the full logits
            out.pop("loss")
        if self.liger_kernels:
            out["liger_kernels"] = list(self.liger_kernels)
        else:
            out.pop("liger_kernels")
        if not self.precompute_ref_log_probs:
            out.pop("precompute_ref_log_probs")
        if not self.precompute_ref_batch_size:
            out.pop("precompute_ref_batch_size")
        if self.grpo is None:
            out.pop("grpo")
        elif self.grpo.vllm is None:  # plan.json names vLLM's settings only when vLLM generates
            out["grpo"] = {k: v for k, v in out["grpo"].items() if not k.startswith("vllm")}
        return out


#: families whose activation terms are derived and checked against the trace (reports/accuracy/,
#: tests/planner/test_memory.py); others get a warning that the analytic activations are approximate
VALIDATED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2")


def accuracy_warning(spec: ModelSpec, use_dora: bool = False) -> str | None:
    """A warning for plans whose activation terms are not validated: other families (GPT-2's
    LayerNorm/GELU MLP, ...), mixture-of-experts layers (routed experts' activations), and DoRA's transients (its
    saved tensors are planned, ``planner.memory.dora``; the norm's identity matrix and weight copies made while a
    module's forward runs are not)."""
    if use_dora:
        return ("DoRA's saved tensors are planned, not the transients of its weight norm (an in × in identity and "
                "in × out weight copies per module while its forward runs): the plan may be low where one is the peak "
                "(checkpointing, small vocabularies); `--method trace` is exact")
    c = spec.config
    if isinstance(c.get("text_config"), dict):
        c = c["text_config"]  # a multimodal wrapper's language model (Mistral-3: mistral) is what runs
    mt = c.get("model_type")
    moe = any(k in c and c[k] for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    if mt in VALIDATED_FAMILIES and not moe:
        return None
    from qplan.planner.memory.moe import DERIVED_MOE, moe_dims  # moe builds on this module's neighbours

    if moe and DERIVED_MOE.get(mt) in VALIDATED_FAMILIES and moe_dims(spec) is not None:
        return None  # the MoE block derived (planner.memory.moe) around a validated family's attention
    what = f"mixture-of-experts layers ({mt})" if moe else f"the {mt} family"
    return (f"activations of {what} are approximated with the Llama-family terms (validated: "
            f"{', '.join(VALIDATED_FAMILIES)}); `--method trace` is exact")


def text_only_warning(spec: ModelSpec, counts: list[ModuleCount]) -> str | None:
    """What a plan for a multimodal wrapper assumes (Gemma-3 4B+, Mistral-3): text-only fine-tuning.
    The vision tower and projector are loaded (and quantized like the rest by bitsandbytes: their
    ``nn.Linear`` weights too), but with no ``pixel_values`` in the batch they never run, so their
    activations are not in the plan, and LoRA on them is created but gets no gradient or
    optimizer state (``stepped_counts``). None for a text model."""
    idle = spec.inventory.text_only_idle
    if not idle:
        return None
    inv = spec.inventory

    def under(p: str) -> bool:
        return idle_in_step(spec, p)

    n = sum(g.instances * (g.in_features * g.out_features + g.bias * g.out_features) for g in inv.linear
            if under(g.pattern) and not g.weight_tied)
    n += sum(g.instances * g.num_embeddings * g.embedding_dim for g in inv.embeddings
             if under(g.pattern) and not g.weight_tied)
    n += sum(g.instances * math.prod(g.shape) for g in inv.params if under(g.pattern))
    lora = sum(c.total for c in counts if idle_in_step(spec, c.module))
    adapted = f"; {lora:,} of the trainable LoRA parameters sit on them and get no gradients" if lora else ""
    return (f"{inv.architecture} is multimodal: this plan is for text-only fine-tuning (no images in the batch). "
            f"{', '.join(idle)} ({n:,} parameters) are loaded but do not run{adapted}; "
            "activations use text_config's dimensions")


def resolve_attn(spec: ModelSpec, attn_impl: str) -> str:
    """``auto`` -> the attention implementation transformers picks for the architecture (recorded in
    the spec's inventory: sdpa, or eager where sdpa is unsupported, e.g. Gemma-2)."""
    if attn_impl == "auto":
        return str(spec.inventory.attn_default or "sdpa")
    return attn_impl


def max_context(spec: ModelSpec) -> int | None:
    c = spec.config
    v = c.get("max_position_embeddings") or c.get("n_positions")
    return int(v) if v else None


# ------------------------------------------------------------------------------ model dims


@dataclass(frozen=True)
class Dims:
    h: int
    L: int
    V: int
    nh: int
    nkv: int
    hd: int
    i: int
    gated: bool
    tied: bool
    norms: int = 2  # norms per decoder layer (Gemma-2: 4, "sandwich" norms around each sublayer)
    gemma_norm: bool = False  # Gemma RMSNorm: ``x.float()``, ``* (1 + weight.float())``
    attn_softcap: bool = False  # Gemma-2: ``tanh`` of the attention scores
    final_softcap: bool = False  # Gemma-2: ``tanh`` of the logits
    qk_norm: bool = False  # Qwen3/Gemma-3: an RMSNorm over each head of q and k (``q_norm``/``k_norm``)
    rope_sets: int = 1  # Gemma-3: one rotary cos/sin pair per layer type (sliding: local base, full: global)

    @property
    def q(self) -> int:
        return self.nh * self.hd

    @property
    def kv(self) -> int:
        return self.nkv * self.hd


def dims(spec: ModelSpec) -> Dims:
    """Model dimensions from the config (names differ by family: GPT-2 uses n_embd/n_layer)."""
    c = spec.config
    if not (c.get("hidden_size") or c.get("n_embd")) and isinstance(c.get("text_config"), dict):
        c = {**c, **c["text_config"]}  # a multimodal wrapper keeps the language model's sizes there
    inv = spec.inventory
    h = int(c.get("hidden_size") or c.get("n_embd"))
    L = int(c.get("num_hidden_layers") or c.get("n_layer"))
    V = int(c.get("vocab_size"))
    if inv.architecture.endswith("ForSequenceClassification"):  # a reward model: its score head's width (seq_cls)
        V = next(g.out_features for g in inv.linear if g.pattern == inv.output_head)
    nh = int(c.get("num_attention_heads") or c.get("n_head"))
    nkv = int(c.get("num_key_value_heads") or nh)
    hd = int(c.get("head_dim") or h // nh)
    i = c.get("intermediate_size") or c.get("n_inner")
    if not isinstance(i, int):
        # absent (transformers' class default applies) or per-layer: the MLP's down projection in
        # the inventory has the width the model was built with; GPT-2's n_inner=None means 4h
        down = [g.in_features for g in inv.linear if g.role == "mlp" and not idle_in_step(spec, g.pattern) and
                g.pattern.rsplit(".", 1)[-1] in ("down_proj", "w2", "dense_4h_to_h", "fc2", "c_proj")]
        i = max(down) if down else 4 * h
    leaves = {g.pattern.rsplit(".", 1)[-1] for g in inv.linear if not idle_in_step(spec, g.pattern)}
    gated = bool({"gate_proj", "gate_up_proj", "w1", "w3"} & leaves) or any(
        p.param == "gate_up_proj" for p in inv.params
    )
    norm_params = [p for p in inv.params if "layers.*." in p.pattern and not idle_in_step(spec, p.pattern)
                   and p.module_type.endswith(("RMSNorm", "LayerNorm"))]
    # per-head norms of q and k (Qwen3's q_norm/k_norm, hd wide) are not residual-stream norms
    head_norms = [p for p in norm_params if tuple(p.shape) == (hd,) and hd != h]
    norm_params = [p for p in norm_params if p not in head_norms]
    norms = len(norm_params) or 2
    gemma = any(p.module_type.startswith("Gemma") for p in norm_params)
    # rotary tables: Gemma-3's rotary module holds ``<layer_type>_inv_freq`` per layer type and the
    # model computes one cos/sin pair per type (modeling_gemma3 ``Gemma3TextModel.forward``:
    # ``for layer_type in set(config.layer_types): self.rotary_emb(..., layer_type)``); others one
    rope = sum(1 for b in inv.buffers if b.buffer.endswith("inv_freq") and not b.buffer.endswith("original_inv_freq")
               and b.pattern.endswith("rotary_emb") and not idle_in_step(spec, b.pattern))
    return Dims(h, L, V, nh, nkv, hd, i, gated, bool(inv.tied), norms, gemma,
                bool(c.get("attn_logit_softcapping")), bool(c.get("final_logit_softcapping")), bool(head_norms),
                max(1, rope))


# ---------------------------------------------------------------------- trainable tensors


def idle_in_step(spec: ModelSpec, pattern: str) -> bool:
    """Whether the module ``pattern`` never runs in a text-only training step: it lies under one of
    the spec's ``text_only_idle`` modules (a multimodal wrapper's vision tower and projector, found
    by a hooked meta-device forward when the spec was built)."""
    return any(pattern == m or pattern.startswith(m + ".") for m in spec.inventory.text_only_idle)


def stepped_counts(spec: ModelSpec, counts: list[ModuleCount]) -> list[ModuleCount]:
    """The trainable tensors a text-only step updates: LoRA weights on a module that never runs get
    no gradient (``.grad`` stays None), and torch's and bitsandbytes' optimizers skip parameters
    without one (``if p.grad is not None``), so they get no state either. Their weights are still
    on the device (``adapter_bytes`` of all counts). Checked against the trace of a Gemma-3 /
    Mistral-3 wrapper (tests/planner/test_multimodal.py)."""
    if not spec.inventory.text_only_idle:
        return counts
    return [c for c in counts if not idle_in_step(spec, c.module)]



def trainable_tensors(counts: list[ModuleCount], frozen: bool = False) -> list[tuple[int, str]]:
    """(numel, dtype) of every trainable tensor, one entry per tensor instance; ``frozen``: with LoRA-FA's frozen
    ``lora_A`` (adapter tensors on the device that get no gradient)."""
    out = []
    for c in counts:
        if c.kind in FROZEN_KINDS and not frozen:
            continue
        for _, shape in c.save_keys:
            out.extend([(math.prod(shape), c.dtype)] * c.instances)
    return out


def adapter_bytes(counts: list[ModuleCount]) -> int:
    """Trainable parameters the adapter adds to the device: ``sum(numel * bytes(dtype))`` (a full fine-tuning's
    trained base parameters are the ``weights`` term, not here).

    PEFT creates LoRA weights in float32 (``autocast_adapter_dtype=True`` upcasts fp16/bf16
    adapters, peft/tuners/tuners_utils.py ``_cast_adapter_dtype``); ``modules_to_save`` copies
    and trainable biases keep their module's dtype.
    """
    return sum(n * BYTES[dt] for n, dt in trainable_tensors([c for c in counts if c.kind != "full"], frozen=True))


def gradient_bytes(counts: list[ModuleCount]) -> int:
    """``.grad`` of every trainable parameter (adapters, or every base parameter with full fine-tuning), same dtype
    as the parameter; frozen weights have none."""
    return sum(n * BYTES[dt] for n, dt in trainable_tensors(counts))


def optimizer_state_bytes(counts: list[ModuleCount], name: str) -> dict[str, int]:
    """Optimizer state, split into ordinary device memory and paged (CUDA unified) memory.

    * ``adamw_torch``: ``exp_avg`` and ``exp_avg_sq`` like the parameter (torch/optim/adamw.py);
      ``step`` is a CPU scalar unless capturable/fused.
    * ``adamw_torch_fused`` (``_fused_adamw_``): the same two states, and ``step`` a 4-byte fp32
      tensor on the device per trainable tensor (``_get_scalar_dtype(is_fused=True)``).
    * ``adamw_8bit``/``paged_adamw_8bit`` (bitsandbytes ``Optimizer2State.init_state``): tensors
      with < 4096 elements keep two fp32 states; larger ones two uint8 states plus two fp32
      ``absmax`` per 256-element block, and once per optimizer the 256-entry fp32 quantization map of each state
      (``name2qmap``, moved to the device by the first ``init_state`` of an 8-bit tensor; ``qmap1``/``qmap2`` of
      every state point to it). Paged variants put tensors with >= 1e5 elements in paged memory.
    * ``paged_adamw_32bit``: two fp32 states, paged from 1e5 elements.
    * ``lion_8bit`` / ``lion_32bit`` and their paged variants (bitsandbytes ``Lion``, ``Optimizer1State.init_state``):
      as the 8-bit / 32-bit AdamW with one state (``state1``, ``absmax1``) instead of two.
    * ``sgd``: Trainer's SGD has no momentum, so no state.
    * ``adafactor`` (transformers.optimization.Adafactor, ``beta1=None``): factored second
      moment for >= 2-D tensors: one fp32 row vector and one column vector; 1-D: full fp32.
    * ``adamw_torch_8bit`` / ``adamw_torch_4bit`` (torchao 0.18.0 ``AdamW8bit`` / ``AdamW4bit``): ``exp_avg`` and
      ``exp_avg_sq`` are each an ``OptimState8bit`` (``subclass_8bit.py``: uint8 ``codes`` per element, fp32
      ``scale`` per 256-element block, a 256-entry fp32 ``qmap``) or ``OptimState4bit`` (``subclass_4bit.py``:
      two 4-bit codes per byte, fp32 ``scale`` per block, a 16-entry fp32 ``qmap``) for tensors of
      ``TORCHAO_MIN_SIZE`` elements and whole blocks, else ``zeros_like(p)`` (the parameter's dtype); ``step``
      and the ``lr`` tensor are host scalars (``torch.tensor(0.0)``).
    """
    opt = optimizer(name)
    dev = paged = 0
    qmaps = False
    for c in counts:
        if c.kind in (*FROZEN_KINDS, UNSTEPPED):  # LoRA-FA's lora_A, VeRA's projections get no state
            continue
        for _, shape in c.save_keys:
            n = math.prod(shape)
            k = c.instances
            big = opt.paged and n >= BNB_PAGED_MIN_NUMEL
            if opt.device_step:
                dev += k * 4  # fused AdamW's fp32 ``step`` on the device
            if opt.state == "adamw":
                dev += k * 2 * n * BYTES[c.dtype]
            elif opt.state == "bnb8bit":
                m = opt.states
                if n < BNB_MIN_8BIT_SIZE:
                    b = m * n * 4
                else:
                    b = m * n + m * 4 * math.ceil(n / BNB_OPTIM_BLOCKSIZE)
                    qmaps = True
                if big:
                    # state1/state2 are paged; absmax stays an ordinary tensor
                    paged += k * m * n
                    dev += k * (b - m * n)
                else:
                    dev += k * b
            elif opt.state == "bnb32bit":
                if big:
                    paged += k * opt.states * n * 4
                else:
                    dev += k * opt.states * n * 4
            elif opt.state in ("torchao8bit", "torchao4bit"):
                dev += k * 2 * torchao_state_bytes(n, BYTES[c.dtype], opt.state == "torchao4bit")
            elif opt.state == "schedulefree":
                dev += k * opt.states * n * BYTES[c.dtype]
            elif opt.state == "factored":
                if len(shape) >= 2:
                    dev += k * 4 * (shape[0] + math.prod(shape[1:]))
                else:
                    dev += k * 4 * n
            elif opt.state != "none":  # pragma: no cover - the table has no other kind
                raise QPlanError(f"optimizer {name!r}: unknown state kind {opt.state!r}")
    if qmaps:
        dev += opt.states * BNB_QMAP_BYTES
    return {"device": dev, "paged": paged}


def torchao_state_bytes(n: int, param_bytes: int, four_bit: bool) -> int:
    """One torchao low-bit AdamW state of an ``n``-element tensor (see ``optimizer_state_bytes``): quantized
    ``codes`` (``n`` bytes, ``n / 2`` for 4-bit) + ``scale`` (``4 n / 256``) + ``qmap`` (256 or 16 fp32), or the
    parameter-sized ``zeros_like(p)`` below ``TORCHAO_MIN_SIZE`` elements or off whole blocks."""
    if n < TORCHAO_MIN_SIZE or n % TORCHAO_BLOCK:
        return n * param_bytes
    codes = n // 2 if four_bit else n
    return codes + 4 * (n // TORCHAO_BLOCK) + 4 * (16 if four_bit else 256)


def optimizer_step_temp_bytes(counts: list[ModuleCount], name: str, kernels: str = "cuda") -> int:
    """Transient tensors of one optimizer step.

    ``adamw_torch`` (foreach, torch/optim/adam.py ``_multi_tensor_adam``): ``exp_avg_sq_sqrt =
    torch._foreach_sqrt(exp_avg_sqs)`` — one parameter-sized tensor per trainable tensor, all alive
    at once. Fused AdamW and bitsandbytes 8-bit/32-bit steps update in place (fused kernels). Adafactor
    (transformers' ``Adafactor.step``, a loop over parameters): ``update = grad**2 + eps`` and the approximated
    ``update`` (then ``-update``) — two fp32 copies of a tensor at a time, and for a 16-bit parameter (full
    fine-tuning of a bf16 model) also its gradient and itself in fp32 (``grad.float()``, ``p.float()``): four; the
    largest over the parameters. torchao's low-bit AdamW (``compiled``) loops over
    parameters too, each through one ``torch.compile``d ``single_param_adam``, which dequantizes both states
    to fp32 (``exp_avg.float().lerp(...)``) and quantizes them back block by block (a reduction over each block
    needs the fp32 values first): two fp32 copies of the largest tensor — derived from the function, the
    compiled kernel's buffers are not seen by the tracker (no GPU measured it). SGD: none.
    """
    tensors = trainable_tensors(counts)
    temps = optimizer(name).step_temps
    if temps == "foreach":
        if kernels == "cpu":
            # CPU parameters take the single-tensor loop (``_single_tensor_adam``): ``denom =
            # (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)``, one tensor at a time, and
            # each parameter's ``step`` is a 4-byte tensor on the same (CPU) device
            return max((n * BYTES[dt] for n, dt in tensors), default=0) * 2 + 4 * len(tensors)
        return sum(n * BYTES[dt] for n, dt in tensors)
    if temps == "adafactor":
        # a 16-bit parameter's gradient and the parameter itself are first copied to fp32 (``grad.float()``,
        # ``p_data_fp32 = p.float()``), alive with the two update copies: four fp32 copies of that tensor
        return max((4 * n * (2 if dt == "float32" else 4) for n, dt in tensors), default=0)
    if temps == "compiled":
        return 2 * 4 * max((n for n, _ in tensors), default=0)
    if temps == "lorafa":
        return lorafa_step_temp_bytes(counts)
    return 0


def lorafa_step_temp_bytes(counts: list[ModuleCount]) -> int:
    """Transients of PEFT's ``LoraFAOptimizer.step`` (peft/optimizers/lorafa.py), a Python loop over the
    parameters in order; for a ``lora_A``, ``lora_B`` pair of ``n = out * r`` fp32 elements:
    ``grad_B = (1/s²) * (grad_B @ pinv(A Aᵀ + δI))`` under bf16 autocast (``is_bf16_available()``: the cast input
    ``2n``, the product ``2n``, the scaled product ``2n``), ``grad_B.to(fp32)`` (``4n`` beside the ``2n``), then
    ``denom_B = exp_avg_sq_B.sqrt()`` (``4n``); every other trainable tensor (``m`` elements of ``b`` bytes) takes
    the plain AdamW branch, ``denom = exp_avg_sq.sqrt()`` (``b m``). The names ``grad_B``/``denom_B``/``denom``
    outlive their iteration: the previous pair's ``grad_B`` (``4p``) and ``denom_B`` (``4p``) are freed only when
    the next pair assigns its own, so a pair's peak is ``max(8p + 4n, 4p + 8n)`` over the state and gradients (the
    ``r × r`` products, ``A Aᵀ``, the identity, the pseudo-inverse, ``4 r²`` bytes each, are left out). Modules in
    inventory order, each layer's in turn (``named_parameters``' order); without bf16 (a T4) the fp32 product makes it
    ``max(8p + 8n, 4p + 8n)``: not distinguished here (at most ``4n`` of one ``lora_B``)."""
    layers = max((c.instances for c in counts if c.kind == "lora"), default=1)
    pairs = [(c, math.prod(c.save_keys[0][1])) for c in counts if c.kind == "lora"]
    plain = [(c, math.prod(shape) * BYTES[c.dtype]) for c in counts if c.kind not in ("lora", *FROZEN_KINDS, UNSTEPPED)
             for _, shape in c.save_keys]
    # named_parameters' order: a trained embedding first, then the layers (their adapters and biases), then the rest
    seq = [("pair", n) for c, n in pairs if c.shape.startswith("emb ")]
    seq += [("plain", b) for c, b in plain if c.shape.startswith("emb ")]
    layer = [("pair", n) for c, n in pairs if not c.shape.startswith("emb ")]
    layer += [("plain", b) for c, b in plain if c.instances == layers and layers > 1]
    seq += layer * layers
    seq += [("plain", b) for c, b in plain if not c.shape.startswith("emb ") and not (c.instances == layers > 1)]
    peak = pair = denom = 0  # live: the last pair's grad_B + denom_B (4 + 4 bytes each), the last plain denom
    for kind, n in seq:
        if kind == "pair":
            peak = max(peak, denom + 8 * pair + 4 * n, denom + 4 * pair + 8 * n)
            pair = n
        else:
            peak = max(peak, 8 * pair + denom + n)
            denom = n
    return peak



def dequant_temp_bytes(spec: ModelSpec, q: QuantSettings, c: int) -> int:
    """bitsandbytes dequantizes a k-bit weight to the compute dtype for each matmul
    (``MatMul4Bit``: ``F.dequantize_4bit(B, quant_state).to(A.dtype)``): a temporary as large as
    the largest quantized layer, ``c * in * out``."""
    if not q.kbit:
        return 0
    sizes = [g.in_features * g.out_features for g in spec.inventory.linear
             if is_quantized(g, q) and not idle_in_step(spec, g.pattern)]
    return c * max(sizes, default=0)


def overhead_bytes(tensor_peak: int, calibration: dict | None = None) -> dict[str, int]:
    """What the GPU holds beyond live tensors: the CUDA context (``CUDA_CONTEXT_BYTES``) and the
    caching allocator's slack (``ALLOCATOR_SLACK_FRACTION * tensor_peak``) — or, from a
    ``qplan calibrate`` file fitted on CUDA runs of the device, its measured ``cuda_context_bytes``
    and ``allocator_slack_fraction``."""
    calibration = calibration or {}
    ctx = calibration.get("cuda_context_bytes")
    slack = calibration.get("allocator_slack_fraction")
    return {
        "cuda_context": int(ctx) if ctx is not None else CUDA_CONTEXT_BYTES,
        "allocator_slack": int((slack if slack is not None else ALLOCATOR_SLACK_FRACTION) * tensor_peak),
    }

