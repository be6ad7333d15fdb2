"""``--adapter-dtype``: the LoRA tensors in bf16 (TRL casts a quantized model's; LLaMA-Factory's pure_bf16 and
torchtune keep them so) instead of PEFT's fp32.

Oracles: the meta trace of the step with the adapters really cast (``qplan.hf.cast_adapters``, as TRL does it), and the
real CPU step against the meta trace of it; the CPU runs of ``tests/backends/test_peft_backend.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("peft")

from test_trainer_configs import one_line, qplan

from qplan.observe.trace import trace_plan, trace_training_step
from qplan.planner.api import plan_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kw", [
    dict(model="llama-3.2-1b", seq_len=512, batch_size=2),                      # QLoRA, fp32 residual (upcast)
    dict(model="llama-3.2-1b", seq_len=512, grad_ckpt=False),
    dict(model="llama-3.2-1b", seq_len=512, upcast=False, compute_dtype="fp16"),  # TRL on a T4: bf16 under fp16
    dict(model="qwen2.5-0.5b", seq_len=1024, quant="bf16", grad_ckpt=False, dropout=0.1),
    dict(model="qwen2.5-0.5b", seq_len=700, batch_size=2, quant="bf16", compute_dtype="fp32"),  # pure bf16
    dict(model="llama-3.2-1b", seq_len=512, dora=True, grad_ckpt=False),
])
def test_a_bf16_adapter_plan_is_its_traced_step(kw):
    plan = plan_dict(gpu="a100-80gb", adapter_dtype="bf16", **kw)
    fp32 = plan_dict(gpu="a100-80gb", **kw)
    assert plan["lora"]["adapter_dtype"] == "bfloat16"
    mem, m32 = plan["prediction"]["memory"], fp32["prediction"]["memory"]
    assert 2 * mem["adapters"] == m32["adapters"] and 2 * mem["gradients"] == m32["gradients"]
    traced = trace_plan(plan, steps=2)
    assert traced["breakdown_at_peak"]["adapters"] == mem["adapters"]
    assert abs(mem["tensor_peak"] - traced["tensor_peak"]) <= 1e-4 * traced["tensor_peak"]
    assert mem["tensor_peak"] < m32["tensor_peak"]


def test_the_cpu_step_casts_what_a_gpu_step_does_not():
    """bitsandbytes' LoRA layers skip PEFT's input cast under CUDA autocast only: on the CPU the branch input is cast to
    bf16 adapters. The meta trace with CPU kernels equals the real CPU step to the byte (tiny Llama, nf4)."""
    import json

    config = json.loads((ROOT / "tests" / "backends" / "data" / "tiny-llama.json").read_text())
    lora = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj", "down_proj"],
            "adapter_dtype": "bfloat16"}
    base = dict(quant="nf4", double_quant=True, compute_dtype="bf16", upcast_kbit=True, lora=lora, batch_size=2,
                seq_len=64, grad_ckpt=True, optimizer="adamw_torch", seed=0)
    cpu = trace_training_step(config, device="cpu", **base)
    meta = trace_training_step(config, device="meta", kernels="cpu", **base)
    assert (meta["tensor_peak"], meta["breakdown_at_peak"]) == (cpu["tensor_peak"], cpu["breakdown_at_peak"])


@pytest.mark.parametrize(("args", "needle"), [
    (["--adapter-dtype", "fp16", "--compute-dtype", "fp16"], "GradScaler"),
    (["--adapter-dtype", "fp16"], "with compute dtype bfloat16"),
    (["--adapter-dtype", "bf16", "--quant", "bf16", "--compute-dtype", "fp16"], "with compute dtype float16"),
    (["--adapter-dtype", "fp16", "--quant", "bf16", "--compute-dtype", "fp32"], "pure 16-bit step"),
    (["--adapter-dtype", "bf16", "--backend", "unsloth"], "peft backend"),
    (["--adapter-dtype", "int4"], "--adapter-dtype"),
])
def test_adapters_no_trainer_runs_as_planned_are_one_line(capsys, args, needle):
    rc, out, err = qplan(capsys, "estimate", "--model", "llama-3.2-1b", *args)
    assert rc == 2 and out == ""
    one_line(err, needle)


LF = ROOT / "tests" / "fixtures" / "trainer_configs" / "llamafactory-qlora-qwen2.5-7b.yaml"


def _lf(tmp_path: Path, **edit) -> Path:
    cfg = yaml.safe_load(LF.read_text())
    cfg.update(edit)
    for k in [k for k, v in edit.items() if v is None]:
        cfg.pop(k)
    f = tmp_path / "lf.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def test_llamafactory_pure_bf16_keeps_bf16_adapters(capsys, tmp_path):
    import json

    f = _lf(tmp_path, quantization_bit=None, pure_bf16=True, bf16=False, fp16=False)
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(f), "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert (doc["lora"]["adapter_dtype"], doc["quant"]["quant"], doc["quant"]["compute_dtype"]) == (
        "bfloat16", "bf16", "float32")
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(_lf(tmp_path, pure_bf16=True)))
    assert rc == 2
    one_line(err, "pure_bf16 with quantization_bit")


def test_fit_plans_every_candidate_with_the_adapters_dtype(capsys):
    import json

    rc, out, err = qplan(capsys, "fit", "--model", "llama-3.2-1b", "--gpu", "t4", "--adapter-dtype", "bf16", "--top", "50",
                         "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    # a T4 computes in fp16: bf16 adapters go only with quantized weights there (TRL's QLoRA)
    assert doc["adapter_dtype"] == "bfloat16" and {row["quant"] for row in doc["best"]} <= {"nf4", "int8"}
