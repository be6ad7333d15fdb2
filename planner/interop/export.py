"""Trainer configs out: a plan.json as the config axolotl, LLaMA-Factory or TRL runs (``qplan export``).

The inverse of ``trainer_configs``: importing what this writes gives the same plan (``lora.targets``
aside when the plan used a ``qv``/``attn``/``mlp`` preset a tool cannot spell: the file names the
modules it resolved to, so the same modules and bytes). A plan a tool cannot run as planned is
refused in one line (a LoRA bias, an Unsloth plan, the kbit fp32 upcast a tool does not do, ...):
the file never says something the plan did not predict. Data set and output paths are
placeholders, marked in the header, since a plan does not hold them.
"""

from __future__ import annotations

import re
from typing import Any

from qplan.planner.errors import QPlanError, shown
from qplan.planner.interop.trainer_configs import FORMATS
from qplan.planner.vocab import HF_CKPT, KBIT, PEFT_METHODS, optimizer

PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
TORCH = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
#: placeholders the user replaces (a plan has no data set or output folder)
DATA = "data.jsonl"
OUT = "outputs/qplan"
#: axolotl requires a learning rate (it changes no memory): the usual LoRA 2e-4
LR = 2e-4


#: what a trainer may be told to download: ORG/NAME and a branch, tag or commit (as ``planner.model.hub`` reads them)
HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
HUB_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")


def _check_source(src: dict[str, Any]) -> None:
    """The Hub id and revision written as the base model: no path, no traversal, no whitespace or control
    characters (a hand-edited plan could name ``../../../etc/passwd``)."""
    hub_id, revision = src.get("hub_id"), src.get("revision")
    if not isinstance(hub_id, str) or not HUB_REPO.fullmatch(hub_id) or ".." in hub_id or hub_id.endswith((".", ".git")):
        raise QPlanError(f"the plan's model.source.hub_id {shown(hub_id)} is not a Hub id (ORG/NAME: letters, digits, "
                         "'.', '_', '-'): re-plan with --model ORG/NAME")
    if revision is not None and (not isinstance(revision, str) or not HUB_REVISION.fullmatch(revision)
                                 or ".." in revision or "//" in revision or revision.endswith("/")):
        raise QPlanError(f"the plan's model.source.revision {shown(revision)} is not a branch, tag or commit: "
                         "re-plan with --model ORG/NAME@REVISION")


def _comment(text: Any) -> str:
    """``text`` made safe inside a one-line YAML comment: printable characters only, at most 100."""
    s = "".join(c if c.isprintable() else "?" for c in str(text)[:100])
    return s + ("..." if len(str(text)) > 100 else "")


