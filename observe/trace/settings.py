"""What a trace runs: the settings of one traced training step, validated once, frozen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qplan.planner.vocab import KERNELS, LOSSES, OPTIMIZERS, QUANTS

#: the trace's names for the compute dtype (``--compute-dtype`` spellings)
DTYPES = ("bf16", "fp16", "fp32")
DEVICES = ("meta", "cpu")
MAX_GRAD_NORM = 1.0  # TrainingArguments.max_grad_norm default


@dataclass(frozen=True)
class TraceSettings:
    """One traced step. ``lora``: the plan's ``lora`` section (``qplan.hf.lora_kwargs`` keys);
    ``kernels``: whose kernels a meta trace mirrors, ``cuda`` (a GPU run) or ``cpu`` (what
    ``device="cpu"`` really runs: the oracle the meta trace is checked against)."""

    quant: str
    double_quant: bool
    compute_dtype: str
    upcast_kbit: bool
    lora: dict[str, Any] = field(hash=False)
    batch_size: int
    seq_len: int
    grad_ckpt: bool
    optimizer: str
    attn_impl: str = "sdpa"
    device: str = "meta"
    steps: int = 1
    seed: int = 0
    kernels: str = "cuda"
    #: also count FLOPs per step with ``torch.utils.flop_counter.FlopCounterMode`` (outermost mode,
    #: so it sees the stand-ins' matmuls: what the GPU kernels compute)
    count_flops: bool = False
    #: ``bnb_4bit_quant_storage`` (a multi-GPU plan that shards 4-bit weights), else uint8
    quant_storage: str | None = None
    #: ``torch.utils.checkpoint(use_reentrant=True)`` (axolotl's and LLaMA-Factory's default) instead of
    #: transformers' non-reentrant default
    reentrant: bool = False
    #: ``full`` (transformers' loss over the logits), ``cce`` (Cut Cross Entropy, ``observe.trace.cce``) or ``trl``
    #: (TRL's fused LM head, ``observe.trace.trl_head``): the fused ones on meta only
    loss: str = "full"
    #: Liger-Kernel's kernels in the decoder layers (``vocab.LIGER_KERNELS``, ``observe.trace.liger``): meta only
    liger_kernels: tuple[str, ...] = ()
    #: full fine-tuning: no adapters, every parameter of the model trains (``requires_grad_(True)``, as a model
    #: handed to ``Trainer`` without PEFT); ``lora`` is then unused
    full: bool = False
    #: a PEFT method other than LoRA (``planner.methods``): its name and the plan's section of it (``IA3Config``'s
    #: target and feed-forward modules, ``PromptTuningConfig``'s virtual tokens); ``lora`` is then unused
    method: str = ""
    section: dict[str, Any] | None = field(default=None, hash=False)
    #: ``sft`` (the Trainer's loss), ``dpo``: TRL's ``DPOTrainer`` step (``observe.trace.dpo``) on ``batch_size``
    #: pairs, chosen and rejected concatenated (``2 batch_size`` rows), or ``kto``: ``KTOTrainer``'s
    #: (``observe.trace.kto``) on ``batch_size`` rows and as many KL rows
    objective: str = "sft"
    #: the batch is padded (DPO: a pair's chosen and rejected differ in length): the ``attention_mask`` the step passes
    #: has zeros, so attention gets a 4-D mask (``patches.padding_on_meta``; a step without a mask is unaffected)
    padded: bool = False
    #: ``grpo``: ``GRPOTrainer``'s step (``observe.trace.grpo``) on ``batch_size`` rows of this many prompt positions
    #: and ``seq_len - prompt_len`` completion positions; ``beta``: its KL coefficient
    prompt_len: int = 0
    beta: float = 0.0
    #: DPO/KTO with ``precompute_ref_log_probs``: the step reads the reference's log-probabilities from the batch (no
    #: reference forward, no reference model with full fine-tuning); ``precompute_pass``: trace the pass before
    #: training instead (``observe.trace.precompute``), on batches of ``precompute_batch`` pairs (rows for KTO)
    precompute_ref: bool = False
    precompute_pass: bool = False
    precompute_batch: int = 0

    @property
    def rows(self) -> int:
        """The rows of the model's batch: DPO runs each pair's chosen and rejected sequence as two rows."""
        return 2 * self.batch_size if self.objective in ("dpo", "reward") else self.batch_size

    @property
    def virtual_tokens(self) -> int:
        """Prompt tuning's tokens prepended to every row (the logits have ``seq_len + virtual_tokens`` positions)."""
        prompt = self.method in ("prompt_tuning", "p_tuning")
        return int((self.section or {}).get("num_virtual_tokens", 0)) if prompt else 0

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {QUANTS}, got {self.quant!r}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {DTYPES}, got {self.compute_dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be 'meta' or 'cpu', got {self.device!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be 'cuda' or 'cpu', got {self.kernels!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss != "full" and (self.device != "meta" or self.kernels != "cuda"):
            raise ValueError(f"loss {self.loss!r} is traced as a GPU runs it (Triton kernels stood in): on meta, CUDA kernels")
        if self.liger_kernels and (self.device != "meta" or self.kernels != "cuda"):
            raise ValueError("Liger's kernels are traced as a GPU runs them (Triton kernels stood in): on meta, CUDA kernels")
        if self.full and self.quant in ("nf4", "fp4", "int8"):
            raise ValueError("full fine-tuning trains the weights: a bitsandbytes-quantized base cannot be trained")
        if self.objective not in ("sft", "dpo", "kto", "reward", "grpo"):
            raise ValueError(f"objective must be 'sft', 'dpo', 'kto', 'reward' or 'grpo', got {self.objective!r}")
        if self.objective == "grpo" and not 0 < self.prompt_len < self.seq_len:
            raise ValueError("a GRPO row has prompt_len prompt positions and at least one completion position")
        if self.objective == "reward" and (self.loss != "full" or self.full or self.method):
            raise ValueError("a reward model is traced as TRL 1.16's RewardTrainer runs LoRA (its score head, no fused "
                             "loss)")
        if self.objective in ("dpo", "kto", "grpo") and (self.loss != "trl" or self.method or (
                self.full and self.objective == "grpo")):
            raise ValueError(f"{self.objective.upper()} is traced as TRL 1.16's trainer runs LoRA (DPO and KTO: full "
                             "fine-tuning too): its fused LM head (loss 'trl')")
        if (self.precompute_ref or self.precompute_pass) and self.objective not in ("dpo", "kto"):
            raise ValueError("precompute_ref_log_probs is DPOTrainer's and KTOTrainer's")
        if self.precompute_pass and (not self.precompute_ref or self.precompute_batch < 1):
            raise ValueError("the precompute pass runs with precompute_ref and a batch of at least one")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("steps >= 1, batch_size >= 1 and seq_len >= 2 are required")

    @property
    def amp(self) -> bool:
        """Autocast on (Trainer ``bf16=True``/``fp16=True``)."""
        return self.compute_dtype in ("bf16", "fp16")

    @property
    def amp_device(self) -> str:
        """The device whose autocast policy applies (emulated on meta)."""
        return "cuda" if self.kernels == "cuda" else "cpu"

    @property
    def load_dtype(self) -> str:
        """The compute dtype for k-bit plans, else the weight dtype."""
        return self.compute_dtype if self.quant in ("nf4", "fp4", "int8") else self.quant

    @property
    def quant_section(self) -> dict[str, Any]:
        """As a plan's ``quant`` section (what ``qplan.hf.bnb_config`` reads)."""
        return {"quant": self.quant, "double_quant": self.double_quant, "compute_dtype": self.compute_dtype,
                "quant_storage": self.quant_storage}

    @property
    def lora_section(self) -> dict[str, Any]:
        return dict(self.lora)
