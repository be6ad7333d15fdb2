"""Training a GRPO plan (``training.objective: grpo``) with TRL's own ``GRPOTrainer`` and transformers' generate.

What the plan assumes (``planner.objectives.check_grpo``, ``planner.memory.generation``) and this run does:

* **The trainer.** ``trl.GRPOTrainer`` (TRL 1.16) with a ``GRPOConfig`` made of the plan's ``TrainingArguments``
  (``backends.hf_train.training_kwargs``) plus its ``training.grpo``: ``num_generations``, ``max_completion_length``,
  ``steps_per_generation``, ``beta``; every other setting is the config's default (``loss_type`` dapo, temperature 1,
  ``disable_dropout`` false). TRL adds its fused LM head and, on a quantized base, casts the trainable tensors to bf16.
* **The prompts**: blocks of ``prompt_length`` tokens cut from the run's data, handed over as token ids (the
  trainer's ``_tokenize_prompts`` returns them as they are: no chat template, every prompt exactly as long as the plan's
  longest). Each is repeated ``num_generations`` times by TRL's sampler.
* **The reward** is a stand-in: the share of even token ids in each completion (a number that varies between
  completions, so the advantages are not all zero). The run measures memory and time, not learning.
* **The generation** is marked as its own phase (``generation``) while ``generate`` runs: its forwards are not the
  step's (the measuring callback's hooks are quiet meanwhile). A random model rarely samples its EOS, so the
  completions run to ``max_completion_length``, as planned.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from qplan.planner.errors import QPlanError

from .base import TrainSettings
from .preference_train import Blocks, trl_config


@dataclasses.dataclass
class GrpoPrompts(Blocks):
    """Prompts of ``seq_len`` tokens cut from packed blocks (``packed.seq_len`` is the plan's prompt length); a prompt
    yields ``generations`` completions, which is what a step counts."""

    generations: int = 8

    def __len__(self) -> int:
        return len(self.packed.blocks) * self.generations

    def hf_dataset(self) -> Any:
        from datasets import Dataset, Features, Sequence, Value

        return Dataset.from_dict({"prompt": [list(b) for b in self.packed.blocks]},
                                 features=Features(prompt=Sequence(Value("int64"))))


def grpo_config(plan: dict[str, Any], settings: TrainSettings, device: str) -> Any:
    """``GRPOConfig`` of the plan (the module docstring); checkpointing set under both of its names."""
    try:
        from trl import GRPOConfig
    except ImportError as exc:  # pragma: no cover - the runner checks first
        raise QPlanError(f"a GRPO plan trains with TRL: pip install trl==1.16.0 ({exc})") from exc
    g = plan["training"]["grpo"]
    return trl_config(GRPOConfig, plan, settings, device, num_generations=int(g["num_generations"]),
                      max_completion_length=int(g["max_completion_length"]),
                      steps_per_generation=int(g["steps_per_generation"]), beta=float(g["beta"]))


def even_share(completion_ids: list[list[int]], **_: Any) -> list[float]:
    """The stand-in reward: the share of even token ids in each completion."""
    return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def run_grpo_trainer(model: Any, tokenizer: Any, prompts: GrpoPrompts, plan: dict[str, Any], settings: TrainSettings,
                     device: str, callbacks: list[Any], optimizer: Any = None) -> None:
    """Train with ``trl.GRPOTrainer`` (the module docstring says what is TRL's and what is set here)."""
    import warnings

    from trl import GRPOTrainer

    class _Pretokenized(GRPOTrainer):
        def _tokenize_prompts(self, prompts: list) -> tuple[list[list[int]], None, dict]:
            return [list(p) for p in prompts], None, {}  # already the prompts' token ids

    args = grpo_config(plan, settings, device)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group.update(lr=args.learning_rate, weight_decay=args.weight_decay)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL calls transformers' deprecated checkpointing names
        trainer = _Pretokenized(model=model, reward_funcs=even_share, args=args, train_dataset=prompts.hf_dataset(),
                                processing_class=tokenizer, callbacks=callbacks, optimizers=(optimizer, None))
        probe = next((getattr(c, "probe", None) for c in callbacks if getattr(c, "probe", None) is not None), None)
        with generation_marked(trainer, probe):
            trainer.train()


@contextlib.contextmanager
def generation_marked(trainer: Any, probe: Any) -> Iterator[None]:
    """While open, each ``generate`` of the trainer's model is the probe's ``generation`` phase (back to ``forward``
    after it), and the phase changes the measuring hooks make from generate's own forwards are dropped."""
    if probe is None:
        yield
        return
    cls = type(trainer.model)
    generate, set_phase, quiet = cls.generate, probe.set_phase, [False]

    def marked(self: Any, *a: Any, **k: Any) -> Any:
        set_phase("generation")
        quiet[0] = True
        try:
            return generate(self, *a, **k)
        finally:
            quiet[0] = False
            set_phase("forward")

    probe.set_phase = lambda phase: None if quiet[0] else set_phase(phase)
    cls.generate = marked
    try:
        yield
    finally:
        cls.generate = generate
        probe.set_phase = set_phase
