"""Plans of several nodes (``distributed.nodes > 1``): the launch of each node, the checks made before any
rank starts, all nodes on this host over loopback, and what each node did (no torch here).

Three ways to start a multi-node plan, through torchrun's c10d rendezvous on the CPU (``--rdzv-backend c10d``; node
0 hosts its store, ``is_host=1``; the others join it) and accelerate's static one on GPUs:

* **all nodes on this host** (``qplan run plan.json --device cpu``): one torchrun agent per node, each in its own
  process group, rendezvous on 127.0.0.1 — the multi-node path tested on the CPU;
* **one node per machine** (``qplan run plan.json --node-rank N --master-addr HOST``): this machine's agent
  (torchrun on the CPU; on GPUs ``accelerate launch --machine_rank N`` with the run folder's
  ``accelerate_config.yaml``);
* **SLURM** (``sbatch slurm.sbatch`` in a run folder): ``srun`` starts one task per node, each a ``qplan run
  --node-rank $SLURM_NODEID`` of the folder's plan.json, with node 0 (the first host of the allocation) as master.

torchrun's c10d rendezvous numbers the ranks in the order of its participants, not by ``--node-rank``; the node a
rank ran on is the one qplan started (``QPLAN_NODE_RANK`` in the rank's environment), recorded in its rank file.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError

#: torchrun's default master port (``--master-port``)
DEFAULT_PORT = 29500
#: torchrun's c10d rendezvous waits this long for every node to join (seconds; ``join_timeout``)
DEFAULT_JOIN_TIMEOUT = 600
#: after one node's launcher fails, how long the others get to end on their own before they are stopped
END_GRACE_S = 60
#: the environment variable that tells a rank which node (``--node-rank``) started it
NODE_ENV = "QPLAN_NODE_RANK"


@dataclass(frozen=True)
class NodeLaunch:
    """Where the nodes of one run meet: ``nodes`` x ``per_node`` ranks, the rendezvous at ``addr:port``."""
    nodes: int
    per_node: int
    addr: str
    port: int
    run_id: str
    join_timeout: int = DEFAULT_JOIN_TIMEOUT

    @property
    def endpoint(self) -> str:
        return f"[{self.addr}]:{self.port}" if ":" in self.addr else f"{self.addr}:{self.port}"


def torchrun_node_command(python: str, nl: NodeLaunch, node: int, job_file: str) -> list[str]:
    """Node ``node``'s torchrun: c10d rendezvous at ``nl.endpoint``, node 0 hosting its store."""
    return [python, "-m", "qplan.backends.torchrun", "--nnodes", str(nl.nodes), "--node-rank", str(node),
            "--nproc-per-node", str(nl.per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", nl.endpoint,
            "--rdzv-id", nl.run_id, "--rdzv-conf", f"is_host={1 if node == 0 else 0},join_timeout={nl.join_timeout}",
            "--max-restarts", "0", "-m", "qplan.backends.worker", job_file]


def accelerate_node_command(python: str, nl: NodeLaunch, node: int, config_file: str, job_file: str) -> list[str]:
    """Node ``node``'s ``accelerate launch`` (GPUs): the config's machines, this machine's rank, the master."""
    return [python, "-m", "accelerate.commands.launch", "--config_file", config_file, "--machine_rank", str(node),
            "--main_process_ip", nl.addr, "--main_process_port", str(nl.port), "-m", "qplan.backends.worker",
            job_file]


def slurm_script(plan: dict[str, Any], run_args: list[str], device: str, python: str) -> str:
    """``slurm.sbatch``: the plan (``plan.json`` beside it) trained again on ``nodes`` nodes, one ``srun`` task per
    node, each ``qplan run --node-rank $SLURM_NODEID`` with the allocation's first host as master. Each node makes a
    new run folder under ``$QPLAN_OUT_DIR`` (default: the folder above this one); node 0's report covers all nodes."""
    d = plan["distributed"]
    nodes, per_node = int(d["nodes"]), int(d["gpus_per_node"])
    gpu = device != "cpu"
    args = " ".join(shlex.quote(a) for a in run_args)
    inner = (f"exec {shlex.quote(python)} -m qplan.cli.main run plan.json --node-rank \"$SLURM_NODEID\" "
             f"--master-addr \"$MASTER_ADDR\" --master-port \"$MASTER_PORT\" --out-dir \"$QPLAN_OUT_DIR\" "
             f"--device {'cuda' if gpu else 'cpu'} {args}").rstrip()
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=qplan-{_job_name(plan['model']['name'])}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={per_node}" if gpu else f"#SBATCH --cpus-per-task={per_node}",
        *(["#SBATCH --exclusive"] if gpu else []),  # the one task per node runs every rank and its data loading
        "#SBATCH --output=qplan-%j.log",
        f"# {_job_name(plan['model']['name'])}: {nodes} nodes x {per_node} rank(s) each ({d['strategy']}), written by "
        "qplan run.",
        "# Submit from this run folder (`cd RUN_FOLDER && sbatch slurm.sbatch`): it trains plan.json again; each node",
        "# makes a new run folder under $QPLAN_OUT_DIR (default: the folder above this one), node 0's covers all nodes.",
        "set -euo pipefail",
        'cd "${SLURM_SUBMIT_DIR:-.}"',
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f'MASTER_PORT="${{QPLAN_MASTER_PORT:-{DEFAULT_PORT}}}"',
        'QPLAN_OUT_DIR="${QPLAN_OUT_DIR:-$(dirname "$PWD")}"',
        "export MASTER_ADDR MASTER_PORT QPLAN_OUT_DIR",
        # no --kill-on-bad-exit: a node whose run fails exits 1 after its report; the others end on their own (their
        # ranks lose the peer) and must not be killed while they write theirs
        f"srun --nodes={nodes} --ntasks-per-node=1 bash -c {shlex.quote(inner)}",
    ]
    return "\n".join(lines) + "\n"


