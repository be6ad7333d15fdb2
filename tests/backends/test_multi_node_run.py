"""`qplan run` of plans of several nodes: 2 nodes x 1 CPU rank (FSDP2, gloo) through torchrun's c10d rendezvous on
loopback — every node on this host from one `qplan run`, one `qplan run --node-rank N` per node as on separate
machines, and the written SLURM script under stand-in ``srun``/``scontrol``.

Oracles: each rank's live-tensor tracker (its own process) against the plan's per-rank prediction; the launchers'
real exit codes for a node killed mid-run; accelerate's own config loader and argument parser for the GPU launch.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from backend_helpers import child_env, llama_spec, qplan_cmd, read_measured, write_plan  # noqa: E402
from qplan.backends import launch, nodes  # noqa: E402
from qplan.backends.runner import run_plan  # noqa: E402

STEPS = 8


def node_plan(**kw) -> dict:
    from qplan.planner.api import plan_dict

    opts = dict(model=llama_spec(), quant="bf16", grad_ckpt=True, backend="peft", batch_size=2, seq_len=64,
                optimizer="adamw_torch", r=16, targets="all-linear", dropout=0.05, gpus=1, nodes=2, strategy="fsdp")
    opts.update(kw)
    return plan_dict(**opts)


def port() -> int:
    return nodes.free_port()


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    d = tmp_path_factory.mktemp("loopback")
    plan = node_plan()
    result = run_plan(write_plan(d / "plan.json", plan), random_init=True, steps=STEPS, device="cpu",
                      out_dir=d / "runs")
    return result, read_measured(result["run_dir"]), plan, d


def test_every_node_on_this_host_trains_and_each_rank_is_within_5_percent(loopback):
    result, doc, plan, _ = loopback
    assert result["status"] == "ok", result["summary"]
    run = doc["run"]
    assert (run["world_size"], run["nodes"], run["gpus_per_node"]) == (2, 2, 1)
    assert run["launcher"]["tool"] == "torchrun" and run["launcher"]["rendezvous"].startswith("c10d 127.0.0.1:")
    assert sorted(e["node"] for e in doc["ranks"]) == [0, 1]  # c10d numbers ranks its own way; the node is qplan's
    predicted = plan["prediction"]["memory_detail"]["tensor_peak_cpu"]
    for e in doc["ranks"]:
        measured = e["memory"]["tensor_peak"]
        err = (predicted - measured) / measured
        print(f"\nnode {e['node']} rank {e['rank']}: predicted {predicted:,} B, measured {measured:,} B, {err:+.2%}")
        assert e["status"] == "ok" and e["last_step"] == STEPS and abs(err) <= 0.05
    assert doc["error"]["weights"] == 0.0  # each rank's own FSDP shard of the frozen weights, to the byte
    assert len(doc["measured"]["loss"]) == STEPS
    for n in doc["nodes"]:  # per-node host memory: its ranks' peak RSS (resource.getrusage), the host's total
        assert n["status"] == "ok" and n["launcher"]["returncode"] == 0 and n["last_step"] == STEPS
        assert 50 * 2**20 < n["host_memory"]["rss_peak_sum"] < n["host_memory"]["total"]
    assert (Path(result["run_dir"]) / "adapter" / "adapter_model.safetensors").is_file()


def test_the_run_folder_holds_each_nodes_launch_and_the_slurm_script(loopback):
    result, doc, _, _ = loopback
    folder = Path(result["run_dir"])
    for n in (0, 1):
        sh = (folder / f"launch-node{n}.sh").read_text()
        assert f"--nnodes 2 --node-rank {n} --nproc-per-node 1 --rdzv-backend c10d" in sh
        assert f"is_host={int(n == 0)}" in sh and sh.rstrip().endswith("-m qplan.backends.worker job.json")
    sbatch = (folder / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    assert '--node-rank "$SLURM_NODEID"' in sbatch and "--random-init --steps 8" in sbatch
    assert subprocess.run(["bash", "-n", str(folder / "slurm.sbatch")]).returncode == 0
    md = (folder / "report.md").read_text()
    assert "## Nodes" in md and "2 ranks on 2 nodes × 1" in md
    assert "class='nodes'" in (folder / "report.html").read_text()


@pytest.mark.parametrize("strategy", ["fsdp", "hsdp"])
def test_the_accelerate_launch_of_each_node_is_accepted_by_accelerate(tmp_path, monkeypatch, strategy):
    """The GPU launch of a node (not run here: no GPU): accelerate's own parser and launch validation take each
    node's command with the multi-machine config (FSDP2; HSDP as its ParallelismConfig, replicate x shard)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    folder = tmp_path / "run"
    folder.mkdir()
    nl = nodes.NodeLaunch(2, 4, "10.0.0.1", 29500, "qplan")
    plan = node_plan(gpus=4, strategy=strategy)
    cmds = launch.write_launch_files(folder, plan, "cuda", "/usr/bin/python3", nl, None, ["--random-init"])
    monkeypatch.chdir(folder)
    for n, cmd in enumerate(cmds):
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
        assert (args.machine_rank, args.num_machines, args.num_processes, args.main_process_ip,
                args.main_process_port) == (n, 2, 8, "10.0.0.1", 29500)
        assert args.use_fsdp and args.fsdp_version == 2 and args.module
        assert args.use_parallelism_config is (strategy == "hsdp")
        if strategy == "hsdp":
            assert (args.parallelism_config_dp_replicate_size, args.parallelism_config_dp_shard_size) == (2, 4)
    assert "#SBATCH --gpus-per-node=4" in (folder / "slurm.sbatch").read_text()


