"""Trainer configs in and out (issue 13).

Oracles: the plan of each realistic config in ``tests/fixtures/trainer_configs`` is compared with the
plan of the flags a person reads off that config (written out by hand below, not derived by the
importer), as JSON, byte for byte; an exported file is parsed by the tool's own parser where it
installs (TRL's ``TrlParser`` over ``ScriptArguments``, ``SFTConfig``, ``ModelConfig``), else checked
against the keys the tool's own config classes declare (``tests/fixtures/trainer_keys``: axolotl's
``AxolotlInputConfig`` and LLaMA-Factory's argument dataclasses, extracted from the released
packages), and imported back to the same plan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qplan.cli.main import main

FIX = Path(__file__).resolve().parents[1] / "fixtures"
CONFIGS = FIX / "trainer_configs"
GPU = "a100-80gb"

#: config file -> the flags that say the same thing (read off the file by a person)
EQUIVALENT = {
    "axolotl-qlora-llama-3.1-8b.yml": [
        "--model", "meta-llama/Llama-3.1-8B", "--quant", "nf4", "--double-quant", "--compute-dtype", "bf16", "--upcast",
        "--r", "32", "--alpha", "16", "--dropout", "0.05", "--targets", "all-linear", "--batch-size", "2",
        "--seq-len", "4096", "--grad-accum", "4", "--grad-ckpt", "--optimizer", "paged_adamw_8bit",
        "--attn", "flash_attention_2"],
    "llamafactory-qlora-qwen2.5-7b.yaml": [
        "--model", "Qwen/Qwen2.5-7B-Instruct", "--quant", "nf4", "--double-quant", "--compute-dtype", "bf16",
        "--no-upcast", "--r", "16", "--alpha", "32", "--dropout", "0", "--targets", "all-linear", "--batch-size", "1",
        "--seq-len", "2048", "--grad-accum", "8", "--grad-ckpt", "--optimizer", "adamw_8bit", "--attn", "sdpa"],
    "trl-lora-smollm2-1.7b.yaml": [
        "--model", "HuggingFaceTB/SmolLM2-1.7B", "--quant", "bf16", "--compute-dtype", "bf16", "--no-upcast",
        "--r", "32", "--alpha", "16", "--dropout", "0.05", "--targets", "all-linear", "--batch-size", "4",
        "--seq-len", "2048", "--grad-accum", "4", "--grad-ckpt", "--optimizer", "adamw_torch_fused", "--attn", "sdpa",
        "--loss", "trl"],  # TRL 1.16's SFTTrainer: the fused LM head
    "trl-qlora-llama-3.2-3b.json": [
        "--model", "meta-llama/Llama-3.2-3B", "--quant", "nf4", "--double-quant", "--compute-dtype", "fp16",
        "--no-upcast", "--r", "16", "--alpha", "32", "--dropout", "0.05", "--targets", "q_proj,k_proj,v_proj,o_proj",
        "--batch-size", "2", "--seq-len", "1024", "--grad-accum", "8", "--grad-ckpt", "--optimizer", "paged_adamw_8bit",
        "--loss", "trl", "--adapter-dtype", "bf16"],  # SFTTrainer casts a quantized model's adapters to bf16
}


def qplan(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def plan_doc(capsys, *args: str) -> dict:
    rc, out, err = qplan(capsys, "estimate", *args, "--gpu", GPU, "--format", "json")
    assert rc == 0, err
    return json.loads(out)


def plan_json(capsys, *args: str) -> str:
    """The plan's JSON without what only a file-read plan has (``trainer_config``: the file and its warnings) and the
    seal over it: what the flags read off a file must plan byte for byte."""
    doc = plan_doc(capsys, *args)
    doc.pop("trainer_config", None)
    doc.pop("seal", None)
    return json.dumps(doc, indent=2, ensure_ascii=False)


def one_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_a_trainer_config_plans_what_its_flags_plan(capsys, name):
    from_file = plan_json(capsys, "--from-config", str(CONFIGS / name))
    from_flags = plan_json(capsys, *EQUIVALENT[name])
    assert from_file == from_flags


def test_explicit_flags_override_the_file(capsys):
    f = str(CONFIGS / "axolotl-qlora-llama-3.1-8b.yml")
    flags = EQUIVALENT["axolotl-qlora-llama-3.1-8b.yml"]
    changed = [*flags, "--r", "8", "--seq-len", "1024", "--no-grad-ckpt"]
    assert plan_json(capsys, "--from-config", f, "--r", "8", "--seq-len", "1024", "--no-grad-ckpt") == \
        plan_json(capsys, *changed)
    assert plan_json(capsys, "--from-config", f) != plan_json(capsys, *changed)


@pytest.mark.parametrize("extra", [
    {"plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"], "cut_cross_entropy": False},
    {"plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_rms_norm": False},
    {"plugins": ["axolotl.integrations.swanlab.SwanLabPlugin"]},
    {"dp_shard_size": 1, "context_parallel_size": 1, "tensor_parallel_size": 1},
])
def test_a_feature_left_off_plans_the_plain_step(capsys, tmp_path, extra):
    """A plugin whose kernels are off, a logging plugin, and parallelism degrees of 1 plan what the file without them
    plans (axolotl's own examples write ``dp_shard_size: 1``)."""
    cfg = yaml.safe_load((CONFIGS / "axolotl-qlora-llama-3.1-8b.yml").read_text())
    f = tmp_path / "a.yml"
    f.write_text(yaml.safe_dump({**cfg, **extra}))
    assert plan_json(capsys, "--from-config", str(f)) == plan_json(capsys, "--from-config",
                                                                     str(CONFIGS / "axolotl-qlora-llama-3.1-8b.yml"))


def test_the_plan_keeps_the_files_warnings_by_kind(capsys, tmp_path):
    """``--format json`` and plan.json carry ``trainer_config``: the file, its tool, and each warning with its kind,
    so a program tells keys that change memory (approximated) from unknown ones (ignored) and launcher keys."""
    src = CONFIGS / "trl-lora-smollm2-1.7b.yaml"
    f = tmp_path / "trl.yaml"
    f.write_text(src.read_text() + "my_new_knob: 3\nddp_find_unused_parameters: false\nload_in_4bit: true\n")
    out = tmp_path / "plan.json"
    doc = plan_doc(capsys, "--from-config", str(f), "--output", str(out))
    assert json.loads(out.read_text()) == doc
    source = doc["trainer_config"]
    assert (source["path"], source["format"]) == (str(f), "trl")
    kinds: dict[str, str] = {}
    for w in source["warnings"]:
        kinds[w["kind"]] = kinds.get(w["kind"], "") + " | " + w["text"]
    assert "my_new_knob" in kinds["ignored"] and "ddp_find_unused_parameters" in kinds["launcher"]
    assert doc["lora"]["adapter_dtype"] == "bfloat16"  # TRL casts a quantized model's adapters: planned, not warned
    assert doc["training"]["loss"] == "trl"  # TRL 1.16's SFT loss: its fused LM head, planned (no warning needed)
    assert "LM head" not in kinds.get("approximated", "")
    assert set(kinds) <= {"approximated", "ignored", "launcher", "data"}
    from qplan.planner.document import check_plan

    check_plan(json.loads(out.read_text()))  # the section is part of plan.json's schema
    bad = {**doc, "trainer_config": {**source, "warnings": [{"kind": "whatever", "text": "x"}]}}
    with pytest.raises(Exception, match="kind"):
        check_plan(bad)


def test_an_unknown_key_is_named_in_a_warning_and_changes_nothing(capsys, tmp_path):
    src = CONFIGS / "trl-lora-smollm2-1.7b.yaml"
    f = tmp_path / "trl.yaml"
    f.write_text(src.read_text() + "my_new_knob: 3\nddp_find_unused_parameters: false\n")
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(f), "--gpu", GPU, "--format", "json")
    assert rc == 0
    assert "keys qplan does not plan (ignored): my_new_knob" in err
    assert "multi-GPU launcher" in err and "ddp_find_unused_parameters" in err
    assert plan_json(capsys, "--from-config", str(f)) == plan_json(capsys, "--from-config", str(src))


