"""Module inventory: the real structure of a model, read from transformers on the meta device.

This is the only planner module that imports torch/transformers/peft (inside functions). It runs
when a spec is created (`qplan spec add`) or when `--model` is a path to a config; a bundled spec
already carries its inventory as data, so `qplan estimate` on a bundled model never gets here.

What is recorded, per group of identical modules (name pattern with layer indices replaced by
``*``):

* ``linear``: every ``nn.Linear`` / GPT-2 ``Conv1D`` — in/out features, bias, instances, and
  whether bitsandbytes would quantize it, decided by transformers' own rule
  (``HfQuantizer.get_modules_to_not_convert`` + ``should_convert_module``, and only
  ``type(m) is nn.Linear or isinstance(m, Conv1D)`` as in ``replace_with_bnb_linear``);
* ``embeddings``: ``nn.Embedding`` modules (LoRA can target them too);
* ``params``: every other parameter (norms, fused MoE expert tensors, routers, ...) with shape;
* ``buffers``: registered buffers (rotary ``inv_freq`` ...) with dtype — they sit on the GPU too;
* ``tied``: parameters shared between modules (stored once);
* ``presets``: the target-module lists of the presets, as names PEFT accepts.
"""

from __future__ import annotations

import re
from typing import Any

from qplan.planner.errors import QPlanError
from qplan.planner.model.weights import bnb_skip_modules

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")

ATTN_RE = re.compile(r"attention|attn", re.I)
MLP_RE = re.compile(r"mlp|feedforward|feed_forward|moe|expert|ffn", re.I)


def _pattern(name: str) -> str:
    """``model.layers.17.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``."""
    return _INDEX.sub("*", name)


def _role(model, name: str) -> str:
    """Classify a module as attention / mlp / head / other by the class names of its ancestors."""
    parts = name.split(".")
    classes = []
    for i in range(1, len(parts)):
        try:
            classes.append(type(model.get_submodule(".".join(parts[:i]))).__name__)
        except AttributeError:  # pragma: no cover - defensive
            continue
    for cls in reversed(classes):
        if ATTN_RE.search(cls):
            return "attn"
        if MLP_RE.search(cls):
            return "mlp"
    return "other"


def build_model_on_meta(config: dict[str, Any], dtype: str | None = None, task: str = "causal"):
    """Instantiate the causal-LM (``task="seq_cls"``: the reward model) of ``config`` on the meta device (no memory,
    exact shapes)."""
    try:
        from qplan.hf import model_from_config
    except ImportError as exc:  # pragma: no cover - qplan.hf ships with qplan
        raise QPlanError("building a spec from a config needs qplan's hf mapping") from exc
    return model_from_config(config, dtype=dtype, device="meta", task=task)


def _unique_suffixes(chosen: list[str], all_patterns: list[str]) -> list[str]:
    """Shortest dotted suffixes that PEFT's suffix match maps onto exactly ``chosen``.

    PEFT matches a string target ``t`` against a module key ``k`` when ``k == t`` or
    ``k.endswith('.' + t)`` (peft/tuners/tuners_utils.py ``check_target_module_exists``).
    GPT-2 has ``attn.c_proj`` and ``mlp.c_proj``: the suffix must be long enough to tell them apart.
    """
    out: list[str] = []
    for pat in chosen:
        parts = pat.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if "*" in suffix:
                continue
            hits = [p for p in all_patterns if p == suffix or p.endswith("." + suffix)]
            if all(h in chosen for h in hits):
                if suffix not in out:
                    out.append(suffix)
                break
        else:  # pragma: no cover - a full name always works
            out.append(pat)
    return out