def test_hsdp_two_nodes_of_two_ranks_train_each_within_5_percent(tmp_path, monkeypatch):
    """HSDP on loopback: 4 CPU ranks (2 cores: oversubscribed, which changes time, not bytes), FSDP2 on a
    (2 nodes, 2 ranks) mesh. Each rank holds its node's half of the weights (not a quarter, as FSDP over 4 ranks
    would), to the byte, and its tensor peak is within 5% of the per-rank prediction."""
    monkeypatch.setenv("QPLAN_CPU_OVERSUBSCRIBE", "1")
    plan = node_plan(gpus=2, strategy="hsdp")
    result = run_plan(write_plan(tmp_path / "plan.json", plan), random_init=True, steps=6, device="cpu",
                      out_dir=tmp_path / "runs")
    assert result["status"] == "ok", result["summary"]
    doc = read_measured(result["run_dir"])
    assert (doc["run"]["world_size"], doc["run"]["nodes"], doc["run"]["strategy"]) == (4, 2, "hsdp")
    assert sorted(e["node"] for e in doc["ranks"]) == [0, 0, 1, 1]
    predicted = plan["prediction"]["memory_detail"]["tensor_peak_cpu"]
    for e in doc["ranks"]:
        err = (predicted - e["memory"]["tensor_peak"]) / e["memory"]["tensor_peak"]
        print(f"\nhsdp node {e['node']} rank {e['rank']}: {e['memory']['tensor_peak']:,} B measured, {err:+.2%}")
        assert e["status"] == "ok" and abs(err) <= 0.05
    assert doc["error"]["weights"] == 0.0
    over_four = node_plan(gpus=4, nodes=1, strategy="fsdp")["prediction"]["memory"]["weights"]
    assert doc["measured"]["memory"]["weights"] == plan["prediction"]["memory"]["weights"] > over_four


def test_a_node_killed_mid_run_is_recorded_and_the_other_ends(tmp_path):
    plan_file = write_plan(tmp_path / "plan.json", node_plan())
    out = tmp_path / "runs"
    res = subprocess.run(qplan_cmd("run", str(plan_file), "--random-init", "--steps", "6", "--device", "cpu",
                                   "--out-dir", str(out)),
                         env=child_env(QPLAN_CALLBACKS="faults:KillNode1AtStep3"), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "node 1 died after step 2: its launcher was killed by SIGKILL" in res.stdout
    run = next(p for p in out.iterdir() if p.is_dir())
    doc = read_measured(run)
    assert doc["status"] == "error" and doc["failure"]["kind"] == "node_died" and doc["failure"]["node"] == 1
    assert doc["failure"]["step"] == 2
    by_node = {n["node"]: n for n in doc["nodes"]}
    assert by_node[1]["launcher"]["returncode"] == -9 and by_node[1]["last_step"] == 2
    assert by_node[0]["status"] == "ended" and by_node[0]["launcher"]["returncode"] != 0
    survivor = next(e for e in doc["ranks"] if e["node"] == 0)
    assert survivor["status"] == "ended" and "failed" in survivor["failure"]["message"]
    assert "node 1 died after step 2" in (run / "report.md").read_text()
    assert not (run / "adapter").exists()


def _fake_slurm(bin_dir: Path) -> None:
    """``srun`` starting its command once per node (SLURM_NODEID 0..nodes-1, concurrently) and ``scontrol show
    hostnames`` answering this host: the script's own lines run, on loopback."""
    bin_dir.mkdir()
    srun = textwrap.dedent(f"""\
        #!{sys.executable}
        import os, subprocess, sys
        args = sys.argv[1:]
        n = int(next(a.split("=")[1] for a in args if a.startswith("--nodes=")))
        cmd = args[next(i for i, a in enumerate(args) if not a.startswith("-")):]
        procs = [subprocess.Popen(cmd, env=dict(os.environ, SLURM_NODEID=str(i))) for i in range(n)]
        sys.exit(max(p.wait() for p in procs))
        """)
    (bin_dir / "srun").write_text(srun)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)


