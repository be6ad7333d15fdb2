"""Step time: the dtype each matmul runs in, the catalog's per-dtype peaks, and several GPUs (issue 31).

The oracle for ``matmul_dtypes`` is PEFT and torch themselves: a LoRA layer is run on the CPU and the dtype of every
matmul it dispatches is recorded (``TorchDispatchMode``), with and without autocast, with fp32 and bf16 adapters. The
time is then checked to charge each term's FLOPs at the catalog's figure for that dtype, and a data-parallel plan to
say per GPU and in total what it predicts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qplan.planner.api import plan_dict
from qplan.planner.compute.timing import matmul_dtypes

GPUS = Path(__file__).resolve().parents[2] / "model_specs" / "gpus"


def _observed_matmul_dtypes(weights: str, adapters: str, autocast: bool) -> tuple[str, str]:
    """(dtype of the base layer's matmul, dtype of the adapters' matmuls) as PEFT runs one LoRA ``Linear`` on the CPU:
    the dtype of each matmul's output, as the repository's one tracker records it (``origins``)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from qplan.observe.tracker import LiveTensorTracker

    torch.manual_seed(0)
    dt = getattr(torch, weights)
    base = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False)).to(dt)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(getattr(torch, adapters))
    x = torch.randn(5, 64, dtype=dt)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    tracker = LiveTensorTracker("cpu", origins=True)
    with ctx, tracker:
        model(x)
    seen = [r.info[1] for r in tracker.records
            if r.info and not r.late and r.info[2].split(".")[1] in ("mm", "addmm")]  # outputs, not adopted inputs
    # the base layer's matmul comes first, then lora_A's and lora_B's (peft/tuners/lora/layer.py, Linear.forward)
    assert len(seen) == 3, seen
    assert len(set(seen[1:])) == 1, seen
    return seen[0], seen[1]


@pytest.mark.parametrize("quant, compute, adapters, autocast", [
    ("bf16", "float32", "float32", False),   # PEFT's benchmark harness: bf16 weights, fp32 adapters, no autocast
    ("bf16", "float32", "bfloat16", False),  # torchtune: everything bf16
    ("bf16", "bfloat16", "float32", True),   # autocast casts the adapters' matmuls too
    ("fp32", "float32", "float32", False),
])
def test_matmul_dtypes_are_what_peft_runs(quant, compute, adapters, autocast):
    weights = {"bf16": "bfloat16", "fp32": "float32"}[quant]
    assert matmul_dtypes(quant, compute, adapters) == _observed_matmul_dtypes(weights, adapters, autocast)


def test_every_catalog_gpu_states_its_fp32_peak_and_where_it_comes_from():
    for f in sorted(GPUS.glob("*.json")):
        g = json.loads(f.read_text())
        assert "fp32" in g["source"], f"{f.name}: no source for the fp32 figure"
        fp32 = g.get("peak_fp32_tflops")
        if fp32 is None:
            assert g["source"]["fp32"].startswith("none:"), f"{f.name}: no fp32 figure and no reason"
            continue
        assert f"{fp32:g} TFLOPS" in g["source"]["fp32"], f.name
        # FP32 on CUDA cores is below the 16-bit tensor-core peak on every NVIDIA card since Volta
        assert fp32 < (g.get("peak_bf16_tflops") or g["peak_fp16_tflops"]), f.name
        assert g["usable_bytes"] <= g["total_bytes"], f.name


def _time(**kw):
    return plan_dict(**kw)["prediction"]


