"""Bytes of the base model's weights as the device holds them, for every quantization mode.

Each function is pure: integers in, integer bytes out. Sources are bitsandbytes 0.50.2
(``bitsandbytes/nn/modules.py`` ``Params4bit``/``Int8Params``, ``functional.py``
``quantize_4bit``/``QuantState``) and transformers 5.23 (``integrations/bitsandbytes.py``
``replace_with_bnb_linear``, ``quantizers/base.py`` ``get_keys_to_not_convert``). The oracle is a
model really quantized by bitsandbytes on the CPU (tests/planner/test_weights.py): the sum of
every tensor storage it holds, and ``get_memory_footprint()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgspec

from qplan.planner.errors import QPlanError, shown
from qplan.planner.model.spec import LinearGroup, ModelSpec
from qplan.planner.vocab import BYTES, COMPUTE_DTYPES, DTYPE_ALIASES, FOUR_BIT, KBIT, QUANTS

#: bitsandbytes' default 4-bit block size on CUDA and CPU (``Params4bit(blocksize=64)``).
BNB_4BIT_BLOCKSIZE = 64
#: block size of the second-level (double) quantization of absmax (``compress_statistics``:
#: ``quantize_blockwise(absmax - offset, blocksize=256)``).
BNB_NESTED_BLOCKSIZE = 256
#: fp32 entries of a 4-bit code book (``get_4bit_type``: 16 values), one copy per layer.
BNB_4BIT_CODE_ENTRIES = 16
#: fp32 entries of the dynamic 8-bit map used for the nested absmax (``create_dynamic_map``).
BNB_NESTED_CODE_ENTRIES = 256


@dataclass(frozen=True)
class QuantSettings:
    quant: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    upcast_kbit: bool = True  # peft.prepare_model_for_kbit_training casts fp16/bf16 params to fp32
    #: a pre-quantized checkpoint's ``llm_int8_skip_modules`` (already applied to the spec's inventory)
    skip_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise QPlanError(f"--quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise QPlanError(f"--compute-dtype must be bf16, fp16 or fp32, got {self.compute_dtype!r}")

    @property
    def kbit(self) -> bool:
        return self.quant in KBIT

    @property
    def load_dtype(self) -> str:
        """dtype of every tensor bitsandbytes does not quantize, as loaded."""
        return self.compute_dtype if self.kbit else DTYPE_ALIASES[self.quant]

    @property
    def unquantized_dtype(self) -> str:
        """dtype of unquantized parameters during training (after the k-bit upcast, if any)."""
        return "float32" if (self.kbit and self.upcast_kbit) else self.load_dtype

    def to_json(self) -> dict[str, Any]:
        d = {"quant": self.quant, "compute_dtype": self.compute_dtype}
        if self.quant in FOUR_BIT:
            d["double_quant"] = self.double_quant
            d["blocksize"] = BNB_4BIT_BLOCKSIZE
        if self.kbit:
            d["prepare_model_for_kbit_training"] = self.upcast_kbit
        d["load_dtype"] = self.load_dtype
        d["unquantized_dtype"] = self.unquantized_dtype
        if self.skip_modules is not None:
            d["skip_modules"] = list(self.skip_modules)
        return d


def bnb_skip_modules(config: dict[str, Any]) -> list[str] | None:
    """``quantization_config.llm_int8_skip_modules`` of a pre-quantized bitsandbytes checkpoint, else None."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes":
        skip = qc.get("llm_int8_skip_modules")
        if isinstance(skip, list) and all(isinstance(s, str) for s in skip):
            return list(skip)
    return None


#: ``quantization_config.quant_method`` of checkpoints whose weights stay packed while LoRA trains on them
#: (transformers' quantizers that keep their own linear layers): not planned, refused by name
PACKED_METHODS = ("gptq", "awq", "aqlm", "hqq", "eetq", "vptq", "spqr", "higgs", "quanto", "bitnet", "compressed-tensors",
                  "torchao", "fbgemm_fp8", "auto-round", "quark")


