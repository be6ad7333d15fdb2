"""One mapping from a plan (or a spec's config) to Hugging Face objects.

The inventory (``qplan.planner.model.inventory``), the trace (``qplan.observe.trace``), the backends
(``qplan.backends``), the benchmarks and the tests all build their transformers config,
``BitsAndBytesConfig``, ``LoraConfig`` and models here, so the oracle and the backend it
predicts load the model through the same code:

* ``hf_config(config)`` — ``AutoConfig.for_model(model_type, **config)`` without the keys that
  describe a checkpoint rather than the architecture (``NOT_ARCHITECTURE``);
* ``bnb_config(quant)`` — the plan's ``quant`` section as ``BitsAndBytesConfig`` (None for 16/32-bit);
* ``lora_kwargs(lora)`` / ``lora_config(lora)`` — the plan's ``lora`` section as the keyword
  arguments PEFT's ``LoraConfig`` and Unsloth's ``get_peft_model`` take, and as a ``LoraConfig``;
* ``model_class(config)`` — the auto class of a model type: ``AutoModelForCausalLM``, or for a
  multimodal wrapper that has no causal-LM mapping (Mistral-3) ``AutoModelForImageTextToText``;
* ``model_from_config(config, ...)`` — ``model_class(...).from_config`` (meta device or CPU);
* ``load_model(path, plan, device)`` — ``from_pretrained`` the way the plan says.

torch, transformers and PEFT are imported inside the functions: importing this module is free.
"""

from __future__ import annotations

import logging
from typing import Any

from qplan.planner.errors import QPlanError
from qplan.planner.vocab import DTYPE_ALIASES, FOUR_BIT, KBIT

#: loggers that write a stray stderr line on import, about kernels qplan never uses, on every command that builds a
#: model (the planner's spec builder imports this module before torch and transformers): bitsandbytes' CPU backend
#: (an optional CPU kernel package is not installed; models are built on the meta device), torchao (which
#: transformers imports when it is installed: its CUDA-only extensions do not load on a CPU machine) and torch's
#: pytree (torchao registers Enums as pytree constants, which torch 2.13 calls deprecated)
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "torchao", "torch.utils._pytree")


def quiet_import_noise() -> None:
    """Errors only from ``QUIET_LOGGERS`` (see there)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


quiet_import_noise()

#: config keys that describe a checkpoint, not the architecture (dropped before ``for_model``):
#: a pre-quantized checkpoint's ``quantization_config`` is applied by ``bnb_config``, and the
#: dtype is always passed explicitly
NOT_ARCHITECTURE = ("transformers_version", "_name_or_path", "architectures", "auto_map", "quantization_config",
                    "torch_dtype", "dtype")


def _one_line(exc: BaseException) -> str:
    """The most specific line of a (possibly multi-line) library error message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _need(what: str) -> QPlanError:
    return QPlanError(f"{what} needs torch, transformers and peft: pip install 'qplan[train]'")


def require_optimizer(name: str) -> None:
    """One line when the plan's optimizer needs a library that is not installed (torchao's low-bit AdamW),
    before anything is built: transformers would raise a multi-line ImportError from inside the Trainer."""
    import importlib.util

    from qplan.planner.vocab import optimizer

    state = optimizer(name).state
    if state.startswith("torchao") and importlib.util.find_spec("torchao") is None:
        raise QPlanError(f"optimizer {name} is torchao's: pip install 'qplan[torchao]' (torchao>=0.11)")
    if state == "schedulefree" and importlib.util.find_spec("schedulefree") is None:
        raise QPlanError(f"optimizer {name} is the schedulefree package's: pip install 'qplan[schedulefree]'")


def peft_optimizer(model: Any, name: str, lora: dict[str, Any] | None, lr: float, weight_decay: float = 0.0) -> Any:
    """Optimizer ``name`` where PEFT makes it (``vocab.Optimizer.peft``), for ``Trainer(optimizers=...)``; None for a
    ``TrainingArguments.optim`` one. ``lorafa``: ``peft.optimizers.create_lorafa_optimizer(model, r, lora_alpha, lr,
    weight_decay)`` with the plan's ``lora`` section (LoRA-FA: freezes every ``lora_A``), as PEFT's method comparison
    makes it."""
    from qplan.planner.vocab import optimizer

    if not optimizer(name).peft:
        return None
    from peft.optimizers import create_lorafa_optimizer

    return create_lorafa_optimizer(model, r=int(lora["r"]), lora_alpha=lora["alpha"], lr=lr,
                                   weight_decay=weight_decay)


