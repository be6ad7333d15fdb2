"""Training a DPO or KTO plan (``training.objective``) with TRL's own ``DPOTrainer`` / ``KTOTrainer``, as TRL's
``dpo.py`` / ``kto.py`` scripts do.

What the plan assumes (``planner.objectives``) and this run does:

* **The trainer.** ``trl.DPOTrainer`` or ``trl.KTOTrainer`` (TRL 1.16) with a ``DPOConfig`` / ``KTOConfig`` made of
  the plan's ``TrainingArguments`` (``backends.hf_train.training_kwargs``) plus ``max_length`` = the plan's
  ``seq_len``; every other setting is the config's default (DPO: sigmoid loss, ``beta`` 0.1; KTO: the ``kto`` loss,
  ``beta`` 0.1, sequential sampling; both ``disable_dropout``, no ``precompute_ref_log_probs``). TRL adds its fused
  LM head itself and, on a quantized base, casts the trainable tensors to bf16 (the plan's adapters are bf16 there:
  ``planner.objectives.kbit_adapters``).
* **The reference.** The backend hands the trainer the PEFT model it made (so the trainable count and the adapter
  snapshot are the backend's, as for SFT). Given a ``PeftModel`` and no ``ref_model``, both trainers copy the adapter
  to a frozen ``ref`` adapter (for re-training a pretrained adapter); for a new adapter that copy equals the base, and
  TRL's scripts (``peft_config`` passed, no wrapper) have none: their reference is the base with the adapters
  disabled. The copy is deleted right after the trainer's ``__init__``, so the reference here is that same
  adapter-disabled base (``use_adapter(model, None)`` in ``_compute_loss``), as the plan and its trace assume.
* **The data**, already tokenized rows (the trainers' ``_prepare_dataset`` — prompt extraction, EOS, tokenization of
  text columns — is skipped for them: they are its output), no prompt, every position a completion token as the
  plan assumes. DPO: pairs (``chosen_ids`` a block of ``seq_len`` tokens, ``rejected_ids`` the next block less its
  last token). KTO: one row a block, every other one a token shorter and labelled undesirable, and the KL term's
  ``KL_completion_ids`` rotated by one within each batch, as ``KTOTrainer._prepare_dataset`` makes them. A shorter
  row in every batch makes the collator pad, with an attention mask of zeros (the plan's 4-D mask). At step 0 the
  policy is the reference (LoRA's B is zero): DPO's first loss is ``-log sigmoid(0) = ln 2``, KTO's
  ``1 - sigmoid(0) = 0.5`` (its KL estimate is 0 too).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from qplan.planner.errors import QPlanError
from qplan.planner.objectives import TRAINERS

from .base import TrainSettings
from .data import PackedData
from .hf_train import training_kwargs


@dataclasses.dataclass
class Blocks:
    """Rows a TRL trainer reads, cut from packed blocks (``backends.data``): the file's tokens and notes are the
    blocks'."""

    packed: PackedData

    @property
    def tokens_in_file(self) -> int:
        return self.packed.tokens_in_file

    @property
    def notes(self) -> list[str]:
        return self.packed.notes


@dataclasses.dataclass
class _Rows(Blocks):
    """Rows cut from packed blocks, every other one a token shorter (so each batch is padded)."""

    def __post_init__(self) -> None:
        if self.packed.seq_len < 2:
            raise QPlanError(f"a preference run needs --seq-len >= 2 (every other row one token shorter), got "
                             f"{self.packed.seq_len}")


@dataclasses.dataclass
class PreferencePairs(_Rows):
    """``len(blocks) // 2`` pairs cut from packed blocks: chosen = block ``2i``, rejected = block ``2i+1`` less its last
    token, no prompt."""

    def __len__(self) -> int:
        return len(self.packed.blocks) // 2

    def rows(self) -> dict[str, list[list[int]]]:
        b = self.packed.blocks
        n = len(self)
        return {"prompt_ids": [[] for _ in range(n)], "chosen_ids": [list(b[2 * i]) for i in range(n)],
                "rejected_ids": [list(b[2 * i + 1][:-1]) for i in range(n)]}

    def hf_dataset(self) -> Any:
        from datasets import Dataset, Features, Sequence, Value

        ids = Sequence(Value("int64"))
        return Dataset.from_dict(self.rows(), features=Features(prompt_ids=ids, chosen_ids=ids, rejected_ids=ids))


