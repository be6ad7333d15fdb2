"""qplan's vocabulary: every name a plan can hold, in one module, and one table row per optimizer.

A new option touches this module (and the one term that uses it), nowhere else: the CLI's
choices, the plan's validation, the memory terms, the trace and the backends all read these.
Torch-free: importing it costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------------- weights

#: base-weight modes: bitsandbytes 4-bit (nf4/fp4) and LLM.int8, or a plain 16/32-bit load
QUANTS = ("nf4", "fp4", "int8", "bf16", "fp16", "fp32")
#: the modes bitsandbytes quantizes (``prepare_model_for_kbit_training`` applies to these)
KBIT = ("nf4", "fp4", "int8")
FOUR_BIT = ("nf4", "fp4")
#: torch dtype names of the compute / load dtypes
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
#: every spelling a user may type for a dtype -> the torch name
DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                 "fp32": "float32", "float32": "float32"}
#: bytes per element
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1, "int8": 1, "int64": 8, "bool": 1}
#: compute dtype -> TrainingArguments' mixed precision (``bf16=True`` / ``fp16=True`` / neither)
MIXED_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}

# ------------------------------------------------------------------------------------- LoRA

PRESETS = ("qv", "attn", "mlp", "all-linear")
BIAS_MODES = ("none", "lora_only", "all")
#: PEFT 0.21.2's method names (``peft.PeftType``, lower case; tests/planner/test_ia3.py checks them): ``--peft-type``
#: plans ``PEFT_PLANNED`` and refuses the others by name
PEFT_TYPES = ("adalora", "adamss", "adaption_prompt", "beft", "boft", "c3a", "cartridge", "cpt", "deft", "delora",
              "fourierft", "frod", "glora", "gralora", "hira", "hra", "ia3", "lily", "ln_tuning", "loha", "lokr", "lora",
              "miss", "multitask_prompt_tuning", "oft", "osf", "p_tuning", "peanut", "poly", "prefix_tuning",
              "prompt_tuning", "psoft", "pvera", "randlora", "road", "shadow", "shira", "supertuning", "tinylora",
              "trainable_tokens", "unilora", "vblora", "vera", "waveft", "xlora")
#: the planned PEFT methods other than LoRA (a plan's ``method``, its section named as it): its name in text, how a
#: message names a plan of it, and PEFT's config class
PEFT_METHODS = {"ia3": ("(IA)³", "an (IA)³", "IA3Config"),
                "prompt_tuning": ("prompt tuning", "a prompt-tuning", "PromptTuningConfig"),
                "p_tuning": ("p-tuning", "a p-tuning", "PromptEncoderConfig"),
                "ln_tuning": ("LN tuning", "an LN tuning", "LNTuningConfig"), "loha": ("LoHa", "a LoHa", "LoHaConfig"),
                "lokr": ("LoKr", "a LoKr", "LoKrConfig"), "vera": ("VeRA", "a VeRA", "VeraConfig"),
                "miss": ("MiSS", "a MiSS", "MissConfig"), "c3a": ("C3A", "a C3A", "C3AConfig")}
PEFT_PLANNED = ("lora", *PEFT_METHODS)
#: adapter dtypes PEFT can hold, and their safetensors names
SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
#: ``--adapter-dtype``: the LoRA tensors' dtype (PEFT's fp32 by default; bf16 as TRL casts a quantized model's and
#: torchtune keeps them)
ADAPTER_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: every spelling ``--adapter-dtype`` takes (the short names and torch's, as ``--compute-dtype``)
ADAPTER_DTYPE_NAMES = {**ADAPTER_DTYPES, **{v: v for v in ADAPTER_DTYPES.values()}}

# --------------------------------------------------------------------------------- training

#: attention implementations transformers offers (``auto``: the architecture's default)
ATTN_IMPLS = ("sdpa", "flash_attention_2", "eager")
ATTN_CHOICES = ("auto", *ATTN_IMPLS)
#: gradient checkpointing: none, transformers/torch (``use_reentrant=False``, transformers' default), torch's
#: reentrant ``CheckpointFunction`` (``use_reentrant=True``: axolotl's and LLaMA-Factory's default), Unsloth's offload
GRAD_CKPT = ("off", "hf", "reentrant", "unsloth")
#: the modes that keep every layer's input on the device and recompute one layer in backward
HF_CKPT = ("hf", "reentrant")
BACKENDS = ("peft", "unsloth")
#: the loss: transformers' ``ForCausalLMLoss`` over the full ``T x V`` logits, Cut Cross Entropy (the loss from the
#: final hidden states and the head's weight, no logits: Apple's ml-cross-entropy as axolotl's CutCrossEntropyPlugin runs
#: it), TRL 1.16's fused LM head (SFTTrainer: the head in [4096, 32768] tiles), or Liger-Kernel's fused linear
#: cross-entropy (axolotl's LigerPlugin, ``liger_fused_linear_cross_entropy``) — ``planner.memory.loss``
LOSSES = ("full", "cce", "trl", "liger")
#: what the step trains for (``--objective``, TRL's trainer names): ``sft`` (the next token), ``dpo`` (TRL's
#: ``DPOTrainer``: each pair's chosen and rejected sequence, and the reference's log-probabilities), ``kto`` (TRL's
#: ``KTOTrainer``: unpaired completions labelled desirable or not, the KL term's mismatched rows, the reference's),
#: ``reward`` (TRL's ``RewardTrainer``: a sequence-classification model scoring each pair's chosen and rejected rows),
#: ``grpo`` (TRL's ``GRPOTrainer``: completions sampled with transformers' ``generate``, then trained on)
TRAINING_OBJECTIVES = ("sft", "dpo", "kto", "reward", "grpo")
#: the objectives whose step also runs the reference (the base with the adapters disabled, no grad) after the policy,
#: through TRL's fused LM head (``planner.objectives``)
PREFERENCE_OBJECTIVES = ("dpo", "kto")
#: Liger-Kernel's kernels inside the decoder layers (``--liger-kernels``; axolotl's ``liger_rms_norm``,
#: ``liger_glu_activation``, ``liger_rope``): each saves other tensors for backward than transformers' modules
LIGER_KERNELS = ("rms_norm", "swiglu", "rope")
#: where a plan's kernels run: a GPU, or the CPU of ``qplan run --device cpu``
KERNELS = ("cuda", "cpu")


@dataclass(frozen=True)
class Optimizer:
    """One optimizer as every part of qplan sees it.

    * ``trainer_optim``: ``TrainingArguments.optim`` (what the backends and the trace ask
      ``Trainer.get_optimizer_cls_and_kwargs`` for);
    * ``state``: the state it keeps per trainable tensor — ``adamw`` (``exp_avg`` and
      ``exp_avg_sq`` like the parameter), ``bnb8bit`` (bitsandbytes blockwise 8-bit: two uint8
      states and fp32 block constants; fp32 for small tensors), ``bnb32bit`` (two fp32 states),
      ``torchao8bit`` / ``torchao4bit`` (torchao's ``OptimState8bit`` / ``OptimState4bit``: codes, block
      scales and a code map per state; the parameter's dtype for small tensors),
      ``factored`` (Adafactor's row/column second moment), ``schedulefree`` (Defazio et al.'s schedule-free
      optimizers, package ``schedulefree``: ``z`` and, but for SGD, ``exp_avg_sq``, each like the parameter),
      ``none`` (Trainer's SGD: no momentum);
    * ``paged``: bitsandbytes puts large states in CUDA unified memory (``cudaMallocManaged``);
    * ``step_temps``: transients of one step — ``foreach`` (torch's multi-tensor AdamW: one
      parameter-sized ``sqrt`` per tensor, all alive at once; single-tensor on the CPU),
      ``adafactor`` (two fp32 copies of the largest tensor), ``compiled`` (torchao's ``torch.compile``d
      single-tensor step: two fp32 copies of the largest tensor), ``lorafa`` (PEFT's ``LoraFAOptimizer``: a loop
      whose projected gradient and ``denom`` stay alive into the next tensor's turn), ``none`` (fused / in-place kernels);
    * ``foreach``: torch picks the multi-tensor path for CUDA parameters
      (``_default_to_fused_or_foreach``); the trace asks for it explicitly (meta/CPU would not);
    * ``host_step``: the ``step`` counter is a host tensor for CUDA parameters (not counted);
    * ``device_step``: the ``step`` counter is a 4-byte fp32 tensor on the device, one per
      trainable tensor (fused AdamW: ``_get_scalar_dtype(is_fused=True)``, torch/optim/adam.py);
    * ``peft``: the optimizer is not a ``TrainingArguments.optim`` but PEFT's own (``peft.optimizers``), handed to
      ``Trainer(optimizers=...)``: ``lorafa`` is ``create_lorafa_optimizer`` (LoRA-FA: ``lora_A`` frozen, AdamW on
      ``lora_B`` with its gradient projected through ``(A Aᵀ)⁻¹``);
    * ``states``: moments per parameter — 2 for AdamW (``exp_avg``, ``exp_avg_sq``), 1 for Lion (bitsandbytes
      ``Lion``: an ``Optimizer1State``, ``state1`` only: the momentum) and for schedule-free SGD (``z``).
    """

    name: str
    trainer_optim: str
    state: str
    paged: bool = False
    step_temps: str = "none"
    foreach: bool = False
    host_step: bool = False
    device_step: bool = False
    states: int = 2
    peft: str = ""


OPTIMIZER_TABLE = (
    Optimizer("adamw_torch", "adamw_torch", "adamw", step_temps="foreach", foreach=True, host_step=True),
    Optimizer("adamw_torch_fused", "adamw_torch_fused", "adamw", device_step=True),
    Optimizer("adamw_8bit", "adamw_bnb_8bit", "bnb8bit"),
    Optimizer("paged_adamw_8bit", "paged_adamw_8bit", "bnb8bit", paged=True),
    Optimizer("paged_adamw_32bit", "paged_adamw_32bit", "bnb32bit", paged=True),
    # bitsandbytes' Lion (transformers' lion_8bit / lion_32bit and their paged variants): one state
    Optimizer("lion_8bit", "lion_8bit", "bnb8bit", states=1),
    Optimizer("paged_lion_8bit", "paged_lion_8bit", "bnb8bit", paged=True, states=1),
    Optimizer("lion_32bit", "lion_32bit", "bnb32bit", states=1),
    Optimizer("paged_lion_32bit", "paged_lion_32bit", "bnb32bit", paged=True, states=1),
    Optimizer("sgd", "sgd", "none", foreach=True, host_step=True),
    Optimizer("adafactor", "adafactor", "factored", step_temps="adafactor"),
    # torchao's low-bit AdamW (transformers' optim names; torchao >= 0.11 ``torchao.optim``)
    Optimizer("adamw_torch_8bit", "adamw_torch_8bit", "torchao8bit", step_temps="compiled", host_step=True),
    Optimizer("adamw_torch_4bit", "adamw_torch_4bit", "torchao4bit", step_temps="compiled", host_step=True),
    # schedule-free (schedulefree 1.4, transformers' optim names): foreach by default on every device
    # (``foreach=hasattr(torch, "_foreach_mul_")``); AdamW's and RAdam's step divide ``exp_avg_sq`` into a new
    # parameter-sized ``denom`` per tensor (``torch._foreach_div``), SGD's is in place
    Optimizer("schedule_free_adamw", "schedule_free_adamw", "schedulefree", step_temps="foreach"),
    Optimizer("schedule_free_radam", "schedule_free_radam", "schedulefree", step_temps="foreach"),
    Optimizer("schedule_free_sgd", "schedule_free_sgd", "schedulefree", states=1),
    # PEFT's LoRA-FA (peft.optimizers.create_lorafa_optimizer; PEFT's method comparison runs it): not a Trainer optim
    Optimizer("lorafa", "lorafa", "adamw", step_temps="lorafa", host_step=True, peft="lorafa"),
)
OPTIMIZERS = {o.name: o for o in OPTIMIZER_TABLE}

# ------------------------------------------------------------------------------ measurement

#: what a byte of a training step is, for the trace and for ``qplan run``'s tracker alike
#: (``qplan.observe.summary.category`` decides; ``tensor_peak`` = every category but
#: ``optimizer_paged``, which lives in unified memory outside the device allocator)
CATEGORIES = ("weights", "adapters", "gradients", "optimizer", "optimizer_paged", "activations", "logits",
              "temporaries")
#: phases of a step as the observers mark them
PHASES = ("forward", "backward", "optimizer")
#: the planner's moments of a step (``prediction.memory_detail.phases``) that fall in each phase an
#: observer marks (``qplan run`` of a GRPO plan marks its ``generation`` too): the loss is computed inside the model's
#: forward; layer 0's backward is in the
#: backward pass; an eager-attention layer's forward runs in the forward and again, recomputed, in
#: the backward
MOMENTS_OF_PHASE = {"forward": ("forward", "attention", "unshard", "mlp_forward", "reference"),
                    "generation": ("generation",),
                    "backward": ("backward", "layers", "layers_last", "attention", "embeddings"),
                    "optimizer": ("optimizer",)}
#: what a person calls each moment
MOMENT_NAMES = {"forward": "loss (end of forward)", "backward": "start of backward", "layers": "layer-0 backward",
                "layers_last": "last layer's backward (every checkpoint alive)", "optimizer": "optimizer step",
                "attention": "eager attention forward",
                "unshard": "FSDP first all-gathers (root + layer 0)",
                "mlp_forward": "a layer's MLP forward",
                "embeddings": "embeddings' backward", "reference": "DPO reference forward (its head)",
                "generation": "GRPO generation (transformers' generate)",
                "precompute": "precompute_ref_log_probs pass (before training)"}


def optimizer(name: str) -> Optimizer:
    """The table row of ``name`` (KeyError for names outside the vocabulary: validate first)."""
    return OPTIMIZERS[name]

#: multi-GPU engines: DDP, FSDP2 full shard, DeepSpeed ZeRO-2 / ZeRO-3, FSDP2 hybrid shard (sharded inside a node,
#: replicated across nodes) (``planner.memory.sharding``)
STRATEGIES = ("ddp", "fsdp", "zero2", "zero3", "hsdp")

#: the keys of ``prediction.memory`` in plan.json, in order
MEMORY_KEYS = ("weights", "weights_footprint", "adapters", "gradients", "optimizer", "activations",
               "logits", "temporaries", "overhead", "tensor_peak", "peak")
