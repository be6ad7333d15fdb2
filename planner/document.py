"""plan.json, typed: ``PlanDoc`` and its sections. ``make_plan`` returns a ``PlanDoc``; plan.json is its
encoding (``to_dict`` / ``dumps``); ``check_plan`` validates a plan read back from disk against the
same types (users edit plans). docs/plan-json.md is generated from these classes.

Field order is the document's key order. A field whose value is ``UNSET`` is left out of the
document (``msgspec``'s convention: e.g. ``quant.double_quant`` exists for 4-bit plans only,
``prediction.trace`` for traced plans only); ``None`` is written as ``null``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from qplan.planner.bounds import (
    MAX_GPUS,
    Alpha,
    Batch,
    Bytes,
    Context,
    Dropout,
    NonEmpty,
    Rank,
    lit,
)
from qplan.planner.data.batching import BATCHINGS, PACKING_STRATEGIES
from qplan.planner.data.formats import FORMATS as DATA_FORMATS
from qplan.planner.data.formats import LONG_SAMPLES
from qplan.planner.errors import QPlanError
from qplan.planner.method_sections import (
    METHOD_SECTIONS,
    C3aSection,
    Ia3Section,
    LnTuningSection,
    LohaSection,
    LokrSection,
    MissSection,
    PromptTuningSection,
    PTuningSection,
    VeraSection,
)
from qplan.planner.validate import _PATH, check_config, explain
from qplan.planner.vocab import (
    ATTN_IMPLS,
    COMPUTE_DTYPES,
    GRAD_CKPT,
    LIGER_KERNELS,
    LOSSES,
    MIXED_PRECISION,
    OPTIMIZERS,
    QUANTS,
    SAFETENSORS_DTYPE,
    STRATEGIES,
    TRAINING_OBJECTIVES,
)
from qplan.planner.vocab import BIAS_MODES as _BIAS

PLAN_SCHEMA_VERSION = 1
SEAL_PATTERN = "^sha256:[0-9a-f]{64}$"


def _d(t: Any, help: str) -> Any:
    return Annotated[t, Meta(description=help)]


class ModelSection(Struct, kw_only=True):
    """The model: its spec's name, where the spec came from, and the Hugging Face config it was built from."""

    name: NonEmpty
    source: _d(dict[str, Any], "hub_id / revision / config_file, or the local path") = {}
    architecture: NonEmpty
    model_type: NonEmpty
    config: _d(dict[str, Any], "the config.json the model is rebuilt from (meta device, random weights)")


class LoraSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """The LoRA settings, and the targets PEFT really adapts (``target_modules``, ``target_parameters``)."""

    r: Rank
    alpha: Alpha
    dropout: Dropout
    targets: NonEmpty
    bias: lit(_BIAS) = "none"
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: list[NonEmpty] = []
    adapter_dtype: lit(SAFETENSORS_DTYPE) = "float32"
    target_parameters: list[NonEmpty] = []
    scaling: _d(float | None, "alpha / r (alpha / sqrt(r) with rsLoRA)") = None
    target_modules: _d(list[NonEmpty], "module names PEFT's LoraConfig gets")
    rank_pattern: dict[str, Annotated[int, Meta(ge=1)]] = {}
    alpha_pattern: dict[str, Annotated[float, Meta(gt=0)]] = {}


class QuantSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """How the base weights are loaded (bitsandbytes settings for k-bit plans)."""

    quant: lit(QUANTS)
    compute_dtype: lit(COMPUTE_DTYPES)
    double_quant: _d(bool | UnsetType, "4-bit plans only") = UNSET
    blocksize: _d(Annotated[int, Meta(ge=1)] | None | UnsetType, "4-bit plans only") = UNSET
    prepare_model_for_kbit_training: _d(bool | UnsetType, "k-bit plans only: the fp32 upcast") = UNSET
    load_dtype: lit(COMPUTE_DTYPES)
    unquantized_dtype: lit(COMPUTE_DTYPES)
    skip_modules: _d(list[str] | None | UnsetType, "a pre-quantized checkpoint's llm_int8_skip_modules") = UNSET


class GrpoSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """TRL's ``GRPOConfig`` generation settings of a GRPO plan (``memory.terms.GrpoSettings``)."""

    num_generations: Annotated[int, Meta(ge=2)]
    prompt_length: Context
    max_completion_length: Context
    steps_per_generation: Batch
    beta: Annotated[float, Meta(ge=0)]
    vllm: _d(Literal["colocate", "server"] | UnsetType, "vLLM instead of transformers' generate; absent: "
             "transformers' generate") = UNSET
    vllm_reserved: _d(Bytes | UnsetType, "colocate: the bytes vLLM holds on this GPU (gpu_memory_utilization x "
                      "total)") = UNSET
    vllm_sleep: _d(bool | UnsetType, "colocate: vLLM sleeps (releases its memory) during the training step") = UNSET


class TrainingSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """The step: micro-batch, sequence, accumulation, checkpointing, optimizer, attention, precision."""

    batch_size: Batch
    seq_len: Context
    grad_accum: Batch
    grad_ckpt: lit(GRAD_CKPT)
    optimizer: lit(OPTIMIZERS)
    attn_impl: lit(ATTN_IMPLS)
    mixed_precision: lit(MIXED_PRECISION.values())
    padded: _d(bool | UnsetType, "--data with padded batches (or padding-free packs under SDPA/eager): attention gets "
               "a 4-D mask (planned)") = UNSET
    flat_tokens: _d(Annotated[int, Meta(ge=1)] | UnsetType, "padding-free packing (TRL's bfd): the worst micro-batch's "
                    "packs flattened into one row of this many tokens, the shape the model sees") = UNSET
    loss: _d(lit(LOSSES) | UnsetType, "cce: Cut Cross Entropy (axolotl's CutCrossEntropyPlugin); trl: TRL 1.16 "
              "SFTTrainer's fused LM head; liger: Liger-Kernel's fused linear cross-entropy: "
              "the loss from the final hidden states without the T x V logits; absent: "
              "the full logits (transformers' loss)") = UNSET
    liger_kernels: _d(list[lit(LIGER_KERNELS)] | UnsetType, "Liger-Kernel's RMSNorm / SwiGLU / RoPE in the decoder "
                      "layers; absent: transformers' modules") = UNSET
    objective: _d(lit(TRAINING_OBJECTIVES) | UnsetType, "dpo: TRL's DPOTrainer (batch_size pairs: 2 x batch_size "
                  "rows, and the reference's forward); kto: TRL's KTOTrainer (batch_size rows, the KL term's rows and "
                  "the reference's forwards); reward: TRL's RewardTrainer; grpo: TRL's GRPOTrainer (generation, then "
                  "batch_size rows of seq_len = prompt + completion); absent: sft") = UNSET
    grpo: _d(GrpoSection | UnsetType, "objective grpo: GRPOConfig's generation settings") = UNSET
    precompute_ref_log_probs: _d(bool | UnsetType, "objective dpo/kto: the reference's log-probabilities computed in "
                                 "a pass before training (TRL's precompute_ref_log_probs): no reference forward in the "
                                 "step, no reference model with full fine-tuning; absent: false") = UNSET
    precompute_ref_batch_size: _d(Annotated[int, Meta(ge=1)] | UnsetType, "the pass's batches (TRL's "
                              "precompute_ref_batch_size: pairs for DPO, rows for KTO); absent: batch_size") = UNSET


class GenerationSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """``--objective grpo``: one generation batch with transformers' ``generate`` (``planner.memory.generation``)."""

    sequences: _d(Annotated[int, Meta(ge=1)], "completions generated at once on one GPU (batch_size x "
                  "steps_per_generation)")
    prompts: _d(Annotated[int, Meta(ge=1)], "distinct prompts among them (sequences / num_generations, per GPU)")
    prompt_length: Context
    completion_length: Context
    engine: _d(Literal["transformers", "vllm"], "who generates: transformers' generate, or vLLM") = "transformers"
    kv_cache: _d(Bytes, "the KV cache after the last forward: 2 x layers x kv_heads x head_dim x dtype bytes x "
                 "sequences x (prompt + completion - 1) (vLLM: the blocks its batch needs, in the model's dtype)")
    sampling: _d(Bytes | UnsetType, "the last step's sampling tensors (head output, fp32 copies, softmax)") = UNSET
    prefill: _d(Bytes | UnsetType, "the prompts' forward at its largest, beyond weights, adapters and optimizer "
                "state") = UNSET
    decode: _d(Bytes | UnsetType, "the last decode forward at its largest, likewise") = UNSET
    sample: _d(Bytes | UnsetType, "the last sampling step, likewise") = UNSET
    dequant: _d(Bytes, "a quantized base: the largest weight dequantized for a matmul (in each moment)") = 0
    tensor_peak: _d(Bytes | None, "live tensor bytes at the generation moment (prediction.memory_detail.phases."
                    "generation); none where vLLM generates inside its own reservation") = None
    vllm: _d(dict[str, Any] | UnsetType, "vLLM (derived from TRL 1.16's vllm_generation.py and vLLM's "
             "gpu_memory_utilization, not measured): its reservation, its copy of the weights, the KV room") = UNSET
    tokens: _d(Annotated[int, Meta(ge=1)], "tokens generated per generation batch (sequences x completion_length)")


class GpuSection(Struct, kw_only=True):
    """The target GPU (bytes usable by tensors after the driver's reservation)."""

    name: NonEmpty
    usable_bytes: Bytes
    total_bytes: Bytes
    bf16: bool


class DistributedSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """Several GPUs: the engine, and the per-rank terms (``prediction.memory`` is then one rank's)."""

    world_size: Annotated[int, Meta(ge=1, le=MAX_GPUS * MAX_GPUS)]
    gpus_per_node: Annotated[int, Meta(ge=1, le=MAX_GPUS)]
    nodes: Annotated[int, Meta(ge=1, le=MAX_GPUS)]
    strategy: lit(STRATEGIES)
    engine: NonEmpty
    cpu_offload: bool
    wrapping_unit: str | None = None
    quant_storage: lit(COMPUTE_DTYPES) | None = None
    memory_is: str
    per_rank: dict[str, Bytes]
    host_offload_per_node: Bytes
    single_gpu: _d(dict[str, Bytes], "the same plan on one GPU: weights, tensor_peak, peak")
    sharding_cost: _d(int | None, "bytes beyond an even split of the weights (replicated constants, padding)") = None
    launch: dict[str, Any] | None | UnsetType = UNSET
    shard_group: _d(Annotated[int, Meta(ge=1, le=MAX_GPUS)] | UnsetType,
                    "hsdp: the ranks one parameter is sharded over (a node's GPUs)") = UNSET
    replicas: _d(Annotated[int, Meta(ge=1, le=MAX_GPUS)] | UnsetType, "hsdp: the copies of the shards (the nodes)") = UNSET
    network_gbps: _d(Annotated[float, Meta(gt=0, le=1e6)] | UnsetType,
                     "--network-gbps: each node's network one way, Gbit/s") = UNSET


class Params(Struct, kw_only=True):
    """Parameter counts (PEFT's own count on the meta-device model is the oracle)."""

    base: Bytes
    trainable: Bytes
    total: Bytes
    trainable_share: float = 0.0
    per_module: _d(list[dict[str, Any]], "module, kind, shape, instances, params_per_instance, total, bytes") = []


