"""Trainer configs in: an axolotl YAML, a LLaMA-Factory YAML, or a TRL / transformers training-arguments
YAML/JSON, read into the options of ``make_plan`` (``qplan estimate --from-config``).

Each tool's defaults are its own (axolotl: no checkpointing, dropout 0; LLaMA-Factory: checkpointing on,
``lora_alpha`` = 2 × rank, targets ``all``; TRL: micro-batch 8, ``max_length`` 1024, ``adamw_torch_fused``),
so a file gives the plan of what that tool would run. Every key is one of three kinds:

* **mapped** — it sets an option (``lora_r`` → ``r``, ``load_in_4bit`` → ``quant nf4``, ...);
* **no memory effect** — paths, data sets, learning rate, logging, schedules: accepted silently;
* anything else: a **warning** that lists it (never silently dropped), or an **error** when the key
  changes per-GPU memory in a way qplan cannot plan (tensor/sequence parallelism, RL stages,
  other quantization methods, kernels that replace the modelled ones).

DeepSpeed / FSDP keys are mapped to ``strategy`` / ``cpu_offload`` by ``trainer_dist``.

Torch-free; YAML is read with PyYAML's safe loader (plain data, no tags that build objects).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError, shown
from qplan.planner.interop.axolotl_plugins import axolotl_plugins
from qplan.planner.interop.config_files import read_config_file
from qplan.planner.interop.liger_keys import trl_liger
from qplan.planner.interop.notes import note
from qplan.planner.interop.trainer_data import axolotl_data, llamafactory_bound, trl_data
from qplan.planner.options import PlanOptions, field_names
from qplan.planner.vocab import LIGER_KERNELS, OPTIMIZER_TABLE

FORMATS = ("axolotl", "llamafactory", "trl")
#: ``TrainingArguments.optim`` -> qplan's optimizer name (``adamw_bnb_8bit`` is qplan's ``adamw_8bit``)
#: (not PEFT's own optimizers, LoRA-FA: a trainer config cannot name them)
_NAMEABLE = [o for o in OPTIMIZER_TABLE if not o.peft]
OPTIM = {o.trainer_optim: o.name for o in _NAMEABLE} | {o.name: o.name for o in _NAMEABLE}
#: transformers TrainingArguments keys that change nothing qplan plans per GPU (paths, schedules, logging, data loading)
TRAINING_NO_EFFECT = {
    "output_dir", "overwrite_output_dir", "do_train", "do_eval", "do_predict", "eval_strategy", "evaluation_strategy",
    "per_device_eval_batch_size", "eval_steps", "eval_accumulation_steps", "learning_rate", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "num_train_epochs", "max_steps", "lr_scheduler_type",
    "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps", "logging_dir", "logging_strategy", "logging_first_step",
    "logging_steps", "save_strategy", "save_steps", "save_total_limit", "save_only_model", "seed", "data_seed",
    "report_to", "run_name", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_drop_last",
    "remove_unused_columns", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "resume_from_checkpoint",
    "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "ddp_timeout", "disable_tqdm", "plot_loss",
    "log_level", "save_safetensors", "group_by_length", "label_names", "tf32", "optim_args", "include_num_input_tokens_seen",
}
#: multi-GPU keys that change per-GPU memory in a way qplan does not plan (deepspeed / fsdp are mapped: trainer_dist)
MULTI_GPU = {"tensor_parallel_size", "context_parallel_size", "sequence_parallel_degree", "dp_shard_size",
             "ray_num_workers", "parallelism_config", "use_hyper_parallel", "hyper_parallel_args"}
#: multi-GPU keys that only tell the launcher (DDP) what to do: per-GPU memory is the single-GPU plan's
LAUNCHER = {"ddp_find_unused_parameters", "ddp_backend", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "local_rank"}


def detect_format(cfg: dict[str, Any]) -> str:
    """axolotl (``base_model``), LLaMA-Factory (``finetuning_type`` / ``lora_target`` / ``cutoff_len`` /
    ``quantization_bit`` / ``stage``), else TRL (``model_name_or_path`` with training arguments)."""
    if "base_model" in cfg:
        return "axolotl"
    if {"finetuning_type", "lora_target", "cutoff_len", "quantization_bit", "stage", "template"} & set(cfg):
        return "llamafactory"
    if "model_name_or_path" in cfg:
        return "trl"
    raise QPlanError("cannot tell which trainer the config is for (no base_model, model_name_or_path or "
                     "LLaMA-Factory keys): pass --config-format axolotl|llamafactory|trl")


class _Reader:
    """Reads keys of one config, remembering which were used, for the unknown-key warning."""

    def __init__(self, cfg: dict[str, Any], fmt: str, base: Path = Path(".")) -> None:
        self.cfg, self.fmt, self.used, self.base, self.warnings = cfg, fmt, set(), base, []

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        v = self.cfg.get(key)
        return default if v is None else v

    def has(self, key: str) -> bool:
        self.used.add(key)
        return self.cfg.get(key) is not None

    def typed(self, key: str, kind: type | tuple, default: Any = None) -> Any:
        v = self.get(key, default)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if v is not None and (not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds)):
            want = " or ".join(k.__name__ for k in kinds)
            raise QPlanError(f"{self.fmt} config: {key} must be {want}, got {shown(v)}")
        return v

    def refuse(self, keys: set[str], why: str, falsy_ok: bool = True) -> None:
        for k in sorted(keys & set(self.cfg)):
            self.used.add(k)
            v = self.cfg[k]
            if falsy_ok and (v is None or v is False or v == "" or v == [] or v == {}):
                continue
            raise QPlanError(f"{self.fmt} config: {k}: {shown(v)} {why}")


def _names(value: Any, key: str, fmt: str) -> str:
    """A target list (YAML list or comma string) as qplan's ``--targets`` text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return ",".join(value)
    raise QPlanError(f"{fmt} config: {key} must be a module name, a list of them or all-linear, got {shown(value)}")


