"""Optimizer states against the optimizers' own tensors (issue 23: torchao's low-bit AdamW).

Oracles: the states torchao itself makes — its ``_new_buffer`` inside the traced step (meta device; the
compiled update is the only stand-in) and a real ``step()`` on the CPU, through transformers' own resolver
(``Trainer.get_optimizer_cls_and_kwargs``, which passes ``block_size`` 256 to both) — never our formula.
"""

from __future__ import annotations

import math
import types

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("torchao")

from qplan.observe.trace import trace_plan
from qplan.planner.api import plan_dict

TORCHAO = ("adamw_torch_8bit", "adamw_torch_4bit")


def _state_bytes(opt) -> int:
    """Device bytes of every state tensor, a tensor subclass by its inner tensors; host scalars (``step``) apart."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    total = 0
    for state in opt.state.values():
        for key, v in state.items():
            if key == "step":
                continue
            inner = [getattr(v, a) for a in v.__tensor_flatten__()[0]] if is_traceable_wrapper_subclass(v) else [v]
            total += sum(t.untyped_storage().nbytes() for t in inner)
    return total


def _one_real_step(optimizer: str):
    """One real CPU step of the optimizer transformers builds for ``optim=<optimizer>`` (its own resolver,
    ``Trainer.get_optimizer_cls_and_kwargs``), on a 64 x 256 and a 16 x 64 parameter: (module, optimizer, kwargs)."""
    import dataclasses

    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.default is not dataclasses.MISSING}
    args = types.SimpleNamespace(**dict(defaults, optim=OptimizerNames(optimizer)))
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.randn(64, 256))
    model.b = torch.nn.Parameter(torch.randn(16, 64))
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    opt = cls(model.parameters(), **kwargs)
    if callable(getattr(opt, "train", None)):  # schedule-free: in train mode, as Trainer puts it
        opt.train()
    for prm in model.parameters():
        prm.grad = torch.randn_like(prm)
    opt.step()
    return model, opt, kwargs


@pytest.mark.parametrize("optimizer", TORCHAO)
def test_torchao_states_equal_the_traced_optimizer_tensors(optimizer):
    """SmolLM2-135M, LoRA r=16 on every linear: k/v ``lora_B`` (192 x 16 = 3,072 elements) stay fp32, every other
    adapter tensor is quantized; the plan's optimizer bytes equal torchao's own states in the traced step to the
    byte, and the peak is within the planner's tolerance."""
    p = plan_dict(model="smollm2-135m", quant="nf4", optimizer=optimizer, seq_len=256)
    tr = trace_plan(p)
    mem = p["prediction"]["memory"]
    assert mem["optimizer"] == tr["breakdown_at_peak"]["optimizer"]
    assert abs(mem["tensor_peak"] - tr["tensor_peak"]) <= 0.03 * tr["tensor_peak"]
    # not the fp32 AdamW's states: 8-bit is ~4x smaller, 4-bit ~8x
    adamw = plan_dict(model="smollm2-135m", quant="nf4", optimizer="adamw_torch", seq_len=256)
    assert mem["optimizer"] < adamw["prediction"]["memory"]["optimizer"] / (3 if optimizer.endswith("8bit") else 6)


@pytest.mark.parametrize("optimizer", TORCHAO)
def test_a_real_torchao_step_makes_the_planned_states(optimizer):
    """One real (compiled) CPU step of the optimizer transformers builds for ``optim=<name>``, on one quantized
    tensor shape (64 x 256) and one small one (16 x 64, kept in the parameter's dtype): its state bytes equal
    ``optimizer_state_bytes`` of the same tensors."""
    import torch

    from qplan.planner.memory.terms import torchao_state_bytes

    model, opt, kwargs = _one_real_step(optimizer)
    assert kwargs["block_size"] == 256
    four = optimizer.endswith("4bit")
    planned = sum(2 * torchao_state_bytes(math.prod(prm.shape), 4, four) for prm in model.parameters())
    assert _state_bytes(opt) == planned
    assert all(isinstance(s["step"], torch.Tensor) and s["step"].device.type == "cpu" for s in opt.state.values())


LION = ("lion_8bit", "paged_lion_8bit", "lion_32bit", "paged_lion_32bit")


