"""A TRL config read with ``--objective grpo`` (``planner.interop.trl_objectives.read_grpo``): TRL 1.16's own
``GRPOConfig`` parser is the oracle that the file is a GRPO config; the plan it reads is the plan of the same settings
as flags, byte for byte; what GRPO's keys change that qplan does not plan is one line or a warning."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from test_trainer_configs import CONFIGS, one_line, plan_json, qplan

FIXTURE = CONFIGS / "grpo-trl-qlora-qwen2.5-0.5b.yaml"
GRPO_CHECK = """
import sys, yaml
from trl import GRPOConfig, ModelConfig, ScriptArguments, TrlParser
for f in sys.argv[1:]:
    cfg = yaml.safe_load(open(f))
    cfg.pop("max_prompt_length", None)  # older TRL's key: 1.16's GRPOConfig has none
    script, grpo, model = TrlParser((ScriptArguments, GRPOConfig, ModelConfig)).parse_dict({**cfg, "use_cpu": True},
                                                                                         allow_extra_keys=False)
    assert model.use_peft and model.load_in_4bit and grpo.num_generations == cfg["num_generations"]
    assert grpo.steps_per_generation == cfg["gradient_accumulation_steps"] and grpo.disable_dropout is False, f
print("ok")
"""
FLAGS = ["--model", "qwen2.5-0.5b", "--objective", "grpo", "--quant", "nf4", "--compute-dtype", "bf16",
         "--adapter-dtype", "bf16", "--batch-size", "8", "--grad-accum", "2", "--num-generations", "8",
         "--max-completion-length", "1024", "--max-prompt-length", "256", "--r", "16", "--alpha", "32",
         "--dropout", "0.05", "--targets", "all-linear", "--no-double-quant", "--no-upcast", "--optimizer", "adamw_torch_fused"]


def _variant(tmp_path, **extra) -> str:
    f = tmp_path / "grpo.yaml"
    cfg = {**yaml.safe_load(FIXTURE.read_text()), **extra}
    f.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))
    return str(f)


def test_the_fixture_is_trls_grpo_config():
    pytest.importorskip("trl")
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", GRPO_CHECK, str(FIXTURE)], capture_output=True,
                       text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


def test_the_file_plans_what_its_flags_plan(capsys):
    assert plan_json(capsys, "--from-config", str(FIXTURE), "--objective", "grpo") == plan_json(capsys, *FLAGS)


def test_generation_batch_size_and_no_effect_keys(capsys, tmp_path):
    """``generation_batch_size`` 32 over a batch of 8 is 4 steps per generation; the loss's own keys change nothing."""
    f = _variant(tmp_path, generation_batch_size=32, epsilon=0.3, loss_type="grpo", scale_rewards="batch")
    flags = [*FLAGS, "--steps-per-generation", "4"]
    assert plan_json(capsys, "--from-config", f, "--objective", "grpo") == plan_json(capsys, *flags)


def test_sampling_settings_are_warned_about(capsys, tmp_path):
    rc, out, err = qplan(capsys, "estimate", "--from-config", _variant(tmp_path, temperature=0.7, top_p=0.95),
                         "--objective", "grpo", "--format", "json")
    assert rc == 0, err
    texts = [w["text"] for w in __import__("json").loads(out)["trainer_config"]["warnings"]]
    assert any("temperature: 0.7 adds a logits processor" in t for t in texts)
    assert any("top_p: 0.95" in t for t in texts)


@pytest.mark.parametrize("extra,needles", [
    ({"use_vllm": True, "vllm_tensor_parallel_size": 2}, ["vllm_tensor_parallel_size: 2"]),
    ({"use_transformers_paged": True}, ["use_transformers_paged: True", "continuous batching"]),
    ({"num_iterations": 2}, ["num_iterations: 2"]),
    ({"generation_batch_size": 12}, ["generation_batch_size 12 must be a multiple of the global batch (8)"]),
    ({"num_generations": 3}, ["divisible by --num-generations 3"]),
    ({"loss_type": "ppo"}, ["loss_type 'ppo'"]),
    ({"use_peft": False, "load_in_4bit": False}, ["use_peft is not true (full fine-tuning), which is not planned"]),
    ({"use_vllm": True, "vllm_enable_sleep_mode": "maybe"}, ["vllm_enable_sleep_mode must be true or false"]),
])
def test_what_grpo_keys_change_that_is_not_planned_is_one_line(capsys, tmp_path, extra, needles):
    rc, out, err = qplan(capsys, "estimate", "--from-config", _variant(tmp_path, **extra), "--objective", "grpo")
    assert rc == 2 and out == ""
    one_line(err, *needles)


def test_a_grpo_file_read_as_sft_points_to_objective_grpo(capsys):
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(FIXTURE))
    assert rc == 2
    one_line(err, "a GRPO config? plan it with --objective grpo")


@pytest.mark.parametrize("extra,flags", [
    ({"use_vllm": True}, ["--vllm", "colocate"]),
    ({"use_vllm": True, "vllm_gpu_memory_utilization": 0.5, "vllm_enable_sleep_mode": True},
     ["--vllm", "colocate", "--vllm-gpu-memory-utilization", "0.5", "--vllm-sleep"]),
    ({"use_vllm": True, "vllm_mode": "server", "vllm_server_host": "10.0.0.2"}, ["--vllm", "server"]),
])
def test_vllm_keys_plan_as_the_vllm_flags(capsys, tmp_path, extra, flags):
    """TRL's vLLM keys are the --vllm flags (colocate's utilization TRL's 0.3 unless given)."""
    f = _variant(tmp_path, **extra)
    assert plan_json(capsys, "--from-config", f, "--objective", "grpo") == plan_json(capsys, *FLAGS, *flags)