def _job_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)[:40] or "run"


# ------------------------------------------------------------------------------ before anything starts


def check_addr(addr: str, port: int) -> list[Any]:
    """The socket addresses of ``addr``, or one line for a name that does not resolve."""
    if not (0 < port < 65536):
        raise QPlanError(f"--master-port must be 1..65535, got {port}")
    try:
        return socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise QPlanError(f"--master-addr {addr}: the name does not resolve on this machine "
                         f"({getattr(exc, 'strerror', None) or exc}): give node 0's address or host name") from exc


def check_host(addr: str, port: int) -> None:
    """Node 0 hosts the rendezvous store at ``addr:port``: one of ``addr``'s addresses must be this machine's, and
    the port free there."""
    last: OSError | None = None
    for family, kind, proto, _, sa in check_addr(addr, port):
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sa)
                return
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise QPlanError(f"--master-port {port} is in use on this machine ({addr}): node 0 hosts the "
                                     "rendezvous there; pick a free port (the same on every node)") from exc
                last = exc
    if last is not None and last.errno == errno.EADDRNOTAVAIL:
        raise QPlanError(f"--master-addr {addr} is not an address of this machine: node 0 hosts the rendezvous, so "
                         "start node 0 on the master machine (or give its own address)") from last
    raise QPlanError(f"--master-addr {addr}:{port}: cannot listen there ({getattr(last, 'strerror', None) or last})")


def wait_for_master(addr: str, port: int, timeout: float, poll: float = 0.5) -> None:
    """A node other than 0 waits (up to ``timeout`` s) for node 0's rendezvous to accept connections: node 0 may
    start later, but an address that cannot be reached, or no node 0 in time, is one line before any rank starts."""
    infos = check_addr(addr, port)
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    unreachable = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL)
    while True:
        errs = []
        for family, kind, proto, _, sa in infos:  # every address of the name (an IPv6 one may have no route)
            with socket.socket(family, kind, proto) as s:
                s.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
                try:
                    s.connect(sa)
                    return
                except OSError as exc:
                    last = exc
                    errs.append(exc)
        if errs and all(e.errno in unreachable for e in errs):
            raise QPlanError(f"--master-addr {addr}: unreachable from this machine ({last.strerror or last}); give "
                             "node 0's address as this node sees it") from last
        if time.monotonic() >= deadline:
            why = getattr(last, "strerror", None) or last or "no answer"
            raise QPlanError(f"node 0's rendezvous at {addr}:{port} did not answer within {timeout:g} s ({why}): start "
                             "node 0 with the same --master-addr/--master-port, or raise --join-timeout")
        time.sleep(poll)