@pytest.mark.parametrize("extra,needles", [
    ({"deepspeed": "deepspeed_configs/zero2.json"}, ["deepspeed", "cannot read"]),  # multi-GPU: test_trainer_configs_dist
    ({"fsdp": ["full_shard", "auto_wrap"]}, ["fsdp_version 1", "FSDP2"]),
    ({"optimizer": "galore_adamw"}, ["galore_adamw", "not an optimizer qplan plans"]),
    ({"xformers_attention": True}, ["xformers_attention"]),
    ({"rl": "dpo"}, ["rl"]),
    ({"load_in_8bit": True}, ["load_in_4bit and load_in_8bit"]),
    ({"micro_batch_size": "two"}, ["micro_batch_size must be int"]),
    ({"lora_r": -4}, ["--from-config", "--r: expected `int` >= 1, got -4"]),
    # axolotl's plugins and kernel keys that change what a step holds (integrations/*/args.py, axolotl 0.19)
    ({"plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"], "cut_cross_entropy": "yes"},
     ["cut_cross_entropy must be bool"]),
    ({"cut_cross_entropy": True}, ["cut_cross_entropy", "does not plan"]),  # the key without its plugin
    ({"plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_rms_norm_gated": True}, ["liger_rms_norm_gated"]),
    ({"plugins": ["axolotl.integrations.kernels.KernelsPlugin"]}, ["KernelsPlugin"]),
    ({"plugins": "cce"}, ["plugins must be a list"]),
    ({"expert_parallel_size": 2}, ["expert_parallel_size 2"]),
    ({"quantize_moe_experts": True}, ["quantize_moe_experts"]),
    ({"lora_target_parameters": ["mlp.experts.gate_up_proj"]}, ["lora_target_parameters", "--target-parameters"]),
])
def test_a_key_that_changes_memory_and_cannot_be_planned_is_an_error(capsys, tmp_path, extra, needles):
    cfg = yaml.safe_load((CONFIGS / "axolotl-qlora-llama-3.1-8b.yml").read_text())
    f = tmp_path / "a.yml"
    f.write_text(yaml.safe_dump({**cfg, **extra}))
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(f))
    assert rc == 2 and out == ""
    one_line(err, *needles)


