"""A reward model's structure (``--objective reward``), derived from the causal LM's spec without torch.

TRL 1.16's ``RewardTrainer`` loads ``AutoModelForSequenceClassification`` with ``num_labels=1``: the same decoder, and
in place of the vocabulary head (``lm_head``, tied to the embeddings or not) a ``score`` head, ``nn.Linear(hidden, 1,
bias=False)`` (transformers' ``GenericForSequenceClassification``), left unquantized by bitsandbytes (the model's last
module), with no tie. So the spec's inventory loses the head's group and gains ``score``'s, its tie to the embeddings
is gone, and its parameter count changes by the two heads. The planner calls ``score`` the output head
(``inventory.output_head``): a row per token of width 1 where the LM's head had the vocabulary
(``planner.memory.terms.dims``). PEFT (``task_type="SEQ_CLS"``) trains a copy of ``score`` (``modules_to_save``) and
leaves it out of ``all-linear``: the presets stay the LM's. ``tests/planner/test_reward.py`` checks the derived
inventory against transformers' own model built on meta (``inventory.build_inventory(config, task="seq_cls")``) and the
trainable count against PEFT's.
"""

from __future__ import annotations

import msgspec

from qplan.planner.errors import QPlanError
from qplan.planner.model.spec import LinearGroup, ModelSpec

#: the model types whose sequence-classification model is the decoder plus ``score = nn.Linear(h, 1, bias=False)``
#: with nothing else changed (checked against transformers, ``tests/planner/test_reward.py``)
SCORE_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
#: the reward model's head (transformers' ``GenericForSequenceClassification.score``)
SCORE = "score"


def reward_spec(spec: ModelSpec) -> ModelSpec:
    """The spec of ``spec``'s reward model (the module docstring says what changes); one line for a model type whose
    reward model qplan does not derive."""
    inv = spec.inventory
    if inv.model_type not in SCORE_HEAD_TYPES:
        raise QPlanError(f"--objective reward on model_type {inv.model_type!r} is not planned yet (qplan derives the "
                         f"reward model of {', '.join(SCORE_HEAD_TYPES)})")
    head = next((g for g in inv.linear if g.pattern == inv.output_head), None)
    if head is None or is_reward(spec):
        raise QPlanError(f"{spec.name}: no output head to replace with a reward head")
    h = head.in_features
    score = LinearGroup(pattern=SCORE, module_type="Linear", in_features=h, out_features=1, bias=False,
                        bnb_quantized=False, keep_fp32=False, role="head", weight_tied=False, instances=1)
    head_params = 0 if head.weight_tied else head.in_features * head.out_features + (head.out_features if head.bias else 0)
    inventory = msgspec.structs.replace(
        inv, architecture=inv.architecture.removesuffix("ForCausalLM") + "ForSequenceClassification",
        output_head=SCORE, linear=tuple(g for g in inv.linear if g is not head) + (score,),
        tied=tuple(t for t in inv.tied if f"{head.pattern}.weight" not in t),
        total_params=inv.total_params - head_params + h)
    return msgspec.structs.replace(spec, inventory=inventory)


def is_reward(spec: ModelSpec) -> bool:
    """Whether ``spec`` is a reward model's (``reward_spec``)."""
    return spec.inventory.output_head == SCORE and spec.inventory.architecture.endswith("ForSequenceClassification")
