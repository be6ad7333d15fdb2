"""Declarative schemas for everything qplan reads, validated with ``msgspec`` before any work.

One validation layer at every boundary, each a typed ``msgspec.Struct`` with its bounds written
as data (``Meta(ge=..., le=...)``, ``Literal`` choices from ``planner.vocab``):

* ``PlanOptions`` — the options of ``qplan estimate`` / ``make_plan`` (CLI names in errors);
* ``ArchConfig`` — the architecture keys of a Hugging Face ``config.json``, with physical bounds
  (layers, widths, heads, vocabulary, context) so absurd values are refused before a model is
  built (a 10-million-layer config would otherwise hang the meta-device build);
* ``PlanDoc`` — a plan.json as ``qplan run`` / ``qplan report`` read it (users edit plans);
* JSON files are decoded by ``read_json``: not UTF-8, not JSON, too deeply nested, not an
  object — each one line.

A violation is a ``QPlanError`` whose one line names the file or option, the field and the fix.
msgspec imports in milliseconds, so ``qplan estimate`` stays instant and torch-free.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from .distributed import STRATEGIES
from .errors import QPlanError
from .vocab import (
    ATTN_CHOICES,
    ATTN_IMPLS,
    BACKENDS,
    BIAS_MODES,
    COMPUTE_DTYPES,
    DTYPE_ALIASES,
    GRAD_CKPT,
    MIXED_PRECISION,
    OPTIMIZERS,
    QUANTS,
    SAFETENSORS_DTYPE,
)

# ------------------------------------------------------------------------------------- bounds
#: physical bounds: generous beyond every released model (Llama-3.1-405B: 126 layers, hidden
#: 16384, vocabulary 128k; Gemma-3: 262k vocabulary; contexts of 1M tokens), far below absurd
MAX_LAYERS = 1024
MAX_WIDTH = 1 << 17  # hidden / intermediate / head_dim
MAX_HEADS = 1 << 12
MAX_VOCAB = 1 << 23
MAX_CONTEXT = 1 << 24
MAX_EXPERTS = 1 << 12
MAX_RANK = 1 << 16
MAX_BATCH = 1 << 16
MAX_ALPHA = 1e6
MAX_NAME = 1024
MAX_TOKENS = 10 ** 15
MAX_GPUS = 1 << 14  # GPUs per node, and nodes
#: how deep a JSON document may nest before it is refused (configs nest 2-3 levels)
MAX_JSON_DEPTH = 64

NonEmpty = Annotated[str, Meta(min_length=1, max_length=MAX_NAME)]
Layers = Annotated[int, Meta(ge=1, le=MAX_LAYERS)]
Width = Annotated[int, Meta(ge=1, le=MAX_WIDTH)]
Heads = Annotated[int, Meta(ge=1, le=MAX_HEADS)]
Vocab = Annotated[int, Meta(ge=1, le=MAX_VOCAB)]
Context = Annotated[int, Meta(ge=1, le=MAX_CONTEXT)]
Experts = Annotated[int, Meta(ge=1, le=MAX_EXPERTS)]
Rank = Annotated[int, Meta(ge=1, le=MAX_RANK)]
Batch = Annotated[int, Meta(ge=1, le=MAX_BATCH)]
Alpha = Annotated[float, Meta(gt=0, le=MAX_ALPHA)]
Dropout = Annotated[float, Meta(ge=0, lt=1)]
Bytes = Annotated[int, Meta(ge=0)]


def _lit(values: Any) -> Any:
    return Literal.__getitem__(tuple(values))


# ------------------------------------------------------------------------------ CLI options


class PlanOptions(Struct, forbid_unknown_fields=True, kw_only=True):
    """``qplan estimate``'s options (``make_plan``'s keywords) other than the model and the GPU."""

    r: Rank = 16
    alpha: Alpha | None = None
    dropout: Dropout | None = None
    targets: Annotated[str, Meta(min_length=1, max_length=16384)] = "all-linear"
    bias: _lit(BIAS_MODES) = "none"
    dora: bool = False
    rslora: bool = False
    modules_to_save: Annotated[str, Meta(max_length=16384)] | list[NonEmpty] = ""
    target_parameters: Annotated[str, Meta(max_length=16384)] | list[NonEmpty] = ""
    quant: _lit(QUANTS) = "nf4"
    double_quant: bool = True
    compute_dtype: _lit(sorted(DTYPE_ALIASES)) = "bf16"
    upcast: bool = True
    seq_len: Context = 512
    batch_size: Batch = 1
    grad_accum: Batch = 1
    grad_ckpt: bool = True
    optimizer: _lit(OPTIMIZERS) = "adamw_torch"
    attn_impl: _lit(ATTN_CHOICES) = "auto"
    backend: _lit(BACKENDS) = "peft"
    strict_dtype: bool = False
    tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS)] | None = None
    dataset_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS)] | None = None
    epochs: Annotated[float, Meta(gt=0, le=10_000)] | None = None
    price_per_hour: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    calibration: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    gpus: Annotated[int, Meta(ge=1, le=MAX_GPUS)] = 1
    nodes: Annotated[int, Meta(ge=1, le=MAX_GPUS)] = 1
    strategy: _lit(STRATEGIES) | None = None
    cpu_offload: bool = False


class Calibration(Struct, kw_only=True):
    """A calibration file written by ``qplan calibrate`` (what later plans read)."""

    device: NonEmpty
    efficiency: Annotated[float, Meta(gt=0, le=1)]
    runs: Annotated[int, Meta(ge=1)]
    overhead_seconds: Annotated[float, Meta(ge=0, le=3600)] = 0.0
    cuda_context_bytes: Annotated[int, Meta(ge=0, le=1 << 40)] | None = None
    allocator_slack_fraction: Annotated[float, Meta(ge=0, le=10)] | None = None
    source: str = ""
    fitted_on: list[dict[str, Any]] = []


def read_calibration(path: str) -> dict[str, Any]:
    data = read_json(path, "calibration file")
    try:
        msgspec.convert(data, Calibration, strict=True)
    except msgspec.ValidationError as exc:
        raise QPlanError(_explain(exc, data, lambda p: f"calibration file {path}: {p.lstrip('.') or 'document'}")) from exc
    return {**data, "source": str(path)}


#: option field -> the CLI flag that sets it
FLAGS = {"attn_impl": "--attn", "dora": "--dora", "rslora": "--rslora"}
#: field -> the choices to list when a value is not one of them
CHOICES = {"bias": BIAS_MODES, "quant": QUANTS, "compute_dtype": sorted(DTYPE_ALIASES), "optimizer": tuple(OPTIMIZERS),
           "attn_impl": ATTN_CHOICES, "backend": BACKENDS, "grad_ckpt": GRAD_CKPT, "adapter_dtype": SAFETENSORS_DTYPE,
           "mixed_precision": tuple(MIXED_PRECISION.values()), "load_dtype": COMPUTE_DTYPES,
           "unquantized_dtype": COMPUTE_DTYPES}
_PATH = re.compile(r" - at `\$((?:\.\w+|\[\d+\])*)`$")


def _explain(exc: msgspec.ValidationError, data: Any, name: Any) -> str:
    """msgspec's message, with the offending value, the field's name (``name(path)``) and choices."""
    msg = str(exc)
    m = _PATH.search(msg)
    path = m.group(1) if m else ""
    what = msg[: m.start()] if m else msg
    value: Any = data
    for part in re.findall(r"\.(\w+)|\[(\d+)\]", path):
        try:
            value = value[part[0]] if part[0] else value[int(part[1])]
        except (KeyError, IndexError, TypeError):
            value = None
            break
    field = path.rsplit(".", 1)[-1] if path else ""
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    detail = what[0].lower() + what[1:] if what else "invalid"
    if "enum" in detail:
        detail = f"unknown value {shown}"
        if field in CHOICES:
            detail += f" (choose one of {', '.join(CHOICES[field])})"
    elif "got" not in detail and path:
        detail += f", got {shown}"
    return f"{name(path)}: {detail}"


def _flag(path: str) -> str:
    field = path.lstrip(".").split(".")[0].split("[")[0]
    return FLAGS.get(field, "--" + field.replace("_", "-")) if field else "options"


def check_options(options: dict[str, Any]) -> PlanOptions:
    """Validate ``make_plan``'s primitive options; one line naming the CLI flag."""
    try:
        return msgspec.convert(options, PlanOptions, strict=True)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Object contains unknown field"):
            raise QPlanError(f"unknown option {text.split('`')[1]!r}") from exc
        raise QPlanError(_explain(exc, options, _flag)) from exc


