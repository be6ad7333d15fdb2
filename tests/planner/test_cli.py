"""The command line as a user meets it: one-line errors, exit codes, JSON, determinism, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import FIXTURES
from qplan.cli.main import main

QPLAN = [sys.executable, "-c", "import sys; from qplan.cli.main import main; sys.exit(main())"]


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*QPLAN, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode != 0
    err = p.stderr.strip()
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in err, err


def test_estimate_table_runs_and_says_fits():
    p = run("estimate", "--model", "llama-3.2-3b", "--r", "32", "--gpu", "t4")
    assert p.returncode == 0, p.stderr
    assert "q_proj" in p.stdout and "FITS" in p.stdout
    assert "no native bfloat16" in p.stdout  # T4: switched to fp16, visibly


def test_estimate_does_not_import_torch():
    code = ("import sys; from qplan.cli.main import main; rc = main(['estimate','--model','llama-3.1-8b',"
            "'--format','json']); assert rc == 0; "
            "heavy = [m for m in ('torch','transformers','peft','bitsandbytes','numpy') if m in sys.modules]; "
            "print(heavy)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]"


def test_json_is_the_plan_and_output_is_byte_identical(tmp_path):
    args = ["estimate", "--model", "qwen2.5-7b", "--r", "8", "--targets", "qv", "--gpu", "a100-40gb",
            "--batch-size", "2", "--seq-len", "1024", "--format", "json"]
    a = run(*args, "--output", str(tmp_path / "a.json"))
    b = run(*args, "--output", str(tmp_path / "b.json"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a.stdout == (tmp_path / "a.json").read_text()
    plan = json.loads(a.stdout)
    assert plan["schema_version"] == 1
    mem = plan["prediction"]["memory"]
    for k in ("weights", "weights_footprint", "adapters", "gradients", "optimizer", "activations", "logits",
              "temporaries", "overhead", "tensor_peak", "peak"):
        assert isinstance(mem[k], int) and mem[k] >= 0, k
    assert plan["prediction"]["fits"] == (mem["peak"] <= plan["gpu"]["usable_bytes"])
    assert plan["prediction"]["headroom"] == plan["gpu"]["usable_bytes"] - mem["peak"]
    assert plan["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "plan.json"
    out.write_text("precious")
    p = run("estimate", "--model", "smollm2-135m", "--output", str(out))
    one_line_error(p, "already exists", "--force")
    assert out.read_text() == "precious"
    p = run("estimate", "--model", "smollm2-135m", "--output", str(out), "--force")
    assert p.returncode == 0 and json.loads(out.read_text())["model"]["name"] == "smollm2-135m"


@pytest.mark.parametrize("args,needles", [
    (["--model", "llama-3.2-3", "--gpu", "t4"], ["unknown model", "llama-3.2-3b"]),
    (["--model", "llama-3.2-3b", "--gpu", "t5"], ["unknown GPU", "t4"]),
    (["--model", "llama-3.2-3b", "--r", "0"], ["--r"]),
    (["--model", "llama-3.2-3b", "--r", "-4"], ["--r"]),
    (["--model", "llama-3.2-3b", "--alpha", "0"], ["--alpha"]),
    (["--model", "llama-3.2-3b", "--dropout", "1"], ["--dropout"]),
    (["--model", "llama-3.2-3b", "--targets", "query_key_value"], ["matches no module", "q_proj"]),
    (["--model", "llama-3.2-3b", "--seq-len", "200000"], ["context", "131072"]),
    (["--model", "llama-3.2-3b", "--batch-size", "0"], ["--batch-size"]),
    (["--model", "llama-3.2-3b", "--optimizer", "adam"], ["--optimizer", "unknown value 'adam'", "adamw_torch"]),
    (["--model", "llama-3.2-3b", "--attn", "flash3"], ["attention", "sdpa"]),
    (["--model", "gemma-2-9b", "--attn", "sdpa"], ["does not support --attn sdpa", "eager"]),
    (["--model", "llama-3.2-3b", "--quant", "int4"], ["--quant"]),
    (["--model", "llama-3.2-3b", "--r", "x"], ["--r"]),
    (["--model", "llama-3.2-3b", "--gpu", "t4", "--strict-dtype"], ["bfloat16", "fp16"]),
    (["--model", "./nope/config.json"], ["no such file"]),
])
def test_bad_input_one_line(args, needles):
    one_line_error(run("estimate", *args), *needles)


def test_attention_auto_is_what_transformers_picks():
    """`--attn auto` (the default) takes the spec's recorded default: eager for Gemma-2, which
    transformers builds without sdpa support; sdpa for Llama."""
    for model, want in (("gemma-2-9b", "eager"), ("llama-3.2-1b", "sdpa")):
        p = run("estimate", "--model", model, "--format", "json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["training"]["attn_impl"] == want


def test_malformed_config(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    one_line_error(run("estimate", "--model", str(bad)), "not valid JSON")
    bad.write_text(json.dumps({"hidden_size": 8}))
    one_line_error(run("estimate", "--model", str(bad)), "model_type")
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    one_line_error(run("estimate", "--model", str(bad)), "no 'num_hidden_layers'")
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 10, "num_attention_heads": 3,
                               "num_hidden_layers": 2, "vocab_size": 100}))
    one_line_error(run("estimate", "--model", str(bad)), "invalid llama config", "multiple")


def test_model_path_builds_inventory_on_the_fly():
    p = run("estimate", "--model", str(FIXTURES / "phi3-fused.json"), "--targets", "qv", "--format", "json")
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)
    assert plan["lora"]["target_modules"] == ["qkv_proj"]


def test_spec_add_then_estimate_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("QPLAN_SPEC_DIR", str(tmp_path))
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((FIXTURES / "qwen2-bias.json").read_text())
    assert main(["spec", "add", str(model_dir)]) == 0
    assert (tmp_path / "my-model.json").is_file()
    assert main(["spec", "add", str(model_dir)]) == 2  # exists: refused without --force
    assert main(["estimate", "--model", "my-model", "--r", "4", "--quant", "bf16"]) == 0


def test_models_and_gpus_list_everything():
    p = run("models", "--format", "json")
    names = {m["name"] for m in json.loads(p.stdout)}
    assert {"llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b", "qwen2.5-0.5b", "qwen2.5-7b",
            "qwen2.5-32b", "gemma-2-9b", "smollm2-135m", "smollm2-1.7b", "mistral-nemo-12b", "phi-4"} <= names
    g = {x["name"]: x for x in json.loads(run("gpus", "--format", "json").stdout)}
    assert {"t4", "l4", "a10g", "l40s", "v100-16gb", "v100-32gb", "a100-40gb", "a100-80gb", "h100-80gb",
            "h200", "rtx-3060-12gb", "rtx-3090", "rtx-4090"} <= set(g)
    assert not g["t4"]["bf16"] and g["a100-80gb"]["bf16"]
    assert all(isinstance(x["usable_bytes"], int) and x["usable_bytes"] <= x["total_bytes"] for x in g.values())


def test_not_fitting_plan_gets_checked_suggestions():
    p = run("estimate", "--model", "llama-3.1-8b", "--quant", "bf16", "--gpu", "rtx-4090", "--no-grad-ckpt",
            "--batch-size", "4", "--seq-len", "2048", "--format", "json")
    plan = json.loads(p.stdout)
    assert plan["prediction"]["fits"] is False
    assert plan["suggestions"]


def test_the_trace_decides_the_verdict(tmp_path, capsys):
    """``--method trace``: the traced tensor peak plus the same overhead is ``trace.peak``, and ``fits`` /
    ``headroom`` are against it. A device whose usable bytes fall between the analytic and the traced peak fits
    the analytic plan and not the traced one (tiny Llama, q,v only, reentrant checkpointing: the analytic layer
    moment is ~3% under the trace, tests/planner/test_memory.py)."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    tiny = str(FIXTURES.parents[1] / "backends" / "data" / "tiny-llama.json")
    args = ["estimate", "--model", tiny, "--targets", "qv", "--dropout", "0", "--reentrant", "--seq-len", "64",
            "--batch-size", "2", "--format", "json"]
    assert main([*args, "--gpu", "t4"]) == 0
    analytic = json.loads(capsys.readouterr().out)["prediction"]
    assert main([*args, "--gpu", "t4", "--method", "trace"]) == 0
    traced = json.loads(capsys.readouterr().out)["prediction"]
    tr, mem = traced["trace"], analytic["memory"]
    assert tr["peak"] == tr["tensor_peak"] + tr["overhead"] and tr["tensor_peak"] > mem["tensor_peak"]
    assert traced["headroom"] == analytic["headroom"] - (tr["peak"] - mem["peak"])
    device = json.loads((FIXTURES.parents[2] / "model_specs" / "gpus" / "t4.json").read_text())
    device.update(name="between", aliases=[], usable_bytes=(mem["peak"] + tr["peak"]) // 2)
    f = tmp_path / "between.json"
    f.write_text(json.dumps(device))
    assert main([*args, "--gpu", str(f)]) == 0
    assert json.loads(capsys.readouterr().out)["prediction"]["fits"] is True
    assert main([*args, "--gpu", str(f), "--method", "trace", "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "peak, traced (the verdict's)" in out