def peft_moe_conversion(model_type: str) -> dict[str, Any] | None:
    """PEFT's rewrite of LoRA targets for MoE models whose experts transformers 5 fused into 3-D
    parameters, as data: the conditions of ``convert_peft_config_for_transformers`` /
    ``_convert_peft_config_moe`` (peft 0.21 ``utils/transformers_weight_conversion.py``) and its
    two tables for the model type. None where PEFT leaves the targets alone (also without PEFT)."""
    try:
        from peft.utils import transformers_weight_conversion as twc
    except ImportError:  # pragma: no cover - PEFT is part of the same extra
        return None
    if twc.get_checkpoint_conversion_mapping(model_type) is None:
        return None
    base = twc._MODEL_TO_CONVERSION_PATTERN.get(model_type)
    modules = twc._MOE_TARGET_MODULE_MAPPING.get(base) if base else None
    fused = twc._MOE_FUSED_TARGETS.get(base, {}) if base else {}
    if not modules or not fused:
        return None
    return {"modules": dict(modules), "fused": {k: list(v) for k, v in fused.items()}}


def text_only_idle_modules(model) -> list[str]:
    """Modules of a multimodal wrapper that a text-only training step never runs (the vision tower
    and the multimodal projector), as the shortest module names covering them.

    Found by running the model's own forward on the meta device with ``input_ids`` and ``labels``
    only (no ``pixel_values``, as in text-only fine-tuning) and recording, with forward hooks,
    which modules were called. Empty for a text model (every module runs). Their LoRA weights are
    created but get no gradient (``.grad`` stays None), so no optimizer state either.
    """
    import torch

    from qplan.observe.trace.patches import packed_sequences_on_meta

    if model.config.get_text_config() is model.config:
        return []
    ran: set[str] = set()
    names = {id(m): n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda mod, *_: ran.add(names[id(mod)])) for m in model.modules()]
    try:
        ids = torch.zeros((1, 8), dtype=torch.long, device="meta")
        with torch.no_grad(), packed_sequences_on_meta():
            model(input_ids=ids, labels=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    # a module is idle when nothing in its subtree ran (a ModuleList never runs itself)
    alive = {n.rsplit(".", k)[0] for n in ran for k in range(n.count(".") + 1)} | ran
    idle = [n for n, m in model.named_modules() if n and n not in alive and next(m.parameters(), None) is not None]
    return [n for n in idle if not any(n.startswith(o + ".") for o in idle)]


def build_inventory(config: dict[str, Any], task: str = "causal") -> dict[str, Any]:
    """Read every module of the model built from ``config`` on the meta device into plain data (``task="seq_cls"``: the
    reward model, the oracle of ``planner.model.seq_cls``)."""
    try:
        import torch
        import transformers
        from transformers.pytorch_utils import Conv1D

        import qplan.hf  # noqa: F401 - first: it quiets the import noise of kernels qplan never uses
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise QPlanError(
            "building a spec from a config needs torch and transformers: pip install 'qplan[train]'"
        ) from exc
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    # Built in bfloat16 so that what transformers keeps in float32 (``_keep_in_fp32_modules``,
    # rotary ``inv_freq``) shows as float32, and what follows the load dtype shows as bfloat16.
    model = build_model_on_meta(config, dtype="bfloat16", task=task)
    # a multimodal wrapper (Gemma-3 4B+, Mistral-3) keeps the language model's sizes in text_config
    text = model.config.get_text_config()
    idle = text_only_idle_modules(model)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    # a pre-quantized bitsandbytes checkpoint (``unsloth/*-bnb-4bit``, Unsloth's dynamic quants) names
    # the modules it left 16-bit: transformers uses that list instead of its default skips
    not_convert = HfQuantizer.get_modules_to_not_convert(
        model, bnb_skip_modules(config), getattr(model, "_keep_in_fp32_modules", None)
    )

    # ``_keep_in_fp32_modules_strict`` (DeepSeek-V3's ``e_score_correction_bias``): from_pretrained
    # loads matching state-dict keys in fp32 whatever the 16-bit dtype (modeling_utils ``_get_dtype_plan``,
    # a search of the key); from_config on meta does not, so apply it here
    strict = [re.compile(re.escape(s).replace(r"\*", ".*")) for s in getattr(model, "_keep_in_fp32_modules_strict", None) or []]
    state_keys = set(model.state_dict().keys())

    def strict_fp32(name: str) -> bool:
        return name in state_keys and any(s.search(name) for s in strict)

    def fp32(t, name: str = "") -> bool:
        return t is not None and (t.dtype == torch.float32 or strict_fp32(name))

    # tied parameters: same Parameter object reachable under several names
    owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            owners.setdefault(id(p), [])
            if full not in owners[id(p)]:
                owners[id(p)].append(full)
    tied = [names for names in owners.values() if len(names) > 1]
    canonical = {names[0] for names in owners.values()}  # the name named_parameters() keeps

    groups: dict[tuple, dict[str, Any]] = {}

    def add(kind: str, key: tuple, record: dict[str, Any]) -> None:
        if key in groups:
            groups[key]["instances"] += 1
        else:
            record["instances"] = 1
            record["kind"] = kind
            groups[key] = record

    covered: set[str] = set()
    for name, mod in model.named_modules():
        if not name:
            continue
        is_conv1d = isinstance(mod, Conv1D)
        if is_conv1d or isinstance(mod, torch.nn.Linear):
            if is_conv1d:
                in_f, out_f = (int(x) for x in mod.weight.shape)
            else:
                in_f, out_f = int(mod.in_features), int(mod.out_features)
            has_bias = getattr(mod, "bias", None) is not None
            weight_tied = f"{name}.weight" not in canonical
            quantizable = (type(mod) is torch.nn.Linear or is_conv1d) and should_convert_module(
                name, not_convert
            )
            pat = _pattern(name)
            add(
                "linear",
                ("linear", pat, in_f, out_f, has_bias, quantizable, weight_tied),
                {
                    "pattern": pat,
                    "module_type": type(mod).__name__,
                    "in_features": in_f,
                    "out_features": out_f,
                    "bias": has_bias,
                    "bnb_quantized": bool(quantizable),
                    "keep_fp32": fp32(mod.weight, f"{name}.weight"),
                    "role": "head" if name == head_name else _role(model, name),
                    "weight_tied": weight_tied,
                },
            )
            covered.update({f"{name}.weight", f"{name}.bias"})
        elif isinstance(mod, torch.nn.Embedding):
            pat = _pattern(name)
            weight_tied = f"{name}.weight" not in canonical
            add(
                "embedding",
                ("embedding", pat, mod.num_embeddings, mod.embedding_dim, weight_tied),
                {
                    "pattern": pat,
                    "module_type": type(mod).__name__,
                    "num_embeddings": int(mod.num_embeddings),
                    "embedding_dim": int(mod.embedding_dim),
                    "weight_tied": weight_tied,
                    "keep_fp32": fp32(mod.weight, f"{name}.weight"),
                },
            )
            covered.add(f"{name}.weight")

    for name, p in model.named_parameters():
        if name in covered:
            continue
        mod_name, _, p_name = name.rpartition(".")
        pat = _pattern(mod_name)
        shape = [int(x) for x in p.shape]
        add(
            "param",
            ("param", pat, p_name, tuple(shape)),
            {
                "pattern": pat,
                "param": p_name,
                "module_type": type(model.get_submodule(mod_name)).__name__ if mod_name else "",
                "shape": shape,
                "keep_fp32": fp32(p, name),
            },
        )

    for name, b in model.named_buffers():
        mod_name, _, b_name = name.rpartition(".")
        pat = _pattern(mod_name)
        shape = [int(x) for x in b.shape]
        # "load": cast with the model to its load dtype (e.g. Gemma's embed_scale); otherwise
        # the dtype transformers keeps it in whatever the load dtype (rotary inv_freq: float32).
        dtype = "load" if b.dtype == torch.bfloat16 else str(b.dtype).removeprefix("torch.")
        if strict_fp32(name):
            dtype = "float32"
        add(
            "buffer",
            ("buffer", pat, b_name, tuple(shape), dtype),
            {"pattern": pat, "buffer": b_name, "shape": shape, "dtype": dtype},
        )

    linear = [g for g in groups.values() if g["kind"] == "linear"]
    embeddings = [g for g in groups.values() if g["kind"] == "embedding"]
    params = [g for g in groups.values() if g["kind"] == "param"]
    buffers = [g for g in groups.values() if g["kind"] == "buffer"]
    for g in groups.values():
        del g["kind"]

    all_patterns = [g["pattern"] for g in linear] + [g["pattern"] for g in embeddings]
    body = [g["pattern"] for g in linear if g["role"] != "head"]
    attn = [g["pattern"] for g in linear if g["role"] == "attn"]
    mlp = [g["pattern"] for g in linear if g["role"] == "mlp"]
    presets: dict[str, list[str]] = {
        "attn": _unique_suffixes(attn, all_patterns),
        "mlp": _unique_suffixes(mlp, all_patterns),
        "all-linear": _unique_suffixes(body, all_patterns),
    }
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M

        default = M.get(model.config.model_type)
    except ImportError:  # pragma: no cover
        default = None
    qv_source = ""
    if default:
        presets["qv"] = list(default)
        qv_source = f"PEFT's default target_modules for model_type {model.config.model_type!r}"
    else:
        # No PEFT default (e.g. phi3, gemma3, mistral3): q and v live in separate q_proj/v_proj, or
        # in one fused projection (qkv_proj, query_key_value, Wqkv, c_attn) that then has to be
        # adapted whole. A multimodal wrapper's vision tower has q_proj/v_proj too, and PEFT
        # matches the names in both towers: so does this preset.
        leaves: dict[str, list[str]] = {}
        for g in linear:
            if g["role"] == "attn":
                leaves.setdefault(g["pattern"].rsplit(".", 1)[-1], []).append(g["pattern"])
        sep = [p for n in ("q_proj", "v_proj") for p in leaves.get(n, [])]
        fused = [p for n, ps in leaves.items() if re.search(r"qkv|query_key_value|c_attn", n, re.I) for p in ps]
        chosen = sep if ("q_proj" in leaves and "v_proj" in leaves) else fused
        if chosen:
            presets["qv"] = _unique_suffixes(chosen, all_patterns)
        qv_source = "no PEFT default for this model_type: q_proj+v_proj, else the fused qkv projection"

    transposed = sorted({_pattern(n) for n, m in model.named_modules() if getattr(m, "is_transposed", False) is True})
    total = sum(p.numel() for p in model.parameters())
    versions = {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    return {
        "generated_by": versions,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "num_hidden_layers": int(getattr(text, "num_hidden_layers", 0) or 0),
        "output_head": head_name,
        "total_params": int(total),
        "linear": linear,
        "embeddings": embeddings,
        "params": params,
        "buffers": buffers,
        "tied": tied,
        # attention implementations the architecture accepts (``_supports_sdpa`` /
        # ``_supports_flash_attn``; eager always) and the one transformers picks by default
        "attn_implementations": ["sdpa"] * bool(getattr(type(model), "_supports_sdpa", False))
        + ["flash_attention_2"] * bool(getattr(type(model), "_supports_flash_attn", False)) + ["eager"],
        "attn_default": str(getattr(model.config, "_attn_implementation", None) or "eager"),
        # distinct ``layer_types`` (sliding-window / global layers): eager builds one mask each
        "attention_types": sorted(set(getattr(text, "layer_types", None) or [])),
        "presets": presets,
        "moe_conversion": peft_moe_conversion(model.config.model_type),
        "transposed": transposed,
        "keep_fp32_fp16": sorted(getattr(model, "_keep_in_fp32_modules", None) or []),
        # multimodal wrappers: what a text-only step does not run (vision tower, projector)
        "text_only_idle": idle,
        "presets_source": {
            "qv": qv_source,
            "attn": "linear modules under an attention module (class name matches attention|attn)",
            "mlp": "linear modules under an MLP/MoE module (class name matches mlp|moe|expert|ffn)",
            "all-linear": "PEFT's all-linear: every nn.Linear/Conv1D except the output head",
        },
    }
