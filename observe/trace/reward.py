"""TRL's reward-model step on the meta device: ``RewardTrainer.compute_loss`` itself, on a stand-in for the trainer.

TRL 1.16's ``RewardTrainer`` (``trl/trainer/reward_trainer.py``) trains ``AutoModelForSequenceClassification`` with one
label; its ``DataCollatorForPreference`` puts each pair's chosen and rejected rows in one batch (``input_ids`` and
``attention_mask`` of ``2 B`` rows, chosen first), and ``compute_loss`` runs the model on them (transformers'
``GenericForSequenceClassification``: the decoder, ``score`` on every position, each row's last non-pad position
pooled), splits the ``2 B`` rewards into chosen and rejected and takes ``-logsigmoid(chosen - rejected).mean()``. The
trace calls that method, unbound, with what it reads of the trainer: ``RewardConfig``'s ``center_rewards_coefficient``
(None), the model, and an accelerator whose gathers return host zeros (``observe.trace.dpo._Accelerator``: the
metrics' values are only logged).

Not traced: padding (the traced rows are full; a padded batch's 4-D mask is ``planner.memory.masks``' term).
"""

from __future__ import annotations

import types
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from .dpo import _Accelerator


def reward_trainer_state(model: Any) -> Any:
    """The attributes of a ``RewardTrainer`` that ``compute_loss`` reads (``RewardConfig``'s defaults)."""
    import dataclasses

    from trl.trainer.reward_config import RewardConfig

    center = next(f.default for f in dataclasses.fields(RewardConfig) if f.name == "center_rewards_coefficient")
    return types.SimpleNamespace(
        model=model, accelerator=_Accelerator(next(model.parameters()).device),
        args=types.SimpleNamespace(center_rewards_coefficient=center),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )


def reward_forward(trainer: Any, model: Any, ids: Any, attention_mask: Any, after: Callable[[], None]) -> Any:
    """One ``RewardTrainer.compute_loss`` on the batch (``input_ids`` of ``2 B`` rows, chosen then rejected)."""
    from trl.trainer.reward_trainer import RewardTrainer

    loss = RewardTrainer.compute_loss(trainer, model, {"input_ids": ids, "attention_mask": attention_mask.clone()})
    after()
    return loss
