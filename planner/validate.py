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

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from qplan.planner.bounds import (  # noqa: F401 - MAX_* re-exported for the readers of configs
    MAX_CONTEXT,
    MAX_GPUS,
    MAX_JSON_DEPTH,
    Alpha,
    Batch,
    Bytes,
    Context,
    Dropout,
    Experts,
    Heads,
    Layers,
    NonEmpty,
    Rank,
    Vocab,
    Width,
    lit,
)
from qplan.planner.errors import QPlanError
from qplan.planner.files import MAX_JSON_BYTES, read_limited
from qplan.planner.vocab import (
    ADAPTER_DTYPE_NAMES,
    ATTN_CHOICES,
    BACKENDS,
    BIAS_MODES,
    COMPUTE_DTYPES,
    DTYPE_ALIASES,
    GRAD_CKPT,
    MIXED_PRECISION,
    OPTIMIZERS,
    QUANTS,
)


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
        raise QPlanError(explain(exc, data, lambda p: f"calibration file {path}: {p.lstrip('.') or 'document'}")) from exc
    return {**data, "source": str(path)}


#: field -> the choices to list when a value is not one of them
CHOICES = {"bias": BIAS_MODES, "quant": QUANTS, "compute_dtype": sorted(DTYPE_ALIASES), "optimizer": tuple(OPTIMIZERS),
           "attn_impl": ATTN_CHOICES, "backend": BACKENDS, "grad_ckpt": GRAD_CKPT, "adapter_dtype": tuple(ADAPTER_DTYPE_NAMES),
           "mixed_precision": tuple(MIXED_PRECISION.values()), "load_dtype": COMPUTE_DTYPES,
           "unquantized_dtype": COMPUTE_DTYPES}
_PATH = re.compile(r" - at `\$((?:\.\w+|\[\d+\])*)`$")


def explain(exc: msgspec.ValidationError, data: Any, name: Any) -> str:
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


# ---------------------------------------------------------------------------- JSON files


def finite(data: Any) -> Any:
    """``data`` with every NaN or infinity replaced by None (JSON has no such numbers: null says "not a number")."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def dumps_finite(data: Any, **kw: Any) -> str:
    """``json.dumps`` that never writes a bare ``NaN`` / ``Infinity`` token: non-finite numbers become null."""
    return json.dumps(finite(data), allow_nan=False, **kw)


def read_json(path: str | Path, what: str, nonfinite: bool = False) -> Any:
    """Decode a JSON file: unreadable, not a regular file, over 64 MiB, not UTF-8, not JSON, nested
    deeper than ``MAX_JSON_DEPTH`` — each a one-line ``QPlanError`` naming the file."""
    p = path if hasattr(path, "read_bytes") else Path(path)
    if isinstance(p, Path):  # a file on disk: the one bounded reader (no FIFO, device or folder; at most 64 MiB)
        raw = read_limited(p, what, MAX_JSON_BYTES)
    else:  # a packaged resource (importlib.resources), shipped with qplan
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise QPlanError(f"cannot read {what} {p}: {exc.strerror or exc}") from exc
    return decode_json(raw, what, p, nonfinite)


def decode_json(raw: bytes, what: str, p: Any, nonfinite: bool = False) -> Any:
    """The JSON in ``raw`` (the bytes of ``what`` file ``p``), with ``read_json``'s one-line errors.
    ``nonfinite``: also read the ``NaN`` / ``Infinity`` tokens older qplan versions wrote, as null."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QPlanError(f"{what} {p} is not UTF-8 text (byte {exc.start}): is it a JSON file?") from exc
    try:
        return loads(text, f"{what} {p}")
    except QPlanError:
        if not nonfinite or _max_depth(text) > MAX_JSON_DEPTH:
            raise
        try:
            return finite(json.loads(text))
        except (ValueError, RecursionError):
            pass
        raise


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
        raise QPlanError(explain(exc, config, lambda path: f"{where}: {path.lstrip('.') or 'config'}")) from exc
    text = arch.text_config
    for keys, name in ((("num_hidden_layers", "n_layer"), "num_hidden_layers"),
                       (("hidden_size", "n_embd"), "hidden_size"), (("vocab_size",), "vocab_size"),
                       (("num_attention_heads", "n_head"), "num_attention_heads")):
        if not any(getattr(arch, k) is not None for k in keys) and not (text and getattr(text, name, None)):
            raise QPlanError(f"{where} has no {name!r}: qplan needs the model's size (is it a causal LM config?)")
    return config


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
    loss: list[float | None] = []  # null: the loss went NaN or infinite (the run diverged)
    timing: _Timing = msgspec.field(default_factory=_Timing)


class MeasuredDoc(Struct, kw_only=True):
    """measured.json as ``qplan run`` writes it (what ``qplan report`` reads back)."""

    schema_version: Literal[1] = 1
    status: lit(STATUSES)
    backend: str | None = None
    measured: _Measured = msgspec.field(default_factory=_Measured)
    failure: dict[str, Any] | None = None


def check_measured(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise QPlanError(f"{where} is not a JSON object")
    try:
        msgspec.convert(doc, MeasuredDoc, strict=True)
    except msgspec.ValidationError as exc:
        raise QPlanError(explain(exc, doc, lambda path: f"{where}: {path.lstrip('.') or 'document'}")) from exc
    return doc