def _optimizer(name: Any, key: str, fmt: str) -> str:
    if name not in OPTIM:
        raise QPlanError(f"{fmt} config: {key} {shown(name)} is not an optimizer qplan plans "
                         f"(one of {', '.join(sorted(o.trainer_optim for o in _NAMEABLE))})")
    return OPTIM[name]


def _precision(r: _Reader) -> str:
    """bf16 / fp16 / fp32 from the ``bf16`` / ``fp16`` flags (``bf16: auto`` is bf16; the GPU check
    switches it to fp16, with a warning, on a GPU without bf16)."""
    bf16, fp16 = r.get("bf16"), r.get("fp16")
    if bf16 and fp16:
        raise QPlanError(f"{r.fmt} config: bf16 and fp16 are both set: choose one")
    if fp16:
        return "fp16"
    return "bf16" if bf16 in (True, "auto", "true", "True") else "fp32"


def _model(repo: Any, revision: Any, key: str, fmt: str) -> str:
    if not isinstance(repo, str) or not repo.strip():
        raise QPlanError(f"{fmt} config: {key} must name the base model (a Hub id such as meta-llama/Llama-3.1-8B)")
    if revision not in (None, "main"):
        return f"{repo}@{revision}"
    return repo


TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _training(r: _Reader, opts: dict[str, Any], seq_key: str, batch_default: int, seq_default: int, ckpt_default: bool,
              optim_key: str, optim_default: str) -> None:
    opts["batch_size"] = r.typed("micro_batch_size" if r.fmt == "axolotl" else "per_device_train_batch_size", int,
                                 batch_default)
    opts["seq_len"] = r.typed(seq_key, int, seq_default)
    opts["grad_accum"] = r.typed("gradient_accumulation_steps", int, 1)
    opts["optimizer"] = _optimizer(r.get(optim_key, optim_default), optim_key, r.fmt)
    if r.fmt != "llamafactory":
        gc = r.get("gradient_checkpointing", ckpt_default)
        if gc not in (True, False):
            raise QPlanError(f"{r.fmt} config: gradient_checkpointing {shown(gc)} is not planned (true or false)")
        opts["grad_ckpt"] = gc
        opts["reentrant"] = gc and _reentrant(r)
    _multi_gpu(r, opts)
    for k in MULTI_GPU & set(r.cfg):  # a degree of 1 (one worker) is no parallelism: nothing to plan
        if r.cfg[k] == 1 and not isinstance(r.cfg[k], bool):
            r.used.add(k)
    r.refuse(MULTI_GPU - r.used, "asks for a multi-GPU parallelism qplan does not plan (it plans DDP, FSDP2 full shard and "
                        "ZeRO-2/3: see docs/multi-gpu.md): remove it")
    r.refuse({"torch_compile", "liger_kernel"},
             "changes the kernels and their memory, which qplan does not model")



def _attn_implementation(r: Any, o: dict[str, Any], tool: str) -> bool:
    """``attn_implementation`` of the file into ``o["attn_impl"]`` (True), or False when absent."""
    impl = r.get("attn_implementation")
    if impl is None:
        return False
    if impl not in ("sdpa", "eager", "flash_attention_2"):
        raise QPlanError(f"{tool} config: attn_implementation {shown(impl)} is not planned (sdpa, eager or flash_attention_2)")
    o["attn_impl"] = impl
    return True

def _multi_gpu(r: _Reader, opts: dict[str, Any]) -> None:
    """``strategy`` / ``cpu_offload`` from ``deepspeed`` or the FSDP keys (``trainer_dist``)."""
    from qplan.planner.interop.trainer_sharding import deepspeed_options, fsdp_options

    fsdp = fsdp_options(r.fmt, r.get("fsdp"), r.get("fsdp_config"), r.get("fsdp_version"), opts.get("grad_ckpt", False))
    r.used.add("fsdp_transformer_layer_cls_to_wrap")
    if r.has("deepspeed"):
        if fsdp:
            raise QPlanError(f"{r.fmt} config: deepspeed and fsdp are both set: choose one")
        ds, warnings = deepspeed_options(r.get("deepspeed"), r.base, r.fmt, opts["batch_size"], opts["grad_accum"],
                                         opts["compute_dtype"])
        opts.update(ds)
        r.warnings += warnings
    elif fsdp is not None:
        opts.update(fsdp[0])
        r.warnings += fsdp[1]