class Memory(Struct, kw_only=True):
    """The GPU memory budget in bytes; ``peak`` = ``tensor_peak`` + ``overhead``."""

    weights: Bytes
    weights_footprint: _d(Bytes, "what get_memory_footprint() prints (no quantization constants)")
    adapters: Bytes
    gradients: Bytes
    optimizer: Bytes
    activations: Bytes
    logits: Bytes
    temporaries: Bytes
    overhead: _d(Bytes, "CUDA context + allocator slack")
    tensor_peak: _d(Bytes, "the largest moment of the step (live tensors)")
    peak: _d(Bytes, "what the GPU must have")


class Flops(Struct, kw_only=True):
    """FLOPs of one optimizer step, as torch's FlopCounterMode counts them, by part."""

    base_forward: Bytes | UnsetType = UNSET
    input_gradients: Bytes | UnsetType = UNSET
    weight_gradients: _d(Bytes | UnsetType, "full fine-tuning: the weights' gradients") = UNSET
    lora: _d(Bytes | UnsetType, "the adapters' own matmuls: LoRA's; p-tuning's prompt encoder") = UNSET
    attention: Bytes | UnsetType = UNSET
    recomputation: Bytes | UnsetType = UNSET
    head: Bytes | UnsetType = UNSET
    reference: _d(Bytes | UnsetType, "DPO: the reference's forward (the base model without adapters, no grad); KTO: "
                  "the policy's forward on the KL rows and the reference's on the KL rows and the batch's, no grad") = UNSET
    generation: _d(Bytes | UnsetType, "GRPO: the generation batches' prefill and decode forwards (planner.compute."
                   "decode)") = UNSET
    total: Bytes


class Moved(Struct, kw_only=True):
    """Bytes one optimizer step moves through GPU memory."""

    weights: Bytes
    dequantization: Bytes
    optimizer: Bytes
    adapter_updates: _d(Bytes | UnsetType, "LoHa, LoKr: the full-size weight update each module builds, scales and "
                        "differentiates every pass (elementwise passes over out × in tensors); C3A: its FFTs over "
                        "every token (memory-bound passes)") = UNSET
    generation: _d(Bytes | UnsetType, "GRPO: each decode step reads the weights, adapters and KV cache (memory-bound, "
                   "serial)") = UNSET
    total: Bytes


class Launches(Struct, kw_only=True):
    """Kernels one optimizer step launches (``planner.compute.ops.step_launches``): the host's work in eager PyTorch."""

    forward: Annotated[int, Meta(ge=0)]
    backward: Annotated[int, Meta(ge=0)]
    optimizer: Annotated[int, Meta(ge=0)]
    generation: _d(Annotated[int, Meta(ge=0)] | UnsetType, "GRPO: a forward's kernels per generated token") = UNSET
    total: Annotated[int, Meta(ge=0)]


class Compute(Struct, kw_only=True):
    """FLOPs and bytes moved by one optimizer step, and the kernels it launches."""

    flops_per_step: Flops
    bytes_per_step: Moved
    kernel_launches_per_step: Launches | UnsetType = UNSET
    flops_counted_as: str = ""
    not_counted: _d(list[str] | UnsetType, "what the count leaves out for this model") = UNSET


Seconds = Annotated[float, Meta(ge=0, le=1e12)]


