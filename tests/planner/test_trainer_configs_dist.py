"""Multi-GPU keys of trainer configs (``deepspeed``, ``fsdp``, ``fsdp_config``) as ``--strategy`` /
``--cpu-offload``: each realistic fixture in ``tests/fixtures/trainer_configs`` plans, with ``--gpus 2``,
byte for byte what the flags a person reads off it plan (written out by hand below); what qplan
cannot plan exactly is one line, exit 2."""

from __future__ import annotations

import json

import pytest
import yaml
from test_trainer_configs import CONFIGS, EQUIVALENT, GPU, one_line, plan_json, qplan

#: multi-GPU fixture -> (the single-GPU fixture it extends, the multi-GPU flags read off it and its JSON)
MULTI = {
    "axolotl-qlora-llama-3.1-8b-zero3.yml": ("axolotl-qlora-llama-3.1-8b.yml", ["--strategy", "zero3"]),
    "llamafactory-qlora-qwen2.5-7b-zero2-offload.yaml": ("llamafactory-qlora-qwen2.5-7b.yaml",
                                                          ["--strategy", "zero2", "--cpu-offload"]),
    "trl-lora-smollm2-1.7b-fsdp.yaml": ("trl-lora-smollm2-1.7b.yaml", ["--strategy", "fsdp"]),
}


@pytest.mark.parametrize("name", sorted(MULTI))
def test_a_multi_gpu_config_plans_what_its_flags_plan(capsys, name):
    single, dist = MULTI[name]
    from_file = plan_json(capsys, "--from-config", str(CONFIGS / name), "--gpus", "2")
    assert from_file == plan_json(capsys, *EQUIVALENT[single], *dist, "--gpus", "2")
    d = json.loads(from_file)["distributed"]
    assert (d["world_size"], d["strategy"]) == (2, dist[1])


def test_flags_override_the_files_strategy(capsys):
    f = str(CONFIGS / "axolotl-qlora-llama-3.1-8b-zero3.yml")
    flags = EQUIVALENT["axolotl-qlora-llama-3.1-8b.yml"]
    assert plan_json(capsys, "--from-config", f, "--gpus", "4", "--strategy", "fsdp") == \
        plan_json(capsys, *flags, "--gpus", "4", "--strategy", "fsdp")


def test_zero3_buffers_the_plan_does_not_model_are_named(capsys):
    rc, _, err = qplan(capsys, "estimate", "--from-config", str(CONFIGS / "axolotl-qlora-llama-3.1-8b-zero3.yml"),
                       "--gpus", "2", "--gpu", GPU, "--format", "json")
    assert rc == 0 and "ZeRO-3 buffers the plan does not model" in err and "stage3_prefetch_bucket_size" in err


def test_an_inline_deepspeed_dict_is_read(capsys, tmp_path):
    cfg = yaml.safe_load((CONFIGS / "trl-lora-smollm2-1.7b.yaml").read_text())
    f = tmp_path / "trl.yaml"
    f.write_text(yaml.safe_dump({**cfg, "deepspeed": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}}))
    assert plan_json(capsys, "--from-config", str(f), "--gpus", "2") == \
        plan_json(capsys, *EQUIVALENT["trl-lora-smollm2-1.7b.yaml"], "--strategy", "zero2", "--gpus", "2")