def checkpoint_quant(spec: ModelSpec, q: QuantSettings) -> tuple[QuantSettings, list[str]]:
    """Plan a checkpoint saved quantized as it loads: a bitsandbytes ``quantization_config`` in the
    config (``unsloth/*-bnb-4bit``) fixes the quantization, and its ``llm_int8_skip_modules`` (Unsloth's
    dynamic quants keep some modules 16-bit) is honoured. A checkpoint whose weights stay packed while LoRA trains
    on top (``PACKED_METHODS``: GPTQ, AWQ, AQLM, HQQ, ...) is refused in one line: its weights are not what any
    ``--quant`` plans (issue 23: refuse the formats that cannot be read, never plan them as something else).
    FP8 and MXFP4 checkpoints (DeepSeek-V3, gpt-oss) are dequantized to 16 bits to be fine-tuned (transformers'
    ``dequantize``): planned as ``--quant`` says, with a warning."""
    qc = spec.config.get("quantization_config")
    if not isinstance(qc, dict):
        return q, []
    method = qc.get("quant_method")
    if method in PACKED_METHODS:
        raise QPlanError(f"{spec.name}'s checkpoint is saved quantized with {method} (its quantization_config), whose "
                         "packed weights qplan does not plan yet (it plans bitsandbytes checkpoints, 16/32-bit ones, and "
                         "FP8/MXFP4 ones dequantized)")
    if method != "bitsandbytes":
        return q, [f"{spec.name}'s checkpoint is saved quantized with {shown(method) if method else 'an unknown method'} "
                   f"(quantization_config); qplan plans its weights as --quant {q.quant} says (dequantized to train)"]
    if qc.get("load_in_4bit"):
        want, dq = str(qc.get("bnb_4bit_quant_type") or "fp4"), bool(qc.get("bnb_4bit_use_double_quant", False))
    elif qc.get("load_in_8bit"):
        want, dq = "int8", q.double_quant
    else:
        return q, []
    if q.quant != want or (want in FOUR_BIT and q.double_quant != dq):
        flags = f"--quant {want}" + ((" --double-quant" if dq else " --no-double-quant") if want in FOUR_BIT else "")
        raise QPlanError(f"{spec.name} is a checkpoint saved in bitsandbytes {want}"
                         f"{' with double quantization' if dq and want in FOUR_BIT else ''}: it loads only that way; "
                         f"plan it with {flags}")
    skip = bnb_skip_modules(spec.config)
    return QuantSettings(q.quant, q.double_quant, q.compute_dtype, q.upcast_kbit, None if skip is None else tuple(skip)), []


def quant4_packed_bytes(numel: int) -> int:
    """Packed 4-bit weight: two values per byte, ``ceil(numel / 2)`` bytes (``Params4bit`` uint8)."""
    return (numel + 1) // 2


def quant4_state_bytes(numel: int, double_quant: bool, blocksize: int = BNB_4BIT_BLOCKSIZE) -> int:
    """Quantization constants of one 4-bit weight (``QuantState`` tensors on the device).

    ``n_blocks = ceil(numel / blocksize)``. Without double quantization: ``absmax`` fp32 per block.
    With it: ``absmax`` uint8 per block, an fp32 ``offset`` scalar, and a nested state —
    ``absmax`` fp32 per 256 blocks and its fp32 256-entry code. Always: the fp32 16-entry code
    book (nf4 or fp4), which each layer holds its own copy of.
    """
    n_blocks = math.ceil(numel / blocksize)
    code = BNB_4BIT_CODE_ENTRIES * 4
    if not double_quant:
        return code + 4 * n_blocks
    nested = 4 * math.ceil(n_blocks / BNB_NESTED_BLOCKSIZE) + 4 * BNB_NESTED_CODE_ENTRIES
    return code + n_blocks + 4 + nested


def int8_state_bytes(out_features: int) -> int:
    """LLM.int8 row scales: ``SCB`` fp32 per output row (``Int8Params``); ``CB`` shares the weight."""
    return 4 * out_features


def is_quantized(g: LinearGroup, q: QuantSettings) -> bool:
    """Whether bitsandbytes converts the linear group ``g`` under ``q`` (transformers' rule,
    recorded as ``bnb_quantized``; tied weights and ``_keep_in_fp32_modules`` stay as they are)."""
    return bool(q.kbit and g.bnb_quantized and not g.keep_fp32 and not g.weight_tied)


def linear_weight_bytes(g: LinearGroup, q: QuantSettings) -> tuple[int, int]:
    """(weight bytes, quantization-constant bytes) of one linear module instance's own weight, as
    stored: int8, packed 4-bit, or the unquantized dtype (bias not included)."""
    n = g.in_features * g.out_features
    if is_quantized(g, q):
        if q.quant == "int8":
            return n, int8_state_bytes(g.out_features)
        return quant4_packed_bytes(n), quant4_state_bytes(n, q.double_quant)
    return n * BYTES["float32" if g.keep_fp32 else q.unquantized_dtype], 0


def linear_instance_bytes(g: LinearGroup, q: QuantSettings) -> tuple[int, int]:
    """(footprint bytes, extra device bytes) of one linear module instance (bias included; a tied
    weight is stored once, by the module that owns it)."""
    bias = g.out_features if g.bias else 0
    bias_b = bias * BYTES["float32" if g.keep_fp32 else q.unquantized_dtype]
    if g.weight_tied:
        return bias_b, 0
    w, extra = linear_weight_bytes(g, q)
    return w + bias_b, extra


def fp16_kept_fp32(spec: ModelSpec, q: QuantSettings, key: str) -> bool:
    """Whether ``from_pretrained`` loads the state-dict ``key`` in fp32 although the load dtype is fp16:
    transformers' ``_keep_in_fp32_modules`` (modeling_utils ``_get_dtype_plan``: only for fp16, a
    substring search of the key; gpt-oss keeps its norms in fp32)."""
    return q.load_dtype == "float16" and any(s in key for s in spec.inventory.keep_fp32_fp16)


