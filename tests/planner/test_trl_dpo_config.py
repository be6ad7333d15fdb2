"""A TRL config read with ``--objective dpo`` (``planner.interop.trl_objectives``): TRL 1.16's own ``DPOConfig`` parser is the
oracle that the file is a DPO config; the plan it reads is the plan of the same settings as flags, byte for byte; what
DPO's keys change that qplan does not plan is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from test_trainer_configs import CONFIGS, one_line, plan_json, qplan

FIXTURE = CONFIGS / "dpo-trl-lora-qwen2.5-0.5b.yaml"
#: the fixture as flags: TRL's ModelConfig/DPOConfig defaults where the file is silent (dtype float32 under bf16
#: autocast, lora_dropout 0.05 that disable_dropout zeroes, PEFT's default targets for Qwen2, max_length 1024,
#: gradient checkpointing on, adamw_torch_fused, sdpa), the fused LM head DPOTrainer always uses
FLAGS = ["--model", "Qwen/Qwen2.5-0.5B-Instruct", "--objective", "dpo", "--quant", "fp32", "--compute-dtype", "bf16",
         "--no-upcast", "--r", "32", "--alpha", "16", "--dropout", "0", "--targets", "qv", "--batch-size", "2",
         "--seq-len", "1024", "--grad-accum", "8", "--grad-ckpt", "--optimizer", "adamw_torch_fused", "--attn", "sdpa",
         "--loss", "trl"]

DPO_CHECK = """
import sys, yaml
from trl import DPOConfig, ModelConfig, ScriptArguments, TrlParser
for f in sys.argv[1:]:
    cfg = yaml.safe_load(open(f))
    script, dpo, model = TrlParser((ScriptArguments, DPOConfig, ModelConfig)).parse_dict({**cfg, "use_cpu": True},
                                                                                       allow_extra_keys=False)
    assert model.use_peft and dpo.per_device_train_batch_size == cfg["per_device_train_batch_size"], f
    assert dpo.disable_dropout is cfg.get("disable_dropout", True) and dpo.max_length == cfg.get("max_length", 1024), f
    assert dpo.precompute_ref_log_probs is cfg.get("precompute_ref_log_probs", False), f
    assert dpo.precompute_ref_batch_size == cfg.get("precompute_ref_batch_size"), f