@pytest.mark.parametrize("name,edit,reentrant", [
    # LLaMA-Factory: use_reentrant_gc defaults to true (hparams/model_args.py; model_utils/checkpointing.py passes it
    # to torch.utils.checkpoint)
    ("llamafactory-qlora-qwen2.5-7b.yaml", {"use_reentrant_gc": None}, True),
    ("llamafactory-qlora-qwen2.5-7b.yaml", {"use_reentrant_gc": True}, True),
    # axolotl 0.19 (utils/config/__init__.py) sets use_reentrant: true when gradient_checkpointing has no kwargs
    ("axolotl-qlora-llama-3.1-8b.yml", {"gradient_checkpointing_kwargs": None}, True),
    ("axolotl-qlora-llama-3.1-8b.yml", {"gradient_checkpointing_kwargs": {"use_reentrant": True}}, True),
    # kwargs without the key reach torch.utils.checkpoint, whose default (torch 2.13) is reentrant
    ("axolotl-qlora-llama-3.1-8b.yml", {"gradient_checkpointing_kwargs": {"preserve_rng_state": True}}, True),
    ("axolotl-qlora-llama-3.1-8b.yml", {"gradient_checkpointing_kwargs": {"use_reentrant": None}}, True),
    # transformers (TRL, a plain Trainer) checkpoints non-reentrant unless told
    ("trl-lora-smollm2-1.7b.yaml", {}, False),
    ("trl-lora-smollm2-1.7b.yaml", {"gradient_checkpointing_kwargs": {"use_reentrant": True}}, True),
])
def test_each_tools_checkpointing_default_is_planned_as_that_tool_runs_it(capsys, tmp_path, name, edit, reentrant):
    """Each tool's own default reentrancy (read from its source, cited above) becomes ``--reentrant`` or not: the
    plan equals the plan of the file's equivalent flags with or without ``--reentrant``; with checkpointing off
    there is nothing reentrant."""
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    for k, v in edit.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    f = tmp_path / name
    f.write_text(yaml.safe_dump(cfg))
    got = json.loads(plan_json(capsys, "--from-config", str(f)))
    assert got["training"]["grad_ckpt"] == ("reentrant" if reentrant else "hf")
    if name in EQUIVALENT:
        flags = [*EQUIVALENT[name], *(["--reentrant"] if reentrant else [])]
        assert got == json.loads(plan_json(capsys, *flags))
    off = {"disable_gradient_checkpointing": True} if name.startswith("llamafactory") else {"gradient_checkpointing": False}
    f.write_text(yaml.safe_dump({**cfg, **off}))
    assert json.loads(plan_json(capsys, "--from-config", str(f)))["training"]["grad_ckpt"] == "off"


@pytest.mark.parametrize("edit", [{"bf16": None}, {"bf16": None, "bfloat16": True}, {"bf16": False, "bfloat16": True}])
def test_axolotls_precision_defaults_are_its_own(capsys, tmp_path, edit):
    """axolotl 0.19 defaults bf16 to "auto" (bf16 on a GPU that has it: utils/schemas/config.py) and trains
    ``bfloat16: true`` with the Trainer's bf16 (core/builders/base.py): each plans as ``bf16: true`` does (a file
    without bf16 was planned in fp32)."""
    cfg = yaml.safe_load((CONFIGS / "axolotl-qlora-llama-3.1-8b.yml").read_text())
    f = tmp_path / "a.yml"
    edited = {k: v for k, v in {**cfg, **edit}.items() if v is not None}
    f.write_text(yaml.safe_dump(edited))
    assert plan_json(capsys, "--from-config", str(f)) == plan_json(capsys, *EQUIVALENT["axolotl-qlora-llama-3.1-8b.yml"])