def _check(plan: dict[str, Any], to: str) -> None:
    if plan.get("method") in PEFT_METHODS:
        _, name, config = PEFT_METHODS[plan["method"]]
        raise QPlanError(f"writing {name} plan to {to} is not done yet: `qplan run` trains it with PEFT's {config}")
    if plan.get("method") == "full":
        raise QPlanError(f"writing a full fine-tuning plan back to {to} is not done yet (qplan reads {to}'s full "
                         "fine-tuning configs with --from-config): export LoRA and QLoRA plans")
    lora, quant, training = plan["lora"], plan["quant"], plan["training"]
    if plan.get("distributed"):
        d = plan["distributed"]
        raise QPlanError(f"the plan is for {d.get('world_size')} GPUs ({d.get('strategy')}): export writes one-GPU plans only "
                         "(writing DeepSpeed/FSDP settings back is not done yet): export a plan made without --gpus/--strategy")
    if plan.get("backend") != "peft":
        raise QPlanError(f"the plan is for the {plan.get('backend')} backend: export plans made with --backend peft")
    if optimizer(plan["training"]["optimizer"]).peft:
        raise QPlanError(f"the plan's optimizer {plan['training']['optimizer']} is PEFT's own (create_lorafa_optimizer), "
                         f"which {to}'s config cannot name: `qplan run` trains it, or plan with another --optimizer")
    if lora.get("bias", "none") != "none":
        raise QPlanError(f"{to} has no option for a LoRA bias ({lora['bias']}): plan with --bias none to export")
    if lora.get("target_parameters"):
        raise QPlanError(f"{to} export of target_parameters is not supported: plan without --target-parameters")
    if lora.get("rank_pattern") or lora.get("alpha_pattern"):
        raise QPlanError("the plan has per-module ranks, which the trainer configs cannot express")
    if training.get("objective", "sft") != "sft":
        raise QPlanError(f"the plan's objective is {training['objective']}: export writes SFT configs, and writing a "
                         f"{training['objective']} config for {to} is not done yet")
    loss = training.get("loss", "full")
    if loss == "cce" and to != "axolotl":
        raise QPlanError(f"{to} has no Cut Cross Entropy option (axolotl's CutCrossEntropyPlugin has): export the plan "
                         "--to axolotl, or plan it with --loss full")
    if loss == "liger" and to != "axolotl":
        raise QPlanError(f"{to} runs Liger with its other kernels too (RMSNorm, RoPE, SwiGLU), which qplan does not plan "
                         "yet: export the plan --to axolotl (LigerPlugin, liger_fused_linear_cross_entropy only), or "
                         "plan it with --loss full")
    if training.get("liger_kernels") and to != "axolotl":
        raise QPlanError(f"writing the plan's Liger kernels back to {to} is not done yet (axolotl's liger_* keys are): "
                         "export it --to axolotl, or plan it without --liger-kernels")
    if loss == "trl" and to != "trl":
        raise QPlanError(f"the plan's loss is TRL's fused LM head, which {to} does not run: export it --to trl, or plan "
                         "it with --loss full")
    if to == "trl" and loss != "trl":
        raise QPlanError("TRL 1.16's SFTTrainer trains through its fused LM head, not the plan's full logits: plan with "
                         "--loss trl to export to TRL")
    kbit = quant["quant"] in KBIT
    adapter = lora.get("adapter_dtype", "float32")
    if to == "trl" and kbit and adapter != "bfloat16":
        raise QPlanError("TRL's SFTTrainer casts a quantized model's adapters to bf16: plan with --adapter-dtype bf16 to "
                         "export to TRL")
    # LLaMA-Factory's pure_bf16: a bf16 model, adapters left in bf16 (with or without bf16 autocast)
    pure_lf = to == "llamafactory" and quant["quant"] == "bf16" and adapter == "bfloat16"
    if adapter != "float32" and not (to == "trl" and kbit) and not pure_lf:
        raise QPlanError(f"the plan's adapters are {adapter}, which {to} keeps in float32 here: plan with "
                         "--adapter-dtype fp32 to export" + (" (LLaMA-Factory's pure_bf16 keeps a bf16 model's in bf16)"
                                                             if to == "llamafactory" else ""))
    if training["grad_ckpt"] not in ("off", *HF_CKPT):
        raise QPlanError(f"checkpointing {training['grad_ckpt']!r} cannot be exported: plan with --grad-ckpt or --no-grad-ckpt")
    if not (plan["model"].get("source") or {}).get("hub_id"):
        raise QPlanError(f"model {shown(plan['model']['name'])} has no Hub id in its spec: a trainer config names the base "
                         "model by its Hub id (plan with --model ORG/NAME, or `qplan spec add --hub-id`)")
    _check_source(plan["model"]["source"])
    upcast = bool(quant.get("prepare_model_for_kbit_training")) and kbit
    if kbit and to == "axolotl" and not upcast:
        raise QPlanError("axolotl runs prepare_model_for_kbit_training (the fp32 upcast) on a k-bit model: plan with --upcast")
    if kbit and to != "axolotl" and upcast:
        raise QPlanError(f"{to} does not run prepare_model_for_kbit_training (no fp32 upcast): plan with --no-upcast to export")
    # LLaMA-Factory without bf16/fp16 loads the dtype it infers (bf16 where the GPU has it) and trains without mixed
    # precision: it runs a pure bf16 step, never an fp32 one
    pure_bf16 = quant["quant"] == "bf16" and quant["compute_dtype"] == "float32"
    if to == "llamafactory" and quant["compute_dtype"] == "float32" and not pure_bf16:
        raise QPlanError("llamafactory trains without bf16/fp16 in the dtype it infers (bf16 where the GPU has it), never "
                         "fp32: plan with --compute-dtype bf16, or --quant bf16 --compute-dtype fp32 (its pure bf16 step)")
    if not kbit and to != "trl" and quant["quant"] != PRECISION[quant["compute_dtype"]] \
            and not (to == "llamafactory" and pure_bf16):
        raise QPlanError(f"{to} loads a 16/32-bit model in its training precision: plan with --quant equal to "
                         f"--compute-dtype (this plan: {quant['quant']} weights, {quant['compute_dtype']} compute)")


