"""Prompt tuning (``--peft-type prompt_tuning``): PEFT's ``PromptTuningConfig``, counted from the spec.

PEFT 0.21 (peft/tuners/prompt_tuning/model.py ``PromptEmbedding``) trains one ``nn.Embedding(num_virtual_tokens *
num_transformer_submodules, token_dim)``, created in torch's default dtype (fp32; the ``sample_vocab`` / ``text``
initialisations copy rows of the word embeddings ``.to(torch.float32)``), whatever the base model's dtype. A
decoder-only model has one transformer submodule (``num_transformer_submodules=1``, ``PeftModel._setup_prompt_encoder``);
``token_dim`` is the config's ``hidden_size`` (the ``text_config``'s for a multimodal wrapper:
``peft.utils.other._prepare_prompt_learning_config``). Nothing in the base model changes: its forward
(``PeftModelForCausalLM.forward``) prepends the ``num_virtual_tokens`` embeddings to every row's word embeddings, and
``-100`` labels to its labels, so the whole model runs on ``seq_len + num_virtual_tokens`` positions
(``TrainingSettings.virtual_tokens``). The oracle is PEFT's ``get_nb_trainable_parameters`` on a meta-device model
(tests/planner/test_prompt_tuning.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from qplan.planner.errors import QPlanError
from qplan.planner.model.lora import ModuleCount
from qplan.planner.model.spec import ModelSpec

#: ``ModuleCount.kind`` of the trained virtual-token embeddings
PROMPT = "prompt"
#: the parameter's name in PEFT's model (and in its adapter file, as ``prompt_embeddings``)
PROMPT_MODULE = "prompt_encoder.default.embedding"


def token_dim(spec: ModelSpec) -> int:
    """PEFT's ``token_dim``: the (text) config's ``hidden_size`` (``n_embd`` / ``d_model`` where a family names it
    so)."""
    cfg = spec.config.get("text_config") or spec.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if cfg.get(key):
            return int(cfg[key])
    raise QPlanError(f"{spec.name}: its config names no hidden_size, n_embd or d_model, PEFT's token_dim")


@dataclass(frozen=True)
class PromptSettings:
    """``PromptTuningConfig`` fields that change what trains (the initialisation does not change a byte)."""

    num_virtual_tokens: int
    #: ``PlanDoc.method`` and the plan section's name
    method: ClassVar[str] = "prompt_tuning"

    def to_json(self, spec: ModelSpec) -> dict[str, Any]:
        return {"num_virtual_tokens": self.num_virtual_tokens, "token_dim": token_dim(spec),
                "num_transformer_submodules": 1}

    def count(self, spec: ModelSpec) -> list[ModuleCount]:
        """The one trained tensor: ``num_virtual_tokens × token_dim`` fp32 (see the module docstring)."""
        n, h = self.num_virtual_tokens, token_dim(spec)
        return [ModuleCount(PROMPT_MODULE, PROMPT, f"prompt {n}×{h}", 1, n * h, "float32", [("weight", [n, h])])]