def test_llamafactory_without_a_precision_flag_plans_its_inferred_pure_bf16_step(capsys, tmp_path):
    """No bf16/fp16 in a LLaMA-Factory file: it loads the model in the inferred dtype (bf16 on a GPU that has it,
    model/patcher.py) and the Trainer runs without mixed precision — a pure bf16 step, not the fp32 plan it was."""
    cfg = yaml.safe_load((CONFIGS / "llamafactory-qlora-qwen2.5-7b.yaml").read_text())
    for k in ("bf16", "fp16", "quantization_bit", "quantization_type", "double_quantization"):
        cfg.pop(k, None)
    f = tmp_path / "lf.yaml"
    f.write_text(yaml.safe_dump(cfg))
    doc = json.loads(plan_json(capsys, "--from-config", str(f)))
    assert (doc["quant"]["quant"], doc["training"]["mixed_precision"]) == ("bf16", "no")


@pytest.mark.parametrize("optim", ["adamw_torch_8bit", "adamw_torch_4bit"])
def test_torchaos_optimizers_in_a_config_are_planned(capsys, tmp_path, optim):
    """torchao's low-bit AdamW (31 of axolotl's LoRA examples) is planned as ``--optimizer``, not refused."""
    cfg = yaml.safe_load((CONFIGS / "axolotl-qlora-llama-3.1-8b.yml").read_text())
    f = tmp_path / "a.yml"
    f.write_text(yaml.safe_dump({**cfg, "optimizer": optim}))
    flags = [*EQUIVALENT["axolotl-qlora-llama-3.1-8b.yml"], "--optimizer", optim]
    assert json.loads(plan_json(capsys, "--from-config", str(f))) == json.loads(plan_json(capsys, *flags))


@pytest.mark.parametrize("extra,needles", [
    ({"num_generations": 8, "beta": 0.04}, ["beta, num_generations", "GRPO", "not SFT"]),
    ({"teacher_model_name_or_path": "Qwen/Qwen2.5-7B"}, ["teacher_model_name_or_path", "GKD"]),
    ({"beta": 0.1, "loss_type": ["sigmoid"]}, ["beta", "DPO"]),
])
def test_a_trl_file_for_another_trainer_is_refused_not_planned_as_sft(capsys, tmp_path, extra, needles):
    """TRL's DPO / GRPO / distillation command lines were planned as SFT, their telling keys 'ignored'."""
    cfg = yaml.safe_load((CONFIGS / "trl-lora-smollm2-1.7b.yaml").read_text())
    f = tmp_path / "t.yaml"
    f.write_text(yaml.safe_dump({**cfg, **extra}))
    rc, _, err = qplan(capsys, "estimate", "--from-config", str(f))
    assert rc == 2
    one_line(err, *needles)


def test_the_trl_objective_keys_are_trls_own():
    """``planner/interop/trl_objective_keys.json`` is what the installed TRL's config classes give (regenerate with
    ``python bench/trl_objective_keys.py`` when TRL is upgraded)."""
    pytest.importorskip("trl")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import trl_objective_keys as T

    from qplan.planner.interop.trainer_configs import trl_objective_keys

    assert trl_objective_keys() == T.objective_keys()["keys"]
    assert {"num_generations", "teacher_model_name_or_path", "beta"} <= set(trl_objective_keys())


def test_a_llamafactory_megatron_bridge_file_is_refused(capsys, tmp_path):
    """LLaMA-Factory reads Megatron-Bridge arguments only when USE_MEGATRON_BRIDGE=1 trains with Megatron-Core: a file
    that carries them is not the HF Trainer's step (it was planned, with the keys 'ignored')."""
    cfg = yaml.safe_load((CONFIGS / "llamafactory-qlora-qwen2.5-7b.yaml").read_text())
    f = tmp_path / "mb.yaml"
    f.write_text(yaml.safe_dump({**cfg, "tensor_model_parallel_size": 1, "use_distributed_optimizer": True}))
    rc, _, err = qplan(capsys, "estimate", "--from-config", str(f))
    assert rc == 2
    one_line(err, "Megatron-Bridge", "tensor_model_parallel_size")