class Time(Struct, kw_only=True):
    """The step time on the GPU: a roofline divided by an efficiency, plus the host's kernel launches (``reason``
    when there is none)."""

    device: str | None = None
    device_kind: Literal["gpu", "cpu"] | UnsetType = UNSET
    peak_flops_per_second: float | UnsetType = UNSET
    matmul_dtype: str | UnsetType = UNSET
    adapter_matmul_dtype: str | UnsetType = UNSET
    adapter_peak_flops_per_second: float | UnsetType = UNSET
    bandwidth_bytes_per_second: float | UnsetType = UNSET
    efficiency: Annotated[float, Meta(gt=0, le=1)] | UnsetType = UNSET
    efficiency_source: str | UnsetType = UNSET
    overhead_seconds: float | UnsetType = UNSET
    kernel_launches: Annotated[int, Meta(ge=0)] | UnsetType = UNSET
    seconds_per_launch: Annotated[float, Meta(ge=0)] | UnsetType = UNSET
    launch_seconds: Seconds | UnsetType = UNSET
    ideal_step_seconds: Seconds | UnsetType = UNSET
    step_seconds: Seconds | None = None
    gpus: Annotated[int, Meta(ge=1)] | UnsetType = UNSET
    tokens_per_step: int | UnsetType = UNSET
    tokens_per_second: Annotated[float, Meta(ge=0)] | UnsetType = UNSET
    tokens_per_step_per_gpu: int | UnsetType = UNSET
    tokens_per_second_per_gpu: Annotated[float, Meta(ge=0)] | UnsetType = UNSET
    communication: dict[str, Any] | UnsetType = UNSET
    not_in_time: list[str] | UnsetType = UNSET
    uncertainty: str | UnsetType = UNSET
    tokens: int | None | UnsetType = UNSET
    steps: int | None | UnsetType = UNSET
    total_seconds: Seconds | None | UnsetType = UNSET
    reason: str | UnsetType = UNSET


class Cost(Struct, kw_only=True):
    """Price per GPU-hour times time and GPUs."""

    price_per_hour: float
    gpus: int
    per_step: float
    total: float | None
    currency: str = ""


_Count = Annotated[int, Meta(ge=0)]


class DataLongest(Struct, forbid_unknown_fields=True, kw_only=True):
    index: _d(_Count, "0-based: dataset[index]")
    row: _d(Annotated[int, Meta(ge=1)], "1-based: the line of a JSONL, the record of a JSON list")
    tokens: _Count


class DataTokens(Struct, forbid_unknown_fields=True, kw_only=True):
    min: _Count
    p50: _Count
    p90: _Count
    p99: _Count
    max: _Count
    mean: Annotated[float, Meta(ge=0)]


class DataWorst(Struct, forbid_unknown_fields=True, kw_only=True):
    seq_len: Context
    batch_size: Batch
    tokens: _Count
    padded: _d(bool, "its rows have pads (a 4-D attention mask)") = False
    flat_tokens: _d(_Count | UnsetType, "padding-free packs: the batch flattened into one row of this many tokens") = UNSET
    note: str = ""


class DataHistogram(Struct, forbid_unknown_fields=True, kw_only=True):
    edges: Annotated[list[_Count], Meta(min_length=2, max_length=1025)]
    counts: Annotated[list[_Count], Meta(min_length=1, max_length=1024)]


class DataSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """``prediction.data`` (``--data``): what the dataset is, as the trainer will see it (``planner.data``)."""

    source: _d(str, "as given: a path or a Hub dataset id")
    path: _d(str, "the file or folder read")
    format: lit(DATA_FORMATS[1:])
    tokenizer: str
    tokenizer_sha256: _d(str, "the tokenizer counted with (qplan run notes a run whose tokenizer differs)") = ""
    max_length: Context | None = None
    batching: lit(BATCHINGS)
    packing_strategy: lit(PACKING_STRATEGIES) | UnsetType = UNSET
    records: _d(_Count | UnsetType, "records read (an axolotl completion record can make several samples)") = UNSET
    samples: _d(Annotated[int, Meta(ge=1)], "samples the trainer's preparation makes, before its length filter")
    long_samples: _d(lit(LONG_SAMPLES[1:]) | UnsetType, "what became of a sample over max_length") = UNSET
    pad_to_multiple_of: _d(int | None | UnsetType, "the collator's: each batch padded to a multiple of it") = UNSET
    dropped: _Count
    truncated: _Count
    longest_sample: DataLongest
    tokens: DataTokens
    total_tokens: _Count
    trained_tokens: _Count
    histogram: DataHistogram
    packs: _Count | UnsetType = UNSET
    batches_per_epoch: _Count
    tokens_per_epoch: _Count
    padded_tokens_per_epoch: _Count
    efficiency: Annotated[float, Meta(gt=0, le=1)]
    kl_seq_len: _d(_Count | UnsetType, "KTO: the widest batch of its KL rows (each prompt with another row's "
                   "completion)") = UNSET
    worst_batch: DataWorst
    epochs: Annotated[float, Meta(gt=0)] = 1.0
    largest_first: bool = False


