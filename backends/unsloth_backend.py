"""Unsloth: ``FastLanguageModel.from_pretrained`` + ``FastLanguageModel.get_peft_model``, trained
by TRL's ``SFTTrainer`` (a ``transformers.Trainer``; Unsloth patches both on import).

Plan -> Unsloth:

* ``quant.quant`` nf4/fp4 -> ``load_in_4bit=True`` with a ``BitsAndBytesConfig`` carrying the
  plan's quant type, double quantization and compute dtype; int8 -> ``load_in_8bit=True``;
  bf16/fp16/fp32 -> a 16/32-bit load. ``dtype`` is the plan's load dtype.
* ``training.grad_ckpt`` -> ``use_gradient_checkpointing``: ``unsloth`` -> ``"unsloth"``
  (checkpoints offloaded to CPU RAM), ``hf`` -> ``True``, ``off`` -> ``False``; Unsloth
  enables it itself, so the Trainer's own flag stays off.
* ``plan["lora"]`` -> ``get_peft_model(r, lora_alpha, lora_dropout, target_modules, bias,
  use_rslora, use_dora, modules_to_save, random_state)``.

Unsloth pins older transformers/trl than qplan's ``train`` extra, so it runs in a virtual
environment of its own (``QPLAN_UNSLOTH_PYTHON``, see ``backends.registry``); importing it
patches transformers, PEFT and TRL process-wide, which is why every backend runs in its own
process. On a machine without a GPU Unsloth trains on the CPU: there it is mostly stock
transformers + PEFT + TRL, its CPU patch replaces the optimizer with ``adamw_torch_fused`` and
drops bf16 autocast where the CPU lacks native bf16 (the arguments the Trainer really used are
recorded in measured.json ``run.trainer``), and ``"unsloth"`` checkpointing is plain
recomputation (nothing to offload to). Its chunked cross-entropy runs only inside
``SFTTrainer.compute_loss``, hence SFTTrainer here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qplan.hf import bnb_config, lora_kwargs, torch_dtype
from qplan.planner.errors import QPlanError

from .base import ModelSource, Prepared, TrainSettings
from .hf_train import training_kwargs
from .peft_backend import trainable_counts

#: plan grad_ckpt -> FastLanguageModel use_gradient_checkpointing
GRAD_CKPT = {"off": False, "hf": True, "unsloth": "unsloth"}


def _import_unsloth() -> Any:
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no network calls from a measuring run
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "UNSLOTH_COMPILE_LOCATION" not in os.environ:
        # unsloth_zoo/compiler.py writes the modules it generates to ./unsloth_compiled_cache (and
        # imports them from there): a run must not write into, or read from, the user's folder.
        # (Its CPU path compiles nothing, so only a GPU run exercises this.)
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="qplan-unsloth-compile-")
        os.environ["UNSLOTH_COMPILE_LOCATION"] = folder
        atexit.register(shutil.rmtree, folder, True)
    try:
        import unsloth  # noqa: F401 - must come before transformers/peft/trl are used
        from unsloth import FastLanguageModel
    except ImportError as exc:
        raise QPlanError("the unsloth backend needs Unsloth: pip install 'qplan[unsloth]' in its own virtual "
                         "environment and set QPLAN_UNSLOTH_PYTHON to its python") from exc
    return FastLanguageModel


class UnslothBackend:
    """Unsloth's ``FastLanguageModel`` with the plan's LoRA, trained by ``transformers.Trainer``."""

    name = "unsloth"

    def __init__(self) -> None:
        self._flm = _import_unsloth()  # at construction: before anything imports transformers

    def prepare(self, plan: dict[str, Any], source: ModelSource, device: str, probe: Any) -> Prepared:
        flm = self._flm
        q, t, lora = plan["quant"], plan["training"], plan["lora"]
        ckpt = GRAD_CKPT[t["grad_ckpt"]]
        kwargs: dict[str, Any] = {
            "model_name": str(source.path),
            "max_seq_length": int(t["seq_len"]),
            "dtype": torch_dtype(q["load_dtype"]),
            "load_in_4bit": q["quant"] in ("nf4", "fp4"),
            "load_in_8bit": q["quant"] == "int8",
            "use_gradient_checkpointing": ckpt,
            "attn_implementation": t["attn_impl"],
            "device_map": {"": device},
            "fix_tokenizer": False,
        }
        bnb = bnb_config(q)
        if bnb is not None:
            kwargs["quantization_config"] = bnb
        probe.set_phase("load")
        model, tokenizer = flm.from_pretrained(**kwargs)
        probe.snapshot("after_load", model)
        probe.snapshot("after_prepare", model)
        footprint = int(model.get_memory_footprint())
        probe.weights_footprint = footprint
        probe.set_phase("adapters")
        model = flm.get_peft_model(
            model,
            **lora_kwargs(lora),
            use_gradient_checkpointing=ckpt,
            random_state=3407,
        )
        probe.snapshot("after_adapters", model, adapters=True)
        if tokenizer.eos_token_id is None and tokenizer.pad_token_id is not None:
            tokenizer.eos_token = tokenizer.pad_token
        notes = []
        if q["quant"] in ("nf4", "fp4", "int8"):
            notes.append("Unsloth prepares k-bit models itself (no prepare_model_for_kbit_training call)")
        return Prepared(model=model, tokenizer=tokenizer, device=device, weights_footprint=footprint,
                        params=trainable_counts(model), notes=notes)

    def train(self, prepared: Prepared, dataset: Any, plan: dict[str, Any], settings: TrainSettings,
              callbacks: list[Any]) -> None:
        """TRL's ``SFTTrainer`` (a ``transformers.Trainer``), as Unsloth's users run it: Unsloth's
        chunked cross-entropy (no full ``batch × seq × vocab`` logits) is only active there."""
        from datasets import Dataset
        from transformers import default_data_collator
        from trl import SFTConfig, SFTTrainer

        kwargs = training_kwargs(plan, settings, prepared.device, trainer_checkpointing=False)
        args = SFTConfig(**kwargs, max_length=int(plan["training"]["seq_len"]), packing=False,
                         dataset_kwargs={"skip_prepare_dataset": True})  # blocks are tokenized and packed
        blocks = [dataset[i] for i in range(len(dataset))]
        train = Dataset.from_dict({k: [b[k] for b in blocks] for k in ("input_ids", "labels")})
        trainer = SFTTrainer(model=prepared.model, args=args, train_dataset=train,
                             processing_class=prepared.tokenizer, data_collator=default_data_collator,
                             callbacks=callbacks)
        trainer.train()

    def save_adapter(self, prepared: Prepared, folder: Path) -> Path:
        prepared.model.save_pretrained(str(folder), safe_serialization=True)
        path = Path(folder) / "adapter_model.safetensors"
        if not path.is_file():  # pragma: no cover - PEFT changed its file name
            raise QPlanError(f"Unsloth/PEFT wrote no {path.name} in {folder}")
        return path