@pytest.mark.parametrize("name,edit,needle", [
    ("axolotl-qlora-llama-3.1-8b.yml", {"gradient_checkpointing_kwargs": {"use_reentrant": "yes"}}, "use_reentrant"),
    ("axolotl-qlora-llama-3.1-8b.yml", {"gradient_checkpointing_kwargs": [1, 2]}, "not a mapping"),
    ("llamafactory-qlora-qwen2.5-7b.yaml", {"use_reentrant_gc": "sometimes"}, "use_reentrant_gc"),
])
def test_a_bad_reentrancy_value_is_one_line(capsys, tmp_path, name, edit, needle):
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    f = tmp_path / name
    f.write_text(yaml.safe_dump({**cfg, **edit}))
    rc, _, err = qplan(capsys, "estimate", "--from-config", str(f))
    assert rc == 2
    one_line(err, needle)


@pytest.mark.parametrize("text,needle", [
    ("base_model: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "not a mapping"),
    ("learning_rate: 1\n", "cannot tell which trainer"),
    ("\xff\xfe", "not UTF-8"),
])
def test_a_bad_config_file_is_one_line(capsys, tmp_path, text, needle):
    f = tmp_path / "c.yml"
    f.write_bytes(text.encode("latin-1"))
    rc, _, err = qplan(capsys, "estimate", "--from-config", str(f))
    assert rc == 2
    one_line(err, needle)


def test_missing_model_and_config_is_one_line(capsys):
    rc, _, err = qplan(capsys, "estimate", "--r", "8")
    assert rc == 2
    one_line(err, "--model is required")


def test_fit_takes_the_model_and_fixed_settings_from_the_config(capsys):
    f = str(CONFIGS / "trl-lora-smollm2-1.7b.yaml")
    rc, a, err = qplan(capsys, "fit", "--from-config", f, "--gpu", "l4", "--format", "json")
    assert rc == 0, err
    rc, b, err = qplan(capsys, "fit", "--model", "HuggingFaceTB/SmolLM2-1.7B", "--gpu", "l4", "--r", "32", "--targets",
                       "all-linear", "--quant", "bf16", "--optimizer", "adamw_torch_fused", "--seq-len", "2048",
                       "--loss", "trl", "--format", "json")  # the file's loss too: TRL's fused LM head
    assert rc == 0, err
    assert a == b and json.loads(a)["best"] and json.loads(a)["loss"] == "trl"


def test_fit_searches_with_the_files_checkpointing_kind(capsys, tmp_path):
    """An axolotl file checkpoints reentrantly by default: ``qplan fit --from-config`` searches with that kind
    (its checkpointed rows say ``reentrant``), as ``--reentrant`` does."""
    cfg = yaml.safe_load((CONFIGS / "axolotl-qlora-llama-3.1-8b.yml").read_text())
    cfg.pop("gradient_checkpointing_kwargs")
    f = tmp_path / "a.yml"
    f.write_text(yaml.safe_dump(cfg))
    rc, out, err = qplan(capsys, "fit", "--from-config", str(f), "--gpu", "a100-80gb", "--format", "json")
    assert rc == 0, err
    kinds = {row["grad_ckpt"] for row in json.loads(out)["best"]}
    assert kinds <= {"reentrant", "off"} and "reentrant" in kinds


# ---------------------------------------------------------------------------------- export

#: (tool, flags of a plan that tool can run as planned)
EXPORTABLE = [
    ("axolotl", ["--model", "llama-3.1-8b", "--r", "32", "--seq-len", "2048", "--batch-size", "2",
                 "--optimizer", "paged_adamw_8bit"]),
    ("axolotl", ["--model", "qwen2.5-7b", "--quant", "bf16", "--targets", "q_proj,v_proj", "--no-grad-ckpt",
                 "--modules-to-save", "embed_tokens", "--dropout", "0.1"]),
    ("llamafactory", ["--model", "qwen2.5-7b", "--no-upcast", "--r", "8", "--alpha", "24", "--optimizer", "adamw_8bit"]),
    ("llamafactory", ["--model", "llama-3.2-3b", "--quant", "int8", "--no-upcast", "--targets", "all-linear", "--dora"]),
    # TRL 1.16's SFTTrainer always trains through its fused LM head
    ("trl", ["--model", "smollm2-1.7b", "--quant", "bf16", "--targets", "qv", "--batch-size", "4", "--rslora",
             "--loss", "trl"]),
    # SFTTrainer casts a quantized model's adapters to bf16, under fp16 autocast too
    ("trl", ["--model", "llama-3.2-3b", "--quant", "nf4", "--no-upcast", "--no-double-quant", "--compute-dtype", "fp16",
             "--loss", "trl", "--adapter-dtype", "bf16"]),
    # reentrant checkpointing is written back as each tool spells it (and non-reentrant where the tool's default is not)
    ("axolotl", ["--model", "llama-3.2-3b", "--reentrant"]),
    ("llamafactory", ["--model", "qwen2.5-7b", "--no-upcast", "--reentrant"]),
    # LLaMA-Factory without bf16/fp16: the dtype it infers, no mixed precision (a pure bf16 step)
    ("llamafactory", ["--model", "qwen2.5-7b", "--quant", "bf16", "--compute-dtype", "fp32"]),
    ("trl", ["--model", "smollm2-1.7b", "--quant", "bf16", "--reentrant", "--loss", "trl"]),
    # LLaMA-Factory's pure_bf16: adapters left in bf16, with and without bf16 autocast
    ("llamafactory", ["--model", "qwen2.5-7b", "--quant", "bf16", "--compute-dtype", "fp32", "--adapter-dtype", "bf16"]),
    ("llamafactory", ["--model", "qwen2.5-7b", "--quant", "bf16", "--adapter-dtype", "bf16"]),
]


def _export(capsys, tmp_path, tool, flags) -> tuple[Path, Path]:
    folder = tmp_path / f"export-{len(list(tmp_path.glob('export-*')))}"
    folder.mkdir()
    plan_file, cfg = folder / "plan.json", folder / f"{tool}.yaml"
    rc, _, err = qplan(capsys, "estimate", *flags, "--gpu", GPU, "--output", str(plan_file), "--format", "json")
    assert rc == 0, err
    rc, out, err = qplan(capsys, "export", str(plan_file), "--to", tool, "--output", str(cfg))
    assert rc == 0, err
    return plan_file, cfg


@pytest.mark.parametrize("tool,flags", EXPORTABLE, ids=lambda x: x if isinstance(x, str) else " ".join(x[:4]))
def test_export_then_import_gives_the_same_plan(capsys, tmp_path, tool, flags):
    plan_file, cfg = _export(capsys, tmp_path, tool, flags)
    rc, again, err = qplan(capsys, "estimate", "--from-config", str(cfg), "--gpu", GPU, "--format", "json")
    assert rc == 0, err
    original, back = json.loads(plan_file.read_text()), json.loads(again)
    source = back.pop("trainer_config")
    assert source["path"] == str(cfg) and source["format"] == tool
    assert not [w for w in source["warnings"] if w["kind"] == "ignored"]  # everything export writes, import reads
    for doc in (original, back):
        doc.pop("seal")
    if original["lora"]["targets"] in ("qv", "attn", "mlp") and tool != "trl":
        # a preset the tool cannot spell comes back as the modules it resolved to: same modules, same bytes
        assert back["lora"]["targets"] == ",".join(original["lora"]["target_modules"])
        back["lora"]["targets"] = original["lora"]["targets"]
    assert back["model"]["name"] == original["model"]["name"]
    assert json.dumps(back, sort_keys=True) == json.dumps(original, sort_keys=True)
    assert "keys qplan does not plan" not in err  # everything export writes, import reads


def _documented_keys(name: str) -> set[str]:
    return set(json.loads((FIX / "trainer_keys" / name).read_text())["keys"])


@pytest.mark.parametrize("tool,keys", [("axolotl", "axolotl-0.19.0.json"), ("llamafactory", "llamafactory-0.9.5.json")])
def test_exported_keys_are_the_tools_own(capsys, tmp_path, tool, keys):
    """axolotl and LLaMA-Factory cannot be installed beside qplan's pins (their resolvers conflict:
    README); their configs are checked against the keys their own config classes declare."""
    known = _documented_keys(keys)
    for t, flags in EXPORTABLE:
        if t == tool:
            cfg = yaml.safe_load(_export(capsys, tmp_path, t, flags)[1].read_text())
            assert set(cfg) <= known, set(cfg) - known
    fixture = next(CONFIGS.glob(f"{tool}-*"))
    assert set(yaml.safe_load(fixture.read_text())) <= known  # the fixture is a real config of the tool


AXOLOTL_CHECK = """
import sys, yaml
from axolotl.utils.schemas.config import AxolotlInputConfig
for f in sys.argv[1:]:
    AxolotlInputConfig(**yaml.safe_load(open(f)))
print("ok")
"""


def test_axolotl_accepts_the_export_and_the_fixtures(capsys, tmp_path):
    """axolotl 0.19.0's own config schema (from .oracles/axolotl, scripts/setup-oracles.sh: axolotl's pins cannot
    live in qplan's venv) validates every axolotl export and fixture."""
    oracle = Path(__file__).resolve().parents[2] / ".oracles" / "axolotl"
    if not (oracle / "axolotl").is_dir():
        pytest.skip(f"axolotl is not installed in {oracle}: run scripts/setup-oracles.sh")
    files = [str(_export(capsys, tmp_path, t, f)[1]) for t, f in EXPORTABLE if t == "axolotl"]
    files += [str(p) for p in CONFIGS.glob("axolotl-*")]
    env = dict(os.environ, PYTHONPATH=str(oracle), AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", AXOLOTL_CHECK, *files], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


TRL_CHECK = """
import sys, yaml
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser
for f in sys.argv[1:]:
    cfg = yaml.safe_load(open(f))
    # use_cpu: the CI machine has no GPU, and TrainingArguments refuses bf16/fp16 without one otherwise
    script, sft, model = TrlParser((ScriptArguments, SFTConfig, ModelConfig)).parse_dict({**cfg, "use_cpu": True},
                                                                                       allow_extra_keys=False)
    assert model.use_peft and model.model_name_or_path == cfg["model_name_or_path"], f
    assert sft.per_device_train_batch_size == cfg["per_device_train_batch_size"] and sft.optim == cfg["optim"], f
print("ok")
"""


def test_trl_parses_the_export_and_the_fixtures(capsys, tmp_path):
    pytest.importorskip("trl")
    files = [str(_export(capsys, tmp_path, t, f)[1]) for t, f in EXPORTABLE if t == "trl"]
    files += [str(p) for p in CONFIGS.glob("trl-*")]
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", TRL_CHECK, *files], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


@pytest.mark.parametrize("tool,flags,needle", [
    ("llamafactory", ["--model", "llama-3.2-3b"], "--no-upcast"),
    ("axolotl", ["--model", "llama-3.2-3b", "--no-upcast"], "--upcast"),
    ("trl", ["--model", "llama-3.2-3b", "--quant", "bf16", "--bias", "all"], "bias"),
    ("axolotl", ["--model", "llama-3.2-3b", "--quant", "fp32", "--compute-dtype", "bf16"], "--quant equal to"),
    ("trl", ["--model", "smollm2-135m", "--backend", "unsloth"], "unsloth"),
    ("trl", ["--model", "smollm2-135m", "--quant", "bf16"], "--loss trl"),  # SFTTrainer fuses the head
    ("axolotl", ["--model", "smollm2-135m", "--loss", "trl"], "export it --to trl"),
    ("trl", ["--model", "smollm2-135m", "--no-upcast", "--loss", "trl"], "--adapter-dtype bf16"),  # TRL would cast
    ("axolotl", ["--model", "smollm2-135m", "--adapter-dtype", "bf16"], "--adapter-dtype fp32"),
    ("llamafactory", ["--model", "smollm2-135m", "--no-upcast", "--adapter-dtype", "bf16"], "pure_bf16"),
])
def test_a_plan_a_tool_cannot_run_as_planned_is_not_exported(capsys, tmp_path, tool, flags, needle):
    plan_file = tmp_path / "plan.json"
    rc, _, err = qplan(capsys, "estimate", *flags, "--output", str(plan_file), "--format", "json")
    assert rc == 0, err
    rc, out, err = qplan(capsys, "export", str(plan_file), "--to", tool, "--output", str(tmp_path / "c.yaml"))
    assert rc == 2 and not (tmp_path / "c.yaml").exists()
    one_line(err, needle)


def test_export_never_overwrites_without_force(capsys, tmp_path):
    plan_file, cfg = _export(capsys, tmp_path, "trl", next(f for t, f in EXPORTABLE if t == "trl"))
    cfg.write_text("mine\n")
    rc, _, err = qplan(capsys, "export", str(plan_file), "--to", "trl", "--output", str(cfg))
    assert rc == 2 and cfg.read_text() == "mine\n"
    one_line(err, "already exists")
    rc, _, err = qplan(capsys, "export", str(plan_file), "--to", "trl", "--output", str(cfg), "--force")
    assert rc == 0 and cfg.read_text().startswith("# TRL")


def test_from_config_on_a_bundled_model_does_not_import_torch():
    from test_architecture import BLOCKER

    code = BLOCKER + ("from qplan.cli.main import main\n"
                      f"rc = main(['estimate', '--from-config', {str(CONFIGS / 'trl-qlora-llama-3.2-3b.json')!r}, "
                      "'--format', 'json'])\n"
                      "assert rc == 0\nassert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', "
                      "'peft')]\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.parametrize("name,key,length,bound", [
    # axolotl 0.19.0 core/builders/causal.py: pad_to_multiple_of 64 unless pad_to_sequence_len is false
    ("axolotl-qlora-llama-3.1-8b.yml", "sequence_len", 1000, 1024),
    # llamafactory 0.9.5 train/sft/workflow.py: pad_to_multiple_of=8 if do_train
    ("llamafactory-qlora-qwen2.5-7b.yaml", "cutoff_len", 1001, 1008),
])
def test_a_config_without_readable_data_is_planned_at_its_collators_bound(capsys, tmp_path, name, key, length, bound):
    """Without data qplan can read, every batch is planned at the longest a sample can be, padded as the tool's
    collator pads it; the warning says so. axolotl with pad_to_sequence_len: false pads to the longest only."""
    text = (CONFIGS / name).read_text()
    f = tmp_path / name
    lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key}:")]
    f.write_text("\n".join(lines) + f"\n{key}: {length}\n")
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(f), "--gpu", GPU, "--format", "json")
    assert rc == 0, err
    assert json.loads(out)["training"]["seq_len"] == bound
    assert "planned at its bound" in err and str(bound) in err
    if name.startswith("axolotl"):
        f.write_text(f.read_text() + "pad_to_sequence_len: false\n")
        rc, out, err = qplan(capsys, "estimate", "--from-config", str(f), "--gpu", GPU, "--format", "json")
        assert rc == 0 and json.loads(out)["training"]["seq_len"] == length


