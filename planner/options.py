"""The planning options: one typed model, the single source of every option of a plan.

``PlanOptions`` is what ``make_plan`` takes (``qplan estimate``'s options); ``FitOptions`` what
``qplan fit`` searches with. Each field carries, as data on its type:

* its default (the field's default), its bounds (``planner.bounds``) and its choices (``Literal``);
* its help text and how the command line spells it (``Meta(description=..., extra=...)``):
  ``flag`` (default ``--field-name``), ``short``, ``negatable`` (``--x/--no-x``), ``section``.

From it come the click options of ``qplan estimate`` and ``qplan fit`` (``qplan.cli.plan_commands``),
``qplan serve``'s query parsing (it parses with those very commands), the names the ``--from-config``
readers map keys to (``planner.interop.trainer_configs`` returns PlanOptions fields, checked), and
the option reference ``docs/options.md`` (``python -m qplan.cli.reference``; a test fails when it
drifts). Adding an option means adding a field here and reading it where it takes effect.

Torch-free and click-free: msgspec validates, one line naming the flag.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from qplan.planner.bounds import (
    MAX_NAME,
    Alpha,
    Batch,
    Context,
    Dropout,
    GpuCount,
    NonEmpty,
    Rank,
    Tokens,
    lit,
)
from qplan.planner.data.batching import BATCHINGS, PACKING_STRATEGIES
from qplan.planner.data.formats import FORMATS as DATA_FORMATS
from qplan.planner.data.formats import LONG_SAMPLES
from qplan.planner.errors import QPlanError
from qplan.planner.validate import explain
from qplan.planner.vocab import (
    ADAPTER_DTYPE_NAMES,
    ATTN_CHOICES,
    BACKENDS,
    BIAS_MODES,
    DTYPE_ALIASES,
    LOSSES,
    OPTIMIZERS,
    PRESETS,
    QUANTS,
    STRATEGIES,
    TRAINING_OBJECTIVES,
)

MODEL, LORA, QUANT, TRAINING, DATA, DEVICE, TIME, MULTI, SEARCH = (
    "Model", "LoRA", "Quantization", "Training", "Your data", "Device", "Time and cost", "Several GPUs", "Search")


def _f(t: Any, help: str, **cli: Any) -> Any:
    """A field's type with its help text and command-line spelling attached."""
    return Annotated[t, Meta(description=help, extra=cli)]


Text = Annotated[str, Meta(max_length=16384)]
Names = Text | list[NonEmpty]
Path_ = Annotated[str, Meta(min_length=1, max_length=4096)]
Price = Annotated[float, Meta(ge=0, le=1e6)]
Epochs = Annotated[float, Meta(gt=0, le=10_000)]
Targets = Annotated[str, Meta(min_length=1, max_length=16384)]

#: --quant when none is given: QLoRA's, and full fine-tuning's (a model loaded in bf16, as its checkpoint is)
DEFAULT_QUANT, FULL_QUANT = "nf4", "bf16"

_MODEL_HELP = ("bundled model name (see `qplan models`), a config.json, a model directory or a Hub id "
               "ORG/NAME[@REV]")