def torch_dtype(name: str) -> Any:
    """``"bf16"``/``"bfloat16"``/... -> ``torch.bfloat16``."""
    import torch

    return getattr(torch, DTYPE_ALIASES[name])


def hf_config(config: dict[str, Any]) -> Any:
    """The transformers config object of a config dict; bad configs are one ``QPlanError`` line."""
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise _need("building a model from a config") from exc
    cfg = {k: v for k, v in config.items() if k not in NOT_ARCHITECTURE}
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise QPlanError("config has no 'model_type': is this a Hugging Face config.json?")
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as exc:
        if model_type not in transformers.CONFIG_MAPPING:
            raise QPlanError(f"transformers {transformers.__version__} does not know model_type {model_type!r}") from exc
        raise QPlanError(f"invalid {model_type} config: {_one_line(exc)}") from exc
    except Exception as exc:
        raise QPlanError(f"invalid {model_type} config: {_one_line(exc)}") from exc


def model_class(hf: Any, task: str = "causal") -> Any:
    """The auto class that builds the whole model of a transformers config: ``AutoModelForCausalLM``
    where the model type has a causal-LM mapping (text models; Gemma-3's ``gemma3`` maps to
    ``Gemma3ForConditionalGeneration`` there), else ``AutoModelForImageTextToText`` for a multimodal
    wrapper without one (``mistral3`` -> ``Mistral3ForConditionalGeneration``): vision tower,
    projector and language model, as ``from_pretrained`` of the Hub checkpoint builds them. ``task="seq_cls"``:
    ``AutoModelForSequenceClassification`` (a reward model: TRL's ``RewardTrainer`` loads that, ``num_labels=1``)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification

    if task == "seq_cls":
        return AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    mt = getattr(hf, "model_type", None)
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def model_from_config(config: dict[str, Any] | Any, *, dtype: str | None = None, attn_impl: str | None = None,
                      device: str = "meta", task: str = "causal") -> Any:
    """``model_class(cfg, task).from_config`` on ``device`` (``meta``: exact shapes, no memory); ``task="seq_cls"``: the
    reward model, one label, its config's ``pad_token_id`` set (the head pools each row's last non-pad token: the
    trainer sets it from the tokenizer; here the EOS id, or 0)."""
    import torch

    hf = hf_config(config) if isinstance(config, dict) else config
    if task == "seq_cls":
        hf = seq_cls_config(hf)
    kwargs: dict[str, Any] = {}
    if dtype:
        kwargs["dtype"] = torch_dtype(dtype)
    if attn_impl:
        kwargs["attn_implementation"] = attn_impl
    try:
        with torch.device(device):
            return model_class(hf, task).from_config(hf, **kwargs)
    except Exception as exc:
        raise QPlanError(f"cannot build model_type {hf.model_type!r} from this config: {_one_line(exc)}") from exc


def seq_cls_config(hf: Any) -> Any:
    """A copy of ``hf`` for a reward model: ``num_labels=1`` (TRL's ``RewardTrainer``), a ``pad_token_id`` (the EOS
    id, else 0) when the config has none."""
    import copy

    hf = copy.deepcopy(hf)
    hf.num_labels = 1
    text = hf.get_text_config()
    if getattr(text, "pad_token_id", None) is None:
        eos = getattr(text, "eos_token_id", None)
        text.pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    return hf


def bnb_config(quant: dict[str, Any]) -> Any | None:
    """The ``BitsAndBytesConfig`` of a plan's ``quant`` section; None for a 16/32-bit base.

    nf4/fp4 -> ``load_in_4bit=True, bnb_4bit_quant_type, bnb_4bit_use_double_quant,
    bnb_4bit_compute_dtype``; int8 -> ``load_in_8bit=True`` (LLM.int8, threshold 6.0)."""
    q = quant["quant"]
    if q not in KBIT:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise QPlanError(f"a {q} plan needs bitsandbytes: pip install 'qplan[train]'") from exc
    from transformers import BitsAndBytesConfig

    # a pre-quantized checkpoint's own list of 16-bit modules (planner.checkpoint_quant)
    skip = {"llm_int8_skip_modules": list(quant["skip_modules"])} if quant.get("skip_modules") is not None else {}
    if q not in FOUR_BIT:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    # a multi-GPU plan that shards 4-bit weights (FSDP, ZeRO-3) stores them in the compute dtype
    # (``bnb_4bit_quant_storage``; the plan's ``distributed.quant_storage``, given here as ``quant_storage``)
    storage = {"bnb_4bit_quant_storage": torch_dtype(quant["quant_storage"])} if quant.get("quant_storage") else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q,
        bnb_4bit_use_double_quant=bool(quant.get("double_quant", False)),
        bnb_4bit_compute_dtype=torch_dtype(quant["compute_dtype"]),
        **skip,
        **storage,
    )


def lora_kwargs(lora: dict[str, Any]) -> dict[str, Any]:
    """The plan's ``lora`` section as the keyword arguments both PEFT's ``LoraConfig`` and
    Unsloth's ``FastLanguageModel.get_peft_model`` take (one mapping, so nothing can drift)."""
    return {
        "r": int(lora["r"]),
        "lora_alpha": lora["alpha"],
        "lora_dropout": float(lora.get("dropout", 0.0) or 0.0),
        "target_modules": list(lora["target_modules"]) if not isinstance(lora["target_modules"], str)
        else lora["target_modules"],
        "bias": lora.get("bias", "none") or "none",
        "use_dora": bool(lora.get("use_dora", False)),
        "use_rslora": bool(lora.get("use_rslora", False)),
        "modules_to_save": list(lora.get("modules_to_save") or []) or None,
        # LoRA on fused MoE expert parameters, as the planner resolved PEFT's rewrite (lora.resolve_targets)
        **({"target_parameters": list(lora["target_parameters"]), "rank_pattern": dict(lora.get("rank_pattern") or {}),
            "alpha_pattern": dict(lora.get("alpha_pattern") or {})} if lora.get("target_parameters") else {}),
    }


