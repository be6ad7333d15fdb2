"""The PEFT backend trains for real on the CPU (tiny random Llama) and its report holds up."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from backend_helpers import build_plan, llama_spec, read_measured, write_plan  # noqa: E402
from qplan.backends.runner import run_plan  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 25-step run: bf16 base, HF checkpointing, AdamW, batch 2 x 64, default lr 2e-4."""
    d = tmp_path_factory.mktemp("peft")
    plan_path = write_plan(d / "plan.json", build_plan(llama_spec(), quant="bf16", grad_ckpt=True))
    result = run_plan(plan_path, random_init=True, steps=25, device="cpu", out_dir=d / "runs")
    return result, read_measured(result["run_dir"]), json.loads(plan_path.read_text())


def test_trains_and_loss_goes_down(trained):
    result, doc, _ = trained
    assert result["status"] == "ok", result["summary"]
    loss = doc["measured"]["loss"]
    assert len(loss) == 25
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    print(f"loss: first 5 steps {first:.4f}, last 5 steps {last:.4f}")
    assert last < first - 0.1


def test_measured_trainable_equals_prediction(trained):
    _, doc, plan = trained
    assert doc["measured"]["params"]["trainable"] == plan["prediction"]["params"]["trainable"]
    assert doc["measured"]["params"]["all"] == plan["prediction"]["params"]["total"]
    assert doc["error"]["trainable"] == 0.0


def test_measured_json_and_report_files(trained):
    result, doc, plan = trained
    run = Path(result["run_dir"])
    assert re.fullmatch(r"\d{8}T\d{6}Z-tiny-llama-peft(-\d+)?", run.name)
    assert json.loads((run / "plan.json").read_text()) == plan
    m = doc["measured"]
    mem = m["memory"]
    assert mem["device"] == "cpu" and mem["tensor_peak"] > mem["weights"] > 0
    assert set(mem["phases"]) == {"after_load", "after_prepare", "after_adapters"}
    assert mem["window_steps"] == [2, 3]
    assert sum(mem["breakdown_at_peak"].values()) == mem["tensor_peak"]
    assert m["timing"]["tokens_per_step"] == 2 * 64 and m["timing"]["tokens_per_second"] > 0
    assert len(m["timing"]["step_seconds"]) == 25
    adapter = run / "adapter" / "adapter_model.safetensors"
    assert m["adapter_file_bytes"] == adapter.stat().st_size
    assert doc["error"]["adapter_file_bytes"] == 0.0  # the planner predicts the file to the byte
    assert doc["error"]["weights"] == 0.0 and doc["error"]["weights_footprint"] == 0.0
    assert doc["error"]["peak"] is None  # no CUDA context/allocator on the CPU
    assert doc["run"]["trainer"]["optim"] == "adamw_torch" and doc["run"]["trainer"]["bf16"] is True
    md = (run / "report.md").read_text()
    assert "| tensor_peak |" in md and "| trainable | 65,536 | 65,536 | +0.00% |" in md
    html = (run / "report.html").read_text()
    assert "class='chart composition'" in html and "class='chart timeline'" in html and "<table" in html
    tl = mem["timeline"]  # live bytes over the measured steps, downsampled, its peak the measured one
    assert tl["peak"]["bytes"] == mem["tensor_peak"] == max(tl["hi"]) and len(tl["t"]) <= 1000
    assert {p[2] for p in tl["phases"]} >= {"forward", "backward", "optimizer"}