class PlanOptions(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The options of one plan (``make_plan``, ``qplan estimate``, ``/api/estimate``)."""

    model: _f(Annotated[str, Meta(max_length=MAX_NAME)] | None, _MODEL_HELP, short="-m", section=MODEL) = None
    r: _f(Rank, "LoRA rank", section=LORA) = 16
    alpha: _f(Alpha | None, "LoRA alpha [default: 2*r]", section=LORA) = None
    dropout: _f(Dropout | None, "LoRA dropout [default: 0.05; 0 where PEFT adapts fused MoE experts, "
                                "which refuse dropout]", section=LORA) = None
    peft_type: _f(Annotated[str, Meta(min_length=1, max_length=64)], "PEFT method (PEFT's own name): lora (with "
                  "--dora, --rslora, --optimizer lorafa for its variants), loha, lokr (--r, --alpha, --targets), vera, miss "
                  "(--r, --targets), c3a (--block-size, --targets), ia3, ln_tuning, prompt_tuning or p_tuning; PEFT's "
                  "other methods are refused by name",
                  section=LORA) = "lora"
    targets: _f(Targets | None, f"preset {'|'.join(PRESETS)}, or comma-separated module names [default: all-linear; "
                "with --peft-type ia3 PEFT's IA3 targets for the model type, e.g. k_proj,v_proj,down_proj; with "
                "--peft-type ln_tuning the norms to tune, PEFT's for the model type by default]",
                section=LORA) = None
    feedforward_modules: _f(Names, "--peft-type ia3: the targets scaled on their input (PEFT's feedforward_modules) "
                            "[default: PEFT's for the model type, e.g. down_proj; none: no module]", section=LORA) = ""
    num_virtual_tokens: _f(Annotated[int, Meta(ge=1, le=1_000_000)] | None, "--peft-type prompt_tuning, p_tuning: the "
                           "trained virtual tokens prepended to every row (PEFT's num_virtual_tokens; required)",
                           section=LORA) = None
    decompose_factor: _f(Annotated[int, Meta(ge=-1, le=1_000_000)] | None, "--peft-type lokr: the Kronecker "
                         "factorization's divider (PEFT's decompose_factor; -1: near the square root, PEFT's default)",
                         section=LORA) = None
    miss_init: _f(Annotated[str, Meta(max_length=16)] | None, "--peft-type miss: PEFT's init_weights: true (zeros, "
                  "PEFT's default) or false (random): an (r, out) block; mini: an (r, mini_r) block repeated along the "
                  "output; bat: (out/r, r, r) blocks, the whole weight rebuilt in fp32 at every forward [default: true]",
                  section=LORA) = None
    block_size: _f(Annotated[int, Meta(ge=1, le=1_000_000)] | None, "--peft-type c3a: the circulant blocks' size "
                   "(PEFT's block_size; it must divide every target's in_features and out_features) [default: 256]",
                   section=LORA) = None
    mini_r: _f(Annotated[int, Meta(ge=1, le=1_000_000)] | None, "--peft-type miss --miss-init mini: the block's width "
               "(PEFT's mini_r; it must divide every target's out_features) [default: 1]", section=LORA) = None
    encoder_hidden_size: _f(Annotated[int, Meta(ge=1, le=1_000_000)] | None, "--peft-type p_tuning: the width of the "
                            "prompt encoder's MLP (PEFT's encoder_hidden_size; required)", section=LORA) = None
    bias: _f(lit(BIAS_MODES), "which biases train (PEFT's bias)", section=LORA) = "none"
    dora: _f(bool, "DoRA: one magnitude vector per adapted module", section=LORA) = False
    rslora: _f(bool, "rank-stabilised scaling alpha/sqrt(r)", section=LORA) = False
    target_parameters: _f(Names, "comma-separated parameters to adapt (PEFT's target_parameters, "
                                 "e.g. mlp.experts.gate_up_proj)", section=LORA) = ""
    modules_to_save: _f(Names, "comma-separated modules trained in full (e.g. embed_tokens,lm_head)",
                        section=LORA) = ""
    adapter_dtype: _f(lit(sorted(ADAPTER_DTYPE_NAMES)), "dtype of the LoRA tensors (A, B, DoRA magnitudes): fp32 as PEFT makes "
                      "them; bf16 as TRL casts a quantized model's and torchtune keeps them", section=LORA) = "fp32"
    full: _f(bool, "full fine-tuning: every parameter trains, no adapter (HF Trainer without PEFT; the LoRA options "
             "do not apply; the weights load in bf16 unless --quant bf16/fp16/fp32 says otherwise)", section=LORA) = False
    quant: _f(lit(QUANTS) | None, "base weights: bitsandbytes 4-bit (nf4, fp4), LLM.int8, or a plain 16/32-bit load "
              f"[default: {DEFAULT_QUANT}; {FULL_QUANT} with --full or --peft-type ia3]", section=QUANT) = None
    double_quant: _f(bool, "4-bit: quantize the absmax constants", negatable=True, section=QUANT) = True
    compute_dtype: _f(lit(sorted(DTYPE_ALIASES)), "dtype of the matmuls (bnb_4bit_compute_dtype; autocast); fp32 with "
                      "--quant bf16/fp16 is a pure 16-bit step: no autocast, matmuls in the weights' dtype (PEFT's "
                      "benchmark harness, torchtune)", section=QUANT) = "bf16"
    upcast: _f(bool, "k-bit plans: prepare_model_for_kbit_training casts unquantized params to fp32",
               negatable=True, section=QUANT) = True
    gpu: _f(Annotated[str, Meta(max_length=MAX_NAME)] | None, "target GPU (see `qplan gpus`), or a device file "
            "(.json)", section=DEVICE) = None
    seq_len: _f(Context | None, "tokens per sequence [default: 512; with --data: the worst batch's padded length]",
                section=TRAINING) = None
    batch_size: _f(Batch, "sequences per micro-batch", section=TRAINING) = 1
    grad_accum: _f(Batch, "micro-batches per optimizer step", section=TRAINING) = 1
    grad_ckpt: _f(bool, "gradient checkpointing", negatable=True, section=TRAINING) = True
    reentrant: _f(bool, "with --grad-ckpt: torch's reentrant checkpoint (use_reentrant=True: axolotl's and "
                  "LLaMA-Factory's default) instead of transformers' non-reentrant one", section=TRAINING) = False
    optimizer: _f(lit(OPTIMIZERS), "optimizer (TrainingArguments.optim; adamw_8bit is adamw_bnb_8bit; lorafa is PEFT's "
                  "LoRA-FA, lora_A frozen)",
                  section=TRAINING) = "adamw_torch"
    attn_impl: _f(lit(ATTN_CHOICES), "attention (auto: what transformers picks for the model, e.g. eager for "
                  "Gemma-2)", flag="--attn", section=TRAINING) = "auto"
    loss: _f(lit(LOSSES), "full: transformers' loss over the T x V logits; cce: Cut Cross Entropy (axolotl's "
             "CutCrossEntropyPlugin; Ampere or newer), no logits; trl: TRL 1.16 SFTTrainer's fused LM head (the head in "
             "4096 x 32768 tiles); liger: Liger-Kernel's fused linear cross-entropy (axolotl's LigerPlugin, "
             "liger_fused_linear_cross_entropy)", section=TRAINING) = "full"
    objective: _f(lit(TRAINING_OBJECTIVES), "sft: next-token training; dpo: TRL 1.16's DPOTrainer — each of the "
                  "--batch-size pairs runs its chosen and rejected sequence (2 x batch rows of --seq-len, TRL's "
                  "max_length, padded to the longer), then the reference (the base with the adapters disabled, no "
                  "grad), through TRL's fused LM head (--loss trl); TRL's disable_dropout: LoRA dropout 0; kto: TRL "
                  "1.16's KTOTrainer — --batch-size unpaired completions (at least 2), the KL term's mismatched rows "
                  "through the policy and the reference without grad, then the reference, through the same head; "
                  "reward: TRL 1.16's RewardTrainer — AutoModelForSequenceClassification (a score head, no logits; PEFT "
                  "trains a copy of it) on each pair's chosen and rejected rows, a 16/32-bit base; grpo: TRL 1.16's "
                  "GRPOTrainer — --batch-size completions per micro-batch, generated with transformers' generate "
                  "(--steps-per-generation micro-batches' worth at once), then trained on through TRL's fused head",
                  section=TRAINING) = "sft"
    num_generations: _f(Batch | None, "with --objective grpo: completions sampled per prompt (TRL's num_generations) "
                        "[default: 8]", section=TRAINING) = None
    max_prompt_length: _f(Context | None, "with --objective grpo: tokens of the longest prompt (TRL 1.16 does not "
                          "truncate prompts; the others are left-padded to it) [default: 512]", section=TRAINING) = None
    max_completion_length: _f(Context | None, "with --objective grpo: tokens generated per completion, planned to the "
                              "end (TRL's max_completion_length) [default: 512]", section=TRAINING) = None
    steps_per_generation: _f(Batch | None, "with --objective grpo: micro-batches per generation batch (TRL's "
                             "steps_per_generation): --batch-size x this many completions are generated at once "
                             "[default: --grad-accum]", section=TRAINING) = None
    vllm: _f(lit(("colocate", "server")) | None, "with --objective grpo: generate with vLLM (TRL's use_vllm, vllm_mode): "
             "colocate (vLLM in the trainer's process, holding --vllm-gpu-memory-utilization of the GPU) or server "
             "(`trl vllm-serve` on other GPUs) [default: transformers' generate]", section=TRAINING) = None
    vllm_gpu_memory_utilization: _f(Annotated[float, Meta(gt=0, le=1)] | None, "with --vllm colocate: the fraction of "
                                    "the whole GPU vLLM takes for its weights, activations and KV blocks (TRL's "
                                    "vllm_gpu_memory_utilization) [default: 0.3]", section=TRAINING) = None
    vllm_sleep: _f(bool, "with --vllm colocate: vLLM sleeps during the training step (TRL's vllm_enable_sleep_mode: "
                   "its weights and KV cache released, re-made for each generation)", section=TRAINING) = False
    beta: _f(Annotated[float, Meta(ge=0, le=1e6)], "with --objective grpo: the KL coefficient (TRL's beta; above 0 "
             "the reference, the base without the adapters, scores each generation batch without grad)",
             section=TRAINING) = 0.0
    precompute_ref_log_probs: _f(bool, "with --objective dpo|kto: the reference's log-probabilities computed in a pass "
                                 "before training (TRL's precompute_ref_log_probs): no reference forward in the step, "
                                 "no reference model with --full; the pass is a moment of its own",
                                 section=TRAINING) = False
    precompute_ref_batch_size: _f(Batch | None, "with --precompute-ref-log-probs: pairs (KTO: rows) a batch of the pass "
                                  "(TRL's precompute_ref_batch_size) [default: --batch-size]", section=TRAINING) = None
    liger_kernels: _f(Names, "comma-separated Liger-Kernel kernels in the decoder layers: rms_norm, swiglu, rope "
                      "(axolotl's liger_rms_norm, liger_glu_activation, liger_rope)", section=TRAINING) = ""
    backend: _f(lit(BACKENDS), "the trainer `qplan run` uses (see `qplan backends`); unsloth plans Unsloth's "
                "kernels", section=TRAINING) = "peft"
    data: _f(Path_ | None, "your dataset (JSONL, JSON, CSV, Parquet, Arrow, or a datasets save_to_disk folder): "
             "its worst batch sets --seq-len, its tokens x --epochs the time", section=DATA) = None
    tokenizer: _f(Path_ | None, "with --data: a tokenizer folder, or a Hub id in the HF cache [default: the model's "
                  "folder or its Hub id]", section=DATA) = None
    data_format: _f(lit(DATA_FORMATS), "with --data: how a record becomes a sequence, as TRL's SFTTrainer does "
                    "(auto: from the first record's fields; preference: DPOTrainer's prompt/chosen/rejected pairs, for "
                    "--objective dpo; unpaired: KTOTrainer's prompt/completion/label rows, for --objective kto), or "
                    "as an axolotl dataset type does (axolotl:TYPE; --max-seq-len is then axolotl's sequence_len)",
                    section=DATA) = "auto"
    max_seq_len: _f(Context | None, "with --data: truncate each sample to this many tokens (TRL's max_length, keep "
                    "the start; TRL defaults to 1024, the plain Trainer does not truncate) [default: none]",
                    section=DATA) = None
    batching: _f(lit(BATCHINGS), "with --data: padding (shuffled, each batch padded to its longest: the Trainer's "
                 "default), sequential (file order), group_by_length, buckets (PEFT's benchmark harness: buckets of "
                 "20 batches sorted longest first), or packing (TRL, needs --max-seq-len)",
                 section=DATA) = "padding"
    packing_strategy: _f(lit(PACKING_STRATEGIES), "with --batching packing: bfd (TRL's default, best-fit decreasing, "
                         "padding-free) or wrapped (concatenate and cut)", section=DATA) = "bfd"
    pad_to_multiple_of: _f(Batch | None, "with --data: the collator pads each batch to a multiple of this (TRL's "
                           "pad_to_multiple_of; 1: to the longest) [default: the trainer's — none for TRL, 64 for "
                           "axolotl]", section=DATA) = None
    long_samples: _f(lit(LONG_SAMPLES), "with --data: a sample over --max-seq-len is truncated (TRL) or dropped "
                     "(axolotl's default), or raise stops (axolotl's excess_length_strategy) [auto: the trainer's]",
                     section=DATA) = "auto"
    largest_first: _f(bool, "with --data: `qplan run` trains the batch holding the longest sample first (an OOM comes "
                      "at once, not after an hour); the rest of the order is unchanged", section=DATA) = False
    strict_dtype: _f(bool, "fail instead of switching bf16 to fp16 on GPUs without bf16", section=DEVICE) = False
    tokens: _f(Tokens | None, "tokens the run trains on: total time (needs --gpu)", section=TIME) = None
    dataset_tokens: _f(Tokens | None, "tokens in the dataset (with --epochs)", section=TIME) = None
    epochs: _f(Epochs | None, "passes over --dataset-tokens or --data [--data: 1]", section=TIME) = None
    price_per_hour: _f(Price | None, "price of one GPU-hour: the run's cost", section=TIME) = None
    calibration: _f(Path_ | None, "a calibration file from `qplan calibrate` (fitted efficiency for the --gpu)",
                    section=TIME) = None
    gpus: _f(GpuCount, "GPUs per node (memory is then per rank)", section=MULTI) = 1
    nodes: _f(GpuCount, "nodes", section=MULTI) = 1
    strategy: _f(lit(STRATEGIES) | None, "multi-GPU engine: ddp, fsdp (FSDP2 full shard), zero2, zero3 "
                 "(DeepSpeed), hsdp (FSDP2 sharded inside a node, replicated across --nodes) [default: ddp]",
                 section=MULTI) = None
    cpu_offload: _f(bool, "FSDP parameter / ZeRO optimizer offload to host memory", section=MULTI) = False
    network_gbps: _f(Annotated[float, Meta(gt=0, le=1e6)] | None,
                     "the network between nodes: each node's bandwidth one way in Gbit/s, its NICs together (400: one "
                     "NDR InfiniBand port); the step time then counts the communication across nodes (a ring bound)",
                     section=MULTI) = None


OBJECTIVES = ("memory", "time", "cost")


class FitOptions(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The options of ``qplan fit`` (``/api/fit``): what is fixed, what is searched, how it is ranked.
    A plan option left out (None) is searched."""

    model: _f(Annotated[str, Meta(max_length=MAX_NAME)] | None, "as for estimate (or from --from-config)",
              short="-m", section=MODEL) = None
    gpu: _f(Annotated[str, Meta(max_length=16384)], "a catalog GPU, a comma-separated list, or all",
            required=True, section=DEVICE)
    seq_len: _f(Context | None, "fix the sequence length (else search it; with --data: the worst batch's)",
                section=SEARCH) = None
    data: _f(Path_ | None, "as for estimate: the dataset's worst batch fixes the sequence length", section=DATA) = None
    tokenizer: _f(Path_ | None, "as for estimate (with --data)", section=DATA) = None
    data_format: _f(lit(DATA_FORMATS), "as for estimate (with --data)", section=DATA) = "auto"
    max_seq_len: _f(Context | None, "as for estimate (with --data)", section=DATA) = None
    batching: _f(lit(BATCHINGS), "as for estimate (with --data); padding and group_by_length pad to the longest "
                 "sample, whatever the batch size", section=DATA) = "padding"
    packing_strategy: _f(lit(PACKING_STRATEGIES), "as for estimate (with --batching packing)", section=DATA) = "bfd"
    pad_to_multiple_of: _f(Batch | None, "as for estimate (with --data)", section=DATA) = None
    long_samples: _f(lit(LONG_SAMPLES), "as for estimate (with --data)", section=DATA) = "auto"
    batch_size: _f(Batch | None, "fix the batch size (else search it)", section=SEARCH) = None
    full: _f(bool, "search full fine-tuning plans (every parameter trains: batch, sequence, checkpointing and "
             "optimizer searched; the weights bf16 unless --quant bf16/fp16/fp32; rank and targets do not apply)",
             section=SEARCH) = False
    quant: _f(lit(QUANTS) | None, "fix the quantization (else search nf4, int8, bf16)", section=SEARCH) = None
    r: _f(Rank | None, "fix the rank (else search 8, 16, 32, 64)", section=SEARCH) = None
    targets: _f(Targets | None, "fix the targets (else search qv, attn, all-linear)", section=SEARCH) = None
    optimizer: _f(lit(OPTIMIZERS) | None, "fix the optimizer (else search adamw_torch, adamw_8bit, "
                  "paged_adamw_8bit)", section=SEARCH) = None
    reentrant: _f(bool, "as for estimate: checkpointing, where a plan has it, is torch's reentrant checkpoint "
                  "(axolotl's and LLaMA-Factory's default)", section=SEARCH) = False
    loss: _f(lit(LOSSES), "as for estimate: the full logits, Cut Cross Entropy, TRL's fused LM head or Liger's "
             "fused linear cross-entropy",
             section=SEARCH) = "full"
    adapter_dtype: _f(lit(sorted(ADAPTER_DTYPE_NAMES)), "as for estimate: the LoRA tensors' dtype (every plan's)",
                      section=SEARCH) = "fp32"
    liger_kernels: _f(Names, "as for estimate: Liger-Kernel's kernels in the decoder layers (every plan's)",
                      section=SEARCH) = ""
    top: _f(Annotated[int, Meta(ge=1, le=100_000)], "how many plans to list", section=SEARCH) = 10
    objective: _f(lit(OBJECTIVES), "rank by tokens per step (memory), tokens/s (time) or cost per million tokens "
                  "(cost); time and cost keep the trained model: only the GPU, the micro-batch x accumulation "
                  "split of --global-batch and checkpointing are searched (rank, targets, quant, optimizer and "
                  "sequence length as given, else estimate's defaults)", section=SEARCH) = "memory"
    global_batch: _f(Batch | None, "with --objective time/cost: sequences per optimizer step, kept; split into "
                     "micro-batch x gradient accumulation [default: --batch-size, else 1]", section=SEARCH) = None
    search_recipe: _f(bool, "with --objective time/cost: also search rank, targets, quant, optimizer, sequence "
                      "length and batch (each row says what it changed from the given or default recipe)",
                      section=SEARCH) = False
    tokens: _f(Tokens | None, "tokens the run trains on: total time/cost", section=TIME) = None
    price_per_hour: _f(Annotated[str, Meta(max_length=16384)] | None, "price of a GPU-hour: a number, or "
                       "NAME=PRICE,... per GPU", section=TIME) = None
    prices: _f(Path_ | None, "a price file: JSON or YAML mapping GPU names to prices per GPU-hour (qplan invents "
               "none: a GPU without a price is ranked by time only)", section=TIME) = None
    calibration: _f(Path_ | None, "a calibration file from `qplan calibrate` for the --gpu", section=TIME) = None
    max_gpus: _f(Annotated[int, Meta(ge=1, le=4096)] | None, "search the fewest GPUs (1..N) and the strategy (ddp, "
                 "zero2, fsdp, zero3, offload) that fit", section=MULTI) = None
    upcast: _f(bool, "with --max-gpus: k-bit plans' fp32 upcast of unquantized params", negatable=True,
               section=MULTI) = True


# ------------------------------------------------------------------------------ introspection


@dataclass(frozen=True)
class OptionInfo:
    """One field as a command line and a reference page see it."""

    name: str
    flag: str
    help: str
    kind: str  # int, float, str, bool
    default: Any
    required: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    bounds: tuple[tuple[str, Any], ...] = ()
    short: str | None = None
    negatable: bool = False
    section: str = ""

    @property
    def negative_flag(self) -> str:
        return "--no-" + self.flag[2:]

    def bounds_text(self) -> str:
        sym = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}
        return ", ".join(f"{sym[k]} {v:,}" if isinstance(v, int) else f"{sym[k]} {v:g}" for k, v in self.bounds)


