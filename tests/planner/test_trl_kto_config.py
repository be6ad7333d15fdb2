"""A TRL config read with ``--objective kto`` (``planner.interop.trl_objectives``): TRL 1.16's own ``KTOConfig`` parser
is the oracle that the file is a KTO config; the plan it reads is the plan of the same settings as flags, byte for
byte; what KTO's keys change that qplan does not plan is one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from test_trainer_configs import CONFIGS, one_line, plan_json, qplan

FIXTURE = CONFIGS / "kto-trl-qlora-qwen2.5-0.5b.yaml"
KTO_CHECK = """
import sys, yaml
from trl import KTOConfig, ModelConfig, ScriptArguments, TrlParser
for f in sys.argv[1:]:
    cfg = yaml.safe_load(open(f))
    script, kto, model = TrlParser((ScriptArguments, KTOConfig, ModelConfig)).parse_dict({**cfg, "use_cpu": True},
                                                                                       allow_extra_keys=False)
    assert model.use_peft and model.load_in_4bit and kto.per_device_train_batch_size == cfg["per_device_train_batch_size"]
    assert kto.disable_dropout is cfg.get("disable_dropout", True) and kto.max_length == cfg.get("max_length", 1024), f
print("ok")
"""


def _variant(tmp_path, **extra) -> str:
    f = tmp_path / "kto.yaml"
    f.write_text(yaml.safe_dump({**yaml.safe_load(FIXTURE.read_text()), **extra}))
    return str(f)


def test_the_fixture_and_its_kto_key_variants_are_trls_kto_configs(tmp_path):
    pytest.importorskip("trl")
    files = [str(FIXTURE), _variant(tmp_path, beta=0.05, desirable_weight=1.33, undesirable_weight=1.0,
                                    loss_type="kto", max_length=512)]
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", KTO_CHECK, *files], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]


def test_trls_kto_example_plans_as_kto(capsys):
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(FIXTURE), "--objective", "kto", "--format", "json")
    assert rc == 0, err
    plan = json.loads(out)
    t = plan["training"]
    assert (t["objective"], t["loss"], t["batch_size"], t["seq_len"]) == ("kto", "trl", 4, 1024)
    assert plan["quant"]["quant"] == "nf4" and plan["lora"]["adapter_dtype"] == "bfloat16"  # KTOTrainer's QLoRA cast
    assert plan["lora"]["dropout"] == 0.0 and plan["lora"]["r"] == 16
    texts = [w["text"] for w in plan["trainer_config"]["warnings"]]
    assert any("lora_dropout 0.05 does nothing: disable_dropout (KTOConfig's default)" in t for t in texts)
    assert any("not read as unpaired rows" in t for t in texts)


def test_kto_keys_with_no_memory_term_plan_the_same(capsys, tmp_path):
    f = _variant(tmp_path, beta=0.05, desirable_weight=1.33, undesirable_weight=0.8, loss_type="kto")
    assert plan_json(capsys, "--from-config", f, "--objective", "kto") == plan_json(
        capsys, "--from-config", str(FIXTURE), "--objective", "kto")


@pytest.mark.parametrize("extra,needles", [
    ({"precompute_ref_log_probs": 1.5}, ["precompute_ref_log_probs must be true or false"]),
    ({"loss_type": "apo_zero_unpaired"}, ["loss_type 'apo_zero_unpaired'", "KTO's kto loss"]),
    ({"disable_dropout": False}, ["disable_dropout: false keeps lora_dropout 0.05", "KTO is planned"]),
    ({"label_smoothing": 0.1}, ["label_smoothing", "DPO", "not KTO"]),
    ({"per_device_train_batch_size": 1}, ["KTOTrainer refuses it"]),
])
def test_what_kto_keys_change_that_is_not_planned_is_one_line(capsys, tmp_path, extra, needles):
    rc, out, err = qplan(capsys, "estimate", "--from-config", _variant(tmp_path, **extra), "--objective", "kto")
    assert rc == 2 and out == ""
    one_line(err, *needles)


def test_a_kto_file_read_as_sft_points_to_objective_kto(capsys, tmp_path):
    rc, out, err = qplan(capsys, "estimate", "--from-config", _variant(tmp_path, desirable_weight=1.0))
    assert rc == 2
    one_line(err, "a KTO config? plan it with --objective kto")