def test_a_relative_deepspeed_path_is_opened_from_the_working_directory(capsys, tmp_path, monkeypatch):
    """axolotl's examples name ``deepspeed_configs/zero2.json`` of the folder axolotl runs from (transformers and
    axolotl open the path as given): the working directory's file wins over one beside the config; without one
    there, the config's folder is used."""
    cfg = yaml.safe_load((CONFIGS / "trl-lora-smollm2-1.7b.yaml").read_text())
    conf_dir, run_dir = tmp_path / "examples", tmp_path / "repo"
    for d, stage in ((conf_dir, 3), (run_dir, 2)):
        (d / "deepspeed_configs").mkdir(parents=True)
        (d / "deepspeed_configs" / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    f = conf_dir / "trl.yaml"
    f.write_text(yaml.safe_dump({**cfg, "deepspeed": "deepspeed_configs/ds.json"}))
    monkeypatch.chdir(run_dir)
    assert json.loads(plan_json(capsys, "--from-config", str(f), "--gpus", "2"))["distributed"]["strategy"] == "zero2"
    monkeypatch.chdir(tmp_path)
    assert json.loads(plan_json(capsys, "--from-config", str(f), "--gpus", "2"))["distributed"]["strategy"] == "zero3"


Z3 = json.loads((CONFIGS / "zero3.json").read_text())


def _zero(**over):
    return {**Z3, "zero_optimization": {**Z3["zero_optimization"], **over}}


@pytest.mark.parametrize("base,extra,ds,args,needles", [
    ("axolotl-qlora-llama-3.1-8b-zero3.yml", {}, None, [], ["zero3", "pass --gpus N"]),
    ("axolotl-qlora-llama-3.1-8b.yml", {"deepspeed": "nope.json"}, None, ["--gpus", "2"], ["'nope.json'", "cannot read"]),
    ("axolotl-qlora-llama-3.1-8b.yml", {"deepspeed": "ds.json"}, "{not json", ["--gpus", "2"], ["not a DeepSpeed JSON"]),
    ("axolotl-qlora-llama-3.1-8b.yml", {"deepspeed": "ds.json"}, _zero(stage=1), ["--gpus", "2"],
     ["zero_optimization.stage", "1"]),
    ("axolotl-qlora-llama-3.1-8b.yml", {"deepspeed": "ds.json"}, _zero(offload_optimizer={"device": "cpu"}), ["--gpus", "2"],
     ["zero_optimization.offload_param", "together"]),
    ("axolotl-qlora-llama-3.1-8b.yml", {"deepspeed": "ds.json"},
     _zero(offload_optimizer={"device": "nvme"}, offload_param={"device": "nvme"}), ["--gpus", "2"], ["'nvme'"]),
    ("llamafactory-qlora-qwen2.5-7b.yaml", {"deepspeed": "ds.json"},
     {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, ["--gpus", "2"], ["reduce_bucket_size", "'auto'"]),
    ("llamafactory-qlora-qwen2.5-7b.yaml", {"deepspeed": "ds.json"}, {"zero_optimization": {"stage": 2},
                                                                      "fp16": {"enabled": True}}, ["--gpus", "2"],
     ["fp16.enabled", "bf16"]),
    ("trl-lora-smollm2-1.7b.yaml", {"fsdp": "shard_grad_op auto_wrap", "fsdp_config": {"fsdp_version": 2}}, None,
     ["--gpus", "2"], ["shard_grad_op"]),
    ("trl-lora-smollm2-1.7b.yaml", {"fsdp": "hybrid_shard auto_wrap", "fsdp_config": {"fsdp_version": 2}}, None,
     ["--gpus", "2"], ["hybrid_shard"]),
    ("trl-lora-smollm2-1.7b.yaml", {"fsdp": "full_shard auto_wrap"}, None, ["--gpus", "2"], ["fsdp_version 1", "FSDP2"]),
    ("trl-lora-smollm2-1.7b.yaml", {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}, None, ["--gpus", "2"],
     ["auto_wrap_policy"]),
    ("trl-lora-smollm2-1.7b.yaml", {"fsdp": "full_shard auto_wrap", "deepspeed": {"zero_optimization": {"stage": 3}},
                                    "fsdp_config": {"fsdp_version": 2}}, None, ["--gpus", "2"], ["both set"]),
    ("trl-qlora-llama-3.2-3b.json", {"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 2}}, None,
     ["--gpus", "2"], ["bnb_4bit_quant_storage: float16"]),
    ("axolotl-qlora-llama-3.1-8b.yml", {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": False}}, None,
     ["--gpus", "2"], ["reshard_after_forward"]),
    ("axolotl-qlora-llama-3.1-8b.yml", {"tensor_parallel_size": 2}, None, ["--gpus", "2"], ["tensor_parallel_size"]),
])
def test_a_multi_gpu_setting_qplan_cannot_plan_is_one_line(capsys, tmp_path, base, extra, ds, args, needles):
    cfg = yaml.safe_load((CONFIGS / base).read_text()) if base.endswith(("yml", "yaml")) else \
        json.loads((CONFIGS / base).read_text())
    f = tmp_path / base
    if cfg.get("deepspeed") == "zero3.json":
        (tmp_path / "zero3.json").write_text(json.dumps(Z3))
    if ds is not None:
        (tmp_path / "ds.json").write_text(ds if isinstance(ds, str) else json.dumps(ds))
    f.write_text(yaml.safe_dump({**cfg, **extra}))
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(f), *args)
    assert rc == 2 and out == ""
    one_line(err, *needles)


def test_fit_refuses_a_files_strategy_instead_of_dropping_it(capsys):
    rc, out, err = qplan(capsys, "fit", "--from-config", str(CONFIGS / "trl-lora-smollm2-1.7b-fsdp.yaml"), "--gpu", "l4")
    assert rc == 2 and out == ""
    one_line(err, "fsdp", "--max-gpus")


def test_a_multi_gpu_plan_is_not_exported(capsys, tmp_path):
    plan_file = tmp_path / "plan.json"
    rc, _, err = qplan(capsys, "estimate", "--from-config", str(CONFIGS / "trl-lora-smollm2-1.7b-fsdp.yaml"), "--gpus", "2",
                       "--output", str(plan_file), "--format", "json")
    assert rc == 0, err
    rc, out, err = qplan(capsys, "export", str(plan_file), "--to", "trl", "--output", str(tmp_path / "c.yaml"))
    assert rc == 2 and not (tmp_path / "c.yaml").exists()
    one_line(err, "2 GPUs", "fsdp", "one-GPU plans only")
