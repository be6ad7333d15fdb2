"""Model specs and GPUs as frozen dataclasses, read from (and written to) their JSON data files.

A spec is the Hugging Face config (kept as the plain dict it is), where it came from, and the
module inventory ``qplan.planner.inventory`` read off the model built on the meta device. The
JSON layout is unchanged: ``ModelSpec.from_json(d).to_json() == d`` for every bundled spec.
A field that is missing or of the wrong kind is one ``QPlanError`` line naming the file and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .errors import QPlanError

SPEC_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LinearGroup:
    """Identical ``nn.Linear`` / ``Conv1D`` modules (``*`` = layer index) and how bitsandbytes treats them."""

    pattern: str
    module_type: str
    in_features: int
    out_features: int
    bias: bool
    bnb_quantized: bool
    keep_fp32: bool
    role: str  # attn | mlp | head | other
    weight_tied: bool
    instances: int


@dataclass(frozen=True)
class EmbeddingGroup:
    pattern: str
    module_type: str
    num_embeddings: int
    embedding_dim: int
    weight_tied: bool
    keep_fp32: bool
    instances: int


@dataclass(frozen=True)
class ParamGroup:
    """Any other parameter: norms, fused MoE expert tensors, routers."""

    pattern: str
    param: str
    module_type: str
    shape: tuple[int, ...]
    keep_fp32: bool
    instances: int


@dataclass(frozen=True)
class BufferGroup:
    """A registered buffer; ``dtype`` ``"load"`` follows the load dtype (Gemma's embed_scale)."""

    pattern: str
    buffer: str
    shape: tuple[int, ...]
    dtype: str
    instances: int


@dataclass(frozen=True)
class Inventory:
    generated_by: dict[str, str]
    architecture: str
    model_type: str
    num_hidden_layers: int
    output_head: str | None
    total_params: int
    linear: tuple[LinearGroup, ...]
    embeddings: tuple[EmbeddingGroup, ...]
    params: tuple[ParamGroup, ...]
    buffers: tuple[BufferGroup, ...]
    tied: tuple[tuple[str, ...], ...]
    attn_implementations: tuple[str, ...] = ()
    attn_default: str = "sdpa"
    attention_types: tuple[str, ...] = ()
    presets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    presets_source: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: dict[str, Any]
    config: dict[str, Any]
    inventory: Inventory
    schema_version: int = SPEC_SCHEMA_VERSION

    @property
    def model_type(self) -> str:
        return self.inventory.model_type

    @classmethod
    def from_json(cls, d: Any, where: str = "model spec") -> "ModelSpec":
        if not isinstance(d, dict):
            raise QPlanError(f"{where} must be a JSON object")
        if d.get("schema_version") != SPEC_SCHEMA_VERSION:
            raise QPlanError(f"{where} has schema_version {d.get('schema_version')!r}, expected {SPEC_SCHEMA_VERSION}")
        for key in ("name", "config", "inventory"):
            if key not in d:
                raise QPlanError(f"{where} lacks {key!r}")
        if not isinstance(d["config"], dict):
            raise QPlanError(f"{where}: 'config' must be a JSON object")
        source = d.get("source") or {}
        if not isinstance(source, dict):
            raise QPlanError(f"{where}: 'source' must be a JSON object")
        return cls(name=str(d["name"]), source=source, config=d["config"],
                   inventory=_inventory(d["inventory"], where))

    def to_json(self) -> dict[str, Any]:
        inv = self.inventory
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "source": self.source,
            "config": self.config,
            "inventory": inventory_json(inv),
        }


def inventory_json(inv: Inventory) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(inv):
        v = getattr(inv, f.name)
        if f.name in ("linear", "embeddings", "params", "buffers"):
            v = [_row_json(r) for r in v]
        elif f.name in ("tied",):
            v = [list(t) for t in v]
        elif f.name in ("attn_implementations", "attention_types"):
            v = list(v)
        elif f.name == "presets":
            v = {k: list(x) for k, x in v.items()}
        out[f.name] = v
    return out


def _row_json(row: Any) -> dict[str, Any]:
    return {f.name: (list(getattr(row, f.name)) if f.name == "shape" else getattr(row, f.name)) for f in fields(row)}


def _rows(kind: type, items: Any, where: str) -> tuple:
    if not isinstance(items, list):
        raise QPlanError(f"{where} must be a list")
    out = []
    names = {f.name for f in fields(kind)}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise QPlanError(f"{where}[{i}] must be a JSON object")
        missing = [n for n in names if n not in item]
        if missing:
            raise QPlanError(f"{where}[{i}] lacks {missing[0]!r}")
        vals = {n: item[n] for n in names}
        if "shape" in vals:
            if not isinstance(vals["shape"], list) or not all(isinstance(x, int) for x in vals["shape"]):
                raise QPlanError(f"{where}[{i}].shape must be a list of integers")
            vals["shape"] = tuple(vals["shape"])
        for n in ("in_features", "out_features", "num_embeddings", "embedding_dim", "instances"):
            if n in vals and (not isinstance(vals[n], int) or isinstance(vals[n], bool) or vals[n] < 0):
                raise QPlanError(f"{where}[{i}].{n} must be a non-negative integer")
        out.append(kind(**vals))
    return tuple(out)


def _inventory(d: Any, where: str) -> Inventory:
    if not isinstance(d, dict):
        raise QPlanError(f"{where}: 'inventory' must be a JSON object")
    w = f"{where}: inventory"
    for key in ("architecture", "model_type", "num_hidden_layers", "total_params", "linear", "embeddings", "params",
                "buffers", "tied"):
        if key not in d:
            raise QPlanError(f"{w} lacks {key!r}")
    presets = d.get("presets") or {}
    if not isinstance(presets, dict):
        raise QPlanError(f"{w}.presets must be a JSON object")
    return Inventory(
        generated_by=dict(d.get("generated_by") or {}),
        architecture=str(d["architecture"]),
        model_type=str(d["model_type"]),
        num_hidden_layers=int(d["num_hidden_layers"] or 0),
        output_head=d.get("output_head"),
        total_params=int(d["total_params"]),
        linear=_rows(LinearGroup, d["linear"], f"{w}.linear"),
        embeddings=_rows(EmbeddingGroup, d["embeddings"], f"{w}.embeddings"),
        params=_rows(ParamGroup, d["params"], f"{w}.params"),
        buffers=_rows(BufferGroup, d["buffers"], f"{w}.buffers"),
        tied=tuple(tuple(t) for t in d["tied"]),
        attn_implementations=tuple(d.get("attn_implementations") or ()),
        attn_default=str(d.get("attn_default") or "sdpa"),
        attention_types=tuple(d.get("attention_types") or ()),
        presets={k: tuple(v) for k, v in presets.items()},
        presets_source=dict(d.get("presets_source") or {}),
    )


# -------------------------------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class Gpu:
    """One GPU of the catalog (``model_specs/gpus/*.json``); the file's other keys are kept in ``extra``."""

    name: str
    total_bytes: int
    usable_bytes: int
    bf16: bool
    compute_capability: str = ""
    aliases: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> "Gpu":
        try:
            return cls(name=str(d["name"]), total_bytes=int(d["total_bytes"]), usable_bytes=int(d["usable_bytes"]),
                       bf16=bool(d["bf16"]), compute_capability=str(d.get("compute_capability", "")),
                       aliases=tuple(d.get("aliases", ())), extra=dict(d))
        except (KeyError, TypeError, ValueError) as exc:
            raise QPlanError(f"GPU file {where}: missing or invalid {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        """The catalog row as written in its file (``qplan gpus --format json``)."""
        return dict(self.extra)
