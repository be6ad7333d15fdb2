"""Launching the ranks of a multi-GPU plan, and merging what each rank measured (no torch here).

``qplan run`` of a plan with ``distributed.world_size > 1`` starts the worker once per rank:

* on the CPU through torchrun (``python -m qplan.backends.torchrun --standalone --nproc_per_node W -m
  qplan.backends.worker job.json``: ``torch.distributed.run`` reporting a failure without a traceback;
  gloo): ``accelerate launch --cpu`` does not start several ranks and accelerate's FSDP plugin needs a
  GPU, so the ranks shard themselves (``backends.ranks``);
* on GPUs through ``accelerate launch --config_file RUN_DIR/accelerate_config.yaml -m
  qplan.backends.worker job.json``: the generated config selects DDP (``MULTI_GPU``), FSDP2
  (``fsdp_version: 2``, decoder layers wrapped) or DeepSpeed ZeRO-2/3 (``deepspeed_config.json`` beside
  it), with the plan's precision, accumulation and offload. The GPU launch is not run by the tests
  (no GPU in CI): the files and the command are checked as data.

A plan of several nodes is launched through torchrun's c10d rendezvous (``backends.nodes``): the run
folder gets ``launch-node<N>.sh`` per node, the accelerate config naming node 0 as master, and
``slurm.sbatch``; ``merge_ranks`` adds each rank's node and a ``nodes`` section (``node_summary``).

The command is written to ``RUN_DIR/launch.sh`` so that the run can be repeated by hand. Every rank
writes ``RUN_DIR/ranks/rank<N>.json`` (``backends.worker``); ``merge_ranks`` turns them into one
measured.json: ``run.world_size``, ``ranks`` (one entry per rank), ``measured`` = the measurement of
the rank with the largest tensor peak (the per-rank prediction is compared with the worst rank), its
timing replaced by the slowest rank's. A rank that failed is the run's failure; ranks the launcher
ended because another one failed are recorded as ``ended``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError

#: statuses of a run, worst first: a failed rank decides the run's status
_WORST = ("oom", "error", "interrupted", "ended", "running", "ok")


def worst(statuses: list[str]) -> str:
    """The worst of some ranks' statuses (an unknown one counts as an error)."""
    return min(statuses, key=lambda s: _WORST.index(s) if s in _WORST else 1)


def dist_section(plan: dict[str, Any]) -> dict[str, Any] | None:
    """The plan's ``distributed`` section when it has more than one rank."""
    d = plan.get("distributed")
    if isinstance(d, dict) and int(d.get("world_size") or 1) > 1:
        return d
    return None


def check_launchable(plan: dict[str, Any], device: str, cpu_count: int | None, gpu_count: int | None,
                     node_rank: int | None = None) -> None:
    """One line for what this machine cannot launch (before any run folder is made). A plan of several nodes runs
    all its nodes here on the CPU (loopback), or, with ``node_rank``, this machine's node only."""
    d = dist_section(plan)
    assert d is not None
    world, nodes, strategy = int(d["world_size"]), int(d.get("nodes") or 1), d["strategy"]
    if nodes > 1 and node_rank is None and device != "cpu":
        raise QPlanError(f"this plan has {nodes} nodes: on GPUs start each machine's node with `qplan run PLAN "
                         f"--node-rank N --master-addr NODE0_HOST` (N = 0..{nodes - 1}), or sbatch the slurm.sbatch "
                         "of a run folder (docs/multi-node.md); on the CPU --device cpu runs every node here")
    if node_rank is not None:
        world = int(d["gpus_per_node"])  # this machine starts its own node's ranks
    if device == "cpu":
        if strategy in ("zero2", "zero3"):
            raise QPlanError(f"--strategy {strategy} cannot train on the CPU here: `qplan run` launches DeepSpeed "
                             "ZeRO on GPUs only (through accelerate); on the CPU use --strategy ddp or fsdp")
        if cpu_count is not None and world > cpu_count and not os.environ.get("QPLAN_CPU_OVERSUBSCRIBE"):
            what = (f"the plan has {world} ranks per node" if node_rank is not None else
                    f"the plan has {world} ranks" + (f" ({nodes} nodes, all on this host)" if nodes > 1 else ""))
            raise QPlanError(f"{what} but this machine has {cpu_count} CPU cores: on the CPU each rank needs a core; "
                             f"re-plan with fewer --gpus{' or --nodes' if nodes > 1 else ''} (or set "
                             "QPLAN_CPU_OVERSUBSCRIBE=1 to run them anyway, slower)")
        if d.get("cpu_offload"):
            raise QPlanError("--cpu-offload moves GPU memory to the host: on the CPU there is nothing to offload "
                             "(re-plan without --cpu-offload)")
    elif gpu_count is not None and world > gpu_count:
        raise QPlanError(f"the plan has {world} ranks{' per node' if node_rank is not None else ''} but torch sees "
                         f"{gpu_count} GPU(s) on this machine")


