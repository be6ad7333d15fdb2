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

#: ``ModuleCount.kind`` of the trained virtual-token embeddings, and of p-tuning's MLP over them
PROMPT, PROMPT_MLP = "prompt", "prompt_mlp"
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

    def count(self, spec: ModelSpec, q: Any = None) -> list[ModuleCount]:
        """The one trained tensor: ``num_virtual_tokens × token_dim`` fp32 (see the module docstring)."""
        n, h = self.num_virtual_tokens, token_dim(spec)
        return [ModuleCount(PROMPT_MODULE, PROMPT, f"prompt {n}×{h}", 1, n * h, "float32", [("weight", [n, h])])]


@dataclass(frozen=True)
class PTuningSettings:
    """``PromptEncoderConfig`` (p-tuning, PEFT 0.21 peft/tuners/p_tuning/model.py ``PromptEncoder``) with its MLP
    reparameterization (PEFT's default): the ``num_virtual_tokens × token_dim`` embedding feeds
    ``Linear(token_dim, H) → ReLU → Linear(H, H) → ReLU → Linear(H, token_dim)`` (``H = encoder_hidden_size``, each
    with a bias, all fp32), whose output is the prompt PEFT prepends to every row, as prompt tuning's
    (``encoder_num_layers`` is ignored for the MLP). ``save_pretrained`` keeps only that output, ``prompt_embeddings``
    (``get_prompt_embedding_to_save``): the encoder is not in the adapter file."""

    num_virtual_tokens: int
    encoder_hidden_size: int
    method: ClassVar[str] = "p_tuning"

    def to_json(self, spec: ModelSpec) -> dict[str, Any]:
        return {"num_virtual_tokens": self.num_virtual_tokens, "token_dim": token_dim(spec),
                "num_transformer_submodules": 1, "encoder_reparameterization_type": "MLP",
                "encoder_hidden_size": self.encoder_hidden_size}

    def count(self, spec: ModelSpec, q: Any = None) -> list[ModuleCount]:
        """The embedding (saved as the prompt), then the MLP's three linear layers (not saved)."""
        n, h, H = self.num_virtual_tokens, token_dim(spec), self.encoder_hidden_size
        out = PromptSettings(n).count(spec)
        for i, (fi, fo) in ((0, (h, H)), (2, (H, H)), (4, (H, h))):
            out.append(ModuleCount(f"prompt_encoder.default.mlp_head.{i}", PROMPT_MLP, f"{fi}→{fo}", 1, fi * fo + fo,
                                   "float32", [("weight", [fo, fi]), ("bias", [fo])]))
        return out
