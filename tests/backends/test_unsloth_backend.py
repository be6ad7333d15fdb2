"""The Unsloth backend trains for real on the CPU, in its own virtual environment.

Unsloth pins transformers/trl older than the `train` extra, so it is installed in a separate
venv and named by QPLAN_UNSLOTH_PYTHON (see backends/registry.py); without it this file skips.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend_helpers import build_plan, llama_spec, read_measured, write_plan
from conftest import unsloth_missing

_SKIP = unsloth_missing()
pytestmark = [pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
              pytest.mark.slow]  # two real Unsloth training runs, ~20-40 s each


@pytest.fixture(scope="module")
def unsloth_run(tmp_path_factory):
    from qplan.backends.runner import run_plan

    d = tmp_path_factory.mktemp("unsloth")
    plan_path = write_plan(d / "plan.json", build_plan(llama_spec(), backend="unsloth", grad_ckpt=True))
    result = run_plan(plan_path, random_init=True, steps=25, device="cpu", out_dir=d / "runs")
    return result, read_measured(result["run_dir"]), json.loads(plan_path.read_text())


def test_unsloth_trains_on_the_cpu(unsloth_run):
    result, doc, plan = unsloth_run
    assert result["status"] == "ok", result["summary"]
    assert doc["environment"].get("unsloth"), doc["environment"]
    loss = doc["measured"]["loss"]
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    print(f"unsloth loss: first 5 steps {first:.4f}, last 5 {last:.4f}; trainer {doc['run']['trainer']}")
    assert len(loss) == 25 and last < first - 0.1
    assert doc["measured"]["params"]["trainable"] == plan["prediction"]["params"]["trainable"]
    mem = doc["measured"]["memory"]
    print(f"unsloth tensor peak: predicted {plan['prediction']['memory_detail']['tensor_peak_cpu']:,} "
          f"(CPU kernels), measured "
          f"{mem['tensor_peak']:,} ({doc['error']['tensor_peak']:+.2%}); at peak {mem['breakdown_at_peak']}")
    assert abs(doc["error"]["tensor_peak"]) <= 0.05
    run = Path(result["run_dir"])
    for name in ("plan.json", "measured.json", "report.md", "report.html", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    assert doc["error"]["adapter_file_bytes"] == 0.0


def test_unsloth_adapter_reloads_with_plain_peft(unsloth_run, tmp_path):
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qplan.backends.modelsrc import build_random_model_dir

    result, doc, plan = unsloth_run
    base = AutoModelForCausalLM.from_pretrained(
        build_random_model_dir(plan["model"]["config"], tmp_path / "base", seed=0), dtype=torch.float32)
    x = torch.randint(3, 259, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(input_ids=x).logits
    model = PeftModel.from_pretrained(base, Path(result["run_dir"]) / "adapter").eval()
    with torch.no_grad():
        assert (model(input_ids=x).logits - ref).abs().max() > 1e-4


@pytest.fixture(scope="module")
def unsloth_nf4_run(tmp_path_factory):
    from qplan.backends.runner import run_plan

    d = tmp_path_factory.mktemp("unsloth-nf4")
    plan_path = write_plan(d / "plan.json", build_plan(llama_spec(), quant="nf4", backend="unsloth", grad_ckpt=True))
    result = run_plan(plan_path, random_init=True, steps=6, device="cpu", out_dir=d / "runs")
    return result, read_measured(result["run_dir"]), json.loads(plan_path.read_text())


def test_unsloth_nf4_weights_are_what_unsloth_holds(unsloth_nf4_run):
    """The path Unsloth's users run: 4-bit. Unsloth quantizes on the CPU too, and keeps embeddings,
    head and norms in the load dtype (no prepare_model_for_kbit_training upcast): the plan's weights
    equal the bytes of the tensors the loaded model holds, to the byte."""
    result, doc, plan = unsloth_nf4_run
    assert result["status"] == "ok", result["summary"]
    assert plan["quant"]["prepare_model_for_kbit_training"] is False
    m, pred = doc["measured"], plan["prediction"]
    assert m["memory"]["weights"] == pred["memory"]["weights"]
    assert m["memory"]["weights_footprint"] == pred["memory"]["weights_footprint"]
    assert m["params"]["trainable"] == pred["params"]["trainable"]
    # Unsloth's CPU path keeps a 4-bit model's LoRA weights in bfloat16 (its GPU path casts them to
    # fp32, unsloth_zoo training_utils.prepare_model_for_training, which the plan follows): measured
    # adapters are 2 bytes per trainable parameter here, and so are the Adam states' 2 x 2.
    at_peak = m["memory"]["breakdown_at_peak"]
    assert at_peak["adapters"] == 2 * pred["params"]["trainable"]
    assert pred["memory"]["adapters"] == 4 * pred["params"]["trainable"]