def _targets(lora: dict[str, Any]) -> str | list[str] | None:
    """``all-linear``, ``None`` for PEFT's default (``qv``), or the module names."""
    t = lora["targets"]
    if t in ("all-linear", "qv"):
        return t
    if t in ("attn", "mlp"):
        return list(lora["target_modules"])
    return [m.strip() for m in t.split(",") if m.strip()]


def _alpha(lora: dict[str, Any]) -> int | float:
    a = lora["alpha"]
    return int(a) if float(a).is_integer() else a


def _precision_flags(compute: str) -> dict[str, bool]:
    p = PRECISION[compute]
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def to_axolotl(plan: dict[str, Any]) -> dict[str, Any]:
    lora, quant, tr, src = plan["lora"], plan["quant"], plan["training"], plan["model"]["source"]
    q = quant["quant"]
    cfg: dict[str, Any] = {"base_model": src["hub_id"]}
    if src.get("revision"):
        cfg["revision_of_model"] = src["revision"]
    cfg["adapter"] = "qlora" if q in ("nf4", "fp4") else "lora"
    cfg["load_in_4bit"] = q in ("nf4", "fp4")
    cfg["load_in_8bit"] = q == "int8"
    if q in ("nf4", "fp4") and (q != "nf4" or not quant["double_quant"]):
        cfg["bnb_config_kwargs"] = {"bnb_4bit_quant_type": q, "bnb_4bit_use_double_quant": bool(quant["double_quant"])}
    cfg.update(lora_r=lora["r"], lora_alpha=_alpha(lora), lora_dropout=lora["dropout"])
    t = _targets(lora)
    if t == "all-linear":
        cfg["lora_target_linear"] = True
    else:
        cfg["lora_target_modules"] = list(lora["target_modules"]) if t == "qv" else t
    if lora.get("modules_to_save"):
        cfg["lora_modules_to_save"] = list(lora["modules_to_save"])
    if lora.get("use_dora"):
        cfg["peft_use_dora"] = True
    if lora.get("use_rslora"):
        cfg["peft_use_rslora"] = True
    cfg.update(micro_batch_size=tr["batch_size"], gradient_accumulation_steps=tr["grad_accum"], sequence_len=tr["seq_len"],
               gradient_checkpointing=tr["grad_ckpt"] in HF_CKPT, optimizer=optimizer(tr["optimizer"]).trainer_optim,
               **_precision_flags(quant["compute_dtype"]))
    if tr["grad_ckpt"] in HF_CKPT:  # axolotl's own default is reentrant: written either way, as planned
        cfg["gradient_checkpointing_kwargs"] = {"use_reentrant": tr["grad_ckpt"] == "reentrant"}
    if tr.get("loss", "full") == "cce":  # the plugin's cut_cross_entropy defaults to true; written as planned
        cfg["plugins"] = ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"]
        cfg["cut_cross_entropy"] = True
    kernels = tr.get("liger_kernels") or []
    if tr.get("loss", "full") == "liger" or kernels:  # the plan's Liger kernels and no other, as planned
        cfg["plugins"] = ["axolotl.integrations.liger.LigerPlugin"]
        if tr.get("loss", "full") == "liger":
            cfg["liger_fused_linear_cross_entropy"] = True
        for k in kernels:
            cfg[{"rms_norm": "liger_rms_norm", "swiglu": "liger_glu_activation", "rope": "liger_rope"}[k]] = True
    cfg["attn_implementation"] = tr["attn_impl"]  # axolotl >= 0.19 (flash_attention: true etc. are deprecated)
    cfg["datasets"] = [{"path": DATA, "ds_type": "json", "type": "completion"}]
    cfg.update(learning_rate=LR, output_dir=OUT)
    return cfg