def free_port(addr: str = "127.0.0.1") -> int:
    """A port free on ``addr`` now (the loopback rendezvous; the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ all nodes on this host


@dataclass
class NodeExit:
    node: int
    returncode: int
    stopped: bool  # ended by qplan after another node failed (or on Ctrl-C)


def _pump(src: Any, log: Any, prefix: bytes) -> None:
    """Copy a child's output to its log (``log``: opened before the child starts, so the log is in the run folder from
    the child's first instant; closed here once the output ends) and to our stderr: as it comes (a progress bar's
    carriage returns included), or line by line behind ``prefix`` (several nodes on one terminal)."""
    with log:
        chunks = iter(src.readline, b"") if prefix else iter(lambda: os.read(src.fileno(), 65536), b"")
        for chunk in chunks:
            log.write(chunk)
            log.flush()
            try:
                os.write(2, prefix + chunk)
            except OSError:  # pragma: no cover - stderr closed
                pass


def start_logged(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path | None,
                 prefix: bytes = b"") -> tuple[subprocess.Popen, threading.Thread]:
    """Start ``cmd`` in a session of its own, its output pumped to ``log_path`` and stderr (``_pump``)."""
    log = open(log_path, "ab")  # handed to the pump thread, which closes it
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, start_new_session=True, cwd=cwd)
    except BaseException:
        log.close()
        raise
    t = threading.Thread(target=_pump, args=(p.stdout, log, prefix), daemon=True)
    t.start()
    return p, t


def spawn_nodes(cmds: list[list[str]], envs: list[dict[str, str]], logs: list[Path], cwd: Path,
                grace_s: float = END_GRACE_S) -> tuple[list[NodeExit], bool]:
    """Start one launcher per node (each its own process group, its output in its log and on stderr, prefixed by
    its node), wait for all. Once one node's launcher fails, the others get ``grace_s`` to end on their own (their
    ranks see the lost peer), then their process groups are stopped (SIGTERM, then SIGKILL). Ctrl-C is forwarded
    to every node once; a second one kills them. Returns (each node's exit, interrupted)."""
    procs, pumps = [], []
    try:
        for n, (cmd, env, log_path) in enumerate(zip(cmds, envs, logs)):
            p, t = start_logged(cmd, env, log_path, cwd, f"[node {n}] ".encode())
            procs.append(p)
            pumps.append(t)
    except BaseException:
        for p in procs:
            _signal_group(p, signal.SIGKILL)
        raise
    stopped: set[int] = set()
    interrupted = False
    stop_at: float | None = None
    kill_at: float | None = None
    try:
        while True:
            try:
                live = [(n, p) for n, p in enumerate(procs) if p.poll() is None]  # reaped launchers are never signalled
                if not live:
                    break
                now = time.monotonic()
                if stop_at is None and any(p.returncode not in (None, 0) for p in procs):
                    stop_at = now + grace_s
                if stop_at is not None and now >= stop_at and kill_at is None:
                    for n, p in live:
                        stopped.add(n)
                        _signal_group(p, signal.SIGTERM)
                    kill_at = now + 30
                if kill_at is not None and now >= kill_at:
                    for _, p in live:
                        _signal_group(p, signal.SIGKILL)
                time.sleep(0.2)
            except KeyboardInterrupt:
                if not interrupted:
                    interrupted = True
                    for p in procs:
                        if p.poll() is None:
                            p.send_signal(signal.SIGINT)
                    print("\nqplan: interrupted — waiting for every node to write its partial measurements "
                          "(Ctrl-C again to kill them)", file=sys.stderr, flush=True)
                else:
                    for p in procs:
                        if p.poll() is None:
                            _signal_group(p, signal.SIGKILL)
    finally:
        for p in procs:  # however the wait ends, no node is left running (they are in sessions of their own)
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
                p.wait()
    for t in pumps:
        t.join(timeout=10)
    return [NodeExit(n, p.returncode, n in stopped) for n, p in enumerate(procs)], interrupted


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    """Signal a node: its launcher's process group, and its ranks (torchrun starts each in a session of its own)."""
    try:
        pgid = os.getpgid(p.pid)
    except OSError:
        return
    for pid in _descendants(p.pid):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first-found."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out