def _unwrap(t: Any) -> tuple[Any, list[Meta]]:
    metas: list[Meta] = []
    while typing.get_origin(t) is Annotated:
        args = typing.get_args(t)
        t = args[0]
        metas += [m for m in args[1:] if isinstance(m, Meta)]
    return t, metas


def option_infos(cls: type[Struct]) -> list[OptionInfo]:
    """The fields of ``cls`` (``PlanOptions``/``FitOptions``) in order, as ``OptionInfo``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in msgspec.structs.fields(cls):
        t, metas = _unwrap(hints[f.name])  # nested Annotated types flatten: bounds and help side by side
        members = [t]
        if typing.get_origin(t) in (typing.Union, types.UnionType):
            members = list(typing.get_args(t))
        nullable = type(None) in members
        first, inner = _unwrap(next(m for m in members if m is not type(None)))
        metas += inner
        choices = tuple(typing.get_args(first)) if typing.get_origin(first) is typing.Literal else None
        kind = "str" if choices else {int: "int", float: "float", bool: "bool"}.get(first, "str")
        bounds = tuple((k, getattr(m, k)) for m in metas for k in ("ge", "gt", "le", "lt")
                       if getattr(m, k) is not None)
        help_ = next((m.description for m in metas if m.description), "")
        extra = {k: v for m in metas if m.extra for k, v in m.extra.items()}
        out.append(OptionInfo(
            name=f.name, flag=extra.get("flag", "--" + f.name.replace("_", "-")), help=help_,
            kind=kind, default=None if f.required else f.default, required=f.required or bool(extra.get("required")),
            choices=choices, nullable=nullable, bounds=bounds, short=extra.get("short"),
            negatable=bool(extra.get("negatable")), section=extra.get("section", "")))
    return out


def field_names(cls: type[Struct] = PlanOptions) -> tuple[str, ...]:
    return tuple(f.name for f in msgspec.structs.fields(cls))


def _flags(cls: type[Struct]) -> dict[str, str]:
    return {o.name: o.flag for o in option_infos(cls)}


def _convert(options: dict[str, Any], cls: type[Struct]) -> Any:
    try:
        return msgspec.convert(options, cls, strict=True)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Object contains unknown field"):
            raise QPlanError(f"unknown option {text.split('`')[1]!r}") from exc
        if text.startswith("Object missing required field"):
            name = text.split("`")[1]
            raise QPlanError(f"{_flags(cls).get(name, name)} is required") from exc
        flags = _flags(cls)

        def flag(path: str) -> str:
            field = path.lstrip(".").split(".")[0].split("[")[0]
            return flags.get(field, "--" + field.replace("_", "-")) if field else "options"

        raise QPlanError(explain(exc, options, flag)) from exc


def check_options(options: dict[str, Any] | PlanOptions) -> PlanOptions:
    """``options`` (field -> value) as validated ``PlanOptions``; one line naming the CLI flag."""
    if isinstance(options, PlanOptions):
        return options
    return _convert(options, PlanOptions)


def check_fit_options(options: dict[str, Any] | FitOptions) -> FitOptions:
    """``options`` as validated ``FitOptions``; one line naming the CLI flag."""
    if isinstance(options, FitOptions):
        return options
    return _convert(options, FitOptions)


def as_dict(options: Struct) -> dict[str, Any]:
    """The options as field -> value (every field, defaults included)."""
    return {f: getattr(options, f) for f in options.__struct_fields__}
