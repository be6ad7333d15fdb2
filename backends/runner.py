"""``qplan run``: check the inputs, make a new run folder, train in a child process, report.

Run folder ``<out_dir>/<UTC time>-<model>-<backend>[-N]`` (never reused). It is made as
``<name>.partial`` — where the live ``worker.log`` is while the run trains — and renamed to ``<name>`` once
its report is written, so a folder without the suffix is complete. A run whose folder cannot be completed
(a full disk) keeps the ``.partial`` folder, says so in one line, and loses nothing. Every path inside
it is relative to it (``job.json``, ``launch.sh``): the folder can be moved and its ``launch.sh`` rerun.

* ``plan.json`` — the plan, byte for byte; ``job.json`` — the run's inputs;
* ``measured.json`` — what the worker measured (``backends.measure``), the ``status`` and the
  signed ``error`` of each compared term (``backends.compare``);
* ``report.md``, ``report.html`` — tables and a predicted-vs-measured chart;
* ``adapter/`` — the trained adapter (PEFT ``save_pretrained``, safetensors); ``model/`` for a full fine-tuning plan;
* ``worker.log`` — the child's output (also shown live on stderr, with the progress bar).

The backend runs in a child process (``python -m qplan.backends.worker``) with the backend's
interpreter (``registry.python_for``): Unsloth patches libraries on import, and a crash or a
kill of the child (e.g. by the kernel's OOM killer) must still leave a report. Ctrl-C is
forwarded to the child, which writes what it measured so far (status ``interrupted``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qplan.planner.document import check_plan
from qplan.planner.errors import QPlanError
from qplan.planner.files import (
    PARTIAL,
    atomic_write,
    check_folder,
    probe_writable,
    publish_folder,
    read_limited,
    safe_is_file,
)
from qplan.planner.validate import decode_json, dumps_finite

from . import registry
from .compare import pairs
from .report import fmt_err, fmt_value, free_name, new_folder, utc_stamp, write_run_report

DEFAULT_STEPS = 4
MAX_STEPS = 10_000_000
MAX_EPOCHS = 10_000
DEFAULT_LR = 2e-4
WARMUP_STEPS = 1
MEASURE_STEPS = 2
#: how long a child may take to write its partial results after Ctrl-C
INTERRUPT_GRACE_S = 120


def read_plan(plan_file: str | Path) -> tuple[dict[str, Any], bytes]:
    p = Path(plan_file)
    if not safe_is_file(p):
        raise QPlanError(f"plan file {plan_file} does not exist (make one with `qplan estimate ... --output plan.json`)")
    raw = read_limited(p, "plan")  # the bytes the run records: one bounded read, decoded from them
    plan = decode_json(raw, "plan", p)
    check_plan(plan, where=str(plan_file))
    return plan, raw


def _data_path(data: str, planned: bool) -> Path:
    """``--data`` as the worker reads it: an absolute path (a --data plan's Hub dataset id: its cached snapshot)."""
    if planned:
        from qplan.planner.data.sources import resolve_source

        return resolve_source(data).resolve()
    return Path(data).resolve()


def _slug(s: str) -> str:
    """A folder-name-safe, bounded form of a name (hostile names stay inside the run folder)."""
    return (re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-.") or "model")[:64]


def _shim_dir() -> str:
    """A folder whose ``qplan/`` links to this qplan's packages, for a foreign interpreter's
    PYTHONPATH (``qplan.observe.trace.unsloth_run.shim_dir``, shared with the Unsloth trace)."""
    from qplan.observe.trace.unsloth_run import shim_dir

    return shim_dir()


def _spawn_and_wait(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> tuple[int, bool]:
    """Run the worker; on Ctrl-C forward SIGINT once and wait for it. Returns (returncode, interrupted)."""
    from .nodes import start_logged

    proc, pump = start_logged(cmd, env, log_path, cwd)
    interrupted = False
    deadline = None
    while True:
        try:
            rc = proc.wait(timeout=None if deadline is None else max(0.1, deadline - time.monotonic()))
            break
        except KeyboardInterrupt:
            if not interrupted:
                interrupted = True
                proc.send_signal(signal.SIGINT)
                deadline = time.monotonic() + INTERRUPT_GRACE_S
                print("\nqplan: interrupted — waiting for the run to write its partial measurements "
                      "(Ctrl-C again to kill it)", file=sys.stderr, flush=True)
            else:
                proc.kill()
        except subprocess.TimeoutExpired:
            proc.kill()
    pump.join(timeout=10)
    return rc, interrupted


def _crash_doc(plan: dict[str, Any], backend: str, rc: int, interrupted: bool, log_path: Path) -> dict[str, Any]:
    """measured.json for a child that died without writing one."""
    if rc < 0:
        sig = signal.Signals(-rc).name
        msg = f"the training process was killed by {sig}"
        if sig == "SIGKILL":
            msg += " (on Linux usually the kernel's OOM killer: the host ran out of memory)"
    else:
        msg = f"the training process exited with code {rc} without writing measurements"
    msg += f"; see {log_path.name} in the run folder"
    status = "interrupted" if interrupted else "error"
    return {"schema_version": 1, "status": status, "backend": backend, "model": plan["model"]["name"],
            "run": {}, "measured": {}, "notes": [],
            "failure": {"kind": "crashed", "message": msg, "step": None, "phase": None, "exception": None,
                        "traceback": None}}


def _multi_device(device: str, python: str) -> str:
    """The device kind a multi-rank run uses: ``cpu`` or ``cuda`` (each rank takes the GPU of its
    local rank); ``auto`` asks the backend's interpreter whether torch sees a GPU."""
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda:"):
        raise QPlanError(f"--device {device} names one GPU, but a multi-GPU plan takes one per rank: use --device "
                         "cuda (set CUDA_VISIBLE_DEVICES to choose which)")
    if device == "cuda":
        return "cuda"
    return "cuda" if (_gpu_count(python) or 0) > 0 else "cpu"


def _gpu_count(python: str) -> int | None:
    try:
        out = subprocess.run([python, "-c", "import torch; print(torch.cuda.device_count())"], capture_output=True,
                             text=True, timeout=300, stdin=subprocess.DEVNULL)
        return int(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def summary_text(plan: dict[str, Any], doc: dict[str, Any], run_dir: Path) -> str:
    lines = [f"run folder: {run_dir}", f"status: {doc.get('status')}"
             + (f" — {doc['failure']['message']}" if doc.get("failure") else "")]
    for term, v in pairs(plan, doc).items():
        if v["measured"] is None:
            continue
        lines.append(f"{term:>18}: predicted {fmt_value(term, v['predicted'])}, measured "
                     f"{fmt_value(term, v['measured'])} ({fmt_err(v['error'])})")
    loss = (doc.get("measured") or {}).get("loss") or []
    if loss:
        ends = " -> ".join("NaN" if x is None or x != x else f"{x:.4f}" for x in (loss[0], loss[-1]))
        diverged = " (the loss went NaN or infinite: the run diverged)" if any(x is None or x != x for x in loss) else ""
        lines.append(f"{'loss':>18}: {ends} over {len(loss)} steps{diverged}")
    lines.append(f"report: {run_dir / 'report.md'} and report.html")
    return "\n".join(lines)


def run_plan(plan_file: str | Path, model_dir: str | None = None, random_init: bool = False,
             data: str | None = None, steps: int | None = None, epochs: float | None = None,
             device: str = "auto", out_dir: str | Path = "reports/runs", lr: float = DEFAULT_LR,
             seed: int = 0, callbacks: list[str] | None = None, largest_first: bool = False,
             node_rank: int | None = None, master_addr: str | None = None, master_port: int | None = None,
             join_timeout: int | None = None) -> dict[str, Any]:
    """Train ``plan_file`` for real, measure, and write a new run folder under ``out_dir``.

    A plan of several nodes: without ``node_rank`` every node runs on this host (the CPU, loopback rendezvous);
    with it, this machine runs that node, meeting node 0 at ``master_addr:master_port`` (``backends.nodes``).

    ``callbacks``: extra ``TrainerCallback`` classes by import path (``"module:Class"``), also
    read from ``$QPLAN_CALLBACKS`` (comma-separated) — for custom logging and fault injection.
    Returns ``{status, summary, run_dir, measured, error, failure}``.
    """
    plan, raw = read_plan(plan_file)
    from qplan.planner.api import check_consistent

    check_consistent(plan)  # world size = GPUs x nodes; the prediction is what the settings predict
    _check_objective(plan)
    if model_dir and random_init:
        raise QPlanError("give either --model-dir or --random-init, not both")
    if not model_dir and not random_init:
        raise QPlanError("no model: pass --model-dir DIR (a local model folder) or --random-init "
                         "(random weights from the plan's config)")
    if model_dir:
        from .modelsrc import check_model_dir

        check_model_dir(model_dir)
    else:
        from .modelsrc import BYTE_VOCAB

        vocab = plan["model"]["config"].get("vocab_size")
        if not isinstance(vocab, int) or vocab < BYTE_VOCAB:
            raise QPlanError(f"--random-init needs the plan's vocab_size >= {BYTE_VOCAB} for its byte-level "
                             f"tokenizer (got {vocab!r}): use --model-dir with a tokenizer")
    planned_data = plan["prediction"].get("data")
    largest_first = largest_first or bool((planned_data or {}).get("largest_first"))  # the flag, or the plan's setting
    if largest_first and not planned_data:
        raise QPlanError("--largest-first orders the batches of a --data plan: make the plan with --data (without it "
                         "every batch has the planned shape)")
    if planned_data and str(planned_data["format"]).startswith("axolotl:"):
        raise QPlanError(f"qplan run trains data formatted as TRL's SFTTrainer does, not axolotl's "
                         f"{planned_data['format']}: train this plan with axolotl, or plan with a TRL format to run it")
    if data is not None and not planned_data:
        from .data import read_jsonl

        read_jsonl(data)  # a missing file or a bad line is reported here, before any model loads
    elif planned_data:
        from qplan.planner.data.sources import read_records, resolve_source

        if data is not None:
            read_records(data)  # another file than the plan's: a bad row is one line here, before any model loads
        else:
            resolve_source(planned_data["path"])  # the plan's own data was read when planned: only that it is there
    if steps is not None and epochs is not None:
        raise QPlanError("give either --steps or --epochs, not both")
    if steps is None and epochs is None:
        steps = DEFAULT_STEPS
    if steps is not None and steps < WARMUP_STEPS + MEASURE_STEPS:
        raise QPlanError(f"--steps must be at least {WARMUP_STEPS + MEASURE_STEPS} "
                         f"({WARMUP_STEPS} warm-up + {MEASURE_STEPS} measured), got {steps}")
    if steps is not None and steps > MAX_STEPS:
        raise QPlanError(f"--steps must be at most {MAX_STEPS:,}, got {steps}")
    if epochs is not None and not (0 < epochs <= MAX_EPOCHS):
        raise QPlanError(f"--epochs must be > 0 and at most {MAX_EPOCHS:,}, got {epochs}")
    if not (0 < lr < float("inf")):
        raise QPlanError(f"--lr must be a finite number > 0, got {lr}")
    if device != "auto" and device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise QPlanError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    info = registry.backend_info(plan["backend"])
    if planned_data and info.name != "peft":
        raise QPlanError(f"qplan run trains --data plans with the peft backend only (its Trainer takes the plan's "
                         f"batching): the {info.name} backend would batch the data its own way; re-plan with --backend peft")
    registry.check_installed(info)
    _check_device_support(plan, device, info.python)
    from . import launch

    multi = launch.dist_section(plan)
    if multi is not None and planned_data:
        raise QPlanError("qplan run does not train --data plans on several ranks yet: each rank would draw its own "
                         "batches; plan for one GPU to run it")
    if multi is not None and plan.get("method") == "full":
        raise QPlanError("qplan run does not train full fine-tuning plans on several ranks yet (each rank would save "
                         "the sharded model): it is planned and traced (`qplan estimate --method trace`); run it on one GPU")
    one_rank = plan.get("distributed") if multi is None else None
    if one_rank and one_rank.get("strategy"):
        # --gpus 1 --strategy S: the launcher starts a strategy on 2 or more ranks; this plan would train as a plain
        # single process, not what it predicts (and ZeRO would run on the CPU)
        strategy = one_rank["strategy"]
        on_cpu = device == "cpu" or (device == "auto" and _multi_device(device, info.python) == "cpu")
        if strategy in ("zero2", "zero3") and on_cpu:
            raise QPlanError(f"--strategy {strategy} cannot train on the CPU here: `qplan run` launches DeepSpeed "
                             "ZeRO on GPUs only (through accelerate); on the CPU use --strategy ddp or fsdp")
        raise QPlanError(f"the plan is for 1 GPU with --strategy {strategy}: `qplan run` launches a strategy on 2 or more "
                         "ranks and would train this as a plain single process: re-plan with --gpus 2 or more, or "
                         "without --strategy")
    n_nodes = int((multi or {}).get("nodes") or 1)
    _check_node_options(n_nodes, node_rank, master_addr, master_port, join_timeout)
    if multi is not None:
        device = _multi_device(device, info.python)
        gpus = _gpu_count(info.python) if device == "cuda" else None
        launch.check_launchable(plan, device, launch.cpu_count(), gpus, node_rank)
    if callbacks is None:
        callbacks = [c.strip() for c in os.environ.get("QPLAN_CALLBACKS", "").split(",") if c.strip()]

    probe_writable(check_folder(out_dir, "--out-dir", create=True), "--out-dir")
    nl = _node_launch(multi, n_nodes, node_rank, master_addr, master_port, join_timeout)  # may wait for node 0
    node_tag = f"-node{node_rank}" if node_rank is not None else ""
    stage = new_folder(out_dir, f"{utc_stamp()}-{_slug(plan['model']['name'])}-{_slug(info.name)}{node_tag}", PARTIAL)
    job = {
        "plan": "plan.json",  # paths inside the run folder are relative to it (the worker finds it from job.json)
        "backend": info.name, "target": info.target,
        "model_dir": str(Path(model_dir).resolve()) if model_dir else None, "random_init": bool(random_init),
        "seed": seed, "data": str(_data_path(data, bool(planned_data))) if data else None, "steps": steps,
        "epochs": epochs,
        "lr": lr, "device": device, "warmup_steps": WARMUP_STEPS, "measure_steps": MEASURE_STEPS,
        "callbacks": callbacks, "python": info.python, "largest_first": largest_first,
    }
    if multi is not None:
        job["world_size"] = int(multi["world_size"])
        job["nodes"] = n_nodes
    cmds = [[info.python, "-m", "qplan.backends.worker", str(stage.resolve() / "job.json")]]
    launcher: dict[str, Any] = {}
    try:
        (stage / "plan.json").write_bytes(raw)
        (stage / "job.json").write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
        if multi is not None:
            run_args = _run_args(model_dir, random_init, data, steps, epochs, lr, largest_first)
            cmds = launch.write_launch_files(stage, plan, device, info.python, nl, node_rank, run_args)
            launcher = {"device": device, "command": cmds[0] if len(cmds) == 1 else cmds,
                        "tool": "torchrun" if device == "cpu" else "accelerate launch",
                        "files": sorted(p.name for p in stage.iterdir() if p.suffix in (".sh", ".sbatch") or p.name in (
                            "accelerate_config.yaml", "deepspeed_config.json"))}
            if nl is not None:
                launcher.update(rendezvous=f"{'c10d' if device == 'cpu' else 'static'} {nl.endpoint}", nodes=n_nodes,
                                node_rank=node_rank, where="one node on this machine" if node_rank is not None
                                else "every node on this host, over loopback")
    except OSError as exc:
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
        raise QPlanError(f"--out-dir {out_dir}: cannot write the run folder ({exc.strerror or exc}); nothing was "
                         "left behind") from exc

    env = dict(os.environ)
    paths = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]  # the launch may run elsewhere
    if multi is not None:
        paths.append(os.getcwd())  # the launch runs in the run folder: modules beside the user stay importable
    shim = None
    if info.python != sys.executable:
        shim = _shim_dir()
        paths.insert(0, shim)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    log_path = stage / "worker.log"
    logs, exits = [log_path], None
    print(f"qplan: training in {stage} (renamed without {PARTIAL} once its report is written)", file=sys.stderr,
          flush=True)
    try:
        if nl is not None and node_rank is None:  # every node here: one launcher each
            from .nodes import NODE_ENV, spawn_nodes

            logs = [stage / f"node{n}.log" for n in range(n_nodes)]
            ended, interrupted = spawn_nodes(cmds, [dict(env, **{NODE_ENV: str(n)}) for n in range(n_nodes)], logs,
                                             stage)
            exits = {x.node: x for x in ended}
            rc = next((x.returncode for x in ended if x.returncode and not x.stopped),
                      next((x.returncode for x in ended if x.returncode), 0))
        else:
            if nl is not None:
                from .nodes import NODE_ENV, NodeExit

                env[NODE_ENV] = str(node_rank)
            rc, interrupted = _spawn_and_wait(cmds[0], env, log_path, cwd=stage if multi is not None else None)
            if nl is not None and node_rank is not None:
                exits = {node_rank: NodeExit(node_rank, rc, False)}
    finally:
        if shim:
            import shutil

            shutil.rmtree(shim, ignore_errors=True)

    measured_file = stage / "measured.json"
    doc = None
    if multi is not None:
        doc = launch.merge_ranks(plan, stage, rc, interrupted, logs, launcher, exits)
        _refuse_mismatched_plans(doc, stage)
    elif measured_file.is_file():
        try:
            doc = decode_json(read_limited(measured_file, "measurements"), "measurements", measured_file, nonfinite=True)
        except QPlanError:
            doc = None
    if doc is None:
        doc = _crash_doc(plan, info.name, rc, interrupted, log_path)
    prs = pairs(plan, doc)
    doc["error"] = {k: v["error"] for k, v in prs.items()}
    doc["compared"] = prs
    try:
        atomic_write(measured_file, dumps_finite(doc, indent=2, ensure_ascii=False) + "\n")  # NaN/inf as null
        write_run_report(stage, plan, doc)
        run_dir = publish_folder(stage, free_name(stage.parent, stage.name[: -len(PARTIAL)]))
    except (OSError, QPlanError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise QPlanError(f"the run ended ({doc['status']}) but its folder could not be completed ({why}): what was "
                         f"written is kept in {stage}") from exc
    measured_file = run_dir / "measured.json"
    reports = {"md": run_dir / "report.md", "html": run_dir / "report.html"}
    return {
        "status": doc["status"],
        "summary": summary_text(plan, doc, run_dir),
        "run_dir": str(run_dir),
        "measured_file": str(measured_file),
        "report_md": str(reports["md"]),
        "report_html": str(reports["html"]),
        "error": doc["error"],
        "failure": doc.get("failure"),
        "returncode": rc,
    }


def _check_objective(plan: dict[str, Any]) -> None:
    """A DPO or KTO plan trains with TRL's ``DPOTrainer`` / ``KTOTrainer`` (``backends.preference_train``): the peft
    backend, TRL installed; one line otherwise, before any model loads."""
    from qplan.planner.objectives import TRAINERS

    objective = plan["training"].get("objective", "sft")
    if objective == "sft":
        return
    if objective == "grpo" and plan["training"]["grpo"].get("vllm"):
        raise QPlanError("qplan run generates with transformers' generate: a --vllm plan is not run (vLLM is not "
                         "installed with qplan); re-plan without --vllm to measure the trainer's side")
    if objective not in TRAINERS:
        raise QPlanError(f"qplan run trains SFT, DPO, KTO, reward and GRPO plans: this plan's objective is "
                         f"{objective!r}")
    name, trainer = objective.upper(), TRAINERS[objective][0]
    if plan["backend"] != "peft":
        raise QPlanError(f"qplan run trains {name} plans with the peft backend (TRL's {trainer} on a PEFT model), not "
                         f"{plan['backend']}: re-plan with --backend peft")
    if plan["prediction"].get("data"):
        raise QPlanError(f"qplan run does not train a {name} plan's --data yet (it cuts its rows from text): plan "
                         "the run with --seq-len instead (the plan's worst batch is its seq_len)")
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise QPlanError(f"a {name} plan trains with TRL's {trainer}, which is not installed: pip install trl==1.16.0")


def _check_node_options(n_nodes: int, node_rank: int | None, master_addr: str | None, master_port: int | None,
                        join_timeout: int | None) -> None:
    """One line for node options that do not fit the plan (before anything starts)."""
    given = [f for f, v in (("--node-rank", node_rank), ("--master-addr", master_addr), ("--master-port", master_port),
                            ("--join-timeout", join_timeout)) if v is not None]
    if given and n_nodes == 1:
        raise QPlanError(f"{', '.join(given)}: for plans of several nodes (qplan estimate --nodes M); this plan has "
                         "1 node")
    if node_rank is not None and not 0 <= node_rank < n_nodes:
        raise QPlanError(f"--node-rank must be 0..{n_nodes - 1} (the plan has {n_nodes} nodes), got {node_rank}")
    if node_rank is not None and not master_addr:
        raise QPlanError("--node-rank needs --master-addr: node 0's address, the same on every node")
    if master_addr is not None and node_rank is None:
        raise QPlanError("--master-addr needs --node-rank (which node this machine is); without both, --device cpu "
                         "runs every node on this host")
    if master_port is not None and not 0 < master_port < 65536:
        raise QPlanError(f"--master-port must be 1..65535, got {master_port}")
    if join_timeout is not None and not 0 < join_timeout <= 86_400:
        raise QPlanError(f"--join-timeout must be 1..86400 seconds, got {join_timeout}")


def _node_launch(multi: dict[str, Any] | None, n_nodes: int, node_rank: int | None, master_addr: str | None,
                 master_port: int | None, join_timeout: int | None) -> Any:
    """Where the nodes meet (None for one node), checked before anything starts: node 0 (or this host, for every
    node here) must be able to host the rendezvous; another node waits for node 0 to answer."""
    if n_nodes == 1 or multi is None:
        return None
    from . import nodes

    wait = join_timeout or nodes.DEFAULT_JOIN_TIMEOUT
    addr = master_addr or "127.0.0.1"
    port = master_port if master_port is not None else nodes.DEFAULT_PORT if node_rank is not None else \
        nodes.free_port(addr)
    if node_rank:
        nodes.wait_for_master(addr, port, wait)
    else:
        nodes.check_host(addr, port)
    return nodes.NodeLaunch(n_nodes, int(multi["gpus_per_node"]), addr, port, "qplan", wait)


def _run_args(model_dir: str | None, random_init: bool, data: str | None, steps: int | None, epochs: float | None,
              lr: float, largest_first: bool) -> list[str]:
    """This run's ``qplan run`` options, for the SLURM script that trains the plan again on every node."""
    out = ["--model-dir", str(Path(model_dir).resolve())] if model_dir else ["--random-init"] if random_init else []
    if data:
        out += ["--data", str(Path(data).resolve()) if Path(data).exists() else data]
    out += ["--steps", str(steps)] if steps is not None else ["--epochs", repr(epochs)] if epochs is not None else []
    if lr != DEFAULT_LR:
        out += ["--lr", repr(lr)]
    return out + (["--largest-first"] if largest_first else [])


def _refuse_mismatched_plans(doc: dict[str, Any], stage: Path) -> None:
    """Nodes started with different plans stop at the rendezvous, before any model loads: one line, no run folder."""
    from .ranks import PLAN_MISMATCH

    for e in doc.get("ranks") or []:
        f = e.get("failure") or {}
        if f.get("kind") == PLAN_MISMATCH:
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
            raise QPlanError(str(f.get("message")))


def _check_device_support(plan: dict[str, Any], device: str, python: str | None) -> None:
    """torchao's low-bit AdamW updates each tensor through ``torch.compile(fullgraph=True)``, which finds no frame to
    compile under the CPU measurement's live-tensor tracker (a TorchDispatchMode), and its eager fallback would
    quantize through a [numel, 256] comparison no GPU makes: such a plan is measured on a GPU (CUDA counters, no
    tracker), refused on the CPU before anything starts.  So are the fused losses that are Triton kernels only (CCE,
    Liger); TRL's fused head folds its tiles with torch ops on the CPU, which the plan's CPU prediction counts."""
    from qplan.planner.vocab import OPTIMIZERS

    on_cpu = device == "cpu" or (device == "auto" and _multi_device(device, python) == "cpu")
    if plan["training"].get("loss") == "cce" and on_cpu:
        raise QPlanError("--loss cce (Cut Cross Entropy) cannot train on the CPU: its Triton kernels run on Ampere or "
                         "newer GPUs only; run the plan on a GPU, or plan it with --loss full to measure on the CPU")
    if plan["training"].get("liger_kernels") and on_cpu:
        raise QPlanError("--liger-kernels cannot train on the CPU: Liger's Triton kernels run on GPUs only; run the "
                         "plan on a GPU, or plan it without them to measure on the CPU")
    if plan["training"].get("loss") == "liger" and on_cpu:
        raise QPlanError("--loss liger (Liger's fused linear cross-entropy) cannot train on the CPU: its Triton kernels "
                         "run on GPUs only; run the plan on a GPU, or plan it with --loss full to measure on the CPU")
    row = OPTIMIZERS.get(plan["training"].get("optimizer", ""))
    if row is None or not row.state.startswith("torchao"):
        return
    if on_cpu:
        raise QPlanError(f"optimizer {row.name} (torchao, a compiled update) cannot be measured on the CPU: its "
                         "torch.compile finds no frame under the live-tensor tracker; run the plan on a GPU, or plan "
                         "the CPU run with another optimizer")