def test_peft_harness_plan_gets_a_time_with_fp32_adapter_matmuls():
    """PEFT's MetaMathQA setting (bf16 weights, fp32 adapters, no autocast) on an L40S: before, no time at all."""
    opts = dict(model="llama-3.2-3b", r=32, alpha=64, dropout=0.0, targets="qv", quant="bf16", compute_dtype="fp32",
                batch_size=4, seq_len=224, grad_ckpt=False, gpu="l40s")
    p = _time(**opts)
    t, f, m = p["time"], p["compute"]["flops_per_step"], p["compute"]["bytes_per_step"]
    l40s = json.loads((GPUS / "l40s.json").read_text())
    p16, p32, bw = l40s["peak_bf16_tflops"] * 1e12, l40s["peak_fp32_tflops"] * 1e12, l40s["memory_bandwidth_gb_s"] * 1e9
    assert f["lora"] > 0
    ideal = max((f["total"] - f["lora"]) / p16 + f["lora"] / p32, m["weights"] / bw) + \
        (m["dequantization"] + m["optimizer"]) / bw
    assert t["ideal_step_seconds"] == pytest.approx(ideal, rel=1e-12)
    assert (t["matmul_dtype"], t["adapter_matmul_dtype"]) == ("bfloat16", "float32")
    # the same plan with bf16 adapters runs every matmul at the 16-bit rate: faster, by the adapters' share
    bfp = _time(**opts, adapter_dtype="bf16")
    bf, bm = bfp["time"], bfp["compute"]["bytes_per_step"]  # its optimizer moves bf16 tensors: its own bytes
    assert "adapter_matmul_dtype" not in bf and bm["optimizer"] == m["optimizer"] // 2
    assert bf["ideal_step_seconds"] == pytest.approx(
        max(f["total"] / p16, bm["weights"] / bw) + (bm["dequantization"] + bm["optimizer"]) / bw, rel=1e-12)
    assert bf["ideal_step_seconds"] < t["ideal_step_seconds"]


def test_fp32_plans_are_timed_at_the_fp32_peak():
    p = _time(model="smollm2-135m", quant="fp32", compute_dtype="fp32", gpu="a100-80gb")
    assert p["time"]["step_seconds"] is not None
    assert p["time"]["peak_flops_per_second"] == 19.5e12 and p["time"]["matmul_dtype"] == "float32"
    none = _time(model="smollm2-135m", quant="fp32", compute_dtype="fp32", gpu="a10g")["time"]
    assert none["step_seconds"] is None and "float32 throughput" in none["reason"]


def test_several_gpus_say_per_gpu_and_in_total():
    one = _time(model="llama-3.1-8b", gpu="h100-pcie", batch_size=2, seq_len=1024)["time"]
    kw = dict(model="llama-3.1-8b", gpu="h100-pcie", batch_size=2, seq_len=1024, gpus=4, tokens=10_000_000,
              price_per_hour=2.0)
    p = _time(**kw)
    t, c = p["time"], p["cost"]
    # each rank runs the one-GPU step, then the gradients' all-reduce over the link (planner.compute.comm)
    assert t["step_seconds"] == pytest.approx(one["step_seconds"] + t["communication"]["seconds"])
    assert t["gpus"] == 4 and t["tokens_per_step_per_gpu"] == 2048 and t["tokens_per_step"] == 4 * 2048
    assert t["tokens_per_second"] == pytest.approx(4 * t["tokens_per_second_per_gpu"])
    assert t["steps"] == math.ceil(10_000_000 / (4 * 2048))
    assert t["total_seconds"] == pytest.approx(t["steps"] * t["step_seconds"])
    assert c["gpus"] == 4 and c["total"] == pytest.approx(t["total_seconds"] / 3600 * 2.0 * 4)
    assert t["communication"]["bytes_per_step"]["gradient_all_reduce"] > 0 and "not_in_time" not in t
    assert "tokens_per_second_per_gpu" not in one and one["gpus"] == 1


def test_unsloth_plans_say_their_launches_are_not_counted():
    p = _time(model="llama-3.2-3b", backend="unsloth", gpu="l4")
    assert "kernel_launches_per_step" not in p["compute"] and p["time"]["launch_seconds"] == 0
    assert "Unsloth" in p["time"]["not_in_time"][0]
    peft = _time(model="llama-3.2-3b", gpu="l4")
    assert peft["compute"]["kernel_launches_per_step"]["total"] > 0 and "not_in_time" not in peft["time"]
