"""Training through ``transformers.Trainer`` with the plan's settings — shared by the backends.

Plan -> ``TrainingArguments``:

* ``training.batch_size`` -> ``per_device_train_batch_size``; ``grad_accum`` ->
  ``gradient_accumulation_steps``;
* ``training.mixed_precision`` ``bf16``/``fp16`` -> ``bf16=True``/``fp16=True`` (autocast; on
  the CPU only bf16 autocast exists, so an fp16 plan is refused there with the fix);
* ``training.optimizer`` -> ``optim`` (``adamw_8bit`` is transformers' ``adamw_bnb_8bit``);
* ``training.grad_ckpt`` ``hf`` / ``reentrant`` -> ``activation_checkpointing=True`` (``gradient_checkpointing``
  before transformers 5.23) with ``use_reentrant=False`` / ``True`` (a backend that enables checkpointing itself,
  like Unsloth, passes ``trainer_checkpointing=False``);
* fixed here, not in the plan (they do not change memory): ``learning_rate`` (run option,
  default 2e-4), constant schedule, ``max_grad_norm=1.0``, ``logging_steps=1``,
  ``save_strategy="no"``, ``report_to="none"``, ``dataloader_drop_last=True``, ``seed``.
"""

from __future__ import annotations

from typing import Any

from qplan.planner.errors import QPlanError
from qplan.planner.vocab import OPTIMIZERS

from .base import TrainSettings


def training_arguments(plan: dict[str, Any], settings: TrainSettings, device: str,
                       trainer_checkpointing: bool = True) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(**training_kwargs(plan, settings, device, trainer_checkpointing))


def _checkpointing(ckpt: bool, reentrant: bool = False) -> dict[str, Any]:
    """Checkpointing (``use_reentrant`` as planned) under transformers' name for it: ``activation_checkpointing`` from 5.23 on
    (``gradient_checkpointing`` is a deprecated alias there, with a FutureWarning), the old name before (the
    Unsloth venv's transformers)."""
    import dataclasses

    from transformers import TrainingArguments

    new = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if new else "gradient_checkpointing"
    return {name: ckpt, f"{name}_kwargs": {"use_reentrant": reentrant} if ckpt else None}


def training_kwargs(plan: dict[str, Any], settings: TrainSettings, device: str,
                    trainer_checkpointing: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``TrainingArguments`` (or a subclass such as TRL's ``SFTConfig``)."""
    t = plan["training"]
    mp = t.get("mixed_precision", "no")
    on_cpu = device == "cpu"
    if on_cpu and mp == "fp16":
        raise QPlanError("this plan trains with fp16 autocast, which needs a GPU: on the CPU re-create the plan "
                         "with --compute-dtype bf16 (and --quant bf16 for a 16-bit base)")
    if t["optimizer"] not in OPTIMIZERS:
        raise QPlanError(f"optimizer {t['optimizer']!r} is not supported by the Trainer backends: "
                         f"choose one of {', '.join(OPTIMIZERS)}")
    from qplan.hf import require_optimizer

    require_optimizer(t["optimizer"])
    ckpt = t["grad_ckpt"] != "off" and trainer_checkpointing
    kwargs: dict[str, Any] = dict(
        output_dir=str(settings.output_dir),
        per_device_train_batch_size=int(t["batch_size"]),
        gradient_accumulation_steps=int(t.get("grad_accum", 1)),
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        # PEFT's own optimizers (LoRA-FA) are handed to the Trainer (``run_trainer``); ``optim`` is then unused
        optim=OPTIMIZERS[t["optimizer"]].trainer_optim if not OPTIMIZERS[t["optimizer"]].peft else "adamw_torch",
        bf16=mp == "bf16",
        fp16=mp == "fp16",
        **_checkpointing(ckpt, t["grad_ckpt"] == "reentrant"),
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_drop_last=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=on_cpu,
    )
    if settings.steps is not None:
        kwargs["max_steps"] = int(settings.steps)
    else:
        kwargs["num_train_epochs"] = float(settings.epochs or 1.0)
    return kwargs


def effective_arguments(args: Any) -> dict[str, Any]:
    """What the Trainer really runs with: a library may rewrite ``TrainingArguments`` (Unsloth's
    CPU patch swaps the optimizer for ``adamw_torch_fused`` and may drop bf16), so the report
    records the arguments the Trainer holds when training begins (``MeasureCallback``)."""
    optim = getattr(args.optim, "value", args.optim)
    ckpt_kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs",
                                                                                     None) or {}
    return {
        "optim": str(optim),
        "bf16": bool(args.bf16),
        "fp16": bool(args.fp16),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "use_reentrant": bool(args.gradient_checkpointing) and bool(ckpt_kwargs.get("use_reentrant", False)),
        "per_device_train_batch_size": int(args.per_device_train_batch_size),
        "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
        "max_steps": int(args.max_steps),
        "learning_rate": float(args.learning_rate),
    }


def run_trainer(model: Any, dataset: Any, plan: dict[str, Any], settings: TrainSettings, device: str,
                callbacks: list[Any], trainer_checkpointing: bool = True, optimizer: Any = None) -> None:
    """Build a ``Trainer`` for the plan and train; ``optimizer``: one the backend made (PEFT's LoRA-FA), which gets
    the run's learning rate and weight decay."""
    from transformers import Trainer, default_data_collator

    args = training_arguments(plan, settings, device, trainer_checkpointing)
    collate = getattr(dataset, "collate", None) or default_data_collator
    if hasattr(dataset, "sampling_strategy"):  # a --data plan's dataset (plan_data.PlanData): its batching
        args.train_sampling_strategy = dataset.sampling_strategy

        class _Trainer(Trainer):
            def _get_train_sampler(self, train_dataset: Any = None) -> Any:
                return dataset.wrap_sampler(super()._get_train_sampler(train_dataset), self.args.train_batch_size)

            def get_train_dataloader(self) -> Any:
                batches = dataset.batch_order(self.args.train_batch_size)
                if batches is None:
                    return super().get_train_dataloader()
                from torch.utils.data import DataLoader  # fixed batches (PEFT's buckets): a batch sampler

                return self.accelerator.prepare(DataLoader(dataset, batch_sampler=batches, collate_fn=self.data_collator))

        trainer_cls = _Trainer
    else:
        trainer_cls = Trainer
    if plan["training"].get("loss") == "trl":  # TRL's fused LM head (added by the backend): SFTTrainer.compute_loss
        base = trainer_cls

        class _FusedHeadTrainer(base):  # type: ignore[misc, valid-type]
            def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                             num_items_in_batch: Any = None) -> Any:
                return super().compute_loss(model, {**inputs, "fused_lm_head": True}, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

        trainer_cls = _FusedHeadTrainer
    if optimizer is not None:
        for group in optimizer.param_groups:
            group.update(lr=args.learning_rate, weight_decay=args.weight_decay)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=callbacks,
                          optimizers=(optimizer, None))
    trainer.train()
