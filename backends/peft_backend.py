"""The standard recipe: transformers + bitsandbytes + PEFT + ``Trainer``, exactly as the plan says.

* Load (``AutoModelForCausalLM.from_pretrained``): ``quant.quant`` nf4/fp4 ->
  ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=..., bnb_4bit_use_double_quant=
  quant.double_quant, bnb_4bit_compute_dtype=quant.compute_dtype)``; int8 ->
  ``load_in_8bit=True``; bf16/fp16/fp32 -> a plain load. ``dtype=quant.load_dtype`` always
  (transformers 5 keeps the dtype asked for), ``attn_implementation=training.attn_impl``,
  everything on one device (``device_map={"": device}``).
* ``prepare_model_for_kbit_training`` when ``quant.prepare_model_for_kbit_training``
  (freezes the base, casts fp16/bf16 parameters that are not 4-bit to fp32, enables
  checkpointing when the plan uses it).
* ``get_peft_model`` with ``LoraConfig(r, lora_alpha, lora_dropout, target_modules, bias,
  use_dora, use_rslora, modules_to_save, task_type="CAUSAL_LM")`` from ``plan["lora"]``; with another PEFT method
  (``method: ia3``, ``prompt_tuning``, ``p_tuning``, ``ln_tuning``) its config from the plan's section of that name
  (``qplan.hf.method_config``); a full fine-tuning plan (``method: full``) trains the model itself, every parameter.
* Train with ``transformers.Trainer`` (``backends.hf_train``); a DPO plan with TRL's ``DPOTrainer`` on preference
  pairs and a KTO plan with ``KTOTrainer`` on unpaired rows (``backends.preference_train``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qplan.hf import bnb_config, cast_adapters, load_model, lora_config, method_config, peft_optimizer, task_of
from qplan.planner.errors import QPlanError
from qplan.planner.vocab import PEFT_METHODS

from .base import ModelSource, Prepared, TrainSettings
from .hf_train import run_trainer


def trainable_counts(model: Any) -> dict[str, int]:
    """PEFT's ``get_nb_trainable_parameters()``: the ground truth for trainable/all."""
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable": int(trainable), "all": int(total)}


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source.path))
    except (OSError, ValueError) as exc:
        raise QPlanError(f"cannot load a tokenizer from {source.path}: {exc}") from exc
    if tok.eos_token_id is None and tok.pad_token_id is not None:
        tok.eos_token = tok.pad_token
    return tok


def cce_patched(model: Any) -> Any:
    """The model with Cut Cross Entropy as its loss: ``cut_cross_entropy.transformers.cce_patch`` (axolotl's fork,
    which its CutCrossEntropyPlugin installs, or Apple's release), as the plugin applies it (``impl="cce"``,
    ``reduction="mean"``)."""
    try:
        from cut_cross_entropy.transformers import cce_patch
    except ImportError as exc:
        raise QPlanError("the plan's loss is Cut Cross Entropy: install it first (axolotl's fork: pip install "
                         "\"cut-cross-entropy[transformers] @ git+https://github.com/axolotl-ai-cloud/ml-cross-entropy.git"
                         f"@5f0c7a7\"): {exc}") from exc
    try:
        return cce_patch(model, impl="cce", reduction="mean")
    except (RuntimeError, ValueError) as exc:  # a model type the installed version does not patch
        raise QPlanError(f"Cut Cross Entropy does not patch {model.config.model_type}: {exc}") from exc


def liger_patched(model: Any, flce: bool, kernels: list[str]) -> Any:
    """The model with Liger-Kernel's fused linear cross-entropy as its loss (``flce``) and the plan's Liger ``kernels``
    (``rms_norm``, ``swiglu``, ``rope``), no other, as axolotl's ``LigerPlugin`` applies its ``liger_*`` keys
    (``apply_liger_kernel_to_<model_type>``; here on the loaded instance)."""
    from qplan.observe.trace.liger import apply_fn, only_flags

    try:
        fn = apply_fn(model.config.model_type)
        flags = only_flags(fn, ("flce",) * flce + tuple(kernels))
    except ImportError as exc:
        raise QPlanError("the plan uses Liger-Kernel: install it first (pip install liger-kernel==0.8.0, the version "
                         f"axolotl pins): {exc}") from exc
    except ValueError as exc:
        raise QPlanError(f"Liger-Kernel on {model.config.model_type}: {exc}") from exc
    fn(model=model, **flags)
    return model