def _axolotl(r: _Reader) -> dict[str, Any]:
    o: dict[str, Any] = {"model": _model(r.get("base_model"), r.get("revision_of_model"), "base_model", "axolotl")}
    adapter = r.get("adapter")
    if adapter not in ("lora", "qlora", None):
        raise QPlanError(f"axolotl config: adapter {shown(adapter)}: qplan plans LoRA, QLoRA (adapter: lora or qlora) "
                         "and full fine-tuning (no adapter)")
    b4, b8 = r.get("load_in_4bit", False), r.get("load_in_8bit", False)
    if adapter == "qlora" and not b4:
        raise QPlanError("axolotl config: adapter: qlora needs load_in_4bit: true")
    if b4 and b8:
        raise QPlanError("axolotl config: load_in_4bit and load_in_8bit are both set: choose one")
    if adapter is None and (b4 or b8):
        raise QPlanError(f"axolotl config: {'load_in_4bit' if b4 else 'load_in_8bit'} without an adapter would train a "
                         "quantized model: qplan plans full fine-tuning of a 16/32-bit model, or LoRA/QLoRA (adapter)")
    # axolotl 0.19 (utils/schemas/config.py) defaults bf16 to "auto" (bf16 where the GPU has it), and trains
    # bfloat16: true with the Trainer's bf16 too (core/builders/base.py: bf16 = cfg.bf16 or cfg.bfloat16)
    if r.get("bfloat16") is True and r.get("fp16"):
        raise QPlanError("axolotl config: bfloat16 and fp16 are both set: choose one")
    prec = "bf16" if r.get("bfloat16") is True or not (r.has("bf16") or r.get("fp16")) else _precision(r)
    bnb = r.get("bnb_config_kwargs") or {}
    if not isinstance(bnb, dict):
        raise QPlanError(f"axolotl config: bnb_config_kwargs must be a mapping, got {shown(bnb)}")
    unknown_bnb = set(bnb) - {"bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "llm_int8_has_fp16_weight"}
    if unknown_bnb or bnb.get("llm_int8_has_fp16_weight"):
        raise QPlanError(f"axolotl config: bnb_config_kwargs {sorted(unknown_bnb) or ['llm_int8_has_fp16_weight']} "
                         "changes the quantization in a way qplan does not plan")
    o["quant"] = bnb.get("bnb_4bit_quant_type", "nf4") if b4 else "int8" if b8 else prec
    o["compute_dtype"] = prec
    if adapter is None:
        _axolotl_full(r, o)
    else:
        _axolotl_lora(r, o, bnb)
    _training(r, o, "sequence_len", 1, 512, False, "optimizer", "adamw_torch_fused")
    axolotl_data(r, o)
    if not _attn_implementation(r, o, "axolotl"):
        if r.get("flash_attention"):
            o["attn_impl"] = "flash_attention_2"
        elif r.get("sdp_attention"):
            o["attn_impl"] = "sdpa"
        elif r.get("eager_attention"):
            o["attn_impl"] = "eager"
    r.refuse({"xformers_attention", "s2_attention", "flex_attention", "sage_attention"},
             "is an attention kernel qplan does not model")
    r.refuse({"rl"}, "is axolotl's RL trainer on TRL 1.8.0 (axolotl pins trl==1.8.0; its DPO and KTO trainers compute "
             "the full logits, no fused LM head): not planned (qplan plans TRL 1.16's trainers)")
    r.refuse({"relora", "relora_steps", "unfrozen_parameters", "lora_on_cpu", "gptq", "loftq_config", "peft",
              "unsloth_lora_mlp", "unsloth_lora_qkv", "unsloth_lora_o", "lora_mlp_kernel", "lora_qkv_kernel",
              "lora_o_kernel", *(() if o.get("loss") == "cce" else ("cut_cross_entropy",)), "chunked_cross_entropy",
              "tiled_mlp", "activation_offloading",
              "gradient_checkpointing_kwargs_offload", "fix_untrained_tokens",
              "embeddings_skip_upcast", "float16", "load_in_2bit", "dpo_beta", "flash_attn_cross_entropy",
              "flash_attn_rms_norm", "flash_attn_fuse_mlp", "flash_attn_fuse_qkv"},
             "changes training memory in a way qplan does not plan from an axolotl config")
    return o


def _axolotl_lora(r: _Reader, o: dict[str, Any], bnb: dict[str, Any]) -> None:
    """``adapter: lora|qlora``: PEFT's LoRA over the loaded (maybe k-bit) model."""
    o["double_quant"] = bool(bnb.get("bnb_4bit_use_double_quant", True))
    o["upcast"] = True  # axolotl runs prepare_model_for_kbit_training for lora/qlora on a k-bit model
    o["r"] = r.typed("lora_r", int, 8)
    if not r.has("lora_alpha"):
        raise QPlanError("axolotl config: lora_alpha is missing (axolotl passes it to PEFT): set it")
    o["alpha"] = float(r.typed("lora_alpha", (int, float)))
    o["dropout"] = float(r.typed("lora_dropout", (int, float), 0.0))
    axolotl_plugins(r, o)
    r.refuse({"lora_target_parameters"}, "changes training memory in a way qplan does not plan from an axolotl config "
                                         "(plan it with --target-parameters)")
    linear, modules = r.get("lora_target_linear"), r.get("lora_target_modules")
    if linear:
        if modules and any(m in ("lm_head",) for m in (modules if isinstance(modules, list) else [modules])):
            raise QPlanError("axolotl config: lora_target_linear with lm_head in lora_target_modules is not planned: "
                             "list the modules instead")
        o["targets"] = "all-linear"
    elif modules:
        o["targets"] = _names(modules, "lora_target_modules", "axolotl")
    else:
        raise QPlanError("axolotl config: neither lora_target_modules nor lora_target_linear is set: set one")
    o["modules_to_save"] = _names(r.get("lora_modules_to_save"), "lora_modules_to_save", "axolotl") \
        if r.has("lora_modules_to_save") else ""
    o["dora"] = bool(r.get("peft_use_dora", False))
    o["rslora"] = bool(r.get("peft_use_rslora", False))


def _axolotl_full(r: _Reader, o: dict[str, Any]) -> None:
    """No ``adapter``: axolotl trains every parameter of the model it loaded in ``torch_dtype`` (bf16 with ``bf16``,
    fp16 with ``fp16``, else fp32: utils/config ``normalize_config``), under the Trainer's mixed precision — qplan's
    ``--full`` in that dtype. Its LoRA keys do nothing then (said, not silently dropped)."""
    o["full"] = True
    axolotl_plugins(r, o)
    given = sorted(k for k in r.cfg if k.startswith(("lora_", "peft_")) and r.cfg[k] not in (None, False, "", []))
    r.used.update(k for k in r.cfg if k.startswith(("lora_", "peft_")))
    if given:
        r.warnings.append(note("ignored", f"axolotl config: {', '.join(given)} without an adapter: axolotl trains "
                                          "every parameter (full fine-tuning); they do nothing"))


def _reentrant(r: _Reader) -> bool:
    """Whether checkpointing is torch's reentrant one (``use_reentrant``):

    * ``gradient_checkpointing_kwargs`` left out: axolotl sets ``{use_reentrant: true}`` (axolotl 0.19
      ``utils/config/__init__.py``, when ``rl`` and ``unfrozen_parameters`` are unset: qplan refuses both);
      transformers (TRL, a plain Trainer) checkpoints non-reentrant (5.23 ``_activation_checkpointing_enable``:
      ``{"use_reentrant": False}`` for ``None``);
    * a mapping without ``use_reentrant`` (or with ``null``): passed on to ``torch.utils.checkpoint``, whose default
      is reentrant (torch 2.13: a warning, then ``use_reentrant = True``)."""
    kwargs = r.get("gradient_checkpointing_kwargs")
    if kwargs is None:
        return r.fmt == "axolotl"
    if not isinstance(kwargs, dict):
        raise QPlanError(f"{r.fmt} config: gradient_checkpointing_kwargs {shown(kwargs)} is not a mapping")
    value = kwargs.get("use_reentrant")
    value = True if value is None else value  # None reaches torch.utils.checkpoint as "not given": reentrant
    if value not in (True, False):
        raise QPlanError(f"{r.fmt} config: gradient_checkpointing_kwargs.use_reentrant {shown(value)} is not planned "
                         "(true or false)")
    return bool(value)


def _llamafactory(r: _Reader) -> dict[str, Any]:
    o: dict[str, Any] = {"model": _model(r.get("model_name_or_path"), r.get("model_revision"), "model_name_or_path",
                                         "llamafactory")}
    if r.get("stage", "sft") not in ("sft", "pt"):  # its own trainers (trl<=0.24): full fp32 logits for dpo/kto
        raise QPlanError(f"llamafactory config: stage {shown(r.get('stage'))}: qplan plans sft and pt (LLaMA-Factory's "
                         "dpo/kto trainers compute the full fp32 logits and log_softmax themselves, not TRL 1.16's code)")
    kind = r.get("finetuning_type", "lora")
    if kind not in ("lora", "full"):
        raise QPlanError(f"llamafactory config: finetuning_type {shown(kind)}: qplan plans lora and full")
    bits, method = r.get("quantization_bit"), str(r.get("quantization_method", "bnb"))
    if kind == "full" and bits is not None:  # model/adapter.py init_adapter refuses it too
        raise QPlanError("llamafactory config: finetuning_type full with quantization_bit: LLaMA-Factory trains a "
                         "quantized model with LoRA or OFT only")
    if bits is not None and method != "bnb":
        raise QPlanError(f"llamafactory config: quantization_method {shown(method)}: qplan plans bitsandbytes (bnb)")
    if bits not in (None, 4, 8):
        raise QPlanError(f"llamafactory config: quantization_bit {shown(bits)}: qplan plans 4 and 8 (bitsandbytes)")
    prec = _precision(r)
    weights = prec
    pure = r.typed("pure_bf16", bool, False)
    if pure:
        # model/adapter.py init_adapter: pure_bf16 leaves the trainable parameters in half precision (get_peft_model
        # with autocast_adapter_dtype=False); hparams/parser.py: the model computes in bf16, without autocast unless bf16
        if bits is not None:
            raise QPlanError("llamafactory config: pure_bf16 with quantization_bit (a quantized model without autocast) "
                             "is not planned: remove one")
        if r.get("fp16"):
            raise QPlanError("llamafactory config: pure_bf16 and fp16 are both set: choose one")
        weights, prec = "bf16", "bf16" if r.get("bf16") else "fp32"
        o["adapter_dtype"] = "bf16"
    elif not (r.get("bf16") or r.get("fp16")):
        # no bf16/fp16 flag: LLaMA-Factory infers the load dtype (model/patcher.py infer_optim_dtype: bf16 where the
        # GPU has it) and the Trainer trains without mixed precision: a pure 16-bit step
        if bits is None:
            weights, prec = "bf16", "fp32"
        else:
            prec = "bf16"
            r.warnings.append(note("approximated", "llamafactory config: without bf16/fp16, LLaMA-Factory trains the "
                                   "k-bit model in bf16 without autocast; the plan assumes bf16 autocast"))
    o["quant"] = {4: str(r.get("quantization_type", "nf4")), 8: "int8"}.get(bits, weights)
    o["compute_dtype"] = prec
    if kind == "full":
        _llamafactory_full(r, o, pure)
    else:
        _llamafactory_lora(r, o)
    _training(r, o, "cutoff_len", 8, 2048, True, "optim", "adamw_torch_fused")
    if kind == "lora" and o.get("strategy") == "zero3" and bits is None and weights == "bf16" and prec in ("bf16", "fp32"):
        o["adapter_dtype"] = "bf16"  # init_adapter: no fp32 cast under ZeRO-3, adapters in the model's dtype
    llamafactory_bound(r, o)
    o["grad_ckpt"] = not r.get("disable_gradient_checkpointing", False)
    # LLaMA-Factory checkpoints with use_reentrant_gc (default true; model_utils/checkpointing.py
    # _gradient_checkpointing_enable: torch.utils.checkpoint with {"use_reentrant": use_reentrant_gc})
    reentrant = r.get("use_reentrant_gc", True)
    if reentrant not in (True, False):
        raise QPlanError(f"llamafactory config: use_reentrant_gc {shown(reentrant)} is not planned (true or false)")
    o["reentrant"] = o["grad_ckpt"] and reentrant
    attn = str(r.get("flash_attn", "auto"))
    o["attn_impl"] = {"auto": "auto", "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}.get(attn)
    if o["attn_impl"] is None:
        raise QPlanError(f"llamafactory config: flash_attn {shown(attn)} is not planned (auto, disabled, sdpa or fa2)")
    if r.typed("enable_liger_kernel", bool, False):
        # model/model_utils/liger_kernel.py: apply_liger_kernel_to_<type>() with its defaults for sft/pt — the fused
        # linear cross-entropy, RMSNorm, SwiGLU and RoPE (a model whose defaults differ is refused by the planner)
        o["loss"], o["liger_kernels"] = "liger", ",".join(LIGER_KERNELS)
    r.refuse({"use_unsloth", "use_unsloth_gc", "upcast_layernorm", "upcast_lmhead_output", "use_galore", "use_apollo",
              "use_muon", "use_adam_mini", "mixture_of_depths", "use_dft_loss", "use_eaft_loss",
              "use_badam", "pissa_init", "loraplus_lr_ratio", "shift_attn", "rope_scaling",
              "neat_packing", "use_llama_pro", "freeze_vision_tower", "train_mm_proj_only", "moe_aux_loss_coef",
              "ref_model", "use_kt", "use_v1_kernels", "resize_vocab", "quantization_device_map"},
             "changes training memory in a way qplan does not plan from a LLaMA-Factory config")
    megatron = sorted(LLAMAFACTORY_MEGATRON & set(r.cfg))
    if megatron:  # hparams/megatron_bridge_args.py: read only when USE_MEGATRON_BRIDGE=1 trains with Megatron
        raise QPlanError(f"llamafactory config: {', '.join(megatron[:4])}{', ...' if len(megatron) > 4 else ''}: "
                         "Megatron-Bridge arguments (USE_MEGATRON_BRIDGE=1 trains with Megatron-Core, not the HF "
                         "Trainer), which qplan does not plan")
    return o


#: LLaMA-Factory's Megatron-Bridge arguments (hparams/megatron_bridge_args.py): a file carrying them is for Megatron
LLAMAFACTORY_MEGATRON = {
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "virtual_pipeline_model_parallel_size", "sequence_parallel", "recompute_granularity", "recompute_method",
    "recompute_num_layers", "use_distributed_optimizer", "overlap_param_gather", "overlap_grad_reduce",
    "moe_grouped_gemm", "moe_token_dispatcher_type", "use_packed_sequences", "export_hf_on_finish",
}


def _llamafactory_lora(r: _Reader, o: dict[str, Any]) -> None:
    o["double_quant"] = bool(r.get("double_quantization", True))
    o["upcast"] = False  # LLaMA-Factory never calls prepare_model_for_kbit_training (model_utils/checkpointing.py)
    o["r"] = r.typed("lora_rank", int, 8)
    o["alpha"] = float(r.typed("lora_alpha", (int, float), 2 * o["r"]))
    o["dropout"] = float(r.typed("lora_dropout", (int, float), 0.0))
    target = _names(r.get("lora_target", "all"), "lora_target", "llamafactory")
    o["targets"] = "all-linear" if target.strip() == "all" else target
    o["modules_to_save"] = _names(r.get("additional_target"), "additional_target", "llamafactory") \
        if r.has("additional_target") else ""
    o["dora"] = bool(r.get("use_dora", False))
    o["rslora"] = bool(r.get("use_rslora", False))


def _llamafactory_full(r: _Reader, o: dict[str, Any], pure: bool) -> None:
    """``finetuning_type: full``: every parameter trains (model/adapter.py ``_setup_full_tuning``). Unless
    ``pure_bf16``, ``init_adapter`` casts the trainable parameters to fp32 (``cast_trainable_params_to_fp32``; under
    ZeRO-3 they are already fp32, and several GPUs are not planned for ``--full`` yet): fp32 weights under the run's
    mixed precision. Its LoRA keys do nothing then (said)."""
    o["full"] = True
    o.pop("adapter_dtype", None)  # pure_bf16's bf16 trainable tensors are the weights themselves
    if not pure:
        o["quant"] = "fp32"
    lora = {"lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target", "use_dora", "use_rslora"}
    given = sorted(k for k in lora & set(r.cfg) if r.cfg[k] not in (None, False, "", []))
    r.used.update(lora)
    if given:
        r.warnings.append(note("ignored", f"llamafactory config: {', '.join(given)} with finetuning_type full: every "
                                          "parameter trains; they do nothing"))


def trl_objective_keys() -> dict[str, list[str]]:
    """Keys only TRL's other trainers take (DPO, GRPO, distillation, reward, ...: ``trl_objective_keys.json``, written
    by ``bench/trl_objective_keys.py`` from TRL's own config classes) -> the trainers that take them."""
    import json

    return json.loads((Path(__file__).parent / "trl_objective_keys.json").read_text(encoding="utf-8"))["keys"]


def _trl(r: _Reader, objective: str = "sft") -> dict[str, Any]:
    from qplan.planner.interop.trl_objectives import OWN_KEYS, read_objective

    others = trl_objective_keys()
    hits = sorted(set(r.cfg) & set(others) - OWN_KEYS.get(objective, set()))
    if hits:  # TRL's sft.py would not parse them either (HfArgumentParser over SFTConfig)
        trainers = sorted({t for k in hits for t in others[k]})
        guess = next((k for k, keys in OWN_KEYS.items() if objective == "sft" and set(hits) <= keys), None)
        raise QPlanError(f"trl config: {', '.join(hits[:4])}{', ...' if len(hits) > 4 else ''} "
                         f"{'is a key' if len(hits) == 1 else 'are keys'} of TRL's "
                         f"{', '.join(trainers[:4])}{', ...' if len(trainers) > 4 else ''} trainer, not "
                         f"{objective.upper()}: "
                         + (f"a {guess.upper()} config? plan it with --objective {guess}" if guess else
                            "qplan plans SFT, DPO, KTO and GRPO (the other preference and RL objectives are not planned yet)"))
    o: dict[str, Any] = {"model": _model(r.get("model_name_or_path"), r.get("model_revision"), "model_name_or_path", "trl")}
    full = not r.get("use_peft", False)  # TRL's sft.py: without use_peft the SFTTrainer trains every parameter
    b4, b8 = r.get("load_in_4bit", False), r.get("load_in_8bit", False)
    if b4 and b8:
        raise QPlanError("trl config: load_in_4bit and load_in_8bit are both set: choose one")
    if full and (b4 or b8):
        raise QPlanError("trl config: a quantized model without use_peft would train its quantized weights: set "
                         "use_peft: true (LoRA/QLoRA) or drop load_in_4bit/load_in_8bit (full fine-tuning)")
    prec = _precision(r) if r.get("bf16") is not None or r.get("fp16") else "bf16"  # SFTConfig: bf16 unless fp16
    dtype = str(r.get("dtype", r.get("torch_dtype", "float32")))
    alias = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    if dtype not in alias:
        raise QPlanError(f"trl config: dtype {shown(dtype)} is not planned (bfloat16, float16 or float32; 'auto' depends on "
                         "the checkpoint: name it)")
    if (b4 or b8) and alias[dtype] != prec:
        raise QPlanError(f"trl config: a quantized model computes in its dtype ({dtype}) but trains with "
                         f"{'no mixed precision' if prec == 'fp32' else prec}: qplan plans one compute dtype — make them agree")
    o["quant"] = str(r.get("bnb_4bit_quant_type", "nf4")) if b4 else "int8" if b8 else alias[dtype]
    o["compute_dtype"] = prec
    if full:
        _trl_full(r, o)
    else:
        _trl_lora(r, o)
    _training(r, o, "max_length", 8, 1024, True, "optim", "adamw_torch_fused")
    # TRL 1.16's SFTTrainer trains through its fused LM head (add_fused_lm_head), except that label smoothing takes the
    # loss from a full-logits forward (sft_trainer.py compute_loss)
    smoothing = r.typed("label_smoothing_factor", (int, float), 0)
    if not 0 <= smoothing < 1:  # NaN too
        raise QPlanError(f"trl config: label_smoothing_factor must be in [0, 1), got {shown(smoothing)}")
    o["loss"] = "full" if smoothing else "trl"
    if full and objective == "grpo":  # DPO/KTO: the reference is a second model (planner.memory.profiles)
        raise QPlanError("trl config with --objective grpo: use_peft is not true (full fine-tuning), which is not "
                         "planned yet")
    if smoothing and objective == "sft":
        r.warnings.append(note("approximated", "trl config: label_smoothing_factor takes the loss from the full logits "
                               "and runs the fused LM head once more under no_grad for the metrics: planned as the full "
                               "logits"))
    if objective == "sft":
        trl_data(r, o)  # DPO's/KTO's datasets are pairs / unpaired rows: planned at max_length (trl_objectives)
    _attn_implementation(r, o, "trl")
    if o.get("strategy") in ("fsdp", "zero3") and o["quant"] in ("nf4", "fp4"):
        storage = r.get("bnb_4bit_quant_storage")
        if storage != TORCH_NAMES[prec]:
            raise QPlanError(f"trl config: {o['strategy']} shards 4-bit weights only when bitsandbytes stores them in the "
                             f"compute dtype: set bnb_4bit_quant_storage: {TORCH_NAMES[prec]} (got {shown(storage)})")
    # the adapters' dtype (sft_trainer.py, TRL 1.16): a quantized model's trainable parameters are cast to bf16 after
    # get_peft_model; under ZeRO-3 an unquantized model's adapters stay in its dtype (autocast_adapter_dtype=False)
    kbit = o["quant"] in ("nf4", "fp4", "int8")
    if kbit and prec in ("bf16", "fp16"):
        o["adapter_dtype"] = "bf16"
    elif not full and o.get("strategy") == "zero3" and alias[dtype] == "bf16" and prec in ("bf16", "fp32"):
        o["adapter_dtype"] = "bf16"
    trl_liger(r, o)
    if objective != "sft":
        read_objective(r, o, objective)
    r.refuse({"lora_target_parameters", "bnb_4bit_quant_storage", "model_init_kwargs", "padding_free", "activation_offloading",
              "lora_task_type"} - ({"padding_free"} if objective == "dpo" else set()),  # DPOTrainer turns it off
             "changes training memory in a way qplan does not plan from a TRL config")
    return o


def _trl_lora(r: _Reader, o: dict[str, Any]) -> None:
    o["double_quant"] = bool(r.get("use_bnb_nested_quant", False))
    o["upcast"] = False  # TRL's SFTTrainer does not call prepare_model_for_kbit_training
    o["r"] = r.typed("lora_r", int, 16)
    o["alpha"] = float(r.typed("lora_alpha", (int, float), 32))
    o["dropout"] = float(r.typed("lora_dropout", (int, float), 0.05))
    o["targets"] = _names(r.get("lora_target_modules"), "lora_target_modules", "trl") \
        if r.has("lora_target_modules") else "qv"  # None: PEFT's default for the model type
    o["modules_to_save"] = _names(r.get("lora_modules_to_save"), "lora_modules_to_save", "trl") \
        if r.has("lora_modules_to_save") else ""
    o["dora"] = bool(r.get("use_dora", False))
    o["rslora"] = bool(r.get("use_rslora", False))


def _trl_full(r: _Reader, o: dict[str, Any]) -> None:
    """``use_peft`` not true: every parameter of the model loaded in ``dtype`` trains; the LoRA keys do nothing."""
    o["full"] = True
    lora = {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "use_dora",
            "use_rslora", "use_bnb_nested_quant"}
    given = sorted(k for k in lora & set(r.cfg) if r.cfg[k] not in (None, False, "", []))
    r.used.update(lora)
    if given:
        r.warnings.append(note("ignored", f"trl config: {', '.join(given)} without use_peft: every parameter trains; "
                                          "they do nothing"))


#: keys of each tool that change nothing qplan plans per GPU
NO_EFFECT = {
    "axolotl": TRAINING_NO_EFFECT | {
        "base_model_config", "model_type", "tokenizer_type", "tokenizer_config", "trust_remote_code", "strict",
        "datasets", "test_datasets", "dataset_prepared_path", "val_set_size", "num_epochs", "lr_scheduler", "warmup_steps",
        "evals_per_epoch", "saves_per_epoch", "wandb_project", "wandb_entity", "wandb_watch", "wandb_name",
        "wandb_log_model", "special_tokens", "train_on_inputs", "group_by_length", "chat_template", "logging_steps",
        "early_stopping_patience", "lora_fan_in_fan_out", "lora_model_dir", "pad_to_sequence_len",
        "sample_packing", "eval_sample_packing", "debug", "hub_model_id", "dataset_processes", "shuffle_merged_datasets",
        "auto_resume_from_checkpoints", "save_first_step", "eval_table_size", "max_steps", "output_dir", "seed",
        "weight_decay", "learning_rate", "eval_batch_size", "save_safetensors"},
    "llamafactory": TRAINING_NO_EFFECT | {
        "trust_remote_code", "template", "dataset", "dataset_dir", "eval_dataset", "max_samples", "overwrite_cache",
        "preprocessing_num_workers", "val_size", "packing", "train_on_prompt", "mask_history", "streaming", "buffer_size",
        "mix_strategy", "tokenized_path", "default_system", "enable_thinking", "export_dir", "infer_backend",
        "adapter_name_or_path", "create_new_adapter", "cache_dir", "model_revision", "hf_hub_token"},
    "trl": TRAINING_NO_EFFECT | {
        "dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split", "dataset_streaming", "dataset_text_field",
        "packing", "packing_strategy", "completion_only_loss", "assistant_only_loss", "chat_template_path", "eos_token",
        "pad_token", "trust_remote_code", "model_revision", "dataset_num_proc", "dataset_kwargs", "shuffle_dataset",
        "ignore_bias_buffers", "eval_packing"},
}
READERS = {"axolotl": _axolotl, "llamafactory": _llamafactory, "trl": _trl}


def read_trainer_config(path: str | Path, fmt: str | None = None, objective: str = "sft"
                        ) -> tuple[dict[str, Any], list[dict[str, str]], str]:
    """``(options, warnings, format)`` of a trainer config file: the options are ``PlanOptions`` fields
    (``planner.options``; a reader mapping a key to another name fails here), each warning ``{"kind", "text"}``
    (``planner.interop.notes``). ``objective``: the trainer the file is for (``--objective``; a TRL file does not
    say: ``dpo`` reads it as a ``DPOConfig``, ``kto`` as a ``KTOConfig``: ``planner.interop.trl_objectives``)."""
    cfg = read_config_file(path)
    if fmt is not None and fmt not in FORMATS:
        raise QPlanError(f"--config-format must be one of {', '.join(FORMATS)}, got {shown(fmt)}")
    fmt = fmt or detect_format(cfg)
    r = _Reader(cfg, fmt, Path(path).parent)
    if objective != "sft" and fmt != "trl":
        config = {"reward": "RewardConfig"}.get(objective, f"{objective.upper()}Config")
        why = ("axolotl pins TRL 1.8.0, whose trainer computes the full logits" if fmt == "axolotl"
               else "LLaMA-Factory runs its own trainer, on the full logits") if objective in ("dpo", "kto") else "not read"
        raise QPlanError(f"--objective {objective} --from-config reads TRL configs (TRL's {config} "
                         f"keys); this {fmt} config is read as SFT ({'rl:' if fmt == 'axolotl' else 'stage:'} "
                         f"{objective}: {why})")
    try:
        opts = READERS[fmt](r, objective) if fmt == "trl" else READERS[fmt](r)
    except (TypeError, ValueError, OverflowError) as exc:  # a value of the wrong kind deep in a mapping
        raise QPlanError(f"{fmt} config {path}: {' '.join(str(exc).split())[:200]}") from exc
    stray = sorted(set(opts) - set(field_names(PlanOptions)))
    if stray:  # a reader that maps a key to a name the options model lacks is a bug here, not in the file
        raise AssertionError(f"the {fmt} reader maps keys to {stray}, which are not PlanOptions fields")
    warnings = list(r.warnings)
    if fmt == "axolotl" and opts["quant"] in ("nf4", "fp4", "int8"):
        warnings.append(note("approximated", "axolotl patches prepare_model_for_kbit_training to keep embed_tokens/lm_head "
                             "in the compute dtype; the plan upcasts them to fp32 as PEFT does (the weights term may be "
                             "high by that)"))
    launcher = sorted(set(cfg) & LAUNCHER)
    if launcher:
        warnings.append(note("launcher", f"{fmt} config keys for a multi-GPU launcher (the plan is one GPU's memory): "
                             f"{', '.join(launcher)}"))
    unknown = sorted(set(cfg) - r.used - NO_EFFECT[fmt] - LAUNCHER)
    if unknown:
        warnings.append(note("ignored", f"{fmt} config keys qplan does not plan (ignored): {', '.join(unknown)}"))
    return opts, warnings, fmt
