"""Weight bytes vs the oracle: models really quantized by bitsandbytes on the CPU.

``weights`` must equal the bytes of every tensor storage the model holds (parameters, buffers,
quantization states, int8 row scales), each counted once; ``weights_footprint`` must equal
transformers' ``get_memory_footprint()``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY_FAMILIES, tiny_spec
from qplan.planner.errors import QPlanError
from qplan.planner.model.weights import QuantSettings, weights_bytes, weights_footprint_bytes


def held_bytes(model) -> int:
    """Bytes of all distinct storages reachable from the model, quant states included."""
    import torch

    seen: dict[int, int] = {}

    def add(t):
        if torch.is_tensor(t):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    for p in model.parameters():
        add(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for v in (qs.absmax, qs.code, qs.offset):
                add(v)
            if qs.state2 is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
        add(getattr(p, "SCB", None))
    for b in model.buffers():
        add(b)
    return sum(seen.values())


def load(path, quant: str, double_quant: bool, dtype: str):
    """Load as the backends do: the BitsAndBytesConfig of qplan's one mapping (``qplan.hf``)."""
    from qplan.hf import bnb_config, model_class_of, torch_dtype

    qc = bnb_config({"quant": quant, "double_quant": double_quant, "compute_dtype": dtype})
    return model_class_of(path).from_pretrained(
        path, quantization_config=qc, dtype=torch_dtype(dtype), device_map="cpu")


CASES = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False), ("int8", False)]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("quant,dq", CASES)
def test_kbit_weights_match_bitsandbytes(family, quant, dq, saved_tiny_models):
    spec = tiny_spec(family)
    model = load(saved_tiny_models(family), quant, dq, "bfloat16")
    q = QuantSettings(quant, dq, "bfloat16", upcast_kbit=False)
    assert weights_bytes(spec, q) == held_bytes(model)
    assert weights_footprint_bytes(spec, q) == model.get_memory_footprint()


@pytest.mark.parametrize("family", ["llama-tied", "qwen2-bias", "gpt2-conv1d", "gemma2", "gemma3-mm", "mistral3-mm"])
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_prepare_model_for_kbit_training_upcast(family, quant, saved_tiny_models):
    from peft import prepare_model_for_kbit_training

    spec = tiny_spec(family)
    model = prepare_model_for_kbit_training(load(saved_tiny_models(family), quant, True, "bfloat16"))
    q = QuantSettings(quant, True, "bfloat16", upcast_kbit=True)
    assert weights_bytes(spec, q) == held_bytes(model)
    assert weights_footprint_bytes(spec, q) == model.get_memory_footprint()


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("quant,dtype", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")])
def test_16_and_32_bit_weights(family, quant, dtype, saved_tiny_models):
    spec = tiny_spec(family)
    model = load(saved_tiny_models(family), quant, False, dtype)
    q = QuantSettings(quant, False, dtype)
    assert weights_bytes(spec, q) == held_bytes(model) == model.get_memory_footprint()


def test_fp16_compute_dtype_4bit(saved_tiny_models):
    spec = tiny_spec("qwen2-bias")
    model = load(saved_tiny_models("qwen2-bias"), "nf4", True, "float16")
    q = QuantSettings("nf4", True, "float16", upcast_kbit=False)
    assert weights_bytes(spec, q) == held_bytes(model)


PREQUANTIZED = Path(__file__).parents[1] / "fixtures" / "prequantized" / "llama-bnb-4bit.json"


@pytest.mark.parametrize("upcast", [False, True])
def test_prequantized_checkpoint_keeps_its_16_bit_modules(tmp_path, upcast):
    """A checkpoint saved by bitsandbytes with ``llm_int8_skip_modules`` (Unsloth's dynamic 4-bit
    quants keep some layers 16-bit) is planned as it loads: the plan's weights equal the bytes a
    real bitsandbytes load with that quantization_config holds (layer 0's down_proj, every o_proj
    and the head stay bf16 here)."""
    import json

    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from qplan.hf import bnb_config, model_from_config
    from qplan.planner.api import plan_dict

    cfg = json.loads(PREQUANTIZED.read_text())
    plan = plan_dict(model=str(PREQUANTIZED), upcast=upcast)
    assert plan["quant"]["skip_modules"] == cfg["quantization_config"]["llm_int8_skip_modules"]
    model_from_config(cfg, dtype="bfloat16", device="cpu").save_pretrained(tmp_path / "ckpt")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", quantization_config=bnb_config(plan["quant"]),
                                             dtype=torch.bfloat16, device_map="cpu")
    if upcast:
        m = prepare_model_for_kbit_training(m)
    assert type(m.model.layers[0].mlp.down_proj).__name__ == "Linear"
    assert type(m.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    assert plan["prediction"]["memory"]["weights"] == held_bytes(m)
    assert plan["prediction"]["memory"]["weights_footprint"] == m.get_memory_footprint()
    with pytest.raises(QPlanError, match="plan it with --quant nf4 --double-quant"):
        plan_dict(model=str(PREQUANTIZED), quant="bf16")


@pytest.mark.parametrize("method", ["gptq", "awq", "aqlm", "compressed-tensors"])
def test_a_packed_prequantized_checkpoint_is_refused_not_planned_16_bit(tmp_path, method):
    """GPTQ / AWQ / AQLM / compressed-tensors checkpoints keep their packed weights while LoRA trains on them:
    no ``--quant`` plans those bytes, so the plan is refused by name (it was a warning over a 16-bit plan); FP8 and
    MXFP4 checkpoints, dequantized to fine-tune, still plan with a warning."""
    import json

    from qplan.planner.api import plan_dict

    cfg = json.loads(PREQUANTIZED.read_text())
    f = tmp_path / f"{method}.json"
    f.write_text(json.dumps({**cfg, "quantization_config": {"quant_method": method, "bits": 4}}))
    with pytest.raises(QPlanError, match=f"saved quantized with {method}.*packed weights"):
        plan_dict(model=str(f), quant="bf16")
    f.write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "mxfp4"}}))
    assert any("dequantized to train" in w for w in plan_dict(model=str(f), quant="bf16")["warnings"])