def lora_config(lora: dict[str, Any], task_type: str = "CAUSAL_LM") -> Any:
    """``peft.LoraConfig(task_type=task_type, **lora_kwargs(lora))`` (adapters in fp32); ``SEQ_CLS`` for a reward model
    (PEFT then trains a copy of the ``score`` head, ``modules_to_save``)."""
    try:
        from peft import LoraConfig
    except ImportError as exc:  # pragma: no cover
        raise _need("LoRA") from exc
    return LoraConfig(task_type=task_type, **lora_kwargs(lora))


def task_of(plan_or_objective: Any) -> tuple[str, str]:
    """(model task for ``model_from_config``, PEFT task type) of a plan document (or its objective): a reward model is
    a sequence classifier."""
    objective = plan_or_objective if isinstance(plan_or_objective, str) else (
        plan_or_objective.get("training") or {}).get("objective", "sft")
    return ("seq_cls", "SEQ_CLS") if objective == "reward" else ("causal", "CAUSAL_LM")


def method_config(method: str, section: dict[str, Any]) -> Any:
    """The PEFT config of a plan's non-LoRA method (``planner.methods``) from its section:
    ``IA3Config(task_type="CAUSAL_LM", target_modules, feedforward_modules)`` (its vectors fp32) or
    ``PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens)`` (its prompt fp32, randomly initialised) or
    ``PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens, encoder_hidden_size)`` (p-tuning's MLP, fp32) or
    ``LNTuningConfig(task_type="CAUSAL_LM", target_modules)`` (copies of the norms, in their own dtype), or LoHa's,
    LoKr's, VeRA's, MiSS's (``MissConfig``: r, init_weights, mini_r) and C3A's (``C3AConfig``: block_size) configs from
    their sections (their tensors fp32)."""
    try:
        import peft
    except ImportError as exc:  # pragma: no cover
        raise _need(method) from exc
    if method == "ia3":
        return peft.IA3Config(task_type="CAUSAL_LM", target_modules=list(section["target_modules"]),
                              feedforward_modules=list(section["feedforward_modules"]))
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=int(section["num_virtual_tokens"]))
    if method == "loha":
        return peft.LoHaConfig(task_type="CAUSAL_LM", r=int(section["r"]), alpha=float(section["alpha"]),
                               target_modules=list(section["target_modules"]))
    if method == "vera":
        return peft.VeraConfig(task_type="CAUSAL_LM", r=int(section["r"]), target_modules=list(section["target_modules"]),
                               save_projection=True)
    if method == "c3a":
        return peft.C3AConfig(task_type="CAUSAL_LM", block_size=int(section["block_size"]),
                              init_weights=section["init_weights"], target_modules=list(section["target_modules"]))
    if method == "miss":
        return peft.MissConfig(task_type="CAUSAL_LM", r=int(section["r"]), init_weights=section["init_weights"],
                               mini_r=int(section["mini_r"]), miss_dropout=float(section["miss_dropout"]),
                               target_modules=list(section["target_modules"]))
    if method == "lokr":
        return peft.LoKrConfig(task_type="CAUSAL_LM", r=int(section["r"]), alpha=float(section["alpha"]),
                               target_modules=list(section["target_modules"]),
                               decompose_factor=int(section["decompose_factor"]),
                               decompose_both=bool(section["decompose_both"]))
    if method == "ln_tuning":
        return peft.LNTuningConfig(task_type="CAUSAL_LM", target_modules=list(section["target_modules"]))
    if method == "p_tuning":
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=int(section["num_virtual_tokens"]),
                                        encoder_reparameterization_type=section["encoder_reparameterization_type"],
                                        encoder_hidden_size=int(section["encoder_hidden_size"]))
    raise ValueError(f"no PEFT config for method {method!r}")