def weights_breakdown(spec: ModelSpec, q: QuantSettings) -> dict[str, int]:
    """Device bytes of the base model by part: quantized weights, their constants, the rest.

    ``quantized`` — packed/int8 weights of the modules bitsandbytes converts;
    ``quant_state`` — their constants (absmax, codes, nested state, int8 row scales);
    ``unquantized`` — every other parameter (embeddings, head, norms, biases, non-Linear
    parameters such as fused MoE experts) in its training dtype, tied parameters once;
    ``buffers`` — registered buffers (rotary ``inv_freq`` ...), in their own dtype.
    """
    inv = spec.inventory
    out = {"quantized": 0, "quant_state": 0, "unquantized": 0, "buffers": 0}
    for g in inv.linear:
        if not g.keep_fp32 and fp16_kept_fp32(spec, q, f"{g.pattern}.weight"):
            g = msgspec.structs.replace(g, keep_fp32=True)
        foot, extra = linear_instance_bytes(g, q)
        k = g.instances
        if is_quantized(g, q):
            bias_dt = q.unquantized_dtype
            bias_b = (g.out_features if g.bias else 0) * BYTES[bias_dt]
            out["quantized"] += k * (foot - bias_b)
            out["unquantized"] += k * bias_b
            out["quant_state"] += k * extra
        else:
            out["unquantized"] += k * foot
    for e in inv.embeddings:
        if e.weight_tied:
            continue
        dt = "float32" if e.keep_fp32 or fp16_kept_fp32(spec, q, f"{e.pattern}.weight") else q.unquantized_dtype
        out["unquantized"] += e.instances * e.num_embeddings * e.embedding_dim * BYTES[dt]
    for p in inv.params:
        dt = "float32" if p.keep_fp32 or fp16_kept_fp32(spec, q, f"{p.pattern}.{p.param}") else q.unquantized_dtype
        out["unquantized"] += p.instances * math.prod(p.shape) * BYTES[dt]
    for b in inv.buffers:
        dt = q.load_dtype if b.dtype == "load" else b.dtype
        if b.dtype == "load" and fp16_kept_fp32(spec, q, f"{b.pattern}.{b.buffer}"):
            dt = "float32"
        out["buffers"] += b.instances * math.prod(b.shape) * BYTES[dt]
    return out


def weights_bytes(spec: ModelSpec, q: QuantSettings) -> int:
    """Every byte of the base model the device holds: ``sum(weights_breakdown)``.

    Quantized weights + quantization constants + unquantized parameters + buffers.
    Checked against the bytes of every tensor storage of a model quantized by bitsandbytes.
    """
    return sum(weights_breakdown(spec, q).values())


def weights_footprint_bytes(spec: ModelSpec, q: QuantSettings) -> int:
    """What ``model.get_memory_footprint()`` prints: parameters (packed, for 4-bit) and buffers.

    transformers sums ``numel * element_size`` over ``parameters()`` and ``buffers()``: the
    quantization constants are not parameters, so they are left out.
    """
    b = weights_breakdown(spec, q)
    return b["quantized"] + b["unquantized"] + b["buffers"]


def base_params(spec: ModelSpec) -> int:
    """Parameters of the base model, tied ones once (``model.num_parameters()``)."""
    return int(spec.inventory.total_params)


def unquantized_expert_bytes(spec: ModelSpec, q: QuantSettings) -> tuple[int, int]:
    """(parameters, device bytes) of the fused 3-D MoE expert tensors under ``q``.

    bitsandbytes converts only ``nn.Linear`` modules (transformers ``replace_with_bnb_linear``); the
    experts transformers 5 fuses into 3-D ``nn.Parameter`` stacks stay in the load dtype, and
    ``prepare_model_for_kbit_training`` casts them to fp32 like any other non-quantized parameter.
    Checked against a model really quantized by bitsandbytes (tests/planner/test_moe.py)."""
    n = sum(p.instances * math.prod(p.shape) for p in spec.inventory.params if len(p.shape) == 3)
    return n, n * BYTES[q.unquantized_dtype]


def unquantized_experts_warning(spec: ModelSpec, q: QuantSettings) -> str | None:
    """The warning a k-bit plan of a MoE model carries: what its unquantized experts cost."""
    n, b = unquantized_expert_bytes(spec, q)
    if not (q.kbit and n):
        return None
    total = weights_bytes(spec, q)
    names = sorted({p.param for p in spec.inventory.params if len(p.shape) == 3})
    gib = 2**30
    msg = (f"bitsandbytes does not quantize the fused expert tensors ({', '.join(names)}): their {n:,} parameters "
           f"stay {q.unquantized_dtype}, {b / gib:.2f} GiB of the {total / gib:.2f} GiB of weights")
    if q.unquantized_dtype == "float32":
        half = n * BYTES[q.load_dtype]
        msg += (f" (prepare_model_for_kbit_training upcasts them to fp32: --no-upcast keeps them {q.load_dtype}, "
                f"{half / gib:.2f} GiB)")
    return msg + "; only the attention and dense linear layers are 4/8-bit"
