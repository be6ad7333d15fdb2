"""Mixture-of-experts models: LoRA on fused 3-D expert tensors (PEFT's ``target_parameters``).

Transformers 5 fuses the experts of Mixtral, Qwen2/3-MoE, DeepSeek-V3 and gpt-oss into 3-D
parameters; PEFT 0.21 rewrites targets onto them for some families. The oracles: PEFT's own
trainable count and trainable tensor shapes on the meta-device model, PEFT's own errors, the file
PEFT's ``save_pretrained`` writes, and a model really quantized by bitsandbytes on the CPU.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from conftest import meta_model, tiny_config, tiny_spec
from qplan.hf import lora_config
from qplan.planner.api import plan_dict
from qplan.planner.errors import QPlanError
from qplan.planner.memory.terms import trainable_tensors
from qplan.planner.model.lora import LoraSettings, adapter_file_bytes, count_lora, resolve_targets, trainable_params
from qplan.planner.model.weights import QuantSettings, unquantized_expert_bytes

MOE = ("mixtral-moe", "qwen2-moe", "qwen3-moe", "deepseek-v3-moe", "gpt-oss-moe")

#: (family, --targets, --target-parameters): presets, v4 expert names, explicit parameters
CASES = [
    *[(f, "all-linear", "") for f in MOE],
    *[(f, "attn", "") for f in MOE],
    ("qwen3-moe", "gate_proj,up_proj,down_proj", ""),
    ("qwen3-moe", "q_proj,down_proj", ""),
    ("deepseek-v3-moe", "gate_proj,up_proj,down_proj", ""),
    ("deepseek-v3-moe", "mlp", ""),
    ("mixtral-moe", "w1,w2,w3,gate", ""),
    ("qwen2-moe", "mlp", ""),
    ("qwen2-moe", "q_proj,v_proj", "mlp.experts.gate_up_proj,mlp.experts.down_proj"),
    ("gpt-oss-moe", "q_proj,v_proj", "mlp.experts.gate_up_proj,mlp.experts.down_proj"),
    ("gpt-oss-moe", "attn", "down_proj,router.weight"),
]


def _peft(family: str, spec, settings: LoraSettings):
    from peft import get_peft_model

    section = {**settings.to_json(), **resolve_targets(spec, settings).to_json()}
    return get_peft_model(meta_model(tiny_config(family)), lora_config(section))


def _raw_peft(family: str, targets, dropout: float = 0.0, use_dora: bool = False):
    """PEFT given the targets as a user would (the "all-linear" string, or v4 names), no rewrite by qplan."""
    from peft import get_peft_model

    section = dict(r=8, alpha=16, dropout=dropout, use_dora=use_dora, target_modules=targets)
    return get_peft_model(meta_model(tiny_config(family)), lora_config(section))


@pytest.mark.parametrize("family,targets,params", CASES)
@pytest.mark.parametrize("r", [1, 8])
def test_counts_and_tensor_shapes_equal_peft(family, targets, params, r):
    spec = tiny_spec(family)
    settings = LoraSettings(r=r, alpha=2 * r, dropout=0.0, targets=targets,
                            target_parameters=tuple(p for p in params.split(",") if p))
    counts = count_lora(spec, settings)
    pm = _peft(family, spec, settings)
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable_params(counts) == trainable
    real = Counter((math.prod(p.shape), str(p.dtype).removeprefix("torch.")) for p in pm.parameters() if p.requires_grad)
    assert Counter(trainable_tensors(counts)) == real


@pytest.mark.parametrize("family", ["mixtral-moe", "qwen3-moe", "deepseek-v3-moe"])
def test_all_linear_string_resolves_like_peft(family):
    """The plan passes PEFT a resolved list; PEFT given the "all-linear" string itself must agree."""
    spec = tiny_spec(family)
    ours = trainable_params(count_lora(spec, LoraSettings(r=8, alpha=16, dropout=0.0)))
    assert ours == _raw_peft(family, "all-linear").get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("family,targets,extra,match", [
    ("qwen3-moe", "all-linear", {"dropout": 0.05}, "--dropout 0"),
    ("mixtral-moe", "all-linear", {"use_dora": True}, "DoRA"),
    ("qwen3-moe", ["gate_proj"], {}, "without up_proj"),
    ("mixtral-moe", ["w1", "w2"], {}, "without w3"),
])
def test_what_peft_refuses_is_refused(family, targets, extra, match):
    with pytest.raises(ValueError):
        _raw_peft(family, targets, **extra)
    with pytest.raises(QPlanError, match=match):
        count_lora(tiny_spec(family), LoraSettings(r=8, alpha=16, targets=targets if isinstance(targets, str)
                                                   else ",".join(targets), **{"dropout": 0.0, **extra}))


def test_expert_names_on_gpt_oss_point_to_target_parameters():
    with pytest.raises(QPlanError, match="--target-parameters"):
        count_lora(tiny_spec("gpt-oss-moe"), LoraSettings(r=8, alpha=16, targets="gate_up_proj"))
    with pytest.raises(QPlanError, match="--target-parameters down_proj,gate_up_proj"):
        count_lora(tiny_spec("gpt-oss-moe"), LoraSettings(r=8, alpha=16, targets="mlp"))


def test_adapter_file_equals_real_peft_save(tmp_path):
    from peft import get_peft_model

    from qplan.hf import model_from_config

    for family, targets, params in [("qwen3-moe", "all-linear", ""), ("mixtral-moe", "all-linear", ""),
                                    ("gpt-oss-moe", "attn", "mlp.experts.gate_up_proj,mlp.experts.down_proj")]:
        spec = tiny_spec(family)
        settings = LoraSettings(r=8, alpha=16, dropout=0.0, targets=targets,
                                target_parameters=tuple(p for p in params.split(",") if p))
        section = {**settings.to_json(), **resolve_targets(spec, settings).to_json()}
        pm = get_peft_model(model_from_config(tiny_config(family), dtype="float32", device="cpu"), lora_config(section))
        pm.save_pretrained(tmp_path / family)
        real = (tmp_path / family / "adapter_model.safetensors").stat().st_size
        assert adapter_file_bytes(spec, count_lora(spec, settings)) == real, family


def test_plan_round_trips_through_the_hf_mapping():
    """plan.json's lora section, turned into a LoraConfig by qplan.hf as the backends do, trains
    exactly the parameters the plan counted (target_parameters, rank_pattern, alpha_pattern)."""
    from peft import get_peft_model

    from conftest import FIXTURES

    plan = plan_dict(model=str(FIXTURES / "qwen3-moe.json"), dropout=0.0, r=4)
    lora = plan["lora"]
    assert lora["target_parameters"] and lora["rank_pattern"]
    pm = get_peft_model(meta_model(tiny_config("qwen3-moe")), lora_config(lora))
    assert pm.get_nb_trainable_parameters()[0] == plan["prediction"]["params"]["trainable"]
    assert any("NOT adapted" not in w and "target_parameters" in w for w in plan["warnings"])


def test_unquantized_experts_are_what_bitsandbytes_leaves(tmp_path):
    """nf4 + prepare_model_for_kbit_training on a real CPU model: the 3-D expert tensors stay
    unquantized and become fp32; the plan's warning states their bytes."""
    import torch
    from peft import prepare_model_for_kbit_training

    from conftest import FIXTURES
    from qplan.hf import bnb_config, model_from_config

    cfg = tiny_config("qwen3-moe")
    model_from_config(cfg, dtype="bfloat16", device="cpu").save_pretrained(tmp_path / "ckpt")
    from transformers import AutoModelForCausalLM

    q = QuantSettings("nf4", True, "bfloat16", True)
    quant = {"quant": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, device_map={"": "cpu"},
                                             quantization_config=bnb_config(quant))
    m = prepare_model_for_kbit_training(m)
    experts = [p for p in m.parameters() if p.dim() == 3]
    assert experts and all(p.dtype == torch.float32 for p in experts)
    n, b = unquantized_expert_bytes(tiny_spec("qwen3-moe"), q)
    assert (n, b) == (sum(p.numel() for p in experts), sum(p.numel() * p.element_size() for p in experts))
    plan = plan_dict(model=str(FIXTURES / "qwen3-moe.json"), dropout=0.0, quant="nf4")
    assert any(f"their {n:,} parameters stay float32" in w for w in plan["warnings"])


