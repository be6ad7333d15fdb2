"""LoRA targets and exact trainable-parameter counts, from a spec's module inventory.

Counts follow PEFT 0.21's layer construction (peft/tuners/lora/layer.py):

* ``Linear`` / ``Conv1D`` ``in -> out``: ``lora_A = nn.Linear(in, r)``, ``lora_B = nn.Linear(r, out)``
  -> ``r * (in + out)``; DoRA adds ``lora_magnitude_vector`` of ``out`` values.
* ``Embedding`` ``V x H``: ``lora_embedding_A (r, V)``, ``lora_embedding_B (H, r)`` -> ``r * (V + H)``;
  DoRA adds ``H``.
* ``bias="lora_only"``: the existing biases of targeted modules become trainable;
  ``bias="all"``: every parameter whose name ends in ``bias`` does.
* ``modules_to_save``: a full trainable copy of each matched module (``ModulesToSaveWrapper``).

Targets match module names the way PEFT does for a list of strings (``check_target_module_exists``):
``key == target`` or ``key.endswith("." + target)``.
The oracle for all of this is PEFT's ``get_nb_trainable_parameters()`` (tests/planner/test_lora.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from qplan.planner.errors import QPlanError
from qplan.planner.model.spec import EmbeddingGroup, LinearGroup, ModelSpec, ParamGroup
from qplan.planner.vocab import BIAS_MODES, BYTES, PRESETS, SAFETENSORS_DTYPE

#: ``ModuleCount.kind`` of LoRA-FA's ``lora_A``: part of the adapter (on the device, in its file), not trainable
FROZEN_A = "lora_frozen"
#: ``ModuleCount.kind`` of LoRA-FA's ``lora_embedding_A``: trainable (it gets a gradient) but never stepped (no state)
UNSTEPPED = "lora_unstepped"
#: kinds on the device and in the adapter file that never train: LoRA-FA's ``lora_A``, VeRA's shared projections
#: (``planner.model.vera``: buffers, not parameters)
FROZEN_KINDS = (FROZEN_A, "vera_projection")

#: qplan's LoRA dropout when none is given (0 where PEFT adapts parameters: ``lora.ParamWrapper`` refuses any)
DEFAULT_DROPOUT = 0.05


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float = DEFAULT_DROPOUT
    targets: str = "all-linear"
    bias: str = "none"
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    adapter_dtype: str = "float32"
    target_parameters: tuple[str, ...] = ()
    #: LoRA-FA (PEFT's ``create_lorafa_optimizer``, optimizer ``lorafa``): ``lora_A`` frozen at its initial value,
    #: only ``lora_B`` trains (set from the optimizer, not a ``LoraConfig`` field)
    fa: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise QPlanError(f"--r must be a positive integer, got {self.r}")
        if not (self.alpha > 0):
            raise QPlanError(f"--alpha must be > 0, got {self.alpha}")
        if not (0 <= self.dropout < 1):
            raise QPlanError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in BIAS_MODES:
            raise QPlanError(f"--bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        if self.adapter_dtype not in SAFETENSORS_DTYPE:
            raise QPlanError(f"adapter dtype must be float32, bfloat16 or float16, got {self.adapter_dtype!r}")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules_to_save"] = list(self.modules_to_save)
        d["target_parameters"] = list(self.target_parameters)
        d["scaling"] = self.scaling
        d.pop("fa")  # the plan's optimizer (``lorafa``) says it
        return d


def _matches(pattern: str, target: str) -> bool:
    return pattern == target or pattern.endswith("." + target)


def _leaf(pattern: str) -> str:
    return pattern.rsplit(".", 1)[-1]


def target_names(spec: ModelSpec, targets: str) -> list[str]:
    """The list of module names PEFT gets for ``targets`` (a preset or comma-separated names)."""
    inv = spec.inventory
    targets = targets.strip()
    if targets in PRESETS:
        names = inv.presets.get(targets)
        experts = sorted({p.param for p in inv.params if len(p.shape) == 3})
        if targets == "mlp" and names is not None and inv.moe_conversion is not None:
            # MoE: the expert projections by the names PEFT rewrites onto the fused experts (not the router)
            names = [*names, *(old for old, new in inv.moe_conversion.modules.items() if new in experts)]
        if names is None:
            raise QPlanError(
                f"preset {targets!r} is not defined for model_type {inv.model_type!r}; "
                f"name modules explicitly, e.g. --targets {','.join(inv.presets['attn'][:2])}"
            )
        if not names:
            hint = (f"; its experts are fused parameters: adapt them with --target-parameters {','.join(experts)}"
                    if experts else "")
            raise QPlanError(
                f"preset {targets!r} matches no nn.Linear in {spec.name} "
                f"({inv.architecture}); linear modules: {', '.join(linear_leaf_names(spec))}{hint}"
            )
        return list(names)
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise QPlanError("--targets is empty: give a preset (qv, attn, mlp, all-linear) or module names")
    return names


def peft_default_targets(spec: ModelSpec, defaults: dict[str, list[str]], label: str, choices: str) -> list[str]:
    """A PEFT method's default target modules for the spec's model type (PEFT's own table); one line in PEFT's words
    where it has none, naming ``choices`` (what ``--targets`` may name)."""
    if spec.model_type not in defaults:
        raise QPlanError(f"PEFT has no default {label} targets for model type {spec.model_type!r} ('Please specify "
                         f"`target_modules`'): give --targets ({choices})")
    return list(defaults[spec.model_type])


def linear_leaf_names(spec: ModelSpec) -> list[str]:
    inv = spec.inventory
    out: list[str] = []
    for g in inv.linear + inv.embeddings:
        leaf = _leaf(g.pattern)
        if leaf not in out:
            out.append(leaf)
    return out


@dataclass
class ModuleCount:
    module: str
    #: lora | lora_frozen, lora_unstepped (LoRA-FA's A) | dora_magnitude | bias | modules_to_save | lora_param | full |
    #: ia3, ia3_ff | prompt, prompt_mlp | ln_tuning
    kind: str
    shape: str
    instances: int
    params_per_instance: int
    dtype: str
    save_keys: list[tuple[str, list[int]]] = field(default_factory=list)
    #: ``lora_param`` only: elements of the wrapped parameter, and whether it is kept in fp32
    base_numel: int = 0
    base_fp32: bool = False

    @property
    def total(self) -> int:
        return self.instances * self.params_per_instance

    def to_json(self, dtype_bytes: int) -> dict[str, Any]:
        return {
            "module": self.module,
            "kind": self.kind,
            "shape": self.shape,
            "instances": self.instances,
            "params_per_instance": self.params_per_instance,
            "total": self.total,
            "bytes": self.total * dtype_bytes,
        }


def _expand(pattern: str, instances: int, num_layers: int) -> list[str]:
    """Concrete module names for a pattern (``*`` = layer index) — for adapter file keys."""
    stars = pattern.count("*")
    if stars == 0:
        return [pattern]
    if stars == 1:
        return [pattern.replace("*", str(i)) for i in range(instances)]
    # nested indices (e.g. per-expert modules): split instances evenly over the outer index
    outer = num_layers if num_layers and instances % num_layers == 0 else 1
    inner = instances // outer
    first, rest = pattern.split("*", 1)
    return [
        f"{first}{i}{name}" for i in range(outer) for name in _expand(rest, inner, 0)
    ]


@dataclass(frozen=True)
class PeftTargets:
    """What PEFT adapts once it has rewritten the targets (``LoraConfig`` fields, as PEFT ends with them)."""

    modules: list[str]
    parameters: list[str]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    #: a target given as a module name that PEFT moved to a fused expert parameter -> that parameter
    moved: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"target_modules": self.modules, "target_parameters": self.parameters,
                "rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern}


def resolve_targets(spec: ModelSpec, lora: LoraSettings) -> PeftTargets:
    """The targets PEFT 0.21 really adapts, with ``target_parameters`` for fused MoE experts.

    Where transformers 5 fused a MoE's experts into 3-D parameters (``spec.inventory.moe_conversion``),
    PEFT rewrites the targets before adapting (``_convert_peft_config_moe``): ``"all-linear"`` becomes the
    leaf names of every ``nn.Linear`` but the head plus every v4 expert/router name; then each target
    equal to (or ending in ``.``) a v4 name becomes that name's v5 parameter in ``target_parameters`` --
    including dense MLPs that share the name (DeepSeek's ``gate_proj``), which are then *not* adapted;
    v4 names fused into one parameter must be targeted together, and the fused parameter gets
    ``r`` and ``alpha`` times their number (``rank_pattern``/``alpha_pattern`` ``.*\\.<param>``).
    """
    inv = spec.inventory
    names = target_names(spec, lora.targets)
    params = list(dict.fromkeys(lora.target_parameters))
    conv = inv.moe_conversion
    if conv is None:
        return PeftTargets(names, params, {}, {}, {})
    if lora.targets.strip() == "all-linear":
        names = list(dict.fromkeys([_leaf(n) for n in names] + list(conv.modules)))
    remaining: list[str] = []
    moved: dict[str, str] = {}
    present: dict[str, set[str]] = {k: set() for k in conv.fused}
    for t in names:
        hit = next(((old, new) for old, new in conv.modules.items() if _matches(t, old)), None)
        if hit is None:
            remaining.append(t)
            continue
        old, new = hit
        moved[t] = new
        params.append(new)
        if new in conv.fused:
            present[new].add(old)
    rank: dict[str, int] = {}
    alpha: dict[str, float] = {}
    for new, olds in conv.fused.items():
        got = present[new]
        if 0 < len(got) < len(olds):
            raise QPlanError(f"PEFT cannot adapt {', '.join(sorted(got))} of {spec.name} without "
                             f"{', '.join(sorted(set(olds) - got))}: transformers 5 fuses them into {new}; target all of them")
        if len(got) == len(olds) > 1:
            rank[rf".*\.{re.escape(new)}"] = lora.r * len(olds)
            alpha[rf".*\.{re.escape(new)}"] = lora.alpha * len(olds)
    return PeftTargets(remaining, list(dict.fromkeys(params)), rank, alpha, moved)


def default_dropout(spec: ModelSpec, targets: str, target_parameters: tuple[str, ...] = ()) -> float:
    """The dropout a plan gets when none is given: ``DEFAULT_DROPOUT``, or 0 where PEFT adapts
    parameters (fused MoE experts), whose ``lora.ParamWrapper`` refuses any dropout."""
    probe = LoraSettings(r=1, alpha=1.0, dropout=0.0, targets=targets, target_parameters=target_parameters)
    return 0.0 if resolve_targets(spec, probe).parameters else DEFAULT_DROPOUT


def moved_targets_warning(spec: ModelSpec, lora: LoraSettings) -> str | None:
    """Say what PEFT's MoE rewrite changed: targets moved to fused expert parameters, and any dense
    ``nn.Linear`` of the same name (DeepSeek's first layers, shared experts) that is then not adapted."""
    tg = resolve_targets(spec, lora)
    if not tg.moved:
        return None
    skipped = [g.pattern for g in spec.inventory.linear if any(_matches(g.pattern, t) for t in tg.moved)]
    moved = ", ".join(sorted(set(tg.moved.values())))
    msg = f"PEFT adapts the fused experts through target_parameters ({moved}), with no dropout on them"
    if tg.rank_pattern:
        msg += f" with rank {', '.join(f'{r} for {k.rsplit(chr(92) + chr(46), 1)[-1]}' for k, r in tg.rank_pattern.items())}"
    if skipped:
        msg += (f"; the dense modules of the same names are NOT adapted ({', '.join(skipped)}): PEFT moves "
                f"{', '.join(sorted(tg.moved))} to the experts")
    return msg


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", key)``."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", key.replace("*", "0")):
            return v
    return default


def _param_candidates(spec: ModelSpec) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(module pattern, parameter name, shape, instances) of every parameter PEFT can find by name."""
    inv = spec.inventory
    out = [(p.pattern, p.param, tuple(p.shape), p.instances) for p in inv.params]
    for g in inv.linear:
        if not g.weight_tied:
            out.append((g.pattern, "weight", (g.out_features, g.in_features), g.instances))
        if g.bias:
            out.append((g.pattern, "bias", (g.out_features,), g.instances))
    for e in inv.embeddings:
        out.append((e.pattern, "weight", (e.num_embeddings, e.embedding_dim), e.instances))
    return out


def count_parameter_targets(spec: ModelSpec, lora: LoraSettings, tg: PeftTargets,
                            module_patterns: set[str]) -> list[ModuleCount]:
    """LoRA on parameters (``target_parameters``: PEFT's ``ParamWrapper``, peft/tuners/lora/layer.py).

    A 3-D parameter ``(E, a, b)`` holds ``E`` experts: ``lora_A = Linear(in, r*E)``,
    ``lora_B = Linear(r*E, out)`` -> ``r * E * (in + out)``, with ``(in, out) = (b, a)`` unless the
    module is ``is_transposed`` (then ``(a, b)``); a 2-D ``(out, in)`` parameter is one expert.
    ``r`` follows ``rank_pattern``. Each further parameter of the same module wraps the previous
    wrapper, so the first one's adapter is saved under ``<module>.base_layer.`` (one per later wrap).
    """
    if not tg.parameters:
        return []
    if lora.dropout:
        raise QPlanError(f"PEFT applies no dropout to LoRA on parameters ({', '.join(tg.parameters)}): "
                         "use --dropout 0 (lora.ParamWrapper raises for any other value)")
    if lora.use_dora:
        raise QPlanError(f"PEFT's DoRA cannot adapt parameters ({', '.join(tg.parameters)}): drop --dora")
    inv = spec.inventory
    hits = [c for c in _param_candidates(spec)
            if any(_matches(f"{c[0]}.{c[1]}", t) for t in tg.parameters)]
    for t in tg.parameters:
        if not any(_matches(f"{c[0]}.{c[1]}", t) for c in hits):
            raise QPlanError(f"target parameter {t!r} matches no parameter of {spec.name}; fused parameters: "
                             f"{', '.join(sorted({p.param for p in inv.params if len(p.shape) == 3})) or 'none'}")
    wrapped: dict[str, list[str]] = {}  # module -> its targeted parameters, in the order PEFT wraps them
    for mod, param, _, _ in hits:
        wrapped.setdefault(mod, []).append(param)
    out: list[ModuleCount] = []
    for mod, param, shape, instances in hits:
        if mod in module_patterns:
            raise QPlanError(f"{mod} is targeted as a module and its parameter {param!r} as a parameter; PEFT refuses both")
        if len(shape) not in (2, 3):
            raise QPlanError(f"PEFT adapts only 2-D or 3-D parameters; {mod}.{param} has shape {list(shape)}")
        r = _pattern_value(tg.rank_pattern, f"{mod}.{param}", lora.r)
        if len(shape) == 3:
            e, a, b = shape
            i_, o_ = (a, b) if mod in inv.transposed else (b, a)
        else:
            e, (o_, i_) = 1, shape
        wrap = "base_layer." * (len(wrapped[mod]) - 1 - wrapped[mod].index(param))
        shape_s = f"{param} {e}×({i_}→{o_})" if len(shape) == 3 else f"{param} {i_}→{o_}"
        fp32 = next((p.keep_fp32 for p in inv.params if p.pattern == mod and p.param == param), False)
        out.append(ModuleCount(mod, "lora_param", shape_s, instances, r * e * (i_ + o_), lora.adapter_dtype,
                               [(f"{wrap}lora_A.weight", [r * e, i_]), (f"{wrap}lora_B.weight", [o_, r * e])],
                               base_numel=math.prod(shape), base_fp32=fp32))
    return out


def count_lora(spec: ModelSpec, lora: LoraSettings, module_dtypes: dict[str, str] | None = None) -> list[ModuleCount]:
    """Per-module trainable parameters of ``lora`` on ``spec`` (one entry per module pattern)."""
    inv = spec.inventory
    tg = resolve_targets(spec, lora)
    names = tg.modules
    linear: tuple[LinearGroup | EmbeddingGroup, ...] = inv.linear
    emb: tuple[EmbeddingGroup, ...] = inv.embeddings
    ad = lora.adapter_dtype
    out: list[ModuleCount] = []
    matched: set[str] = set()
    if not names and not tg.parameters:
        raise QPlanError(f"no target is left for {spec.name}: give --targets or --target-parameters")
    for name in names:
        hits = [g for g in linear + emb if _matches(g.pattern, name)]
        if not hits:
            other = [p for p in inv.params if _matches(p.pattern, name)]
            if other:
                raise QPlanError(
                    f"target {name!r} is a {other[0].module_type}, which LoRA cannot adapt; "
                    f"targetable modules: {', '.join(linear_leaf_names(spec))}"
                )
            if any(_matches(f"{p.pattern}.{p.param}", name) for p in inv.params if len(p.shape) in (2, 3)):
                raise QPlanError(f"target {name!r} of {spec.name} is a parameter, not a module: "
                                 f"give it as --target-parameters {name} (PEFT's target_parameters)")
            raise QPlanError(
                f"target {name!r} matches no module of {spec.name}; "
                f"its linear modules are: {', '.join(linear_leaf_names(spec))}"
            )
        matched.update(g.pattern for g in hits)
    targeted = [g for g in linear + emb if g.pattern in matched]
    for g in targeted:
        r = _pattern_value(tg.rank_pattern, g.pattern, lora.r)
        if isinstance(g, LinearGroup):
            i_, o_ = g.in_features, g.out_features
            shape = f"{i_}→{o_}"
            per = r * (i_ + o_)
            keys_a, keys_b = ("lora_A.weight", [r, i_]), ("lora_B.weight", [o_, r])
            mag = o_
        else:
            i_, o_ = g.num_embeddings, g.embedding_dim
            shape = f"emb {i_}×{o_}"
            per = r * (i_ + o_)
            keys_a, keys_b = ("lora_embedding_A", [r, i_]), ("lora_embedding_B", [o_, r])
            mag = o_
        if lora.fa:  # LoRA-FA: lora_A is frozen (create_lorafa_optimizer: ``requires_grad_(False)``), on the device all the same
            # -- but only names holding "lora_A": an embedding's ``lora_embedding_A`` keeps its gradient, and the
            # optimizer, pairing it with ``lora_embedding_B``, never steps it (no state)
            kind = FROZEN_A if isinstance(g, LinearGroup) else UNSTEPPED
            out.append(ModuleCount(g.pattern, kind, shape, g.instances, r * i_, ad, [keys_a]))
            out.append(ModuleCount(g.pattern, "lora", shape, g.instances, r * o_, ad, [keys_b]))
        else:
            out.append(ModuleCount(g.pattern, "lora", shape, g.instances, per, ad, [keys_a, keys_b]))
        if lora.use_dora:
            out.append(ModuleCount(g.pattern, "dora_magnitude", f"{mag}", g.instances, mag, ad,
                                   [("lora_magnitude_vector", [mag])]))
    out.extend(count_parameter_targets(spec, lora, tg, matched))
    if lora.bias in ("lora_only", "all"):
        # existing biases become trainable; a wrapped (targeted) module's bias is saved as
        # ``<module>.base_layer.bias`` (peft/utils/save_and_load.py get_peft_model_state_dict)
        dt = (module_dtypes or {}).get("bias", ad)
        pool = targeted if lora.bias == "lora_only" else linear
        for g in pool:
            if isinstance(g, LinearGroup) and g.bias and not g.weight_tied:
                key = "base_layer.bias" if g.pattern in matched else "bias"
                out.append(ModuleCount(g.pattern, "bias", f"{g.out_features}", g.instances,
                                       g.out_features, dt, [(key, [g.out_features])]))
    if lora.bias == "all":
        for p in inv.params:
            if p.param == "bias":
                n = math.prod(p.shape)
                out.append(ModuleCount(p.pattern, "bias", "×".join(map(str, p.shape)),
                                       p.instances, n, dt, [("bias", list(p.shape))]))
    for name in lora.modules_to_save:
        hits: list[LinearGroup | EmbeddingGroup | ParamGroup] = [g for g in linear + emb if _matches(g.pattern, name)]
        hits += [p for p in inv.params if _matches(p.pattern, name)]
        if not hits:
            raise QPlanError(
                f"--modules-to-save {name!r} matches no module of {spec.name}; "
                f"modules: {', '.join(linear_leaf_names(spec))}"
            )
        seen: set[str] = set()
        for g in hits:
            if isinstance(g, LinearGroup):
                n = g.in_features * g.out_features + (g.out_features if g.bias else 0)
                shape = f"{g.in_features}→{g.out_features}"
                keys = [("weight", [g.out_features, g.in_features])]
                if g.bias:
                    keys.append(("bias", [g.out_features]))
            elif isinstance(g, EmbeddingGroup):
                n = g.num_embeddings * g.embedding_dim
                shape = f"emb {g.num_embeddings}×{g.embedding_dim}"
                keys = [("weight", [g.num_embeddings, g.embedding_dim])]
            else:
                n = math.prod(g.shape)
                shape = "×".join(map(str, g.shape))
                keys = [(g.param, list(g.shape))]
            key = g.pattern + shape
            if key in seen:
                continue
            seen.add(key)
            dt = (module_dtypes or {}).get("modules_to_save", ad)
            out.append(ModuleCount(g.pattern, "modules_to_save", shape, g.instances, n, dt, keys))
    return out


def trainable_params(counts: list[ModuleCount]) -> int:
    """Every trainable parameter: adapters, DoRA magnitudes, unfrozen biases, modules_to_save copies (not LoRA-FA's
    frozen ``lora_A``)."""
    return sum(c.total for c in counts if c.kind not in FROZEN_KINDS)


def added_params(counts: list[ModuleCount]) -> int:
    """Parameters the adapter adds to the model (unfrozen biases and a full fine-tuning's trained weights already
    existed; copies are new)."""
    return sum(c.total for c in counts if c.kind not in ("bias", "full", "vera_projection"))


def adapter_file_bytes(spec: ModelSpec, counts: list[ModuleCount]) -> int:
    """Exact size of ``adapter_model.safetensors`` written by PEFT's ``save_pretrained``.

    safetensors layout (safetensors/src/tensor.rs ``prepare``/``serialize``): an 8-byte
    little-endian header length, a compact JSON header — ``__metadata__`` first (PEFT passes
    ``{"format": "pt"}``), then one entry per tensor sorted by dtype (larger first) and name,
    with ``data_offsets`` — padded with spaces to a multiple of 8, then the raw tensor bytes.
    PEFT's keys are the module names under ``base_model.model.`` with the adapter name removed (a prompt-learning
    method saves its prompt as ``prompt_embeddings``).
    """
    L = spec.inventory.num_hidden_layers
    tensors: list[tuple[str, str, list[int]]] = []
    for c in counts:
        st = SAFETENSORS_DTYPE[c.dtype if c.dtype in SAFETENSORS_DTYPE else "float32"]
        if c.kind == "prompt":  # prompt tuning (planner.model.prompt): get_peft_model_state_dict's one key
            tensors.append(("prompt_embeddings", st, list(c.save_keys[0][1])))
            continue
        if c.kind == "prompt_mlp":  # p-tuning's encoder: its output is the saved prompt, it is not saved itself
            continue
        if c.kind == "vera_projection":  # VeRA's shared projections (save_projection): one key each
            tensors.extend((f"base_model.{k}", st, list(shape)) for k, shape in c.save_keys)
            continue
        for mod in _expand(c.module, c.instances, L):
            for suffix, shape in c.save_keys:
                tensors.append((f"base_model.model.{mod}.{suffix}", st, shape))
    order = {"F32": 0, "BF16": 1, "F16": 1}
    tensors.sort(key=lambda t: (order[t[1]], t[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, st, shape in tensors:
        n = math.prod(shape) * (BYTES["float32"] if st == "F32" else BYTES["bfloat16"])
        header[name] = {"dtype": st, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    return 8 + len(blob) + offset