class PeftBackend:
    """transformers + bitsandbytes + PEFT, trained by ``transformers.Trainer``."""

    name = "peft"

    def prepare(self, plan: dict[str, Any], source: ModelSource, device: str, probe: Any) -> Prepared:
        from peft import get_peft_model, prepare_model_for_kbit_training

        q, t = plan["quant"], plan["training"]
        bnb = bnb_config(q)
        probe.set_phase("load")
        model = load_model(str(source.path), plan, device)
        if t.get("loss") == "cce":
            model = cce_patched(model)
        if t.get("loss") == "liger" or t.get("liger_kernels"):
            model = liger_patched(model, t.get("loss") == "liger", list(t.get("liger_kernels") or []))
        probe.snapshot("after_load", model)
        ckpt = t["grad_ckpt"] != "off"
        if bnb is not None and q.get("prepare_model_for_kbit_training"):
            probe.set_phase("prepare")
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=ckpt,
                gradient_checkpointing_kwargs={"use_reentrant": t["grad_ckpt"] == "reentrant"} if ckpt else None,
            )
        probe.snapshot("after_prepare", model)
        footprint = int(model.get_memory_footprint())
        probe.weights_footprint = footprint
        if plan.get("method") == "full":  # full fine-tuning: the Trainer gets the model itself, every parameter trains
            from qplan.observe.trace.run import trainable_and_total

            probe.set_phase("trainable")
            for p in model.parameters():
                p.requires_grad_(True)
            if t.get("loss") == "trl" and t.get("objective", "sft") == "sft":  # SFTTrainer's fused head (DPO: its own)
                from qplan.observe.trace.trl_head import add_sft_fused_head

                add_sft_fused_head(model)
            probe.snapshot("after_adapters", model, adapters=False)
            trainable, total = trainable_and_total(model)
            return Prepared(model=model, tokenizer=load_tokenizer(source), device=device,
                            weights_footprint=footprint, params={"trainable": int(trainable), "all": int(total)})
        probe.set_phase("adapters")
        if plan.get("method") in PEFT_METHODS:
            model = get_peft_model(model, method_config(plan["method"], plan[plan["method"]]))
        else:
            model = cast_adapters(get_peft_model(model, lora_config(plan["lora"], task_of(plan)[1])), plan["lora"])
        # as TRL's SFTTrainer: the fused LM head on the causal LM under the PEFT wrapper (DPOTrainer adds its own)
        if t.get("loss") == "trl" and t.get("objective", "sft") == "sft":
            from qplan.observe.trace.trl_head import add_sft_fused_head

            add_sft_fused_head(model.get_base_model())
        # PEFT's own optimizer (LoRA-FA) is made now, as PEFT's harness does before counting: it freezes lora_A
        # (the learning rate is the run's, set in ``train``)
        opt = peft_optimizer(model, t["optimizer"], plan["lora"], lr=0.0)
        probe.snapshot("after_adapters", model, adapters=True)
        return Prepared(model=model, tokenizer=load_tokenizer(source), device=device,
                        weights_footprint=footprint, params=trainable_counts(model), optimizer=opt)

    def train(self, prepared: Prepared, dataset: Any, plan: dict[str, Any], settings: TrainSettings,
              callbacks: list[Any]) -> None:
        if plan["training"].get("objective", "sft") == "grpo":  # TRL's GRPOTrainer, generating with transformers
            from .grpo_train import run_grpo_trainer

            run_grpo_trainer(prepared.model, prepared.tokenizer, dataset, plan, settings, prepared.device, callbacks,
                             optimizer=prepared.optimizer)
            return
        if plan["training"].get("objective", "sft") != "sft":  # TRL's DPOTrainer / KTOTrainer
            from .preference_train import run_preference_trainer

            run_preference_trainer(prepared.model, prepared.tokenizer, dataset, plan, settings, prepared.device, callbacks,
                            optimizer=prepared.optimizer)
            return
        run_trainer(prepared.model, dataset, plan, settings, prepared.device, callbacks, optimizer=prepared.optimizer)

    def save_adapter(self, prepared: Prepared, folder: Path) -> Path:
        """The trained adapter (``adapter_model.safetensors``); with full fine-tuning the trained model itself
        (``model.safetensors``, or its index when transformers shards a large one)."""
        prepared.model.save_pretrained(str(folder), safe_serialization=True)
        if not hasattr(prepared.model, "peft_config"):
            index = Path(folder) / "model.safetensors.index.json"
            return index if index.is_file() else Path(folder) / "model.safetensors"
        path = Path(folder) / "adapter_model.safetensors"
        if not path.is_file():  # pragma: no cover - PEFT changed its file name
            raise QPlanError(f"PEFT wrote no {path.name} in {folder}")
        return path