def test_the_slurm_script_trains_again_one_qplan_run_per_node(loopback, tmp_path):
    """sbatch's view: the script of a finished run folder, under stand-in srun/scontrol, runs `qplan run --node-rank
    $SLURM_NODEID` on each node (here: two processes meeting over loopback, as on two machines). Each node makes a
    new folder; node 0's holds every rank's file and the adapter; the finished folder is left as it was."""
    result, _, _, _ = loopback
    folder = Path(result["run_dir"])
    before = {p.name: p.stat().st_mtime_ns for p in folder.rglob("*")}
    _fake_slurm(tmp_path / "bin")
    out = tmp_path / "slurm-runs"
    env = child_env(QPLAN_OUT_DIR=str(out), QPLAN_MASTER_PORT=str(port()), SLURM_JOB_NODELIST="node[1-2]",
                    PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run(["bash", "slurm.sbatch"], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    made = sorted(p.name for p in out.iterdir())
    assert len(made) == 2 and made[0].endswith("-node0") and made[1].endswith("-node1"), made
    for name in made:
        doc = read_measured(out / name)
        assert doc["status"] == "ok" and sorted(e["node"] for e in doc["ranks"]) == [0, 1]
        assert all(e["status"] == "ok" for e in doc["ranks"])  # every rank's file reached every node's folder
        assert doc["run"]["launcher"]["node_rank"] == int(name[-1])
    assert (out / made[0] / "adapter").is_dir() and not (out / made[1] / "adapter").exists()
    assert {p.name: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_nodes_started_with_different_plans_stop_at_the_rendezvous(tmp_path):
    p0 = write_plan(tmp_path / "a.json", node_plan())
    p1 = write_plan(tmp_path / "b.json", node_plan(r=8))
    out = tmp_path / "runs"
    master = ["--master-addr", "127.0.0.1", "--master-port", str(port()), "--join-timeout", "120"]
    procs = [subprocess.Popen(qplan_cmd("run", str(p), "--random-init", "--device", "cpu", "--out-dir", str(out),
                                        "--node-rank", str(n), *master),
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, p in ((1, p1), (0, p0))]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 2, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("qplan: error: node 1's plan.json differs from node 0's (sha256")
    assert not out.exists() or not any(out.iterdir())  # nothing trained: no run folder


# ------------------------------------------------------------------------------ refused before anything starts


def _refused(tmp_path, capsys, plan: dict, *args: str) -> str:
    from qplan.cli.main import main

    plan_file = write_plan(tmp_path / "plan.json", plan)
    out = tmp_path / "runs"
    rc = main(["run", str(plan_file), "--random-init", "--out-dir", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())
    return err


@pytest.mark.parametrize("args, needle", [
    (["--node-rank", "2", "--master-addr", "127.0.0.1"], "--node-rank must be 0..1 (the plan has 2 nodes), got 2"),
    (["--node-rank", "1"], "--node-rank needs --master-addr"),
    (["--master-addr", "127.0.0.1"], "--master-addr needs --node-rank"),
    (["--node-rank", "1", "--master-addr", "no-such-host.invalid"], "--master-addr no-such-host.invalid: the name "
                                                                    "does not resolve"),
    (["--node-rank", "0", "--master-addr", "192.0.2.1"], "--master-addr 192.0.2.1 is not an address of this machine"),
    (["--node-rank", "1", "--master-addr", "127.0.0.1", "--join-timeout", "1", "--master-port", "FREE"],
     "node 0's rendezvous at 127.0.0.1:FREE did not answer within 1 s"),
    (["--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port", "0"], "--master-port must be 1..65535, got 0"),
    (["--node-rank", "1", "--master-addr", "127.0.0.1", "--master-port", "70000"], "--master-port must be 1..65535"),
    (["--device", "cuda"], "this plan has 2 nodes: on GPUs start each machine's node with `qplan run PLAN --node-rank"),
])
def test_bad_node_options_are_one_line(tmp_path, capsys, args, needle):
    device = [] if "--device" in args else ["--device", "cpu"]
    free = str(port())  # nothing listens there: no node 0
    args, needle = [free if a == "FREE" else a for a in args], needle.replace("FREE", free)
    err = _refused(tmp_path, capsys, node_plan(), *device, *args)
    assert needle in err, err


def test_a_port_in_use_is_refused_on_node_0(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        err = _refused(tmp_path, capsys, node_plan(), "--device", "cpu", "--node-rank", "0", "--master-addr",
                       "127.0.0.1", "--master-port", str(busy))
    assert f"--master-port {busy} is in use on this machine" in err


def test_an_unreachable_master_is_refused(tmp_path, capsys):
    """192.0.2.1 (TEST-NET-1) answers nobody: unreachable at once, or no answer within the timeout."""
    err = _refused(tmp_path, capsys, node_plan(), "--device", "cpu", "--node-rank", "1", "--master-addr", "192.0.2.1",
                   "--join-timeout", "2")
    assert "unreachable from this machine" in err or "did not answer within 2 s" in err, err


def test_more_ranks_than_this_machine_has_and_node_options_on_one_node(tmp_path, capsys):
    err = _refused(tmp_path, capsys, node_plan(gpus=64), "--device", "cpu", "--node-rank", "1", "--master-addr",
                   "127.0.0.1")
    assert "the plan has 64 ranks per node but this machine has" in err
    err = _refused(tmp_path, capsys, node_plan(gpus=2, nodes=1, strategy="ddp"), "--device", "cpu", "--node-rank", "0",
                   "--master-addr", "127.0.0.1")
    assert "--node-rank, --master-addr: for plans of several nodes" in err and "this plan has 1 node" in err


def test_nodes_that_outlive_a_failed_node_are_stopped_after_the_grace(tmp_path):
    """spawn_nodes on stand-in launchers: node 1 fails at once, node 0 would run for a minute (a rank stuck outside any
    collective). After the grace node 0's process group is stopped (SIGTERM) and recorded as stopped by qplan."""
    import time

    cmds = [[sys.executable, "-c", "import time; time.sleep(60)"], [sys.executable, "-c", "import sys; sys.exit(3)"]]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    t0 = time.monotonic()
    exits, interrupted = nodes.spawn_nodes(cmds, [dict(os.environ)] * 2, logs, tmp_path, grace_s=1)
    assert time.monotonic() - t0 < 30 and not interrupted
    assert (exits[1].returncode, exits[1].stopped) == (3, False)
    assert exits[0].returncode == -15 and exits[0].stopped
    assert all(p.is_file() for p in logs)


def _rank_doc(rank: int, node: int, status: str, failure: dict | None = None, adapter: int | None = None) -> dict:
    return {"rank": rank, "node": node, "local_rank": 0, "status": status, "failure": failure, "host": "h",
            "measured": {"memory": {"tensor_peak": 1000 + rank}, "adapter_file_bytes": adapter, "loss": [1.0]}}


def test_merge_blames_a_rank_killed_by_a_signal_and_takes_the_adapter_size_from_node_0(tmp_path):
    """Hand-made rank files as a run leaves them: torchrun's summary names rank 1 killed by SIGKILL (the OOM killer:
    it wrote nothing more), rank 0 then failed with a clock on the lost peer; c10d put node 1's rank first."""
    plan = node_plan()
    (tmp_path / "ranks").mkdir()
    docs = [_rank_doc(0, 1, "error", {"kind": "error", "message": "Connection closed by peer", "at": 5.0}),
            _rank_doc(1, 0, "running", adapter=None)]
    for d in docs:
        (tmp_path / "ranks" / f"rank{d['rank']}.json").write_text(json.dumps(d))
    log = tmp_path / "node0.log"
    log.write_text("Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 0)\n"
                   "  exitcode  : -9 (pid: 7)\n")
    doc = launch.merge_ranks(plan, tmp_path, 1, False, [log], {"device": "cpu"})
    assert doc["failure"]["rank"] == 1 and "killed by SIGKILL" in doc["failure"]["message"]
    assert doc["ranks"][0]["status"] == "ended"
    ok = [_rank_doc(0, 1, "ok"), _rank_doc(1, 0, "ok", adapter=12345)]
    for d in ok:
        (tmp_path / "ranks" / f"rank{d['rank']}.json").write_text(json.dumps(d))
    assert launch.merge_ranks(plan, tmp_path, 0, False, [log], {"device": "cpu"})["measured"]["adapter_file_bytes"] \
        == 12345