class Prediction(Struct, kw_only=True):
    """What qplan predicts: counts, memory (device and host), the moments of the step, time and cost."""

    method: Literal["analytic", "trace"]
    params: Params
    adapter_file_bytes: Bytes | None = None
    memory: Memory
    host: _d(dict[str, Bytes] | None, "host RAM: offloaded checkpoints, paged optimizer, offloaded states, peak") = None
    memory_detail: _d(dict[str, Any], "weights breakdown, moments (phases), composition, CPU-kernel moments") = {}
    fits: bool | None = None
    headroom: int | None = None
    compute: Compute | None = None
    time: Time | None = None
    cost: Cost | None = None
    trace: _d(dict[str, Any] | None | UnsetType, "--method trace: the traced step; its peak (tensor peak + the "
                 "same overhead) decides fits and headroom") = UNSET
    data: _d(DataSection | UnsetType, "--data: the dataset's token statistics, the worst batch (training.seq_len) "
             "and the tokens of an epoch (planner.data)") = UNSET
    generation: _d(GenerationSection | UnsetType, "--objective grpo: the generation batch (transformers' generate): "
                   "its KV cache and moments") = UNSET


class ConfigWarning(Struct, forbid_unknown_fields=True, kw_only=True):
    """One warning of reading a trainer config (``planner.interop.notes``)."""

    kind: Literal["approximated", "ignored", "launcher", "data"]
    text: NonEmpty


class TrainerConfigSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """``--from-config``: the file the plan was read from, its tool, and what reading it warned about."""

    path: NonEmpty
    format: Literal["axolotl", "llamafactory", "trl"]
    warnings: list[ConfigWarning] = []


class PlanDoc(Struct, kw_only=True):
    """plan.json (schema_version 1) as ``qplan estimate`` writes it."""

    schema_version: Literal[1]
    qplan_version: str = ""
    model: ModelSection
    method: _d(Literal["lora", "full", "ia3", "prompt_tuning", "p_tuning", "ln_tuning", "loha", "lokr", "vera", "miss",
                       "c3a"]
               | UnsetType,
               "full: "
               "full fine-tuning, every parameter trains (`--full`; `lora` is null); ia3, prompt_tuning, p_tuning, "
               "ln_tuning, loha, lokr, vera, miss, c3a: "
               "that PEFT method "
               "(`--peft-type`; `lora` is null, "
               "the section named as the method says what it trains); absent: LoRA") = UNSET
    lora: _d(LoraSection | None, "the adapter (null with full fine-tuning and the other PEFT methods)")
    ia3: _d(Ia3Section | UnsetType, "method ia3 only") = UNSET
    prompt_tuning: _d(PromptTuningSection | UnsetType, "method prompt_tuning only") = UNSET
    p_tuning: _d(PTuningSection | UnsetType, "method p_tuning only") = UNSET
    ln_tuning: _d(LnTuningSection | UnsetType, "method ln_tuning only") = UNSET
    loha: _d(LohaSection | UnsetType, "method loha only") = UNSET
    lokr: _d(LokrSection | UnsetType, "method lokr only") = UNSET
    vera: _d(VeraSection | UnsetType, "method vera only") = UNSET
    miss: _d(MissSection | UnsetType, "method miss only") = UNSET
    c3a: _d(C3aSection | UnsetType, "method c3a only") = UNSET
    quant: QuantSection
    training: TrainingSection
    gpu: GpuSection | None = None
    backend: NonEmpty  # the backend registry (entry points) decides, with the list of known ones
    distributed: DistributedSection | None | UnsetType = UNSET
    warnings: list[str] = []
    trainer_config: _d(TrainerConfigSection | UnsetType, "--from-config: the file, its tool, and its warnings by kind "
                       "(approximated: a memory effect not modelled exactly; ignored: keys qplan does not know; "
                       "launcher: no effect on one GPU; data: where the lengths come from)") = UNSET
    prediction: Prediction
    suggestions: _d(list[str] | UnsetType, "single changes that make a plan fit (plans that do not)") = UNSET
    seal: _d(Annotated[str, Meta(pattern=SEAL_PATTERN)] | UnsetType,
             "SHA-256 of the rest of the document as qplan wrote it (`seal()`): `qplan run` and `qplan export` "
             "refuse a plan whose content no longer matches it (edited by hand)") = UNSET

    def to_dict(self) -> dict[str, Any]:
        """plan.json's JSON value (UNSET fields left out)."""
        return msgspec.to_builtins(self)


