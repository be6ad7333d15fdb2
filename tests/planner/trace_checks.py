"""The checks the method tests share: a plan against its traced step (every phase and the peak's composition), its
counts against PEFT's on a meta-device model, its adapter file against the one PEFT saves."""

from __future__ import annotations

#: the planner's moments inside the traced backward phase
BACKWARD = ("backward", "layers", "layers_last", "embeddings", "attention")


def assert_traced_step(**options) -> None:
    """The plan of ``options`` (``plan_dict``'s) against its traced step, two steps: ``assert_plan_is_the_trace``."""
    import pytest

    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan
    from qplan.planner.api import plan_dict

    plan = plan_dict(**options)
    assert_plan_is_the_trace(plan, trace_plan(plan, steps=2))


def assert_flops_are_the_counter_s(peft_type: str, r: int, **options) -> None:
    """The FLOPs of a plan of ``peft_type`` on Llama-3.2-1B (bf16, 2 x 256, ``options`` on top) equal FlopCounterMode's
    count of its traced step, exactly."""
    import pytest

    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan
    from qplan.planner.api import plan_dict

    plan = plan_dict(**{"model": "llama-3.2-1b", "peft_type": peft_type, "r": r, "quant": "bf16", "batch_size": 2,
                        "seq_len": 256, **options})
    flops = plan["prediction"]["compute"]["flops_per_step"]
    assert flops["total"] == trace_plan(plan, steps=2, count_flops=True)["flops_per_step"][-1]


def assert_plan_is_the_trace(plan: dict, traced: dict, tol: float = 0.001) -> None:
    """The trainable count equal; the tensor peak and each phase's peak (forward, backward, optimizer step) within
    ``tol`` of the trace's; each category of the peak moment within ``2 tol`` of the trace's peak."""
    mem, phases = plan["prediction"]["memory"], plan["prediction"]["memory_detail"]["phases"]
    assert traced["trainable_params"] == plan["prediction"]["params"]["trainable"]
    assert abs(mem["tensor_peak"] - traced["tensor_peak"]) <= tol * traced["tensor_peak"], (mem, traced)
    tp = traced["phase_peaks"]
    for ours, theirs in ((phases["forward"], tp["forward"]), (phases["optimizer"], tp["optimizer"]),
                         (max(v for k, v in phases.items() if k in BACKWARD), tp["backward"])):
        assert abs(ours - theirs) <= tol * theirs, (phases, tp)
    detail = plan["prediction"]["memory_detail"]
    comp = detail["composition"][detail["peak_phase"]]
    for cat, b in traced["breakdown_at_peak"].items():
        assert abs(comp.get(cat, 0) - b) <= 2 * tol * traced["tensor_peak"], (cat, comp, traced["breakdown_at_peak"])


#: the traced settings every full-update / projection method is checked in (tests/planner/test_loha.py, test_lokr.py,
#: test_vera.py add their own): PEFT's harness (pure bf16, no checkpointing), checkpointing under bf16 autocast,
#: reentrant, fp32 weights under autocast, every linear layer
ADAPTER_CASES = [
    dict(model="llama-3.2-1b", quant="bf16", compute_dtype="fp32", grad_ckpt=False),
    dict(model="llama-3.2-1b", quant="bf16"),
    dict(model="qwen3-0.6b", quant="bf16", reentrant=True),
    dict(model="llama-3.2-1b", quant="fp32", compute_dtype="bf16", grad_ckpt=False),
    dict(model="llama-3.2-1b", quant="bf16", compute_dtype="fp32", grad_ckpt=False, targets="all-linear"),
]

#: a two-layer Llama small enough to build on the CPU and save an adapter of in a test
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
              "max_position_embeddings": 128}


def assert_counts_are_peft_s(plan: dict, name: str, buffers: str = "") -> None:
    """The plan's trainable and total counts are PEFT's ``get_nb_trainable_parameters`` of its method on a meta-device
    model of ``name``; its adapter bytes are the trained tensors' (and the shared buffers' named with ``buffers``)."""
    from peft import get_peft_model

    from qplan.hf import method_config, model_from_config
    from qplan.planner.model.catalog import load_spec

    model = model_from_config(load_spec(name).config, dtype="bf16", device="meta")
    pm = get_peft_model(model, method_config(plan["method"], plan[plan["method"]]))
    trainable, total = pm.get_nb_trainable_parameters()
    params = plan["prediction"]["params"]
    assert params["trainable"] == trainable and params["total"] == total
    shared = {id(b): b for n, b in pm.named_buffers() if buffers and buffers in n} if buffers else {}
    assert plan["prediction"]["memory"]["adapters"] == sum(
        p.numel() * p.element_size() for p in pm.parameters() if p.requires_grad) + sum(
        b.numel() * b.element_size() for b in shared.values())
    assert plan["lora"] is None


def assert_adapter_file_is_peft_s(tmp_path, config: dict, **options) -> None:
    """``save_pretrained`` of the plan's method on a CPU model of ``config`` writes the adapter file the plan sizes,
    to the byte."""
    import json

    from peft import get_peft_model

    from qplan.hf import method_config, model_from_config
    from qplan.planner.api import plan_dict

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config), encoding="utf-8")
    plan = plan_dict(model=str(cfg), seq_len=64, **options)
    pm = get_peft_model(model_from_config(config, dtype=options.get("quant", "bf16"), device="cpu"),
                        method_config(plan["method"], plan[plan["method"]]))
    pm.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size == plan["prediction"]["adapter_file_bytes"]


#: a toy Llama with a 512-token vocabulary: its peak is inside a layer (its backward or a module's forward), where a
#: method's own transients decide it
TOY_LLAMA = {**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 768, "head_dim": 64, "vocab_size": 512}


def toy_peak_error(tmp_path, **options) -> tuple[dict, float]:
    """The plan of ``options`` (``plan_dict``'s) on ``TOY_LLAMA`` (bf16, 2 x 128) and its tensor peak's relative error
    against the traced step's."""
    import json

    import pytest

    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan
    from qplan.planner.api import plan_dict

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TOY_LLAMA), encoding="utf-8")
    plan = plan_dict(**{"model": str(cfg), "quant": "bf16", "batch_size": 2, "seq_len": 128, **options})
    traced = trace_plan(plan, steps=2)["tensor_peak"]
    return plan, plan["prediction"]["memory"]["tensor_peak"] / traced - 1
