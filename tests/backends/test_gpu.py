"""CUDA measurement path (allocator counters, NVML, CUDA context): needs an NVIDIA GPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from backend_helpers import build_plan, llama_spec, read_measured, write_plan  # noqa: E402
from qplan.backends.runner import run_plan  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("quant", ["nf4", "bf16"])
def test_cuda_run_reads_allocator_and_device_counters(quant, tmp_path):
    plan = build_plan(llama_spec(), quant=quant, grad_ckpt=True, batch_size=4, seq_len=128)
    result = run_plan(write_plan(tmp_path / "plan.json", plan), random_init=True, steps=6, device="cuda",
                      out_dir=tmp_path / "runs")
    assert result["status"] == "ok", result["summary"]
    doc = read_measured(result["run_dir"])
    mem = doc["measured"]["memory"]
    assert mem["device"] == "cuda"
    assert 0 < mem["peak_allocated"] <= mem["peak_reserved"]
    assert mem["device_used"] >= mem["peak_reserved"]
    assert mem["cuda_context"] > 0 and mem["peak"] == mem["peak_reserved"] + mem["cuda_context"]
    assert doc["error"]["peak"] is not None and doc["error"]["tensor_peak"] is not None
    assert doc["measured"]["params"]["trainable"] == plan["prediction"]["params"]["trainable"]
    print(f"\n[{quant}] tensor_peak error {doc['error']['tensor_peak']:+.2%}, peak error {doc['error']['peak']:+.2%}, "
          f"context {mem['cuda_context']:,} B ({mem['device_used_source']})")