def section(cls: type[Struct], data: dict[str, Any]) -> Any:
    """``cls`` from a builder's dict: every key must be a field (nothing is silently dropped)."""
    stray = set(data) - set(cls.__struct_fields__)
    if stray:
        raise AssertionError(f"{cls.__name__} has no field for {sorted(stray)}")
    return msgspec.convert(data, cls)


def seal(plan: dict[str, Any]) -> str:
    """``sha256:`` + the SHA-256 of the plan without its ``seal`` key, as canonical JSON (sorted keys, no
    whitespace, UTF-8). JSON numbers read back as the same ints and floats, so the seal survives re-indenting
    or re-ordering the file, and changes with any value. It detects a plan edited by hand, not an attacker
    (anyone can re-compute it)."""
    body = {k: v for k, v in plan.items() if k != "seal"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def dumps(plan: PlanDoc | dict[str, Any]) -> str:
    """Canonical JSON: 2-space indent, UTF-8, trailing newline; sealed (``seal``): every plan file qplan
    writes can be checked for hand edits."""
    data = dict(plan.to_dict() if isinstance(plan, PlanDoc) else plan)
    data.pop("seal", None)
    data["seal"] = seal(data)
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def check_plan(plan: Any, where: str = "plan") -> dict[str, Any]:
    """Validate a plan document read from disk (the whole of it) before anything runs."""
    if not isinstance(plan, dict):
        raise QPlanError(f"{where} is not a JSON object")
    if plan.get("schema_version") != PLAN_SCHEMA_VERSION:
        raise QPlanError(f"{where} has schema_version {plan.get('schema_version')!r}; this qplan reads version 1 "
                         "(re-create it with `qplan estimate ... --output`)")
    try:
        msgspec.convert(plan, PlanDoc, strict=True)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Object contains unknown field"):
            m = _PATH.search(text)
            sect = (m.group(1).lstrip(".") + ".") if m else ""
            raise QPlanError(f"{where}: unknown field {sect}{text.split('`')[1]} (a typo?)") from exc
        raise QPlanError(explain(exc, plan, lambda path: f"{where}: {path.lstrip('.') or 'document'}")) from exc
    check_config(plan["model"]["config"], f"{where}: model.config")
    lora = plan["lora"]
    if (lora is None) != (plan.get("method") in ("full", *METHOD_SECTIONS)):
        raise QPlanError(f"{where}: lora is null exactly when method is full (full fine-tuning), "
                         f"{' or '.join(METHOD_SECTIONS)}")
    for name in METHOD_SECTIONS:
        if (name in plan) != (plan.get("method") == name):
            raise QPlanError(f"{where}: a {name} section goes with method {name}, and only with it")
    if lora is not None and not lora["target_modules"] and not lora.get("target_parameters"):
        raise QPlanError(f"{where}: lora.target_modules is empty and there are no lora.target_parameters: "
                         "nothing would be adapted")
    return plan