# ------------------------------------------------------------------------------ commands and configs


def torchrun_command(python: str, world: int, job_file: str) -> list[str]:
    """The CPU launch: torchrun, one node, ``world`` processes, a free port (``--standalone``);
    ``qplan.backends.torchrun`` is torchrun ending in its failure summary instead of a traceback."""
    return [python, "-m", "qplan.backends.torchrun", "--standalone", "--nnodes", "1", "--nproc_per_node", str(world),
            "-m", "qplan.backends.worker", job_file]


def accelerate_command(python: str, config_file: str, job_file: str) -> list[str]:
    """The GPU launch: ``accelerate launch`` with the generated config (``python -m accelerate.commands.launch``,
    the interpreter of the backend)."""
    return [python, "-m", "accelerate.commands.launch", "--config_file", config_file, "-m", "qplan.backends.worker",
            job_file]


def _mixed_precision(plan: dict[str, Any]) -> str:
    return {"bf16": "bf16", "fp16": "fp16"}.get(plan["training"].get("mixed_precision", "no"), "no")


def deepspeed_config(plan: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config of a zero2/zero3 plan ("auto" values are filled by transformers from the
    ``TrainingArguments``: batch size, accumulation, clipping, precision)."""
    d = dist_section(plan) or plan["distributed"]
    stage = 2 if d["strategy"] == "zero2" else 3
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": stage == 3, "contiguous_gradients": True}
    if d.get("cpu_offload"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    mp = _mixed_precision(plan)
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": mp == "bf16"},
        "fp16": {"enabled": mp == "fp16"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
    }


def accelerate_config(plan: dict[str, Any], deepspeed_file: str | None = None,
                      master: tuple[str, int] | None = None) -> dict[str, Any]:
    """The ``accelerate launch --config_file`` of a multi-GPU plan (accelerate 1.x keys); a plan of several
    machines names node 0 as ``master`` (each machine gives its own ``--machine_rank``)."""
    d = dist_section(plan) or plan["distributed"]
    strategy = d["strategy"]
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": {"ddp": "MULTI_GPU", "fsdp": "FSDP", "hsdp": "FSDP", "zero2": "DEEPSPEED",
                             "zero3": "DEEPSPEED"}[strategy],
        "mixed_precision": _mixed_precision(plan),
        "num_machines": int(d.get("nodes") or 1),
        "machine_rank": 0,
        "num_processes": int(d["world_size"]),
        "gpu_ids": "all",
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if master is not None:
        cfg.update(main_process_ip=master[0], main_process_port=int(master[1]))
    if strategy == "hsdp":  # FSDP2 on a 2-D mesh: accelerate's ParallelismConfig (replicate x shard)
        cfg["parallelism_config"] = {"parallelism_config_dp_replicate_size": int(d["nodes"]),
                                     "parallelism_config_dp_shard_size": int(d["gpus_per_node"])}
    if strategy in ("fsdp", "hsdp"):
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            # wraps each class of the model's _no_split_modules (its decoder layer), then the root
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": bool(d.get("cpu_offload")),
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_activation_checkpointing": False,  # the Trainer's gradient_checkpointing does it, as planned
        }
    elif strategy in ("zero2", "zero3"):
        cfg["deepspeed_config"] = {"deepspeed_config_file": deepspeed_file or "deepspeed_config.json",
                                   "zero3_init_flag": False}
        cfg.pop("mixed_precision")  # the DeepSpeed file says it (accelerate refuses both)
    return cfg


def to_yaml(data: dict[str, Any], indent: int = 0) -> str:
    """A flat YAML of nested mappings of scalars (what accelerate's config files are)."""
    lines = []
    for k, v in data.items():
        pad = " " * indent
        if isinstance(v, dict):
            lines.append(f"{pad}{k}:")
            lines.append(to_yaml(v, indent + 2).rstrip("\n"))
        elif isinstance(v, bool):
            lines.append(f"{pad}{k}: {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{pad}{k}: {v}")
        else:
            lines.append(f"{pad}{k}: {json.dumps(str(v))}")
    return "\n".join(lines) + "\n"


def write_launch_files(run_dir: Path, plan: dict[str, Any], device: str, python: str,
                       nl: Any = None, node_rank: int | None = None,
                       run_args: list[str] | None = None) -> list[list[str]]:
    """Write the launch files of the run into ``run_dir`` and return the commands this run starts (one per node it
    runs here), run from inside ``run_dir``: every file they name is relative to the folder, so a moved folder still
    launches. One node: ``launch.sh``. Several nodes (``nl``, a ``nodes.NodeLaunch``): ``launch-node<N>.sh`` for
    each node, the accelerate config naming node 0 as master and ``slurm.sbatch``."""
    from . import nodes as nodes_mod

    d = dist_section(plan)
    assert d is not None
    job_file = "job.json"
    cfg_file = ds_file = None
    if device != "cpu" or nl is not None:
        if d["strategy"] in ("zero2", "zero3"):
            ds_file = "deepspeed_config.json"
            (run_dir / ds_file).write_text(json.dumps(deepspeed_config(plan), indent=2) + "\n", encoding="utf-8")
        cfg_file = "accelerate_config.yaml"
        master = (nl.addr, nl.port) if nl is not None else None
        (run_dir / cfg_file).write_text(to_yaml(accelerate_config(plan, ds_file, master)), encoding="utf-8")
    if nl is None:
        cmd = torchrun_command(python, int(d["world_size"]), job_file) if device == "cpu" else \
            accelerate_command(python, cfg_file, job_file)
        (run_dir / "launch.sh").write_text(
            _script(cmd, "the command `qplan run` started, from inside the run folder (rerun it by hand from anywhere)"),
            encoding="utf-8")
        return [cmd]
    cmds = []
    for n in range(nl.nodes):
        cmd = nodes_mod.torchrun_node_command(python, nl, n, job_file) if device == "cpu" else \
            nodes_mod.accelerate_node_command(python, nl, n, cfg_file, job_file)
        (run_dir / f"launch-node{n}.sh").write_text(
            _script(cmd, f"node {n} of {nl.nodes}: run on that machine (from anywhere; it runs inside this run folder)"),
            encoding="utf-8")
        cmds.append(cmd)
    (run_dir / "slurm.sbatch").write_text(nodes_mod.slurm_script(plan, run_args or [], device, sys.executable),
                                          encoding="utf-8")
    return cmds if node_rank is None else [cmds[node_rank]]


def _script(cmd: list[str], comment: str) -> str:
    """A launch script that runs ``cmd`` from inside the run folder it lies in."""
    return (f"#!/bin/sh\n# {comment}\n" 'cd "$(dirname "$0")" || exit 1\n'
            + "exec " + " ".join(shlex.quote(c) for c in cmd) + "\n")


# ------------------------------------------------------------------------------ merging


def read_rank_files(run_dir: Path, world: int) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    for r in range(world):
        f = run_dir / "ranks" / f"rank{r}.json"
        try:
            out.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            out.append(None)
    return out


_ROOT_RANK = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def root_cause(log_text: str) -> tuple[int, int] | None:
    """(rank, exit code) of the first failed rank, from torchrun's failure summary in the log."""
    m = _ROOT_RANK.search(log_text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _signal_name(code: int) -> str:
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def exit_text(code: int) -> str:
    """How a process ended, in words (a signal by name)."""
    if code < 0:
        text = _signal_name(code)
        if text == "killed by SIGKILL":
            text += " (on Linux usually the kernel's OOM killer: the host ran out of memory)"
        return text
    return f"exited with code {code}"


def _rank_entry(r: int, doc: dict[str, Any] | None, plan_peak: int | None) -> dict[str, Any]:
    if doc is None:
        return {"rank": r, "status": "ended", "failure": {"kind": "crashed", "message": f"rank {r} wrote nothing"},
                "memory": {}, "timing": {}, "error": {"tensor_peak": None}}
    meas = doc.get("measured") or {}
    mem = meas.get("memory") or {}
    tm = meas.get("timing") or {}
    peak = mem.get("tensor_peak")
    return {
        "rank": r, "status": doc.get("status"), "failure": doc.get("failure"), "pid": doc.get("pid"),
        "node": doc.get("node"), "host": doc.get("host"), "local_rank": doc.get("local_rank"),
        "last_step": doc.get("last_step"), "host_memory": doc.get("host_memory") or {},
        "memory": {k: mem.get(k) for k in ("tensor_peak", "tensor_peak_phase", "tensor_peak_step", "weights",
                                           "breakdown_at_peak", "phase_peaks", "window_steps") if k in mem},
        "timing": {k: tm.get(k) for k in ("mean_step_seconds", "step_seconds", "tokens_per_second") if k in tm},
        "loss": meas.get("loss") or [],
        "error": {"tensor_peak": (plan_peak - peak) / peak if plan_peak is not None and peak else None},
    }


def _node_died(ranks: list[dict[str, Any]], exits: dict[int, Any], interrupted: bool) -> None:
    """The ranks of a node whose launcher was killed (not by qplan) are still "running" in their files: that node
    died, at the last step its ranks recorded."""
    if interrupted:
        return
    for n, x in sorted(exits.items()):
        if x.returncode >= 0 or x.stopped:
            continue
        for e in ranks:
            if e.get("node") == n and e["status"] == "running":
                step = e.get("last_step")
                e["status"] = "error"
                e["failure"] = {"kind": "node_died", "step": step, "phase": None, "exception": None, "traceback": None,
                                "message": f"node {n} died " + (f"after step {step}" if step else "before its first step")
                                + f": its launcher was {_signal_name(x.returncode)} (a lost machine, or the kernel's "
                                "OOM killer)"}


def merge_ranks(plan: dict[str, Any], run_dir: Path, rc: int, interrupted: bool, logs: list[Path],
                launcher: dict[str, Any], exits: dict[int, Any] | None = None) -> dict[str, Any]:
    """measured.json of a multi-rank run from its rank files (see the module docstring). ``logs``: the launchers'
    logs (one per node started here); ``exits``: each node's launcher exit (a ``nodes.NodeExit``) where this
    process started several."""
    d = dist_section(plan)
    assert d is not None
    world, n_nodes = int(d["world_size"]), int(d.get("nodes") or 1)
    docs = read_rank_files(run_dir, world)
    cpu = launcher.get("device") == "cpu"
    detail = plan["prediction"].get("memory_detail") or {}
    plan_peak = detail.get("tensor_peak_cpu") if cpu else plan["prediction"]["memory"].get("tensor_peak")
    ranks = [_rank_entry(r, doc, plan_peak) for r, doc in enumerate(docs)]
    _node_died(ranks, exits or {}, interrupted)
    log = ""
    for path in logs:
        try:
            log += path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            pass
    cause = root_cause(log) if rc != 0 else None
    failed = sorted((e for e in ranks if e["status"] in ("oom", "error", "interrupted")),
                    key=lambda e: _WORST.index(e["status"]))
    died = next((e for e in ranks if (e.get("failure") or {}).get("kind") == "node_died"), None)
    # the first failure: a node that died, else the rank that failed first by its own clock (ranks that lost a
    # peer fail after it), else torchrun's root cause
    timed = sorted((e for e in failed if isinstance((e.get("failure") or {}).get("at"), (int, float))),
                   key=lambda e: e["failure"]["at"])
    root = next((e for e in ranks if cause is not None and e["rank"] == cause[0]), None)
    # a rank killed by a signal (the OOM killer) records nothing, and its peers then fail with a clock: it goes first
    killed = root if root is not None and cause is not None and cause[1] < 0 and root["status"] == "running" else None
    first = died or killed or (timed[0] if timed else None) or root or (failed[0] if failed else None)
    # ranks still "running" when the launcher stopped: the root cause was killed; the others were ended.
    # A rank that failed after the root cause (its peer left a collective: gloo's "Connection closed by
    # peer") failed because of it: ended, with its own message kept
    for e in ranks:
        if first is not None and e is not first and e["status"] in ("error", "interrupted") and not interrupted:
            own = (e.get("failure") or {}).get("message")
            e["status"] = "ended"
            e["failure"] = dict(e.get("failure") or {}, kind="ended",
                                message=f"rank {e['rank']} stopped after rank {first['rank']} failed"
                                + (f" ({own})" if own else ""))
            continue
        if e["status"] != "running":
            continue
        e["status"] = "ended"
        if e is first:
            e["failure"] = {"kind": "crashed", "message": f"rank {e['rank']} {exit_text(cause[1])}" if cause
                            else f"rank {e['rank']} stopped without a result", "step": None, "phase": None,
                            "exception": None, "traceback": None}
        else:
            why = "(interrupted)" if interrupted else (f"after rank {first['rank']} failed" if first is not None
                                                       else "after a failure")
            e["failure"] = {"kind": "ended", "message": f"rank {e['rank']} was ended by the launcher {why}",
                            "step": None, "phase": None, "exception": None, "traceback": None}
    ok = all(e["status"] == "ok" for e in ranks) and rc == 0
    measured_docs = [doc for doc in docs if doc is not None]
    base = measured_docs[0] if measured_docs else {}
    by_peak = [doc for doc in measured_docs if ((doc.get("measured") or {}).get("memory") or {}).get("tensor_peak")]
    peak_doc = max(by_peak, key=lambda doc: doc["measured"]["memory"]["tensor_peak"]) if by_peak else base
    measured = json.loads(json.dumps(peak_doc.get("measured") or {}))
    if measured:
        measured.setdefault("memory", {})["peak_rank"] = peak_doc.get("rank")
        timed = [doc for doc in measured_docs if ((doc.get("measured") or {}).get("timing") or {}).get("mean_step_seconds")]
        if timed:
            slow = max(timed, key=lambda doc: doc["measured"]["timing"]["mean_step_seconds"])
            measured["timing"] = dict(slow["measured"]["timing"], slowest_rank=slow.get("rank"))
        # the saving rank's (node 0's local rank 0: c10d may number another node's rank 0)
        r0 = next((doc for doc in measured_docs if doc.get("node", 0) == 0 and doc.get("local_rank", 0) == 0),
                  docs[0] or {})
        m0 = r0.get("measured") or {}
        measured["loss"] = m0.get("loss") or measured.get("loss") or []  # the Trainer's loss, averaged over ranks
        measured["adapter_file_bytes"] = m0.get("adapter_file_bytes")
        measured["params"] = m0.get("params") or measured.get("params") or {}
    if ok:
        status, failure = "ok", None
    else:
        if first is not None and first["status"] != "ended":
            status = first["status"]
        else:
            status = "error"
        if interrupted:
            status = "interrupted"
        if first is not None:
            failure = dict(first["failure"] or {"kind": "crashed", "message": first["status"]})
            failure["message"] = f"rank {first['rank']}: {failure.get('message')}"
            failure["rank"] = first["rank"]
            if first.get("node") is not None and n_nodes > 1:
                failure["node"] = first["node"]
        else:
            failure = {"kind": "crashed", "message": f"the launcher {exit_text(rc)} without a failed rank",
                       "step": None, "phase": None, "exception": None, "traceback": None, "rank": None}
        if first is None or first["status"] == "ended":
            failure["message"] += f"; see {', '.join(p.name for p in logs)} in the run folder"
    run = dict(base.get("run") or {})
    run.update(world_size=world, strategy=d["strategy"], engine=d.get("engine"), launcher=launcher,
               ranks_measured=sum(1 for doc in docs if doc is not None and doc.get("status") != "running"))
    if n_nodes > 1:
        run.update(nodes=n_nodes, gpus_per_node=int(d["gpus_per_node"]))
    return {
        "schema_version": 1, "status": status, "backend": base.get("backend") or plan["backend"],
        "model": plan["model"]["name"], "run": run, "environment": base.get("environment"),
        "device": base.get("device"), "measured": measured, "failure": failure,
        "notes": base.get("notes") or [], "ranks": ranks,
        **({"nodes": node_summary(ranks, n_nodes, exits)} if n_nodes > 1 else {}),
    }


def cpu_count() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count()


def node_summary(ranks: list[dict[str, Any]], nodes: int, exits: dict[int, Any] | None) -> list[dict[str, Any]]:
    """One entry per node: its ranks, host, worst status, last step reached, the peak host memory (RSS) of its
    ranks summed, and its launcher's exit where this process started it."""
    out = []
    for n in range(nodes):
        mine = [e for e in ranks if e.get("node") == n]
        host = next((e["host"] for e in mine if e.get("host")), None)
        rss = [e["host_memory"]["rss_peak"] for e in mine if (e.get("host_memory") or {}).get("rss_peak")]
        steps = [e["last_step"] for e in mine if e.get("last_step") is not None]
        entry: dict[str, Any] = {
            "node": n, "ranks": [e["rank"] for e in mine], "host": host,
            "status": worst([e["status"] for e in mine]) if mine else "unknown",
            "last_step": max(steps) if steps else None,
            "host_memory": {"rss_peak_sum": sum(rss) if len(rss) == len(mine) and mine else None,
                            "total": next((e["host_memory"].get("total") for e in mine
                                           if (e.get("host_memory") or {}).get("total")), None)},
        }
        x = (exits or {}).get(n)
        if x is not None:
            entry["launcher"] = {"returncode": x.returncode, "stopped_by_qplan": x.stopped,
                                 "exit": exit_text(x.returncode)}
        out.append(entry)
    return out
