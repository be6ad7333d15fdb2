"""Training a DPO plan (``training.objective: dpo``) with TRL's own ``DPOTrainer``, as TRL's ``dpo.py`` script does.

What the plan assumes (``planner.objectives.check_dpo``) and this run does:

* **The trainer.** ``trl.DPOTrainer`` (TRL 1.16) with a ``DPOConfig`` made of the plan's ``TrainingArguments``
  (``backends.hf_train.training_kwargs``) plus ``max_length`` = the plan's ``seq_len``; every other DPO setting is
  ``DPOConfig``'s default (sigmoid loss, ``beta`` 0.1, ``disable_dropout``, no ``precompute_ref_log_probs``).
  TRL adds its fused LM head itself and, on a quantized base, casts the trainable tensors to bf16 (the plan's
  adapters are bf16 there: ``planner.objectives.dpo_kbit_adapters``).
* **The reference.** The backend hands DPOTrainer the PEFT model it made (so the trainable count and the adapter
  snapshot are the backend's, as for SFT). Given a ``PeftModel`` and no ``ref_model``, DPOTrainer copies the adapter
  to a frozen ``ref`` adapter (for re-training a pretrained adapter); for a new adapter that copy equals the base, and
  TRL's script (``peft_config`` passed, no wrapper) has none: its reference is the base with the adapters disabled.
  The copy is deleted right after ``DPOTrainer.__init__``, so the reference here is that same adapter-disabled base
  (``use_adapter(model, None)`` in ``_compute_loss``), as the plan and its trace assume.
* **The data.** Preference pairs of already tokenized rows (``prompt_ids`` empty, ``chosen_ids`` a block of
  ``seq_len`` tokens, ``rejected_ids`` the next block less its last token): every position is a completion token, as
  the plan assumes, and each pair's rejected row is one token shorter, so the collator pads it and passes an
  attention mask with zeros (the plan's 4-D mask). ``DPOTrainer._prepare_dataset`` (prompt extraction, EOS,
  tokenization of text columns) is skipped for these rows: they are its output already. At step 0 the policy is the
  reference (LoRA's B is zero), so the first loss is ``-log sigmoid(0) = ln 2``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qplan.planner.errors import QPlanError

from .base import TrainSettings
from .data import PackedData
from .hf_train import training_kwargs


@dataclasses.dataclass
class PreferencePairs:
    """``len(blocks) // 2`` pairs cut from packed blocks: chosen = block ``2i``, rejected = block ``2i+1`` less its last
    token, no prompt."""

    packed: PackedData

    def __post_init__(self) -> None:
        if self.packed.seq_len < 2:
            raise QPlanError(f"a DPO run needs --seq-len >= 2 (a rejected row one token shorter), got {self.packed.seq_len}")

    def __len__(self) -> int:
        return len(self.packed.blocks) // 2

    @property
    def tokens_in_file(self) -> int:
        return self.packed.tokens_in_file

    @property
    def notes(self) -> list[str]:
        return self.packed.notes

    def rows(self) -> dict[str, list[list[int]]]:
        b = self.packed.blocks
        n = len(self)
        return {"prompt_ids": [[] for _ in range(n)], "chosen_ids": [list(b[2 * i]) for i in range(n)],
                "rejected_ids": [list(b[2 * i + 1][:-1]) for i in range(n)]}

    def hf_dataset(self) -> Any:
        from datasets import Dataset, Features, Sequence, Value

        ids = Sequence(Value("int64"))
        return Dataset.from_dict(self.rows(), features=Features(prompt_ids=ids, chosen_ids=ids, rejected_ids=ids))


def dpo_config(plan: dict[str, Any], settings: TrainSettings, device: str) -> Any:
    """``DPOConfig`` of the plan: its ``TrainingArguments`` and ``max_length`` = ``seq_len``. TRL's configs default
    ``gradient_checkpointing`` to True and ``bf16`` to True: both names of checkpointing are set to the plan's."""
    try:
        from trl import DPOConfig
    except ImportError as exc:  # pragma: no cover - the runner checks first
        raise QPlanError(f"a DPO plan trains with TRL's DPOTrainer: pip install trl==1.16.0 ({exc})") from exc
    kw = training_kwargs(plan, settings, device)
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    ckpt = kw.get("activation_checkpointing", kw.get("gradient_checkpointing"))
    ckpt_kwargs = kw.get("activation_checkpointing_kwargs", kw.get("gradient_checkpointing_kwargs"))
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if name in fields:
            kw[name], kw[f"{name}_kwargs"] = ckpt, ckpt_kwargs
    return DPOConfig(**kw, max_length=int(plan["training"]["seq_len"]))


def run_dpo_trainer(model: Any, tokenizer: Any, pairs: PreferencePairs, plan: dict[str, Any], settings: TrainSettings,
                    device: str, callbacks: list[Any], optimizer: Any = None) -> None:
    """Train with ``trl.DPOTrainer`` on ``pairs`` (the module docstring says what is TRL's and what is set here)."""
    from trl import DPOTrainer

    class _PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset  # already DPOTrainer's tokenized rows (prompt_ids, chosen_ids, rejected_ids)

    args = dpo_config(plan, settings, device)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group.update(lr=args.learning_rate, weight_decay=args.weight_decay)
    trainer = _PretokenizedDPOTrainer(model=model, args=args, train_dataset=pairs.hf_dataset(),
                                      processing_class=tokenizer, callbacks=callbacks, optimizers=(optimizer, None))
    if "ref" in getattr(trainer.model, "peft_config", {}):  # the copy DPOTrainer makes of a wrapped model's adapter
        trainer.model.delete_adapter("ref")
    trainer.train()
