"""The plan.json sections of the PEFT methods other than LoRA (``planner.methods``), each named as its method: what
PEFT's config of it gets. Split from ``planner.document`` (its ``PlanDoc`` holds one of them per plan)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from qplan.planner.bounds import NonEmpty


def _d(t: Any, help: str) -> Any:
    return Annotated[t, Meta(description=help)]


class Ia3Section(Struct, forbid_unknown_fields=True, kw_only=True):
    """(IA)³: the modules PEFT's ``IA3Config`` gets (PEFT's defaults for the model type where none were given)."""

    target_modules: _d(list[NonEmpty], "module names PEFT's IA3Config gets")
    feedforward_modules: _d(list[NonEmpty], "the targets scaled on their input (the others on their output)")


class PromptTuningSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """Prompt tuning: what PEFT's ``PromptTuningConfig`` gets and resolves."""

    num_virtual_tokens: _d(Annotated[int, Meta(ge=1)], "trained virtual tokens prepended to every row")
    token_dim: _d(Annotated[int, Meta(ge=1)], "their width: the model's hidden_size")
    num_transformer_submodules: _d(Literal[1], "1 for a decoder-only model")


class PTuningSection(PromptTuningSection, forbid_unknown_fields=True, kw_only=True):
    """P-tuning: prompt tuning whose prompt is an MLP's output (PEFT's ``PromptEncoderConfig``)."""

    encoder_reparameterization_type: _d(Literal["MLP"], "the prompt encoder (PEFT's LSTM is not planned yet)")
    encoder_hidden_size: _d(Annotated[int, Meta(ge=1)], "the MLP's width: hidden_size → H → H → hidden_size")


class LnTuningSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """LN tuning: the norms PEFT's ``LNTuningConfig`` trains a copy of (its defaults for the model type where none
    were given)."""

    target_modules: _d(list[NonEmpty], "module names PEFT's LNTuningConfig gets")


class LohaSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """LoHa: what PEFT's ``LoHaConfig`` gets (its default targets for the model type where none were given)."""

    r: _d(Annotated[int, Meta(ge=1)], "LoHa rank")
    alpha: _d(Annotated[float, Meta(gt=0)], "LoHa alpha")
    scaling: _d(float, "alpha / r")
    target_modules: _d(list[NonEmpty], "module names PEFT's LoHaConfig gets")


class LokrSection(LohaSection, forbid_unknown_fields=True, kw_only=True):
    """LoKr: what PEFT's ``LoKrConfig`` gets (its default targets for the model type where none were given)."""

    decompose_factor: _d(int, "the factorization's divider (-1: near the square root)")
    decompose_both: _d(bool, "w1 factored too (qplan gives PEFT's default, false)")


class VeraSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """VeRA: what PEFT's ``VeraConfig`` gets (its default targets for the model type where none were given)."""

    r: _d(Annotated[int, Meta(ge=1)], "VeRA rank: the shared projections' inner size")
    target_modules: _d(list[NonEmpty], "module names PEFT's VeraConfig gets")
    save_projection: _d(Literal[True], "the projections are in the adapter file (PEFT's default)")


class MissSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """MiSS: what PEFT's ``MissConfig`` gets (its default targets for the model type where none were given)."""

    r: _d(Annotated[int, Meta(ge=1)], "MiSS rank: the block's rows (the input is summed in r-wide slices)")
    init_weights: _d(bool | Literal["bat", "mini"], "the block's form: true/false (r × out), bat (out/r × r × r: the "
                     "weight rebuilt at every forward), mini (r × mini_r, repeated)")
    mini_r: _d(Annotated[int, Meta(ge=1)], "mini's block width (1 otherwise, unused)")
    miss_dropout: _d(Annotated[float, Meta(ge=0, le=0)], "no dropout (qplan plans PEFT's default, 0)")
    target_modules: _d(list[NonEmpty], "module names PEFT's MissConfig gets")


class C3aSection(Struct, forbid_unknown_fields=True, kw_only=True):
    """C3A: what PEFT's ``C3AConfig`` gets (its default targets for the model type where none were given)."""

    block_size: _d(Annotated[int, Meta(ge=1)], "the circulant blocks' size (divides every target's in and out)")
    init_weights: _d(Literal["xavier_uniform"], "the kernel's initialisation (PEFT's default)")
    target_modules: _d(list[NonEmpty], "module names PEFT's C3AConfig gets")


#: the plan section of each PEFT method other than LoRA (``planner.methods``), named as the method
METHOD_SECTIONS = {"ia3": Ia3Section, "prompt_tuning": PromptTuningSection, "p_tuning": PTuningSection,
                   "ln_tuning": LnTuningSection, "loha": LohaSection, "lokr": LokrSection,
                   "vera": VeraSection, "miss": MissSection,
                   "c3a": C3aSection}