@pytest.mark.parametrize("optimizer", LION)
def test_lion_states_equal_the_traced_optimizer_tensors(optimizer):
    """bitsandbytes' Lion (one state) in the traced step of SmolLM2-135M: the plan's optimizer bytes (device and
    paged) equal the states bitsandbytes makes, to the byte; half the 8-bit / 32-bit AdamW's."""
    p = plan_dict(model="smollm2-135m", quant="nf4", optimizer=optimizer, seq_len=256)
    tr = trace_plan(p, steps=2)
    mem = p["prediction"]["memory"]
    at_peak = tr["breakdown_at_peak"]
    assert mem["optimizer"] == at_peak["optimizer"] + at_peak["optimizer_paged"]
    assert abs(mem["tensor_peak"] - tr["tensor_peak"]) <= 0.03 * tr["tensor_peak"]
    adamw = plan_dict(model="smollm2-135m", quant="nf4", seq_len=256,
                      optimizer=("paged_" if optimizer.startswith("paged") else "") + "adamw_"
                      + ("8bit" if optimizer.endswith("8bit") else "32bit")) if optimizer != "lion_32bit" else None
    if adamw is not None:
        assert 2 * mem["optimizer"] == adamw["prediction"]["memory"]["optimizer"]


@pytest.mark.parametrize("optimizer", ("lion_8bit", "lion_32bit"))
def test_a_real_lion_step_makes_the_planned_states(optimizer):
    """One real CPU step of the optimizer transformers builds for ``optim=<name>`` (bitsandbytes ``Lion``), on a
    tensor above bitsandbytes' 8-bit threshold (64 x 256) and one below it (16 x 64, kept fp32): its state bytes
    (the quantization map, shared by every state, once) equal the plan's for the same tensors."""
    import torch

    from qplan.planner.memory.terms import optimizer_state_bytes
    from qplan.planner.model.lora import ModuleCount

    _, opt, _ = _one_real_step(optimizer)
    seen, real, qmap = set(), 0, 0
    for state in opt.state.values():
        assert "state2" not in state  # one moment
        for key, v in state.items():
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                real += v.untyped_storage().nbytes()
                qmap += v.untyped_storage().nbytes() if key.startswith("qmap") else 0
    counts = [ModuleCount("m", "lora", "", 1, 64 * 256 + 16 * 64, "float32", [("a", [64, 256]), ("b", [16, 64])])]
    planned = optimizer_state_bytes(counts, optimizer)
    assert real == planned["device"] + planned["paged"]
    assert qmap == (1024 if optimizer == "lion_8bit" else 0)


SCHEDULE_FREE = ("schedule_free_adamw", "schedule_free_radam", "schedule_free_sgd")


@pytest.mark.parametrize("optimizer", SCHEDULE_FREE)
def test_schedule_free_states_and_step_equal_the_traced_optimizer(optimizer):
    """The schedulefree package's optimizers (transformers' ``schedule_free_*``) in the traced step of SmolLM2-135M:
    the plan's states (``z`` and, but for SGD, ``exp_avg_sq``) equal the package's own tensors to the byte, and the
    optimizer step's moment (AdamW's and RAdam's ``denom``, one parameter-sized tensor per trainable tensor) is
    within 0.01%. RAdam divides only once its variance is rectified (step 5 on, ``rho_t > 4``): six steps traced."""
    pytest.importorskip("schedulefree")
    p = plan_dict(model="smollm2-135m", quant="nf4", optimizer=optimizer, seq_len=64)  # the step's moment: any length
    tr = trace_plan(p, steps=6 if optimizer.endswith("radam") else 2)
    mem = p["prediction"]["memory"]
    assert mem["optimizer"] == tr["breakdown_at_peak"]["optimizer"]
    planned, traced = p["prediction"]["memory_detail"]["phases"]["optimizer"], tr["phase_peaks"]["optimizer"]
    assert abs(planned - traced) <= 1e-4 * traced
    adamw = plan_dict(model="smollm2-135m", quant="nf4", optimizer="adamw_torch", seq_len=64)["prediction"]["memory"]
    assert mem["optimizer"] * (2 if optimizer.endswith("sgd") else 1) == adamw["optimizer"]


@pytest.mark.parametrize("optimizer", SCHEDULE_FREE)
def test_a_real_schedule_free_step_makes_the_planned_states(optimizer):
    """One real CPU step of the optimizer transformers builds for ``optim=<name>`` (in train mode, as Trainer puts it):
    its state bytes equal the plan's for the same tensors."""
    pytest.importorskip("schedulefree")

    import torch

    from qplan.planner.memory.terms import optimizer_state_bytes
    from qplan.planner.model.lora import ModuleCount

    _, opt, _ = _one_real_step(optimizer)
    real = sum(v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    assert set(next(iter(opt.state.values()))) == ({"z"} if optimizer.endswith("sgd") else {"z", "exp_avg_sq"})
    counts = [ModuleCount("m", "lora", "", 1, 64 * 256 + 16 * 64, "float32", [("a", [64, 256]), ("b", [16, 64])])]
    assert real == optimizer_state_bytes(counts, optimizer)["device"]
