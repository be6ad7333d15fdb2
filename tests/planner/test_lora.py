"""LoRA parameter counts vs the oracle: PEFT's own get_nb_trainable_parameters() on the real model.

The model is built by transformers from the spec's config on the meta device, and PEFT receives
its own preset where one exists ("all-linear"; None = PEFT's default targets for the model type),
so our preset lists are checked too, not just our arithmetic.
"""

from __future__ import annotations

import copy

import pytest

from conftest import TINY_FAMILIES, meta_model, tiny_spec
from qplan.planner.errors import QPlanError
from qplan.planner.model.catalog import bundled_model_names, load_spec
from qplan.planner.model.lora import LoraSettings, added_params, count_lora, target_names, trainable_params
from qplan.planner.model.weights import base_params

#: counts are linear in r (rank_pattern multiplies it): two ranks pin slope and intercept
RANKS = (1, 64)
PRESETS = ("qv", "attn", "mlp", "all-linear")

#: Sampled in pytest, the whole grid in ``python bench/peft_counts.py`` (reports/benchmarks/peft-counts.md).
#: PEFT creates every LoRA tensor on the CPU and initialises it before moving it to the meta device,
#: so r=64 on fused experts is slow: DeepSeek-V3's mlp and all-linear (3e10 adapter parameters each)
#: took ~430 s of the suite, Qwen3-30B-A3B's ~50 s. These (model, preset) pairs are checked here at
#: r=1 only; r=64 of the same kind of target is still checked on a model that has it: fused experts
#: with a shared expert and MLA on deepseek-v2-lite (all-linear, a superset of its mlp), Mixtral's
#: experts (mlp, a subset of its all-linear), Qwen3-MoE's on the tiny fixture (test_moe.py, r=1 and 8);
#: llama-3.3-70b-instruct has llama-3.1-70b's shapes, which run every preset at both ranks.
BENCH_ONLY_R64 = {
    ("deepseek-v3", "mlp"), ("deepseek-v3", "all-linear"),
    ("qwen3-30b-a3b", "mlp"), ("qwen3-30b-a3b", "all-linear"),
    ("deepseek-v2-lite", "mlp"),
    ("mixtral-8x7b", "all-linear"),
    ("llama-3.3-70b-instruct", "mlp"), ("llama-3.3-70b-instruct", "all-linear"),
}
#: 10-25 s each on a 2-core CPU even sampled (meta models of 27-80 layers, 1e9-parameter adapters)
SLOW_MODELS = {"deepseek-v3", "deepseek-v2-lite", "mixtral-8x7b", "llama-3.1-70b"}

_models: dict[str, object] = {}


def _model(name: str, config: dict):
    if name not in _models:
        _models.clear()  # keep one full-size meta model alive at a time
        _models[name] = meta_model(config)
    return copy.deepcopy(_models[name])


def peft_counts(model, **lora) -> tuple[int, int]:
    """PEFT's own count, the LoraConfig built by qplan's one mapping (``qplan.hf.lora_config``)
    from a plan-style ``lora`` section, as the backends build it."""
    from peft import get_peft_model

    from qplan.hf import lora_config

    pm = get_peft_model(model, lora_config(lora))
    return pm.get_nb_trainable_parameters()


def oracle_targets(spec: dict, preset: str):
    if preset == "all-linear":
        return "all-linear"
    if preset == "qv":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

        default = peft_defaults.get(spec.inventory.model_type)
        if default:
            return list(default)  # PEFT's own default for this model_type
    return target_names(spec, preset)  # the names qplan hands PEFT (MoE "mlp": the expert projections)


def check(spec: dict, name: str, preset: str, r: int, **extra) -> None:
    if spec.inventory.moe_conversion and preset in ("all-linear", "mlp"):
        extra.setdefault("dropout", 0.0)  # PEFT refuses dropout on the fused expert parameters these reach
    settings = LoraSettings(r=r, alpha=2 * r, targets=preset, **extra)
    counts = count_lora(spec, settings)
    ours = trainable_params(counts)
    kwargs = dict(r=r, alpha=2 * r, target_modules=oracle_targets(spec, preset))
    for k, v in extra.items():
        kwargs[k] = list(v) if k == "modules_to_save" else v
    trainable, total = peft_counts(_model(name, spec.config), **kwargs)
    assert ours == trainable, f"{name} {preset} r={r}: ours {ours} != PEFT {trainable}"
    added = added_params(counts)
    assert base_params(spec) + added == total, f"{name}: base {base_params(spec)} + {added} != PEFT all {total}"


def bundled_cases(name: str, full: bool = False) -> list[tuple[str, int]]:
    """(preset, r) pairs checked for a bundled model: every preset it has at both ranks (``full``,
    the benchmark) or less the ``BENCH_ONLY_R64`` ones (pytest)."""
    spec = load_spec(name)
    out = []
    for preset in PRESETS:
        try:
            target_names(spec, preset)
        except QPlanError:  # no such preset here (DeepSeek's MLA has no q/v pair; gpt-oss has no nn.Linear MLP)
            continue
        out += [(preset, r) for r in RANKS if full or r == RANKS[0] or (name, preset) not in BENCH_ONLY_R64]
    return out


