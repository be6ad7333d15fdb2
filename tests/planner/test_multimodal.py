"""Multimodal wrappers (Gemma-3 4B+ ``Gemma3ForConditionalGeneration``, Mistral-Small-3.x
``Mistral3ForConditionalGeneration``) planned for text-only fine-tuning.

Fixtures: tiny configs written by ``scripts/make_multimodal_fixtures.py`` from transformers' own
config classes (vision tower + projector + language model). The oracles: PEFT's own trainable
count for explicit targets (the presets are in test_lora.py's ``TINY_FAMILIES`` sweep, the weights
in test_weights.py's), a real text-only training step on the CPU (which trainable tensors get a
gradient and optimizer state), and the meta-device trace of the plan.
"""

from __future__ import annotations

import contextlib
import io

import pytest

from conftest import meta_model, tiny_config, tiny_spec
from qplan.planner.api import plan_dict
from qplan.planner.memory.terms import gradient_bytes, optimizer_state_bytes, stepped_counts
from qplan.planner.model.lora import LoraSettings, count_lora, trainable_params

MM = ("gemma3-mm", "mistral3-mm")


def _peft(family: str, targets, r: int = 4):
    from peft import get_peft_model

    from qplan.hf import lora_config

    return get_peft_model(meta_model(tiny_config(family)), lora_config(dict(r=r, alpha=2 * r, target_modules=targets)))


@pytest.mark.parametrize("family", MM)
def test_spec_has_both_towers_and_text_config_layers(family):
    spec = tiny_spec(family)
    inv = spec.inventory
    assert inv.num_hidden_layers == tiny_config(family)["text_config"]["num_hidden_layers"]
    assert inv.text_only_idle == ("model.vision_tower", "model.multi_modal_projector")
    vision = [g for g in inv.linear if g.pattern.startswith("model.vision_tower.")]
    assert vision and all(g.bnb_quantized for g in vision)  # bitsandbytes quantizes them (test_weights)
    assert tiny_spec("gemma3-text").inventory.text_only_idle == ()


@pytest.mark.parametrize("family,targets", [("gemma3-mm", "q_proj,v_proj"), ("gemma3-mm", "o_proj,fc1"),
                                            ("mistral3-mm", "q_proj,v_proj"), ("mistral3-mm", "linear_1,down_proj")])
def test_explicit_targets_match_in_both_towers_like_peft(family, targets):
    """PEFT matches a name by suffix wherever it occurs: ``q_proj`` adapts the vision tower too."""
    spec = tiny_spec(family)
    counts = count_lora(spec, LoraSettings(r=4, alpha=8, targets=targets))
    pm = _peft(family, targets.split(","))
    assert trainable_params(counts) == pm.get_nb_trainable_parameters()[0]
    adapted = {n.rsplit(".lora_", 1)[0] for n, p in pm.named_parameters() if p.requires_grad}
    if "q_proj" in targets:
        assert any("vision_tower" in n for n in adapted) and any("language_model" in n for n in adapted)


@pytest.mark.parametrize("family", MM)
@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_8bit"])
def test_text_only_step_updates_only_the_language_model(family, optimizer):
    """A real text-only step on the CPU (PEFT model, ``all-linear``): the trainable tensors that get
    a ``.grad`` and optimizer state are exactly ``stepped_counts``; the vision tower's get neither."""
    import torch
    from peft import get_peft_model

    from qplan.hf import lora_config, model_from_config
    from qplan.planner.vocab import optimizer as optimizer_row

    torch.manual_seed(0)
    spec = tiny_spec(family)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, targets="all-linear")
    counts = count_lora(spec, settings)
    model = get_peft_model(model_from_config(tiny_config(family), dtype="float32", device="cpu"),
                           lora_config(dict(r=4, alpha=8, target_modules="all-linear")))
    ids = torch.randint(0, 900, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    with_grad = [p for p in params if p.grad is not None]
    assert len(with_grad) < len(params)  # the vision tower's LoRA got no gradient
    assert sum(p.grad.numel() * p.grad.element_size() for p in with_grad) == gradient_bytes(stepped_counts(spec, counts))
    if optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    opt.step()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
                if torch.is_tensor(v) and k != "step")
    assert optimizer_row(optimizer).state in ("adamw", "bnb8bit")
    assert state == optimizer_state_bytes(stepped_counts(spec, counts), optimizer)["device"]


def _plan(family, **kw):
    o = dict(model=f"tests/fixtures/configs/{family}.json", r=8, alpha=None, dropout=0.05, targets="all-linear",
             bias="none", dora=False, rslora=False, modules_to_save="", quant="nf4", double_quant=True,
             compute_dtype="bf16", upcast=True, gpu=None, seq_len=64, batch_size=2, grad_accum=1, grad_ckpt=True,
             optimizer="adamw_torch", attn_impl="sdpa", backend="peft")
    o.update(kw)
    return plan_dict(**o)


@pytest.mark.parametrize("family", MM)
def test_plan_says_text_only_and_counts_like_the_trace(family):
    from qplan.observe.trace import trace_plan

    plan = _plan(family)
    assert any("text-only fine-tuning" in w and "model.vision_tower" in w for w in plan["warnings"])
    with contextlib.redirect_stderr(io.StringIO()):
        tr = trace_plan(plan)
    assert plan["prediction"]["params"]["trainable"] == tr["trainable_params"]
    analytic = plan["prediction"]["memory"]["tensor_peak"]
    assert abs(analytic - tr["tensor_peak"]) / tr["tensor_peak"] < 0.02, (analytic, tr["tensor_peak"])


def test_text_model_has_no_multimodal_warning():
    assert not any("multimodal" in w for w in _plan("gemma3-text")["warnings"])


@pytest.mark.parametrize("ckpt", [True, False])
def test_gemma3_eager_activations_match_the_trace(ckpt):
    """Gemma-3's sliding/global layers each get their own rotary cos/sin (``rotary_activation``):
    with eager attention (masks already modelled) the tiny Gemma-3 plan is within 0.2% of the trace
    (sdpa's sliding-window mask is not modelled: up to 2.4% low on this tiny config, see docs/models.md)."""
    from qplan.observe.trace import trace_plan

    plan = _plan("gemma3-text", quant="bf16", grad_ckpt=ckpt, attn_impl="eager", batch_size=1, seq_len=128)
    with contextlib.redirect_stderr(io.StringIO()):
        tr = trace_plan(plan)
    analytic = plan["prediction"]["memory"]["tensor_peak"]
    assert abs(analytic - tr["tensor_peak"]) / tr["tensor_peak"] < 0.002, (analytic, tr["tensor_peak"])
