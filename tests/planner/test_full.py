"""Full fine-tuning (``--full``): every parameter trains.

Oracles: the model itself on the meta device (its parameters are the trainable count), the traced training step
(``--method trace`` runs a model handed to the Trainer without PEFT, on the meta device with the CUDA kernels' own
allocations: every moment of the step, not only its peak) and torch's FlopCounterMode. The real CPU runs are in
tests/backends/test_full_run.py. No expected value here comes from qplan's own formulas.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trace_checks import BACKWARD, assert_plan_is_the_trace

from qplan.planner.api import plan_dict
from qplan.planner.errors import QPlanError
from qplan.planner.model.catalog import load_spec
from qplan.planner.model.full import count_full
from qplan.planner.model.weights import QuantSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b", "qwen3-0.6b", "gemma-2-9b", "phi-4", "qwen3-30b-a3b",
                                  "gpt-oss-20b", "deepseek-v2-lite", "smollm2-135m", "qwen2.5-0.5b"])
def test_the_trainable_count_is_every_parameter_of_the_model(name):
    pytest.importorskip("torch")
    from qplan.hf import model_from_config

    spec = load_spec(name)
    model = model_from_config(spec.config, dtype="bf16", device="meta")
    params = list(model.parameters())  # a tied weight once
    counts = count_full(spec, QuantSettings("bf16", False, "bfloat16", False))
    assert sum(c.total for c in counts) == sum(p.numel() for p in params)
    assert len([1 for c in counts for _ in range(c.instances) for _ in c.save_keys]) == len(params)
    plan = plan_dict(model=name, full=True)
    assert plan["prediction"]["params"]["trainable"] == plan["prediction"]["params"]["total"] == sum(
        p.numel() for p in params)
    assert plan["prediction"]["memory"]["adapters"] == 0


CASES = [  # (model, options): families x precision x checkpointing x optimizer
    ("llama-3.2-1b", dict(quant="bf16", optimizer="adamw_torch_fused")),  # tied, checkpointing, bf16 autocast
    ("llama-3.2-1b", dict(quant="fp32", compute_dtype="bf16", grad_ckpt=False)),  # fp32 master weights, AdamW foreach
    ("llama-3.2-1b", dict(quant="bf16", compute_dtype="fp32", grad_ckpt=False, optimizer="adafactor")),  # pure bf16
    ("llama-3.1-8b", dict(quant="bf16", optimizer="adamw_torch_fused")),  # untied embeddings
    ("qwen3-0.6b", dict(quant="fp32", compute_dtype="fp16", reentrant=True, optimizer="adamw_torch_fused")),
    ("gemma-2-9b", dict(quant="bf16", grad_ckpt=False, optimizer="adamw_torch_fused")),  # eager, softcaps, sandwich norms
    ("qwen3-30b-a3b", dict(quant="bf16", optimizer="adamw_torch_fused", grad_ckpt=False)),  # experts and router train
]  # a sample: bench/full_accuracy.py runs 84 cases and 8 FSDP2 ranks (reports/accuracy/full/)


@pytest.mark.parametrize("model,options", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_every_moment_of_the_step_equals_the_traced_step(model, options):
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan

    plan = plan_dict(model=model, full=True, batch_size=2, seq_len=1024, **options)
    traced = trace_plan(plan, steps=2)
    assert_plan_is_the_trace(plan, traced)


@pytest.mark.parametrize("model,ckpt", [("llama-3.2-1b", True), ("llama-3.1-8b", False)])
def test_the_flops_are_what_the_flop_counter_counts(model, ckpt):
    pytest.importorskip("peft")
    from qplan.observe.trace import trace_plan

    plan = plan_dict(model=model, full=True, batch_size=1, seq_len=256, grad_ckpt=ckpt)
    flops = plan["prediction"]["compute"]["flops_per_step"]
    assert flops["weight_gradients"] == flops["input_gradients"] > 0
    assert flops["total"] == trace_plan(plan, steps=2, count_flops=True)["flops_per_step"][-1]


@pytest.mark.parametrize("options,message", [
    (dict(quant="nf4"), "a nf4 (bitsandbytes) base cannot be trained"),
    (dict(quant="int8"), "a int8 (bitsandbytes) base cannot be trained"),
    (dict(r=8), "--r is a LoRA option"),
    (dict(targets="qv"), "--targets is a LoRA option"),
    (dict(dora=True), "--dora is a LoRA option"),
    (dict(quant="fp16", compute_dtype="fp16"), "Attempting to unscale FP16 gradients"),
    (dict(gpus=2), "not planned yet"),  # DDP
    (dict(gpus=2, strategy="zero3"), "not planned yet"),
    (dict(gpus=2, strategy="fsdp", cpu_offload=True), "not planned yet"),
    (dict(backend="unsloth"), "unsloth backend's full fine-tuning is not planned"),
    (dict(loss="liger"), "--full with --loss liger"),
])
def test_what_full_fine_tuning_cannot_plan_is_one_line(options, message):
    with pytest.raises(QPlanError) as exc:
        plan_dict(model="llama-3.2-1b", full=True, **options)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_the_default_load_is_bf16_and_a_card_without_bf16_trains_fp32_weights_under_fp16_autocast():
    plan = plan_dict(model="llama-3.2-1b", full=True)
    assert (plan["quant"]["quant"], plan["method"], plan["lora"]) == ("bf16", "full", None)
    assert plan["prediction"]["adapter_file_bytes"] is None
    t4 = plan_dict(model="llama-3.2-1b", full=True, gpu="t4")
    assert (t4["quant"]["quant"], t4["quant"]["compute_dtype"]) == ("fp32", "float16")
    assert "weights to fp32" in t4["warnings"][0]
    assert plan_dict(model="llama-3.2-1b")["quant"]["quant"] == "nf4"  # LoRA keeps QLoRA's default


def test_a_full_plan_file_is_checked_and_read_back(tmp_path):
    from qplan.planner.api import check_consistent, plan_settings
    from qplan.planner.document import check_plan, seal

    plan = plan_dict(model="llama-3.2-1b", full=True, gpu="a100-80gb")
    check_consistent(plan)  # re-made from its settings: the same terms
    assert plan_settings(plan)["full"] is True
    plan["seal"] = seal(plan)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    check_plan(json.loads(path.read_text()), str(path))
    bad = {**plan, "method": "lora"}
    bad.pop("seal")
    with pytest.raises(QPlanError, match="lora is null exactly when method is full"):
        check_plan(bad, "plan.json")


def test_the_cli_prints_a_full_plan(capsys):
    from qplan.cli.main import main

    assert main(["estimate", "--model", "llama-3.2-3b", "--full", "--gpu", "a100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "full fine-tuning (every parameter trains)" in out and "no adapter" in out
    assert "weight gradients" in out and "embeddings' backward" in out
    assert main(["estimate", "--model", "llama-3.2-3b", "--full", "--quant", "nf4"]) == 2
    assert "cannot be trained" in capsys.readouterr().err


FULL_CONFIGS = {  # a trainer config that fine-tunes every parameter -> the flags a person reads off it
    "axolotl.yml": ("base_model: meta-llama/Llama-3.2-1B\nbf16: true\nsequence_len: 2048\nmicro_batch_size: 2\n"
                    "gradient_accumulation_steps: 4\ngradient_checkpointing: true\noptimizer: adamw_torch_fused\n"
                    "flash_attention: true\nlora_r: 16\n",
                    ["--quant", "bf16", "--compute-dtype", "bf16", "--seq-len", "2048", "--batch-size", "2",
                     "--grad-accum", "4", "--grad-ckpt", "--reentrant", "--optimizer", "adamw_torch_fused",
                     "--attn", "flash_attention_2"]),
    # LLaMA-Factory casts the trainable parameters to fp32 (init_adapter), the Trainer runs bf16 autocast
    "llamafactory.yaml": ("model_name_or_path: meta-llama/Llama-3.2-1B\nstage: sft\nfinetuning_type: full\nbf16: true\n"
                          "cutoff_len: 1024\nper_device_train_batch_size: 1\ngradient_accumulation_steps: 8\n",
                          ["--quant", "fp32", "--compute-dtype", "bf16", "--seq-len", "1024", "--batch-size", "1",
                           "--grad-accum", "8", "--grad-ckpt", "--reentrant", "--optimizer", "adamw_torch_fused"]),
    # label smoothing takes TRL's loss from the full logits; without use_peft every parameter trains
    "trl.yaml": ("model_name_or_path: meta-llama/Llama-3.2-1B\ndtype: bfloat16\nbf16: true\nmax_length: 512\n"
                 "per_device_train_batch_size: 4\nlabel_smoothing_factor: 0.1\ngradient_checkpointing: true\n",
                 ["--quant", "bf16", "--compute-dtype", "bf16", "--seq-len", "512", "--batch-size", "4", "--grad-ckpt",
                  "--optimizer", "adamw_torch_fused"]),
}


@pytest.mark.parametrize("name", sorted(FULL_CONFIGS))
def test_a_full_fine_tuning_trainer_config_plans_what_its_flags_plan(tmp_path, capsys, name):
    from qplan.cli.main import main

    text, flags = FULL_CONFIGS[name]
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")

    def doc(*args):
        assert main(["estimate", *args, "--gpu", "a100-80gb", "--format", "json"]) == 0, capsys.readouterr().err
        d = json.loads(capsys.readouterr().out)
        d.pop("seal", None)
        return d

    from_file = doc("--from-config", str(path))
    warnings = from_file.pop("trainer_config")["warnings"]
    assert from_file == doc("--model", "meta-llama/Llama-3.2-1B", "--full", *flags)
    if name == "axolotl.yml":  # its LoRA keys do nothing without an adapter: said
        assert any("lora_r without an adapter" in w["text"] for w in warnings)


@pytest.mark.parametrize("text,message", [
    ("base_model: meta-llama/Llama-3.2-1B\nload_in_4bit: true\n", "load_in_4bit without an adapter"),
    ("model_name_or_path: meta-llama/Llama-3.2-1B\nfinetuning_type: full\nquantization_bit: 4\n", "LoRA or OFT only"),
    ("model_name_or_path: meta-llama/Llama-3.2-1B\nfinetuning_type: freeze\n", "qplan plans lora and full"),
])
def test_what_a_full_fine_tuning_config_cannot_plan_is_one_line(tmp_path, capsys, text, message):
    from qplan.cli.main import main

    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["estimate", "--from-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_trl_file_without_peft_plans_full_fine_tuning_through_trl_s_fused_head(tmp_path, capsys):
    """TRL 1.16's SFTTrainer trains a model without PEFT through its fused head too (its head's gradient in chunks)."""
    import json

    from qplan.cli.main import main

    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: meta-llama/Llama-3.2-1B\ndtype: bfloat16\nmax_length: 512\n", encoding="utf-8")
    assert main(["estimate", "--from-config", str(path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["method"] == "full" and doc["training"]["loss"] == "trl"
    assert doc["prediction"]["memory"]["logits"] < doc["prediction"]["memory"]["weights"]


def test_the_comparison_rows_are_the_plans_of_each_method():
    """``qplan compare``: each row is what ``qplan estimate`` plans with the flags a person would type for it."""
    from qplan.planner.search.compare import compare_methods, parse_methods

    given = dict(model="llama-3.2-3b", gpu="a100-80gb", r=32, seq_len=1024, batch_size=2, tokens=10_000_000,
                 price_per_hour=2.0)
    res = compare_methods(given, parse_methods("full,lora,qlora,dora"))
    by = {r["method"]: r for r in res["methods"]}
    flags = {"full": dict(full=True, r=16), "lora": dict(quant="bf16"), "qlora": dict(quant="nf4"),
             "dora": dict(quant="bf16", dora=True)}
    for method, extra in flags.items():
        plan = plan_dict(**{**given, **extra})
        p = plan["prediction"]
        row = by[method]
        assert (row["quant"], row["trainable"], row["peak"], row["fits"], row["headroom"]) == (
            plan["quant"]["quant"], p["params"]["trainable"], p["memory"]["peak"], p["fits"], p["headroom"])
        assert row["tokens_per_second"] == p["time"]["tokens_per_second"] and row["total_cost"] == p["cost"]["total"]
    assert by["full"]["trainable"] > by["dora"]["trainable"] > by["lora"]["trainable"] == by["qlora"]["trainable"]
    # a method that cannot be planned is a row with its reason; only when none can is the comparison refused
    two = compare_methods({**given, "gpus": 2}, ("full", "qlora"))["methods"]
    assert "not planned yet" in two[0]["error"] and "error" not in two[1]
    with pytest.raises(QPlanError, match="unknown method 'boft'"):
        parse_methods("lora,boft")
    with pytest.raises(QPlanError, match="not planned yet"):  # nothing to compare: the reason is the command's
        compare_methods({**given, "gpus": 2, "strategy": "zero3"}, ("full",))


def test_fit_searches_full_fine_tuning_and_each_row_is_the_estimate():
    """``qplan fit --full``: batch, sequence, checkpointing and optimizer searched for full fine-tuning; each row's peak
    is what ``qplan estimate --full`` plans for it (the oracle of the search: the plan itself)."""
    from qplan.planner.search.fit import fit_document

    res = fit_document({"model": "llama-3.1-8b", "gpu": "a100-80gb", "full": True, "top": 4})
    assert res["best"] and all(r["targets"] == "full" and r["r"] is None for r in res["best"])
    for row in res["best"]:
        plan = plan_dict(model="llama-3.1-8b", gpu="a100-80gb", full=True, batch_size=row["batch_size"],
                         seq_len=row["seq_len"], grad_ckpt=row["grad_ckpt"] != "off", optimizer=row["optimizer"])
        assert plan["prediction"]["memory"]["peak"] == row["peak"] and plan["prediction"]["fits"]
    timed = fit_document({"model": "llama-3.2-3b", "gpu": "a100-80gb", "full": True, "objective": "time",
                          "seq_len": 2048, "global_batch": 8})
    row = timed["best"][0]
    plan = plan_dict(model="llama-3.2-3b", gpu="a100-80gb", full=True, batch_size=row["batch_size"],
                     grad_accum=row["grad_accum"], seq_len=2048, grad_ckpt=row["grad_ckpt"] != "off")
    assert row["step_seconds"] == pytest.approx(plan["prediction"]["time"]["step_seconds"], rel=1e-9)
    for bad, message in ((dict(r=8), "--r is a LoRA option"), (dict(quant="nf4"), "cannot be trained"),
                         (dict(max_gpus=4, objective="time"), "one GPU for now")):
        with pytest.raises(QPlanError, match=message):
            fit_document({"model": "llama-3.2-3b", "gpu": "a100-80gb", "full": True, **bad})


FSDP_CASES = [  # (model, options): one rank of FSDP2 full shard, traced with the real fully_shard on a fake group
    ("qwen3-0.6b", dict(gpus=4, optimizer="sgd", seq_len=256)),                           # tied, the embeddings' backward
    ("llama-3.1-8b", dict(gpus=2, optimizer="adamw_torch_fused")),                       # untied, a layer's backward
]  # the rest of the grid: bench/full_accuracy.py


@pytest.mark.parametrize("model,options", FSDP_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(FSDP_CASES)])
def test_an_fsdp_rank_of_full_fine_tuning_is_the_traced_rank(model, options):
    """FSDP2 full fine-tuning: the root unit's gradients stay unsharded until its post-backward (the head's from the
    start of the backward, the embeddings' at the end), each layer's are reduce-scattered by its own; the rank's peak
    and its phases within 1% of the traced rank (the moments inside a layer's backward are planned at its end), the
    collectives equal to the byte."""
    pytest.importorskip("peft")
    from qplan.observe.trace.dist import trace_rank_step

    plan = plan_dict(model=model, full=True, batch_size=2, seq_len=options.pop("seq_len", 1024), strategy="fsdp",
                     gpu="a100-80gb", **options)
    traced = trace_rank_step(plan, steps=2)
    mem, phases = plan["prediction"]["memory"], plan["prediction"]["memory_detail"]["phases"]
    assert abs(mem["tensor_peak"] - traced["tensor_peak"]) <= 0.01 * traced["tensor_peak"], (mem, traced)
    backward = max(v for k, v in phases.items() if k in BACKWARD)
    assert abs(backward - traced["phase_peaks"]["backward"]) <= 0.01 * traced["phase_peaks"]["backward"]
    assert abs(phases["optimizer"] - traced["phase_peaks"]["optimizer"]) <= 0.001 * traced["phase_peaks"]["optimizer"]
    from qplan.planner.compute.comm import gather_bytes

    col, world = traced["collectives"], plan["distributed"]["world_size"]
    c = plan["prediction"]["time"]["communication"]["bytes_per_step"]
    assert c["weight_all_gather"] == gather_bytes(col["forward:_allgather_base_"], world) + gather_bytes(
        col["backward:_allgather_base_"], world)
    assert c["gradient_reduce_scatter"] == gather_bytes(col["backward:_reduce_scatter_base_"], world)