@dataclasses.dataclass
class UnpairedRows(_Rows):
    """KTO's rows, one a packed block: every other one a token shorter and labelled undesirable; the KL term's
    completions rotated by one within each batch of ``batch_size`` (``KTOTrainer._prepare_dataset``'s
    ``add_kl_completion_ids``: ``(x_1, y_n), (x_2, y_1), ...``)."""

    batch_size: int = 2

    def __len__(self) -> int:
        return len(self.packed.blocks)

    def rows(self) -> dict[str, list[Any]]:
        completions = [list(b) if i % 2 == 0 else list(b[:-1]) for i, b in enumerate(self.packed.blocks)]
        kl: list[list[int]] = []
        for i in range(0, len(completions), self.batch_size):
            batch = completions[i:i + self.batch_size]
            kl += [batch[-1], *batch[:-1]]
        return {"prompt_ids": [[] for _ in completions], "completion_ids": completions, "KL_completion_ids": kl,
                "label": [i % 2 == 0 for i in range(len(completions))]}

    def hf_dataset(self) -> Any:
        from datasets import Dataset, Features, Sequence, Value

        ids = Sequence(Value("int64"))
        return Dataset.from_dict(self.rows(), features=Features(prompt_ids=ids, completion_ids=ids,
                                                                KL_completion_ids=ids, label=Value("bool")))


def trainer_config(plan: dict[str, Any], settings: TrainSettings, device: str) -> Any:
    """``DPOConfig`` / ``KTOConfig`` of the plan: its ``TrainingArguments`` and ``max_length`` = ``seq_len``. TRL's
    configs default ``gradient_checkpointing`` to True and ``bf16`` to True: both names of checkpointing are set to the
    plan's."""
    try:
        import trl
    except ImportError as exc:  # pragma: no cover - the runner checks first
        raise QPlanError(f"a {plan['training']['objective'].upper()} plan trains with TRL: pip install trl==1.16.0 "
                         f"({exc})") from exc
    cls = getattr(trl, TRAINERS[plan["training"]["objective"]][1])
    t = plan["training"]
    pre = {"precompute_ref_log_probs": True, "precompute_ref_batch_size": t.get("precompute_ref_batch_size")} if t.get(
        "precompute_ref_log_probs") else {}
    return trl_config(cls, plan, settings, device, max_length=int(t["seq_len"]), **pre)


def trl_config(cls: Any, plan: dict[str, Any], settings: TrainSettings, device: str, **extra: Any) -> Any:
    """A TRL config class (``DPOConfig``, ``GRPOConfig``, ...) of the plan's ``TrainingArguments`` and ``extra``; TRL's
    configs default checkpointing to on: it is set under both of its names to the plan's."""
    kw = training_kwargs(plan, settings, device)
    fields = {f.name for f in dataclasses.fields(cls)}
    ckpt = kw.get("activation_checkpointing", kw.get("gradient_checkpointing"))
    ckpt_kwargs = kw.get("activation_checkpointing_kwargs", kw.get("gradient_checkpointing_kwargs"))
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if name in fields:
            kw[name], kw[f"{name}_kwargs"] = ckpt, ckpt_kwargs
    return cls(**kw, **extra)


def run_preference_trainer(model: Any, tokenizer: Any, rows: Any, plan: dict[str, Any], settings: TrainSettings,
                           device: str, callbacks: list[Any], optimizer: Any = None) -> None:
    """Train with ``trl.DPOTrainer`` on pairs, or ``trl.KTOTrainer`` on unpaired rows (the module docstring says what
    is TRL's and what is set here)."""
    import trl

    base = getattr(trl, TRAINERS[plan["training"]["objective"]][0])

    class _Pretokenized(base):  # type: ignore[misc, valid-type]
        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset  # already the trainer's tokenized rows

        def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:
            # handed a wrapped model, TRL copies its adapter as "ref"; a user's run (peft_config) has none, and the
            # pass runs the base with the adapters disabled: so here too
            drop_reference_copy(self.model)
            return super()._precompute_ref_logps(*args, **kwargs)

    args = trainer_config(plan, settings, device)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group.update(lr=args.learning_rate, weight_decay=args.weight_decay)
    probe = next((getattr(c, "probe", None) for c in callbacks if getattr(c, "probe", None) is not None), None)
    measured = probe is not None and bool(plan["training"].get("precompute_ref_log_probs"))
    with probe.measured_pass("precompute", model) if measured else contextlib.nullcontext():  # the pass, in __init__
        trainer = _Pretokenized(model=model, args=args, train_dataset=rows.hf_dataset(), processing_class=tokenizer,
                                callbacks=callbacks, optimizers=(optimizer, None))
    drop_reference_copy(trainer.model)
    trainer.train()


def drop_reference_copy(model: Any) -> None:
    """Delete the ``ref`` adapter TRL 1.16's ``DPOTrainer``/``KTOTrainer`` copies from the ``default`` one when handed a
    PEFT-wrapped model (``__init__``: "re-training an existing adapter"). The runs here wrap the model themselves,
    where a user passes ``peft_config`` and gets no copy: the reference is the base with the adapters disabled."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