@pytest.mark.parametrize("extra,needle", [
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be at least 1, got 0"),
    ({"pad_to_multiple_of": -5}, "pad_to_multiple_of must be at least 1, got -5"),
    ({"pad_to_multiple_of": "x"}, "pad_to_multiple_of must be int"),
    ({"sample_packing": 3}, "sample_packing must be true or false, got 3"),
    ({"pad_to_sequence_len": "x"}, "pad_to_sequence_len must be true or false"),
    ({"excess_length_strategy": 5}, "excess_length_strategy 5 is not planned"),
    ({"datasets": "x"}, "datasets must be a list of mappings"),
])
def test_hostile_axolotl_data_keys_are_one_line(capsys, tmp_path, extra, needle):
    """The keys that shape axolotl's batches, given values axolotl would not take: one line, exit 2, whether or not
    the dataset is readable (they used to be taken as truthy, or 0 as the default 64)."""
    cfg = yaml.safe_load((CONFIGS / "axolotl-qlora-llama-3.1-8b.yml").read_text())
    f = tmp_path / "axolotl.yml"
    f.write_text(yaml.safe_dump({**cfg, **extra}))
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(f))
    assert rc == 2 and out == ""
    one_line(err, needle)


def test_llamafactory_export_refuses_an_fp32_step(capsys, tmp_path):
    """LLaMA-Factory never trains in fp32 (without bf16/fp16 it infers bf16 and runs a pure bf16 step): an fp32 plan
    is refused in one line, not written as a file that would run something else."""
    plan_file = tmp_path / "plan.json"
    rc, _, err = qplan(capsys, "estimate", "--model", "qwen2.5-7b", "--quant", "fp32", "--compute-dtype", "fp32",
                       "--output", str(plan_file), "--format", "json")
    assert rc == 0, err
    rc, _, err = qplan(capsys, "export", str(plan_file), "--to", "llamafactory", "--output", str(tmp_path / "lf.yaml"))
    assert rc == 2 and not (tmp_path / "lf.yaml").exists()
    one_line(err, "never fp32")


def test_trl_label_smoothing_is_planned_with_the_full_logits(capsys, tmp_path):
    """TRL 1.16's SFTTrainer takes the loss from a full-logits forward when label smoothing is on (sft_trainer.py
    compute_loss), else from its fused LM head."""
    f = tmp_path / "trl.yaml"
    f.write_text((CONFIGS / "trl-lora-smollm2-1.7b.yaml").read_text() + "label_smoothing_factor: 0.1\n")
    doc = plan_doc(capsys, "--from-config", str(f))
    assert "loss" not in doc["training"]
    assert any("label_smoothing_factor" in w["text"] for w in doc["trainer_config"]["warnings"])


@pytest.mark.parametrize("value", ["-1", ".nan", "1.5"])
def test_trl_label_smoothing_out_of_range_is_one_line(capsys, tmp_path, value):
    f = tmp_path / "trl.yaml"
    f.write_text((CONFIGS / "trl-lora-smollm2-1.7b.yaml").read_text() + f"label_smoothing_factor: {value}\n")
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(f))
    assert rc == 2 and out == ""
    one_line(err, "label_smoothing_factor must be in [0, 1)")
