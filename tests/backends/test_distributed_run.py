"""`qplan run` of multi-GPU plans: 2 CPU ranks (gloo) under torchrun, DDP and FSDP2, measured per rank.

Oracles: each rank's live-tensor tracker (its own process) against the plan's per-rank CPU-kernel
prediction (``memory_detail.tensor_peak_cpu``); plain PEFT reloading the saved adapter on one process
and a single-process PEFT model's adapter tensors (names, shapes, dtypes); accelerate's own config
loader for the generated GPU launch files (the GPU launch itself is not run here).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from backend_helpers import child_env, llama_spec, qplan_cmd, read_measured, write_plan  # noqa: E402
from qplan.backends import launch  # noqa: E402
from qplan.backends.runner import run_plan  # noqa: E402
from qplan.planner.errors import QPlanError  # noqa: E402

STEPS = 16


def dist_plan(strategy: str, **kw) -> dict:
    from qplan.planner.api import plan_dict

    opts = dict(model=llama_spec(), quant="bf16", grad_ckpt=True, backend="peft", batch_size=2, seq_len=64,
                optimizer="adamw_torch", r=16, targets="all-linear", dropout=0.05, gpus=2, strategy=strategy)
    opts.update(kw)
    return plan_dict(**opts)


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def trained(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    plan = dist_plan(request.param)
    result = run_plan(write_plan(d / "plan.json", plan), random_init=True, steps=STEPS, device="cpu",
                      out_dir=d / "runs")
    return request.param, result, read_measured(result["run_dir"]), plan


def test_two_ranks_train_and_loss_falls(trained):
    strategy, result, doc, _ = trained
    assert result["status"] == "ok", result["summary"]
    assert doc["run"]["world_size"] == 2 and doc["run"]["strategy"] == strategy
    assert [e["rank"] for e in doc["ranks"]] == [0, 1] and all(e["status"] == "ok" for e in doc["ranks"])
    assert doc["run"]["launcher"]["tool"] == "torchrun"
    assert (Path(result["run_dir"]) / "launch.sh").read_text().count("--nproc_per_node 2") == 1
    loss = doc["measured"]["loss"]
    assert len(loss) == STEPS
    first, last = sum(loss[:4]) / 4, sum(loss[-4:]) / 4
    print(f"\n[{strategy}] loss: first 4 steps {first:.4f}, last 4 steps {last:.4f}")
    assert last < first - 0.05
    # the trainer's arguments as it ran them: one process's batch, the plan's precision and optimizer
    assert doc["run"]["trainer"]["per_device_train_batch_size"] == 2 and doc["run"]["trainer"]["bf16"] is True


def test_each_rank_within_5_percent_of_the_per_rank_prediction(trained):
    strategy, result, doc, plan = trained
    predicted = plan["prediction"]["memory_detail"]["tensor_peak_cpu"]
    peaks = []
    for e in doc["ranks"]:
        measured = e["memory"]["tensor_peak"]
        err = (predicted - measured) / measured
        print(f"\n[{strategy}] rank {e['rank']}: predicted {predicted:,} B, measured {measured:,} B "
              f"({e['memory']['tensor_peak_phase']}, step {e['memory']['tensor_peak_step']}), error {err:+.2%}")
        assert e["error"]["tensor_peak"] == pytest.approx(err)
        assert abs(err) <= 0.05
        peaks.append(measured)
    assert doc["measured"]["memory"]["tensor_peak"] == max(peaks)  # the largest rank is the one compared
    assert doc["error"]["tensor_peak"] == pytest.approx((predicted - max(peaks)) / max(peaks))
    # per-rank static bytes: the rank's own (sharded, for FSDP) weights, to the byte
    assert doc["error"]["weights"] == 0.0 and doc["error"]["weights_footprint"] == 0.0
    slow = max(e["timing"]["mean_step_seconds"] for e in doc["ranks"])
    assert doc["measured"]["timing"]["mean_step_seconds"] == slow


def test_adapter_reloads_in_plain_peft_like_a_single_process_one(trained, tmp_path):
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qplan.backends.modelsrc import build_random_model_dir
    from qplan.hf import lora_config

    strategy, result, doc, plan = trained
    adapter_dir = Path(result["run_dir"]) / "adapter"
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert doc["measured"]["adapter_file_bytes"] == (adapter_dir / "adapter_model.safetensors").stat().st_size
    assert doc["error"]["adapter_file_bytes"] == 0.0
    base_dir = build_random_model_dir(plan["model"]["config"], tmp_path / "base", seed=0)
    # what one process's PEFT model saves: the same names, shapes and dtypes (full, not shards)
    single = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16),
                            lora_config(plan["lora"]))
    single.save_pretrained(tmp_path / "single", safe_serialization=True)
    ref = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert {k: (tuple(v.shape), v.dtype) for k, v in saved.items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in ref.items()}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    x = torch.randint(3, 259, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = base(input_ids=x).logits.float()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    live = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    for key, tensor in saved.items():
        assert torch.equal(live[key.replace(".weight", ".default.weight")], tensor), key
    assert all(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)  # B starts at zero: it trained
    with torch.no_grad():
        assert (model(input_ids=x).logits.float() - before).abs().max() > 1e-3


def test_report_has_a_row_per_rank(trained):
    strategy, result, doc, _ = trained
    md = (Path(result["run_dir"]) / "report.md").read_text()
    assert "## Ranks" in md and f"2 ranks ({strategy}" in md
    assert md.count("| ok |") == 2
    assert "class='ranks'" in (Path(result["run_dir"]) / "report.html").read_text()


def test_a_failing_rank_ends_the_others_and_is_recorded(tmp_path):
    plan_file = write_plan(tmp_path / "plan.json", dist_plan("fsdp"))
    out = tmp_path / "runs"
    res = subprocess.run(qplan_cmd("run", str(plan_file), "--random-init", "--steps", "4", "--device", "cpu",
                                   "--out-dir", str(out)),
                         env=child_env(QPLAN_CALLBACKS="faults:OomOnRank1AtStep2"), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "status: oom — rank 1: OOM at step 2 in phase forward: OutOfMemoryError: simulated" in res.stdout
    assert "Traceback" not in res.stderr  # torchrun's failure summary, no Python stack
    run = next(p for p in out.iterdir() if p.is_dir())
    doc = read_measured(run)
    assert doc["status"] == "oom" and doc["failure"]["rank"] == 1 and doc["failure"]["step"] == 2
    r0, r1 = doc["ranks"]
    assert r1["status"] == "oom" and r1["failure"]["kind"] == "oom"
    assert r0["status"] == "ended" and r0["failure"]["message"].startswith(
        ("rank 0 was ended by the launcher after rank 1 failed", "rank 0 stopped after rank 1 failed"))
    print("rank 0:", r0["failure"]["message"])
    assert not (run / "adapter").exists()
    assert "status: **oom** — rank 1: OOM at step 2" in (run / "report.md").read_text()
    assert (run / "report.html").is_file()


# ------------------------------------------------------------------------------ refusals (no ranks start)


@pytest.mark.parametrize("plan_kw, device, needle", [
    (dict(gpus=1, nodes=2, strategy="ddp"), "cuda", "this plan has 2 nodes: on GPUs start each machine's node"),
    (dict(strategy="zero2"), "cpu", "--strategy zero2 cannot train on the CPU here"),
    (dict(gpus=64, strategy="ddp"), "cpu", "the plan has 64 ranks but this machine has"),
    (dict(strategy="fsdp", cpu_offload=True), "cpu", "--cpu-offload moves GPU memory to the host"),
    (dict(strategy="ddp"), "cuda:1", "--device cuda:1 names one GPU"),
])
def test_refused_before_any_run_folder(tmp_path, capsys, plan_kw, device, needle):
    from qplan.cli.main import main

    plan_file = write_plan(tmp_path / "plan.json", dist_plan(**plan_kw))
    out = tmp_path / "runs"
    rc = main(["run", str(plan_file), "--random-init", "--device", device, "--out-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------ the GPU launch files


@pytest.mark.parametrize("strategy, offload", [("ddp", False), ("fsdp", False), ("fsdp", True), ("zero2", True),
                                               ("zero3", False)])
def test_generated_gpu_launch_files_load_in_accelerate(tmp_path, monkeypatch, strategy, offload):
    """What `qplan run` would start on GPUs: accelerate's own loader reads the config (the GPU launch
    itself is untested here: no GPU in CI). The files name each other relative to the run folder, where
    the launch runs, so a moved folder still launches: read here from a copy in another folder."""
    import shutil

    from accelerate.commands.config.config_args import load_config_from_file

    plan = dist_plan(strategy, gpus=4, cpu_offload=offload)
    made = tmp_path / "run.partial"
    made.mkdir()
    (cmd,) = launch.write_launch_files(made, plan, "cuda", "/usr/bin/python3")
    run = tmp_path / "moved" / "run"
    shutil.copytree(made, run)
    shutil.rmtree(made)
    monkeypatch.chdir(run)
    assert cmd[:3] == ["/usr/bin/python3", "-m", "accelerate.commands.launch"]
    assert cmd[3:5] == ["--config_file", "accelerate_config.yaml"]
    assert cmd[-3:] == ["-m", "qplan.backends.worker", "job.json"]
    assert str(tmp_path) not in "".join(p.read_text() for p in run.iterdir())
    cfg = load_config_from_file(cmd[4])
    assert cfg.num_processes == 4 and cfg.num_machines == 1 and cfg.use_cpu is False
    assert cfg.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(strategy, "DEEPSPEED")
    if strategy == "fsdp":
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_offload_params"] is offload
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert str(getattr(cfg.mixed_precision, "value", cfg.mixed_precision)) == "bf16"
    if strategy.startswith("zero"):
        ds = json.loads(Path(cfg.deepspeed_config["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == int(strategy[-1])
        assert ("offload_optimizer" in ds["zero_optimization"]) is offload
        assert ds["bf16"]["enabled"] is True
    sh = (run / "launch.sh").read_text().splitlines()
    assert sh[-2] == 'cd "$(dirname "$0")" || exit 1'
    assert sh[-1].startswith("exec /usr/bin/python3 -m accelerate.commands.launch --config_file accelerate_config.yaml")


def test_check_launchable_counts_gpus():
    with pytest.raises(QPlanError, match="the plan has 2 ranks but torch sees 1 GPU"):
        launch.check_launchable(dist_plan("fsdp"), "cuda", 64, 1)
    launch.check_launchable(dist_plan("zero3"), "cuda", 1, 2)  # ZeRO on GPUs: allowed


def test_root_cause_from_torchrun_summary():
    text = ("Root Cause (first observed failure):\n[0]:\n  time      : x\n  host      : h\n"
            "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 7)\n")
    assert launch.root_cause(text) == (1, -9)
    assert launch.root_cause("no summary") is None