def test_adapter_reloads_with_peft_and_changes_the_output(trained, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qplan.backends.modelsrc import build_random_model_dir

    result, doc, plan = trained
    base_dir = build_random_model_dir(plan["model"]["config"], tmp_path / "base", seed=doc["run"]["seed"])
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    x = torch.randint(3, 259, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(input_ids=x).logits.float()
    adapter_dir = Path(result["run_dir"]) / "adapter"
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    live = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(live) == 2 * 7 * 2  # A and B for 7 modules in 2 layers
    for key, tensor in saved.items():
        live_key = key.replace(".weight", ".default.weight")
        assert torch.equal(live[live_key], tensor), key  # every saved tensor was loaded
    assert all(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)  # B starts at zero: it trained
    with torch.no_grad():
        out = model(input_ids=x).logits.float()
    assert (out - ref).abs().max() > 1e-3


# Measured CPU tensor peak vs the analytic prediction for the same step on CPU kernels
# (prediction.memory_detail.tensor_peak_cpu: fp32 dropout noise instead of CUDA's bool mask,
# single-tensor AdamW). Target |error| <= 5%; the breakdown printed by the test (pytest -s) says
# where the bytes go.
CASES = [
    pytest.param("bf16", True, False, id="bf16-ckpt"),
    pytest.param("bf16", False, False, id="bf16-nockpt"),
    pytest.param("nf4", True, False, id="nf4-ckpt"),
    pytest.param("nf4", False, False, id="nf4-nockpt"),
    # axolotl's / LLaMA-Factory's default: torch's reentrant checkpoint, really run by the Trainer
    pytest.param("nf4", True, True, id="nf4-reentrant"),
    # bf16 weights without autocast (--compute-dtype fp32 on a 16-bit load: PEFT's benchmark harness, torchtune)
    pytest.param("bf16-pure", False, False, id="bf16-pure-nockpt"),
]


@pytest.mark.parametrize("quant, grad_ckpt, reentrant", CASES)
def test_cpu_tensor_peak_matches_prediction(quant, grad_ckpt, reentrant, tmp_path):
    pure = quant == "bf16-pure"
    plan = build_plan(llama_spec(), quant="bf16" if pure else quant, grad_ckpt=grad_ckpt, reentrant=reentrant,
                      compute_dtype="fp32" if pure else "bf16")
    result = run_plan(write_plan(tmp_path / "plan.json", plan), random_init=True, steps=4, device="cpu",
                      out_dir=tmp_path / "runs")
    assert result["status"] == "ok", result["summary"]
    doc = read_measured(result["run_dir"])
    mem = doc["measured"]["memory"]
    pred = plan["prediction"]["memory"]
    err = doc["error"]["tensor_peak"]
    predicted = plan["prediction"]["memory_detail"]["tensor_peak_cpu"]
    print(f"\n[{quant} ckpt={grad_ckpt}] tensor peak: predicted {predicted:,} B "
          f"({plan['prediction']['memory_detail']['peak_phase']}), measured {mem['tensor_peak']:,} B "
          f"(step {mem['tensor_peak_step']}, {mem['tensor_peak_phase']}), error {err:+.2%}")
    print("  predicted terms:", {k: pred[k] for k in ("weights", "adapters", "gradients", "optimizer",
                                                       "activations", "logits", "temporaries")})
    print("  measured at peak:", mem["breakdown_at_peak"])
    for row in mem["peak_detail"][:15]:
        print(f"    {row['category']:>12} {row['bytes']:>9,}  {row['origin']}")
    assert err == pytest.approx((predicted - mem["tensor_peak"]) / mem["tensor_peak"])
    assert doc["run"]["trainer"]["use_reentrant"] is reentrant
    assert abs(err) <= 0.05


@pytest.mark.parametrize("quant, compute", [("nf4", "bf16"), ("bf16", "fp32")], ids=["qlora-trl", "pure-bf16"])
def test_bf16_adapters_train_as_planned_on_the_cpu(quant, compute, tmp_path):
    """``--adapter-dtype bf16`` (TRL's cast of a quantized model's adapters; a pure bf16 step's own): the run casts the
    LoRA tensors, its trainable bytes equal the plan's (half the fp32 adapters'), the saved adapter is bf16 and as
    large as planned, and the measured peak is within the CPU tolerance of the prediction."""
    from safetensors import safe_open

    plan = build_plan(llama_spec(), quant=quant, compute_dtype=compute, adapter_dtype="bf16")
    assert plan["lora"]["adapter_dtype"] == "bfloat16"
    fp32 = build_plan(llama_spec(), quant=quant, compute_dtype=compute)
    assert 2 * plan["prediction"]["memory"]["adapters"] == fp32["prediction"]["memory"]["adapters"]
    result = run_plan(write_plan(tmp_path / "plan.json", plan), random_init=True, steps=3, device="cpu",
                      out_dir=tmp_path / "runs")
    assert result["status"] == "ok", result["summary"]
    doc = read_measured(result["run_dir"])
    assert doc["measured"]["memory"]["breakdown_at_peak"]["adapters"] == plan["prediction"]["memory"]["adapters"]
    adapter = Path(result["run_dir"]) / "adapter" / "adapter_model.safetensors"
    with safe_open(str(adapter), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert adapter.stat().st_size == plan["prediction"]["adapter_file_bytes"]
    assert abs(doc["error"]["tensor_peak"]) <= 0.05
