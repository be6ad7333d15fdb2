"""Unsloth plans model what Unsloth does (issue 10), checked without a GPU.

* weights: Unsloth's ``prepare_model_for_training`` casts only the LoRA weights to fp32, so an
  Unsloth k-bit plan holds the bitsandbytes weights of a PEFT plan *without* the fp32 upcast —
  whose bytes tests/planner/test_weights.py checks against real bitsandbytes models, and
  tests/backends/test_unsloth_backend.py against a real Unsloth nf4 load;
* host RAM: ``"unsloth"`` checkpointing offloads every layer's input to pinned host slots — counted
  from the config's own numbers here, not from qplan's dims (the Unsloth trace is the oracle,
  tests/planner/test_unsloth_trace.py); paged optimizers can spill all their pages.
"""

from __future__ import annotations

import pytest

from qplan.planner.api import plan_dict
from qplan.planner.model.catalog import load_spec


@pytest.mark.parametrize("model", ["llama-3.1-8b", "llama-3.2-3b", "qwen2.5-7b", "gemma-2-9b"])
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_unsloth_kbit_weights_equal_peft_without_the_upcast(model, quant):
    uns = plan_dict(model=model, quant=quant, backend="unsloth")
    peft_no_upcast = plan_dict(model=model, quant=quant, upcast=False)
    peft = plan_dict(model=model, quant=quant)
    assert uns["quant"]["prepare_model_for_kbit_training"] is False
    assert uns["prediction"]["memory_detail"]["weights"] == peft_no_upcast["prediction"]["memory_detail"]["weights"]
    assert uns["prediction"]["memory"]["weights"] < peft["prediction"]["memory"]["weights"]


def test_llama_3_1_8b_nf4_unsloth_weights_are_not_fp32_upcast():
    """The issue's case: 7.27 GiB with the PEFT recipe's upcast; Unsloth keeps the 16-bit
    embedding and head (2 x 128256 x 4096 x 2 bytes instead of x 4)."""
    uns = plan_dict(model="llama-3.1-8b", quant="nf4", backend="unsloth")["prediction"]["memory"]["weights"]
    peft = plan_dict(model="llama-3.1-8b", quant="nf4")["prediction"]["memory"]["weights"]
    c = load_spec("llama-3.1-8b").config
    # embedding + head (untied) and the norms: 2 bytes less per element
    norms = (2 * c["num_hidden_layers"] + 1) * c["hidden_size"]
    assert peft - uns == 2 * (2 * c["vocab_size"] * c["hidden_size"] + norms)


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-7b"])
def test_unsloth_checkpointing_offloads_every_layer_input_to_host(model):
    """Every layer's input (bf16 here) in its own pinned slot, a power-of-two block of torch's host
    allocator, beside the pool of 200 x 256 KiB slots Unsloth pins when it patches checkpointing
    (unsloth_zoo gradient_checkpointing.py). Counted from the config's own numbers; the oracle that
    Unsloth really allocates this is tests/planner/test_unsloth_trace.py (its offload run on meta)."""
    b, s = 2, 2048
    plan = plan_dict(model=model, backend="unsloth", batch_size=b, seq_len=s, compute_dtype="bf16")
    c = load_spec(model).config
    host = plan["prediction"]["host"]
    slot = b * s * c["hidden_size"] * 2  # bf16 stream
    block = 1 << (slot - 1).bit_length()
    assert host["offloaded_checkpoints"] == 200 * 256 * 1024 + c["num_hidden_layers"] * block
    assert host["peak"] == host["offloaded_checkpoints"] + host["paged_optimizer"]
    hf = plan_dict(model=model, backend="peft", batch_size=b, seq_len=s)["prediction"]["host"]
    assert hf == {"offloaded_checkpoints": 0, "paged_optimizer": 0, "peak": 0}


def test_unsloth_offloads_nothing_below_512_tokens():
    """``apply_unsloth_gradient_checkpointing``: below max_seq_length 512, "unsloth" is plain checkpointing."""
    plan = plan_dict(model="llama-3.1-8b", backend="unsloth", batch_size=8, seq_len=256)
    assert plan["prediction"]["host"]["offloaded_checkpoints"] == 0


def test_paged_optimizer_can_spill_all_its_pages_to_host():
    plan = plan_dict(model="llama-3.2-1b", optimizer="paged_adamw_8bit")
    paged = plan["prediction"]["memory_detail"]["optimizer_paged"]
    assert paged > 0 and plan["prediction"]["host"]["paged_optimizer"] == paged