# ---------------------------------------------------------------------------- JSON files


def read_json(path: str | Path, what: str) -> Any:
    """Decode a JSON file: unreadable, not UTF-8, not JSON, nested deeper than ``MAX_JSON_DEPTH``
    — each a one-line ``QPlanError`` naming the file."""
    p = path if hasattr(path, "read_bytes") else Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise QPlanError(f"cannot read {what} {p}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QPlanError(f"{what} {p} is not UTF-8 text (byte {exc.start}): is it a JSON file?") from exc
    return loads(text, f"{what} {p}")


def loads(text: str, where: str) -> Any:
    """``json`` text -> Python data, with the depth limit and one-line errors."""
    depth = _max_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise QPlanError(f"{where} nests {depth} levels deep (at most {MAX_JSON_DEPTH}): is it the right file?")
    try:
        return msgspec.json.decode(text.encode("utf-8"))
    except msgspec.DecodeError as exc:
        raise QPlanError(f"{where} is not valid JSON ({exc})") from exc


def _max_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting outside strings (a linear scan; refuses before decoding)."""
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


# ------------------------------------------------------------------------ Hugging Face config


class ArchConfig(Struct, kw_only=True):
    """The architecture keys of a ``config.json`` that size the model, with physical bounds
    (other keys pass through untouched). GPT-2 spells them ``n_layer``/``n_embd``/``n_head``;
    multimodal wrappers keep them in ``text_config``."""

    model_type: Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")]
    num_hidden_layers: Layers | None = None
    n_layer: Layers | None = None
    hidden_size: Width | None = None
    n_embd: Width | None = None
    intermediate_size: Width | list[Width] | None = None
    n_inner: Width | None = None
    moe_intermediate_size: Width | None = None
    head_dim: Width | None = None
    num_attention_heads: Heads | list[Heads] | None = None
    n_head: Heads | None = None
    num_key_value_heads: Heads | list[Heads] | None = None
    vocab_size: Vocab | None = None
    max_position_embeddings: Context | None = None
    n_positions: Context | None = None
    num_local_experts: Experts | None = None
    num_experts: Experts | None = None
    n_routed_experts: Experts | None = None
    num_experts_per_tok: Experts | None = None
    text_config: "TextConfig | None" = None


class TextConfig(Struct, kw_only=True):
    """``text_config`` of a multimodal wrapper: the same bounds, ``model_type`` optional."""

    model_type: Annotated[str, Meta(max_length=100)] | None = None
    num_hidden_layers: Layers | None = None
    hidden_size: Width | None = None
    intermediate_size: Width | None = None
    head_dim: Width | None = None
    num_attention_heads: Heads | None = None
    num_key_value_heads: Heads | None = None
    vocab_size: Vocab | None = None
    max_position_embeddings: Context | None = None


def check_config(config: Any, where: str) -> dict[str, Any]:
    """A Hugging Face config dict within physical bounds; the essential sizes present."""
    if not isinstance(config, dict):
        raise QPlanError(f"{where} must hold a JSON object")
    if "model_type" not in config:
        raise QPlanError(f"{where} has no 'model_type': is it a Hugging Face config.json?")
    try:
        arch = msgspec.convert(config, ArchConfig, strict=True)
    except msgspec.ValidationError as exc:
        raise QPlanError(_explain(exc, config, lambda path: f"{where}: {path.lstrip('.') or 'config'}")) from exc
    text = arch.text_config
    for keys, name in ((("num_hidden_layers", "n_layer"), "num_hidden_layers"),
                       (("hidden_size", "n_embd"), "hidden_size"), (("vocab_size",), "vocab_size"),
                       (("num_attention_heads", "n_head"), "num_attention_heads")):
        if not any(getattr(arch, k) is not None for k in keys) and not (text and getattr(text, name, None)):
            raise QPlanError(f"{where} has no {name!r}: qplan needs the model's size (is it a causal LM config?)")
    return config


# ------------------------------------------------------------------------------- plan.json


class _Model(Struct, kw_only=True):
    name: NonEmpty
    architecture: NonEmpty
    model_type: NonEmpty
    config: dict[str, Any]
    source: dict[str, Any] = {}


class _Lora(Struct, forbid_unknown_fields=True, kw_only=True):
    r: Rank
    alpha: Alpha
    dropout: Dropout
    targets: NonEmpty
    target_modules: list[NonEmpty]
    bias: _lit(BIAS_MODES) = "none"
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: list[NonEmpty] = []
    target_parameters: list[NonEmpty] = []
    rank_pattern: dict[str, Annotated[int, Meta(ge=1)]] = {}
    alpha_pattern: dict[str, Annotated[float, Meta(gt=0)]] = {}
    adapter_dtype: _lit(SAFETENSORS_DTYPE) = "float32"
    scaling: float | None = None


class _Quant(Struct, forbid_unknown_fields=True, kw_only=True):
    quant: _lit(QUANTS)
    compute_dtype: _lit(COMPUTE_DTYPES)
    load_dtype: _lit(COMPUTE_DTYPES)
    unquantized_dtype: _lit(COMPUTE_DTYPES)
    double_quant: bool = False
    blocksize: Annotated[int, Meta(ge=1)] | None = None
    prepare_model_for_kbit_training: bool = False
    skip_modules: list[str] | None = None


class _Training(Struct, forbid_unknown_fields=True, kw_only=True):
    batch_size: Batch
    seq_len: Context
    grad_accum: Batch
    grad_ckpt: _lit(GRAD_CKPT)
    optimizer: _lit(OPTIMIZERS)
    attn_impl: _lit(ATTN_IMPLS)
    mixed_precision: _lit(MIXED_PRECISION.values())


class _Gpu(Struct, kw_only=True):
    name: NonEmpty
    usable_bytes: Bytes
    total_bytes: Bytes
    bf16: bool


class _Memory(Struct, kw_only=True):
    weights: Bytes
    weights_footprint: Bytes
    adapters: Bytes
    gradients: Bytes
    optimizer: Bytes
    activations: Bytes
    logits: Bytes
    temporaries: Bytes
    overhead: Bytes
    tensor_peak: Bytes
    peak: Bytes


class _Params(Struct, kw_only=True):
    base: Bytes
    trainable: Bytes
    total: Bytes
    trainable_share: float = 0.0
    per_module: list[dict[str, Any]] = []


class _Flops(Struct, kw_only=True):
    total: Bytes
    base_forward: Bytes = 0
    input_gradients: Bytes = 0
    lora: Bytes = 0
    attention: Bytes = 0
    recomputation: Bytes = 0
    head: Bytes = 0


class _Moved(Struct, kw_only=True):
    total: Bytes
    weights: Bytes
    dequantization: Bytes
    optimizer: Bytes


class _Compute(Struct, kw_only=True):
    flops_per_step: _Flops
    bytes_per_step: _Moved
    flops_counted_as: str = ""


Seconds = Annotated[float, Meta(ge=0, le=1e12)]


class _Time(Struct, kw_only=True):
    device: str | None = None
    device_kind: Literal["gpu", "cpu"] = "gpu"
    step_seconds: Seconds | None = None
    ideal_step_seconds: Seconds | None = None
    tokens_per_second: Annotated[float, Meta(ge=0)] | None = None
    efficiency: Annotated[float, Meta(gt=0, le=1)] | None = None
    total_seconds: Seconds | None = None


class _Prediction(Struct, kw_only=True):
    method: Literal["analytic", "trace"]
    params: _Params
    memory: _Memory
    host: dict[str, Bytes] | None = None
    adapter_file_bytes: Bytes | None = None
    memory_detail: dict[str, Any] = {}
    fits: bool | None = None
    headroom: int | None = None
    trace: dict[str, Any] | None = None
    compute: _Compute | None = None
    time: _Time | None = None
    cost: dict[str, Any] | None = None


class _Distributed(Struct, forbid_unknown_fields=True, kw_only=True):
    world_size: Annotated[int, Meta(ge=1, le=MAX_GPUS * MAX_GPUS)]
    gpus_per_node: Annotated[int, Meta(ge=1, le=MAX_GPUS)]
    nodes: Annotated[int, Meta(ge=1, le=MAX_GPUS)]
    strategy: _lit(STRATEGIES)
    engine: NonEmpty
    cpu_offload: bool
    memory_is: str
    per_rank: dict[str, Bytes]
    host_offload_per_node: Bytes
    single_gpu: dict[str, Bytes]
    wrapping_unit: str | None = None
    quant_storage: _lit(COMPUTE_DTYPES) | None = None
    sharding_cost: int | None = None
    launch: dict[str, Any] | None = None


class PlanDoc(Struct, kw_only=True):
    """plan.json (schema_version 1) as ``qplan estimate`` writes it."""

    schema_version: Literal[1]
    model: _Model
    lora: _Lora
    quant: _Quant
    training: _Training
    backend: NonEmpty  # the backend registry (entry points) decides, with the list of known ones
    prediction: _Prediction
    qplan_version: str = ""
    gpu: _Gpu | None = None
    distributed: _Distributed | None = None
    warnings: list[str] = []
    suggestions: list[str] = []


#: ``measured.json`` ``status`` values (the backends' ``base.STATUSES``)
STATUSES = ("running", "ok", "oom", "error", "interrupted")
MaybeBytes = Annotated[int, Meta(ge=0)] | None


class _MeasuredMemory(Struct, kw_only=True):
    device: str | None = None
    tensor_peak: MaybeBytes = None
    peak_allocated: MaybeBytes = None
    peak_reserved: MaybeBytes = None
    peak: MaybeBytes = None
    cuda_context: int | None = None
    weights: MaybeBytes = None
    weights_footprint: MaybeBytes = None
    breakdown_at_peak: dict[str, int] = {}


class _Timing(Struct, kw_only=True):
    mean_step_seconds: Annotated[float, Meta(gt=0, le=1e9)] | None = None


class _Measured(Struct, kw_only=True):
    params: dict[str, int] = {}
    memory: _MeasuredMemory = msgspec.field(default_factory=_MeasuredMemory)
    adapter_file_bytes: MaybeBytes = None
    loss: list[float] = []
    timing: _Timing = msgspec.field(default_factory=_Timing)


class MeasuredDoc(Struct, kw_only=True):
    """measured.json as ``qplan run`` writes it (what ``qplan report`` reads back)."""

    schema_version: Literal[1] = 1
    status: _lit(STATUSES)
    backend: str | None = None
    measured: _Measured = msgspec.field(default_factory=_Measured)
    failure: dict[str, Any] | None = None


def check_measured(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise QPlanError(f"{where} is not a JSON object")
    try:
        msgspec.convert(doc, MeasuredDoc, strict=True)
    except msgspec.ValidationError as exc:
        raise QPlanError(_explain(exc, doc, lambda path: f"{where}: {path.lstrip('.') or 'document'}")) from exc
    return doc


def check_plan(plan: Any, where: str = "plan") -> dict[str, Any]:
    """Validate a plan document read from disk (the whole of it) before anything runs."""
    if not isinstance(plan, dict):
        raise QPlanError(f"{where} is not a JSON object")
    if plan.get("schema_version") != 1:
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
        raise QPlanError(_explain(exc, plan, lambda path: f"{where}: {path.lstrip('.') or 'document'}")) from exc
    check_config(plan["model"]["config"], f"{where}: model.config")
    lora = plan["lora"]
    if not lora["target_modules"] and not lora.get("target_parameters"):
        raise QPlanError(f"{where}: lora.target_modules is empty and there are no lora.target_parameters: "
                         "nothing would be adapted")
    return plan