print("ok")
"""


def _variant(tmp_path, **extra) -> str:
    f = tmp_path / "dpo.yaml"
    f.write_text(yaml.safe_dump({**yaml.safe_load(FIXTURE.read_text()), **extra}))
    return str(f)


def test_the_fixture_and_its_dpo_key_variants_are_trls_dpo_configs(tmp_path):
    pytest.importorskip("trl")
    files = [str(FIXTURE)]
    for i, extra in enumerate([{"beta": 0.05, "loss_type": ["sigmoid"], "label_smoothing": 0.1, "max_length": 512},
                               {"disable_dropout": False, "lora_dropout": 0.0, "padding_free": True},
                               {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 8}]):
        (tmp_path / str(i)).mkdir()
        files.append(_variant(tmp_path / str(i), **extra))
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", DPO_CHECK, *files], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


def test_trls_dpo_example_plans_as_its_flags_do(capsys):
    assert plan_json(capsys, "--from-config", str(FIXTURE), "--objective", "dpo") == plan_json(capsys, *FLAGS)
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(FIXTURE), "--objective", "dpo", "--format", "json")
    assert rc == 0
    texts = [w["text"] for w in json.loads(out)["trainer_config"]["warnings"]]
    assert any("lora_dropout 0.05 does nothing: disable_dropout" in t for t in texts)
    assert any("not read as preference pairs" in t for t in texts)


def test_dpo_keys_with_no_memory_term_plan_the_same(capsys, tmp_path):
    f = _variant(tmp_path, beta=0.05, loss_type="sigmoid", label_smoothing=0.1, use_weighting=True, padding_free=True,
                 disable_dropout=False, lora_dropout=0.0)
    assert plan_json(capsys, "--from-config", f, "--objective", "dpo") == plan_json(capsys, *FLAGS)


@pytest.mark.parametrize("extra,needles", [
    ({"precompute_ref_log_probs": "yes"}, ["precompute_ref_log_probs must be true or false"]),
    ({"precompute_ref_log_probs": 1}, ["precompute_ref_log_probs must be true or false"]),
    ({"precompute_ref_log_probs": True, "precompute_ref_batch_size": 0}, ["precompute_ref_batch_size must be a positive"]),
    ({"beta": float("nan")}, ["beta must be a finite number"]),
    ({"lora_dropout": -1}, ["lora_dropout must be in [0, 1), got -1"]),
    ({"sync_ref_model": True}, ["sync_ref_model: True (TR-DPO)"]),
    ({"loss_type": ["sigmoid", "sft"]}, ["loss_type", "sigmoid loss"]),
    ({"loss_type": "ipo"}, ["loss_type 'ipo'"]),
    ({"disable_dropout": False}, ["disable_dropout: false keeps lora_dropout 0.05"]),
    ({"num_generations": 8}, ["num_generations", "GRPO", "not DPO"]),
])
def test_what_dpo_plans_do_not_cover_is_one_line(capsys, tmp_path, extra, needles):
    rc, _, err = qplan(capsys, "estimate", "--from-config", _variant(tmp_path, **extra), "--objective", "dpo")
    assert rc == 2
    one_line(err, *needles)


def test_a_dpo_file_without_peft_plans_full_fine_tuning_with_a_reference_model(capsys, tmp_path):
    """``use_peft`` not true: DPOTrainer trains the model itself and loads the reference from the same checkpoint (the
    plan's second copy of the weights); the LoRA keys do nothing."""
    flags = ["--model", "Qwen/Qwen2.5-0.5B-Instruct", "--objective", "dpo", "--full", "--quant", "fp32",
             "--compute-dtype", "bf16", "--batch-size", "2", "--seq-len", "1024", "--grad-accum", "8", "--grad-ckpt",
             "--optimizer", "adamw_torch_fused", "--attn", "sdpa", "--loss", "trl"]
    f = _variant(tmp_path, use_peft=False)
    assert plan_json(capsys, "--from-config", f, "--objective", "dpo") == plan_json(capsys, *flags)


def test_a_dpo_file_that_precomputes_the_reference_plans_the_pass(capsys, tmp_path):
    """``precompute_ref_log_probs`` and ``precompute_ref_batch_size`` plan as their flags (``DPOConfig``'s names)."""
    f = _variant(tmp_path, precompute_ref_log_probs=True, precompute_ref_batch_size=8)
    flags = [*FLAGS, "--precompute-ref-log-probs", "--precompute-ref-batch-size", "8"]
    assert plan_json(capsys, "--from-config", f, "--objective", "dpo") == plan_json(capsys, *flags)
    f = _variant(tmp_path, precompute_ref_batch_size=8)  # alone it does nothing: warned
    rc, out, _ = qplan(capsys, "estimate", "--from-config", f, "--objective", "dpo", "--format", "json")
    assert rc == 0 and "precompute_ref_log_probs" not in json.loads(out)["training"]
    assert any("precompute_ref_batch_size without" in w["text"] for w in json.loads(out)["trainer_config"]["warnings"])


def test_a_dpo_file_read_as_sft_points_to_the_objective_and_other_tools_are_refused(capsys, tmp_path):
    rc, _, err = qplan(capsys, "estimate", "--from-config", _variant(tmp_path, beta=0.1))
    assert rc == 2
    one_line(err, "beta", "a DPO config? plan it with --objective dpo")
    rc, _, err = qplan(capsys, "estimate", "--from-config", str(CONFIGS / "axolotl-qlora-llama-3.1-8b.yml"),
                       "--objective", "dpo")
    assert rc == 2
    one_line(err, "--objective dpo --from-config reads TRL configs", "rl: dpo: axolotl pins TRL 1.8.0")
