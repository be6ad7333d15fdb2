"""`qplan run` of a LoRA-FA plan (`--optimizer lorafa`): the Trainer gets PEFT's own `create_lorafa_optimizer`, which
freezes every `lora_A`; the live tensors of a real CPU step are what the plan predicts for CPU kernels, the trained
`lora_B` moved and the frozen `lora_A` did not (the saved adapter holds both)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from backend_helpers import estimate_and_run


def test_a_lorafa_run_measures_what_the_plan_predicts_and_trains_only_b(tmp_path, capsys):
    from safetensors.torch import load_file

    run, doc = estimate_and_run(tmp_path, capsys, ["--optimizer", "lorafa", "--quant", "bf16", "--batch-size", "2",
                                                   "--seq-len", "128", "--r", "8", "--no-grad-ckpt"])
    plan = run / "plan.json"
    compared = doc["compared"]
    assert compared["trainable"]["measured"] == compared["trainable"]["predicted"]
    predicted = json.loads(plan.read_text())["prediction"]["params"]
    assert doc["measured"]["params"]["trainable"] == predicted["trainable"]
    assert abs(compared["tensor_peak"]["error"]) <= 0.005, compared["tensor_peak"]
    assert doc["run"]["trainer"]["optim"] == "peft LoraFAOptimizer"
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    a = [k for k in weights if "lora_A" in k]
    b = [k for k in weights if "lora_B" in k]
    assert a and len(a) == len(b)
    # PEFT initialises lora_B to zeros: after three steps B has moved; A is saved (frozen, at its initial value)
    assert all(weights[k].abs().sum() > 0 for k in b)