def to_llamafactory(plan: dict[str, Any]) -> dict[str, Any]:
    lora, quant, tr, src = plan["lora"], plan["quant"], plan["training"], plan["model"]["source"]
    q = quant["quant"]
    cfg: dict[str, Any] = {"model_name_or_path": src["hub_id"]}
    if src.get("revision"):
        cfg["model_revision"] = src["revision"]
    cfg.update(stage="sft", do_train=True, finetuning_type="lora", lora_rank=lora["r"], lora_alpha=_alpha(lora),
               lora_dropout=lora["dropout"])
    t = _targets(lora)
    cfg["lora_target"] = "all" if t == "all-linear" else ",".join(lora["target_modules"] if t == "qv" else t)
    if lora.get("modules_to_save"):
        cfg["additional_target"] = ",".join(lora["modules_to_save"])
    if lora.get("use_dora"):
        cfg["use_dora"] = True
    if lora.get("use_rslora"):
        cfg["use_rslora"] = True
    if q in KBIT:
        cfg.update(quantization_bit=8 if q == "int8" else 4, quantization_method="bnb")
        if q != "int8":
            cfg.update(quantization_type=q, double_quantization=bool(quant["double_quant"]))
    cfg.update(per_device_train_batch_size=tr["batch_size"], gradient_accumulation_steps=tr["grad_accum"],
               cutoff_len=tr["seq_len"], disable_gradient_checkpointing=tr["grad_ckpt"] == "off")
    if tr["grad_ckpt"] in HF_CKPT:
        cfg["use_reentrant_gc"] = tr["grad_ckpt"] == "reentrant"
    cfg.update(optim=optimizer(tr["optimizer"]).trainer_optim, **_precision_flags(quant["compute_dtype"]))
    if lora.get("adapter_dtype", "float32") == "bfloat16":  # pure_bf16: adapters left in the model's bf16
        cfg["pure_bf16"] = True
    cfg["flash_attn"] = {"flash_attention_2": "fa2", "sdpa": "sdpa", "eager": "disabled"}[tr["attn_impl"]]
    cfg.update(dataset="REPLACE_WITH_YOUR_DATASET", template="default", output_dir=OUT)
    return cfg


def to_trl(plan: dict[str, Any]) -> dict[str, Any]:
    lora, quant, tr, src = plan["lora"], plan["quant"], plan["training"], plan["model"]["source"]
    q = quant["quant"]
    cfg: dict[str, Any] = {"model_name_or_path": src["hub_id"]}
    if src.get("revision"):
        cfg["model_revision"] = src["revision"]
    cfg["dtype"] = quant["compute_dtype"] if q in KBIT else TORCH[q]
    cfg.update(use_peft=True, lora_r=lora["r"], lora_alpha=_alpha(lora), lora_dropout=lora["dropout"])
    t = _targets(lora)
    if t != "qv":
        cfg["lora_target_modules"] = t
    if lora.get("modules_to_save"):
        cfg["lora_modules_to_save"] = list(lora["modules_to_save"])
    if lora.get("use_dora"):
        cfg["use_dora"] = True
    if lora.get("use_rslora"):
        cfg["use_rslora"] = True
    if q in ("nf4", "fp4"):
        cfg.update(load_in_4bit=True, bnb_4bit_quant_type=q, use_bnb_nested_quant=bool(quant["double_quant"]))
    elif q == "int8":
        cfg["load_in_8bit"] = True
    cfg.update(per_device_train_batch_size=tr["batch_size"], gradient_accumulation_steps=tr["grad_accum"],
               max_length=tr["seq_len"], gradient_checkpointing=tr["grad_ckpt"] in HF_CKPT,
               optim=optimizer(tr["optimizer"]).trainer_optim, **_precision_flags(quant["compute_dtype"]),
               attn_implementation=tr["attn_impl"])
    if tr["grad_ckpt"] == "reentrant":  # transformers' default is non-reentrant
        cfg["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    cfg.update(dataset_name=DATA, output_dir=OUT)
    return cfg


WRITERS = {"axolotl": to_axolotl, "llamafactory": to_llamafactory, "trl": to_trl}
HEADER = ("# {tool} config written by `qplan export` from {source}: the plan's model, LoRA, quantization and\n"
          "# training settings. Replace the placeholders ({placeholders}) with your data set and output folder.\n"
          "# Import it back with: qplan estimate --from-config THIS_FILE{gpu}\n")


def export_config(plan: dict[str, Any], to: str, source: str = "plan.json") -> tuple[dict[str, Any], str]:
    """``(config, YAML text)`` of ``plan`` for trainer ``to``."""
    if to not in FORMATS:
        raise QPlanError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    _check(plan, to)
    cfg = WRITERS[to](plan)
    import yaml

    gpu = f" --gpu {_comment(plan['gpu']['name'])}" if plan.get("gpu") else ""
    placeholders = {"axolotl": "datasets, learning_rate, output_dir", "llamafactory": "dataset, template, output_dir",
                    "trl": "dataset_name, output_dir"}[to]
    head = HEADER.format(tool={"axolotl": "axolotl", "llamafactory": "LLaMA-Factory", "trl": "TRL (trl sft --config)"}[to],
                         source=_comment(source), placeholders=placeholders, gpu=gpu)
    assert all(line.startswith("# ") for line in head.splitlines()), head  # the header is comments, nothing else
    return cfg, head + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False, allow_unicode=True)