def cast_adapters(peft_model: Any, lora: dict[str, Any]) -> Any:
    """The LoRA tensors (``lora_A``/``lora_B``, embedding factors, DoRA magnitudes, LoRA on parameters) of a PEFT
    model in the plan's ``adapter_dtype`` (``get_peft_model`` makes them fp32), cast in place as TRL does
    (``param.data = param.data.to(dtype)``); other trainable tensors keep their dtype."""
    dtype = lora.get("adapter_dtype", "float32")
    if dtype != "float32":
        target = torch_dtype(dtype)
        for name, param in peft_model.named_parameters():
            if param.requires_grad and ".lora_" in name:
                param.data = param.data.to(target)
    return peft_model


def load_kwargs(plan: dict[str, Any], device: str) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments of a plan: dtype, attention, device, quantization."""
    q, t = plan["quant"], plan["training"]
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(q["load_dtype"]),
        "attn_implementation": t["attn_impl"],
        "device_map": {"": device},
    }
    storage = (plan.get("distributed") or {}).get("quant_storage")
    bnb = bnb_config({**q, "quant_storage": storage} if storage else q)  # FSDP/ZeRO-3 shard 4-bit weights
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    return kwargs


def model_class_of(path: str | Any) -> Any:
    """``model_class`` of the config in a model folder (``AutoConfig.from_pretrained``)."""
    from transformers import AutoConfig

    return model_class(AutoConfig.from_pretrained(str(path)))


def load_model(path: str, plan: dict[str, Any], device: str) -> Any:
    """``model_class_of(path).from_pretrained(path, **load_kwargs(plan, device))``, ``use_cache`` off; a reward plan's
    model is ``AutoModelForSequenceClassification`` with ``num_labels=1``, as TRL's ``RewardTrainer`` loads it (a
    causal checkpoint has no ``score``: transformers initialises it)."""
    if task_of(plan)[0] == "seq_cls":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1,
                                                                   **load_kwargs(plan, device))
    else:
        model = model_class_of(path).from_pretrained(str(path), **load_kwargs(plan, device))
    model.config.use_cache = False
    return model
