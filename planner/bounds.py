"""Physical bounds on everything qplan reads, as ``msgspec`` constrained types (data, not checks).

Generous beyond every released model (Llama-3.1-405B: 126 layers, hidden 16384, vocabulary 128k;
Gemma-3: 262k vocabulary; contexts of 1M tokens), far below absurd: a 10-million-layer config would
otherwise hang the meta-device build. ``planner.options`` (the plan options), ``planner.validate``
(configs, calibration, measured.json) and ``planner.document`` (plan.json) all use these.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta

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
Tokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS)]
GpuCount = Annotated[int, Meta(ge=1, le=MAX_GPUS)]


def lit(values: Any) -> Any:
    """``Literal[v1, v2, ...]`` of a vocabulary tuple (the choices a field accepts)."""
    return Literal.__getitem__(tuple(values))