#: one bundled spec per model type (tied and untied embeddings where a type has both) in pytest: a larger model of a
#: type runs the same inventory code on the same PEFT layers; every bundled spec: ``python bench/peft_counts.py``
#: (reports/benchmarks/peft-counts.md), which saved ~95 s of the CI suite's 22 minutes
PYTEST_SPECS = {"llama-3.2-1b", "llama-3.1-8b", "qwen2.5-0.5b", "qwen3-0.6b", "qwen3-8b", "gemma-2-9b", "phi-4",
                "mistral-nemo-12b", "gpt-oss-20b", "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite", "deepseek-v3"}


def test_the_sample_covers_every_model_type():
    types = {load_spec(n).model_type for n in bundled_model_names()}
    assert {load_spec(n).model_type for n in PYTEST_SPECS} == types


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n
                                  for n in bundled_model_names() if n in PYTEST_SPECS])
def test_bundled_specs_every_preset_and_rank_match_peft(name):
    spec = load_spec(name)
    for preset, r in bundled_cases(name):
        check(spec, name, preset, r)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_other_families_match_peft(family):
    spec = tiny_spec(family)
    for preset in PRESETS:
        names = spec.inventory.presets.get(preset)
        if not names:
            with pytest.raises(QPlanError):
                count_lora(spec, LoraSettings(r=8, alpha=16, targets=preset))
            continue
        for r in (1, 8):
            check(spec, family, preset, r)


@pytest.mark.parametrize(
    "family,extra",
    [
        ("llama-tied", {"use_dora": True}),
        ("qwen2-bias", {"use_dora": True}),
        ("qwen2-bias", {"bias": "lora_only"}),
        ("qwen2-bias", {"bias": "all"}),
        ("gpt2-conv1d", {"bias": "all"}),
        ("llama-tied", {"use_rslora": True}),
        ("qwen2-bias", {"modules_to_save": ("lm_head",)}),
        ("qwen2-bias", {"modules_to_save": ("embed_tokens", "lm_head")}),
        ("phi3-fused", {"use_dora": True, "bias": "all"}),
    ],
)
def test_variants_match_peft(family, extra):
    check(tiny_spec(family), family, "all-linear", 8, **extra)


@pytest.mark.parametrize("family,targets", [("llama-tied", "q_proj,v_proj,embed_tokens"),
                                            ("gpt2-conv1d", "attn.c_proj"),
                                            ("phi3-fused", "qkv_proj"),
                                            ("gemma3-mm", "q_proj,v_proj,fc2"),
                                            ("mistral3-mm", "q_proj,merging_layer")])
def test_explicit_targets_match_peft(family, targets):
    spec = tiny_spec(family)
    ours = trainable_params(count_lora(spec, LoraSettings(r=4, alpha=8, targets=targets)))
    trainable, _ = peft_counts(_model(family, spec.config), r=4, alpha=8, target_modules=targets.split(","))
    assert ours == trainable


def test_gpt2_attn_and_mlp_presets_tell_c_proj_apart():
    spec = tiny_spec("gpt2-conv1d")
    p = spec.inventory.presets
    attn = trainable_params(count_lora(spec, LoraSettings(r=8, alpha=16, targets="attn")))
    mlp = trainable_params(count_lora(spec, LoraSettings(r=8, alpha=16, targets="mlp")))
    both = trainable_params(count_lora(spec, LoraSettings(r=8, alpha=16, targets="all-linear")))
    assert "attn.c_proj" in p["attn"] and "mlp.c_proj" in p["mlp"]
    assert attn + mlp == both


def test_unknown_target_lists_real_module_names():
    spec = load_spec("llama-3.2-1b")
    with pytest.raises(QPlanError, match="q_proj.*down_proj"):
        count_lora(spec, LoraSettings(r=8, alpha=16, targets="query_key_value"))
    with pytest.raises(QPlanError, match="cannot adapt"):
        count_lora(spec, LoraSettings(r=8, alpha=16, targets="input_layernorm"))


@pytest.mark.parametrize("bad", [dict(r=0, alpha=1), dict(r=-3, alpha=1), dict(r=8, alpha=0),
                                 dict(r=8, alpha=16, dropout=1.0), dict(r=8, alpha=16, dropout=-0.1),
                                 dict(r=8, alpha=16, bias="some")])
def test_bad_lora_settings(bad):
    with pytest.raises(QPlanError):
        LoraSettings(**bad)


def test_adapter_file_size_equals_real_peft_save(tmp_path):
    """Predicted adapter_model.safetensors size vs the file PEFT really writes."""
    from peft import get_peft_model

    from conftest import tiny_config
    from qplan.hf import lora_config, model_from_config
    from qplan.planner.model.lora import adapter_file_bytes

    for family, extra in [("llama-tied", {}), ("qwen2-bias", {"use_dora": True, "bias": "lora_only"}),
                          ("gpt2-conv1d", {}), ("qwen2-bias", {"modules_to_save": ("lm_head",)})]:
        spec = tiny_spec(family)
        settings = LoraSettings(r=8, alpha=16, targets="all-linear", **extra)
        counts = count_lora(spec, settings, {"bias": "float32", "modules_to_save": "float32"})
        model = model_from_config(tiny_config(family), dtype="float32", device="cpu")
        kw = {k: (list(v) if k == "modules_to_save" else v) for k, v in extra.items()}
        pm = get_peft_model(model, lora_config(dict(r=8, alpha=16, target_modules="all-linear", **kw)))
        out = tmp_path / family / str(len(extra))
        pm.save_pretrained(out)
        real = (out / "adapter_model.safetensors").stat().st_size
        assert adapter_file_bytes(spec, counts) == real, family
