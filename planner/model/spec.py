"""Model specs and GPUs as frozen, typed records, read from (and written to) their JSON data files.

A spec is the Hugging Face config (kept as the plain dict it is), where it came from, and the
module inventory ``qplan.planner.model.inventory`` read off the model built on the meta device. The
JSON layout is unchanged: ``ModelSpec.from_json(d).to_json() == d`` for every bundled spec.
A field that is missing or of the wrong kind is one ``QPlanError`` line naming the file and field
(the rows are ``msgspec`` Structs: declared types and bounds, checked as the file is read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from qplan.planner.errors import QPlanError

SPEC_SCHEMA_VERSION = 1

Count = Annotated[int, Meta(ge=0)]
Dim = Annotated[int, Meta(ge=0, le=1 << 24)]


class LinearGroup(Struct, frozen=True, forbid_unknown_fields=True):
    """Identical ``nn.Linear`` / ``Conv1D`` modules (``*`` = layer index) and how bitsandbytes treats them."""

    pattern: str
    module_type: str
    in_features: Dim
    out_features: Dim
    bias: bool
    bnb_quantized: bool
    keep_fp32: bool
    role: str  # attn | mlp | head | other
    weight_tied: bool
    instances: Count


class EmbeddingGroup(Struct, frozen=True, forbid_unknown_fields=True):
    pattern: str
    module_type: str
    num_embeddings: Dim
    embedding_dim: Dim
    weight_tied: bool
    keep_fp32: bool
    instances: Count


class ParamGroup(Struct, frozen=True, forbid_unknown_fields=True):
    """Any other parameter: norms, fused MoE expert tensors, routers."""

    pattern: str
    param: str
    module_type: str
    shape: tuple[Dim, ...]
    keep_fp32: bool
    instances: Count


class BufferGroup(Struct, frozen=True, forbid_unknown_fields=True):
    """A registered buffer; ``dtype`` ``"load"`` follows the load dtype (Gemma's embed_scale)."""

    pattern: str
    buffer: str
    shape: tuple[Dim, ...]
    dtype: str
    instances: Count


class MoeConversion(Struct, frozen=True, forbid_unknown_fields=True):
    """How PEFT rewrites LoRA targets of a mixture-of-experts model whose experts transformers 5
    fused into 3-D parameters (``peft/utils/transformers_weight_conversion.py``
    ``_MOE_TARGET_MODULE_MAPPING`` / ``_MOE_FUSED_TARGETS``, read when the spec is built).

    ``modules``: a v4 module name -> the v5 parameter PEFT targets instead (``w1 -> gate_up_proj``,
    ``gate -> gate.weight``); ``fused``: a v5 parameter -> the v4 names fused into it, which must be
    targeted together and get ``r`` and ``alpha`` times their number.
    """

    modules: dict[str, str]
    fused: dict[str, tuple[str, ...]]


class Inventory(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    generated_by: dict[str, str]
    architecture: str
    model_type: str
    num_hidden_layers: Count
    output_head: str | None
    total_params: Count
    linear: tuple[LinearGroup, ...]
    embeddings: tuple[EmbeddingGroup, ...]
    params: tuple[ParamGroup, ...]
    buffers: tuple[BufferGroup, ...]
    tied: tuple[tuple[str, ...], ...]
    attn_implementations: tuple[str, ...] = ()
    attn_default: str = "sdpa"
    attention_types: tuple[str, ...] = ()
    presets: dict[str, tuple[str, ...]] = {}
    presets_source: dict[str, str] = {}
    #: PEFT's target rewrite for fused MoE experts (None: targets are used as given)
    moe_conversion: MoeConversion | None = None
    #: module patterns whose 3-D parameters are stored (experts, in, out) (``is_transposed``)
    transposed: tuple[str, ...] = ()
    #: ``_keep_in_fp32_modules``: state-dict keys containing one of these load in fp32 when the load dtype is fp16
    keep_fp32_fp16: tuple[str, ...] = ()
    #: module names a text-only training step never runs: a multimodal wrapper's vision tower and
    #: projector (found by a hooked meta-device forward, ``inventory.text_only_idle_modules``)
    text_only_idle: tuple[str, ...] = ()


class ModelSpec(Struct, frozen=True, kw_only=True):
    """A model spec file: frozen, typed, validated as it is read (``msgspec``)."""

    schema_version: int
    name: Annotated[str, Meta(min_length=1, max_length=1024)]
    config: dict[str, Any]
    inventory: Inventory
    source: dict[str, Any] = {}

    @property
    def model_type(self) -> str:
        return self.inventory.model_type

    @classmethod
    def from_json(cls, d: Any, where: str = "model spec") -> "ModelSpec":
        from qplan.planner.validate import check_config, explain

        if not isinstance(d, dict):
            raise QPlanError(f"{where} must be a JSON object")
        if d.get("schema_version") != SPEC_SCHEMA_VERSION:
            raise QPlanError(f"{where} has schema_version {d.get('schema_version')!r}, expected {SPEC_SCHEMA_VERSION}")
        for key in ("name", "config", "inventory"):
            if key not in d:
                raise QPlanError(f"{where} lacks {key!r}")
        if d.get("source") is None:
            d = {**d, "source": {}}
        try:
            spec = msgspec.convert(d, cls, strict=True)
        except msgspec.ValidationError as exc:
            raise QPlanError(explain(exc, d, lambda path: f"{where}: {path.lstrip('.') or 'spec'}")) from exc
        check_config(spec.config, f"{where}: config")
        return spec

    def to_json(self) -> dict[str, Any]:
        """The file's layout: schema_version, name, source, config, inventory."""
        return {"schema_version": self.schema_version, "name": self.name, "source": self.source,
                "config": self.config, "inventory": inventory_json(self.inventory)}


def inventory_json(inv: Inventory) -> dict[str, Any]:
    """The inventory as the JSON a spec file holds (tuples as lists, fields in order)."""
    return msgspec.json.decode(msgspec.json.encode(inv))


# -------------------------------------------------------------------------------------- GPUs


Tflops = Annotated[float, Meta(gt=0, le=1e7)] | None


class GpuDoc(Struct, kw_only=True):
    """A GPU catalog file or a device file (``--gpu my-device.json``): what plans read of it."""

    name: Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    total_bytes: Annotated[int, Meta(ge=1, le=1 << 50)]
    usable_bytes: Annotated[int, Meta(ge=1, le=1 << 50)]
    bf16: bool
    compute_capability: Annotated[str, Meta(max_length=10)] = ""
    aliases: list[Annotated[str, Meta(min_length=1, max_length=100)]] = []
    peak_bf16_tflops: Tflops = None
    peak_fp16_tflops: Tflops = None
    peak_fp32_tflops: Tflops = None
    memory_bandwidth_gb_s: Annotated[float, Meta(gt=0, le=1e7)] | None = None
    #: the link between the GPUs of one node (NVLink or PCIe) and its bidirectional bandwidth per GPU
    interconnect: Annotated[str, Meta(max_length=100)] | None = None
    interconnect_gb_s: Annotated[float, Meta(gt=0, le=1e7)] | None = None


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
    def from_json(cls, d: Any, where: str) -> "Gpu":
        """A catalog row or a device file, checked against ``GpuDoc`` (names, bytes, throughput)."""
        from qplan.planner.validate import explain

        if not isinstance(d, dict):
            raise QPlanError(f"device file {where} must hold a JSON object")
        try:
            doc = msgspec.convert(d, GpuDoc, strict=True)
        except msgspec.ValidationError as exc:
            raise QPlanError(explain(exc, d, lambda path: f"device file {where}: {path.lstrip('.') or 'device'}")) from exc
        return cls(name=doc.name, total_bytes=doc.total_bytes, usable_bytes=doc.usable_bytes, bf16=doc.bf16,
                   compute_capability=doc.compute_capability, aliases=tuple(doc.aliases), extra=dict(d))

    def to_json(self) -> dict[str, Any]:
        """The catalog row as written in its file (``qplan gpus --format json``)."""
        return dict(self.extra)