@pytest.mark.parametrize("model,param", [("smollm2-135m", "model.embed_tokens.weight"),
                                         ("llama-3.2-1b", "self_attn.q_proj.weight")])
def test_target_parameters_on_dense_weights_equal_peft(model, param):
    """PEFT's target_parameters also wraps an ordinary 2-D weight (one "expert")."""
    from peft import get_peft_model

    from qplan.planner.model.catalog import load_spec

    plan = plan_dict(model=model, targets="k_proj", target_parameters=param)
    pm = get_peft_model(meta_model(load_spec(model).config), lora_config(plan["lora"]))
    assert pm.get_nb_trainable_parameters()[0] == plan["prediction"]["params"]["trainable"]


def test_a_1d_target_parameter_is_refused_as_peft_does():
    from peft import get_peft_model

    from qplan.planner.model.catalog import load_spec

    section = dict(r=8, alpha=16, dropout=0.0, target_modules=["k_proj"], target_parameters=["self_attn.q_proj.bias"])
    with pytest.raises(ValueError, match="only 2d and 3d"):
        get_peft_model(meta_model(load_spec("qwen2.5-0.5b").config), lora_config(section))
    with pytest.raises(QPlanError, match="only 2-D or 3-D"):
        plan_dict(model="qwen2.5-0.5b", targets="k_proj", target_parameters="self_attn.q_proj.bias")
