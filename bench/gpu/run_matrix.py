#!/usr/bin/env python3
"""Run the GPU matrix (bench/gpu/matrix.py) in one go: build models once, one process per cell.

    python bench/gpu/run_matrix.py --dry-run                 # any machine: plans + list, no torch
    python bench/gpu/run_matrix.py --budget-seconds 3300     # on the GPU machine
    python bench/gpu/run_matrix.py --tiny --device cpu --limit 1   # CPU smoke test, tiny models

What a real run does, in order:

1. names the GPU with ``nvidia-smi`` (the orchestrator never touches CUDA, so it holds no
   context while cells measure) and picks the planner's GPU for the fits verdict
   (``--gpu``, else from the name: H100 -> h100-80gb, H200 -> h200, ...);
2. probes each backend in its own process (check_env.py) into ``<root>/env.json``; a backend
   that does not import has its cells listed as skipped, with the error;
3. writes every cell's plan to ``<root>/plans/<cell>.json`` and the order to ``matrix.json``;
4. builds each model once from its spec with random bf16 weights into
   ``--model-store/<model>`` (models.py, on the GPU, in a child process) and reuses it for every
   cell; when the disk is short it evicts the least recently used model (rebuilt if needed);
5. runs each cell as ``python -m qplan.cli.main run PLAN --model-dir DIR --device cuda
   --out-dir <root>/<cell>`` in its own process (Unsloth patches libraries on import), which
   makes the run folder ``<root>/<cell>/<time>-<model>-<backend>/`` (plan.json,
   measured.json, report.md/html, worker.log); the cell's own record is ``<root>/<cell>/cell.json``;
6. stops starting cells when ``--budget-seconds`` is nearly spent (the next cell's expected
   time, from measured cells of the same model and backend, must fit), and
7. runs ``qplan report`` over every finished run folder into ``<root>/summary/``.

``<root>`` is ``--out-root/<gpu-slug>``, e.g. ``reports/gpu/nvidia-h100-80gb-hbm3``.
Resumable: a cell whose folder already holds a finished measured.json (any status but
``running``) is not run again; a cell that failed without one is retried only with
``--retry-failed``. ``matrix-status.json`` and ``matrix.md`` are rewritten after every cell.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def load_sibling(name: str):
    """Import bench/gpu/<name>.py as ``qplan_bench_<name>`` (bench/gpu is not a package, and
    names like ``matrix`` or ``models`` must not shadow anything on sys.path)."""
    import importlib.util

    key = f"qplan_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


mx = load_sibling("matrix")

DEFAULT_STORE = "/tmp/qplan-models"
#: Seconds kept back from the budget for the final `qplan report` and writing the status.
REPORT_RESERVE_S = 60
#: SIGINT grace: `qplan run` forwards Ctrl-C to its worker, which writes partial measurements.
INTERRUPT_GRACE_S = 150
#: --tiny: shapes shrink so a CPU runs a cell in seconds.
TINY_SEQ_DIVISOR = 32

#: nvidia-smi name -> planner GPU (model_specs/gpus); first match wins.
GPU_MAP = (
    (r"H200", "h200"), (r"H100", "h100-80gb"), (r"A100.*80", "a100-80gb"), (r"A100", "a100-40gb"),
    (r"L40S", "l40s"), (r"\bL4\b", "l4"), (r"A10G", "a10g"), (r"4090", "rtx-4090"), (r"3090", "rtx-3090"),
    (r"3060", "rtx-3060-12gb"), (r"V100.*32", "v100-32gb"), (r"V100", "v100-16gb"), (r"T4", "t4"),
)

CELL_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
}


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.") or "gpu"


def gpu_name_from_smi() -> str | None:
    """The first GPU's name from nvidia-smi (no CUDA context in this process), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if out.returncode == 0 and names else None


def planner_gpu_for(name: str | None) -> str | None:
    if not name:
        return None
    for pattern, key in GPU_MAP:
        if re.search(pattern, name, re.IGNORECASE):
            return key
    return None


# ----------------------------------------------------------------------------- cell state


def finished_runs(cell_dir: Path) -> list[Path]:
    """Run folders under ``cell_dir`` whose measured.json is final (status not 'running'), oldest first."""
    runs = []
    own = [cell_dir / "measured.json"] if (cell_dir / "measured.json").is_file() else []
    for m in sorted(cell_dir.glob("*/measured.json")) + own:
        try:
            status = json.loads(m.read_text(encoding="utf-8")).get("status")
        except (OSError, json.JSONDecodeError):
            continue
        if status != "running":
            runs.append(m.parent)
    return sorted(runs, key=lambda p: (p / "measured.json").stat().st_mtime)


def run_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "measured.json").read_text(encoding="utf-8")).get("status")
    except (OSError, json.JSONDecodeError):
        return None


def read_cell_record(cell_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cell_dir / "cell.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def resume_decision(cell_dir: Path, retry_failed: bool) -> str | None:
    """Why a cell is not (re)run: 'done' (a finished measured.json), 'failed before', or None."""
    if finished_runs(cell_dir):
        return "done"
    rec = read_cell_record(cell_dir)
    if rec and rec.get("status") not in (None, "ok", "oom", "running", "not started", "skipped") and not retry_failed:
        return "failed before"
    return None


# ----------------------------------------------------------------------------- model store


@dataclass
class ModelStore:
    root: Path
    device: str
    tiny: bool = False
    python: str = sys.executable
    build_timeout: int = 1800
    last_used: dict[str, float] = field(default_factory=dict)
    builds: list[dict[str, Any]] = field(default_factory=list)

    def path(self, model: str) -> Path:
        return self.root / (f"tiny-{model}" if self.tiny else model)

    def ensure(self, model: str, need_bytes: int, log: Path) -> Path:
        """The model's folder, built now if missing (evicting other models if the disk is short)."""
        is_built = load_sibling("models").is_built

        dest = self.path(model)
        self.last_used[model] = time.time()
        if is_built(dest):
            return dest
        self.root.mkdir(parents=True, exist_ok=True)
        self._make_room(need_bytes, keep=model)
        cmd = [self.python, str(HERE / "models.py"), "--model", model, "--dest", str(dest), "--device", self.device]
        if self.tiny:
            cmd.append("--tiny")
        t0 = time.time()
        with open(log, "ab") as fh:
            fh.write(("+ " + " ".join(cmd) + "\n").encode())
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **CELL_ENV},
                                  timeout=self.build_timeout)
        self.builds.append({"model": model, "seconds": round(time.time() - t0, 1), "rc": proc.returncode})
        if proc.returncode != 0 or not is_built(dest):
            raise RuntimeError(f"building {model} failed (exit {proc.returncode}); see {log}")
        return dest

    def _make_room(self, need_bytes: int, keep: str) -> None:
        margin = 2 * 2**30
        while shutil.disk_usage(self.root).free < need_bytes + margin:
            others = [m for m in self.last_used if m != keep and self.path(m).exists()]
            others += [p.name for p in self.root.iterdir() if p.is_dir() and p.name not in self.last_used
                       and p.name != self.path(keep).name]
            if not others:
                return  # nothing to evict: let the build try (and fail loudly if it must)
            victim = min(others, key=lambda m: self.last_used.get(m, 0.0))
            print(f"[matrix] disk short: evicting model {victim} from {self.root}", flush=True)
            shutil.rmtree(self.path(victim) if victim in self.last_used else self.root / victim, ignore_errors=True)
            self.last_used.pop(victim, None)


# ----------------------------------------------------------------------------- running one cell


def _worker_pids(cell_dir: Path) -> list[int]:
    """PIDs of `qplan.backends.worker` processes whose job lies under ``cell_dir`` (our own children)."""
    pids = []
    needle = str(cell_dir.resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qplan.backends.worker" in cmd and needle in cmd:
            pids.append(int(proc.name))
    return pids


def run_cell_process(cmd: list[str], cell_dir: Path, timeout: float, log: Path) -> tuple[int | None, bool]:
    """Run ``qplan run`` for one cell; on timeout SIGINT it (it forwards to its worker, which writes
    partial measurements), then kill what is left. Returns (returncode, timed_out)."""
    with open(log, "ab") as fh:
        fh.write(("+ " + " ".join(cmd) + "\n").encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **CELL_ENV}, cwd=str(REPO), start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            pass
        fh.write(f"\n[matrix] cell timed out after {timeout:.0f}s: SIGINT\n".encode())
        fh.flush()
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout=INTERRUPT_GRACE_S), True
        except subprocess.TimeoutExpired:
            pass
        for pid in [proc.pid] + _worker_pids(cell_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait(), True


# ----------------------------------------------------------------------------- the matrix run


@dataclass
class Options:
    out_root: Path
    slug: str
    gpu: str
    device: str
    model_store: Path
    budget_s: float | None
    cell_timeout: float
    steps: int | None
    limit: int | None
    only: str | None
    backends: tuple[str, ...] | None
    include_skipped: bool
    retry_failed: bool
    max_backend_failures: int
    tiny: bool
    dry_run: bool
    report: bool
    env_check: bool
    env_cache: Path | None = None


def tiny_plan_fn(spec_dir: Path):
    """Plans for --tiny: shrunken user specs (tiny-<model>) and sequences / TINY_SEQ_DIVISOR."""
    tiny_config = load_sibling("models").tiny_config
    from qplan.planner.model.catalog import load_spec, make_spec

    os.environ["QPLAN_SPEC_DIR"] = str(spec_dir)
    spec_dir.mkdir(parents=True, exist_ok=True)
    made: set[str] = set()

    def plan_fn(cell: mx.Cell, gpu: str) -> dict[str, Any]:
        name = f"tiny-{cell.model}"
        if name not in made:
            spec = make_spec(tiny_config(load_spec(cell.model).config), name, {"derived_from": cell.model})
            (spec_dir / f"{name}.json").write_text(json.dumps(spec.to_json(), indent=2) + "\n", encoding="utf-8")
            made.add(name)
        small = mx.Cell(cell.model, cell.quant, (cell.batch_size, max(16, cell.seq_len // TINY_SEQ_DIVISOR)),
                        cell.grad_ckpt, cell.backend, cell.optimizer)
        return mx.plan_dict(small, gpu, model=name)

    return plan_fn


def write_status(root: Path, opts: Options, m: mx.Matrix, records: dict[str, dict[str, Any]],
                 started: float, store: ModelStore | None, notes: list[str]) -> None:
    rows = []
    for i, v in enumerate(m.order, 1):
        rec = records.get(v.cell.id, {"status": "pending"})
        rows.append({"order": i, "id": v.cell.id, **{k: rec.get(k) for k in ("status", "seconds", "run_dir", "reason")}})
    doc = {"gpu_slug": opts.slug, "planner_gpu": opts.gpu, "device": opts.device, "tiny": opts.tiny,
           "elapsed_s": round(time.monotonic() - started, 1), "budget_s": opts.budget_s,
           "counts": _counts(rows), "model_builds": store.builds if store else [], "notes": notes,
           "cells": rows, "skipped": [{"id": v.cell.id, "reason": v.reason} for v in m.skipped]}
    (root / "matrix-status.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    lines = [f"# GPU matrix on {opts.slug}", "",
             f"planner GPU {opts.gpu}; {len(m.order)} cells in order, {len(m.skipped)} skipped as predicted "
             f"not to fit; elapsed {doc['elapsed_s']:.0f} s" + (f" of a {opts.budget_s:.0f} s budget" if opts.budget_s else ""),
             "", "counts: " + ", ".join(f"{k} {v}" for k, v in sorted(doc["counts"].items())), "",
             "| # | cell | status | s | run folder |", "|---:|---|---|---:|---|"]
    for r in rows:
        run = Path(r["run_dir"]).relative_to(root) if r.get("run_dir") else ""
        lines.append(f"| {r['order']} | {r['id']} | {r['status']}{' — ' + r['reason'] if r.get('reason') else ''} "
                     f"| {r['seconds'] if r.get('seconds') is not None else ''} | {run} |")
    if m.skipped:
        lines += ["", "## Skipped (predicted not to fit, or refused by the planner)", ""]
        lines += [f"- {v.cell.id}: {v.reason}" for v in m.skipped]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (root / "matrix.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def expected_seconds(v: mx.Verdict, measured: dict[tuple[str, str], list[float]]) -> float:
    """Mean measured time of this model+backend so far, else the matrix's prior estimate."""
    seen = measured.get((v.cell.model, v.cell.backend))
    return sum(seen) / len(seen) if seen else v.seconds


def run(opts: Options) -> int:
    started = time.monotonic()
    root = opts.out_root / opts.slug
    root.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    plan_fn = mx.plan_dict
    if opts.tiny:
        plan_fn = tiny_plan_fn(root / "tiny-specs")
        notes.append(f"--tiny: models shrunk to 2 layers / hidden 64 / vocab 512, sequences / {TINY_SEQ_DIVISOR}; "
                     f"a smoke test of the pipeline, not a measurement of the real models")
    m = mx.build_matrix(opts.gpu, plan_fn=plan_fn, include_skipped=opts.include_skipped)
    first = [v.cell for v in m.order[:mx.COVER_WITHIN]]
    missing = mx.uncovered_values(first)
    mx.write_plans(m, root)
    selected = [v for v in m.order
                if (not opts.only or re.search(opts.only, v.cell.id))
                and (not opts.backends or v.cell.backend in opts.backends)]
    if opts.limit is not None:
        selected = selected[:opts.limit]
    done_before = {v.cell.id: resume_decision(root / v.cell.id, opts.retry_failed) for v in selected}

    print(f"[matrix] {root}: {len(m.order)} cells in order, {len(m.skipped)} skipped as predicted not to fit "
          f"{opts.gpu}; first {mx.COVER_WITHIN} cover every axis value: "
          f"{'yes' if not missing else 'NO, missing ' + ', '.join(missing)}",
          flush=True)
    for v in m.skipped:
        print(f"[matrix]   skip {v.cell.id}: {v.reason}", flush=True)
    todo = [v for v in selected if done_before[v.cell.id] is None]
    print(f"[matrix] selected {len(selected)}; already done {sum(1 for d in done_before.values() if d == 'done')}, "
          f"failed before (not retried) {sum(1 for d in done_before.values() if d == 'failed before')}, "
          f"to run {len(todo)}; rough total {sum(v.seconds for v in todo) / 60:.0f} min (prior estimate, not measured)",
          flush=True)
    if opts.dry_run:
        for i, v in enumerate(selected, 1):
            state = done_before[v.cell.id] or "would run"
            print(f"  {i:>4} {v.cell.id:72} {state}")
        print(f"[matrix] dry run: plans in {root / 'plans'}, order in {root / 'matrix.json'}; nothing trained", flush=True)
        return 0 if not missing else 1

    records: dict[str, dict[str, Any]] = {}
    for v in m.order:
        rec = read_cell_record(root / v.cell.id)
        runs = finished_runs(root / v.cell.id)
        if runs:
            records[v.cell.id] = {**(rec or {}), "status": run_status(runs[-1]) or "done", "run_dir": str(runs[-1])}
        elif rec:
            records[v.cell.id] = rec
    _warn_stale_qplan(notes)

    broken: dict[str, str] = {}
    if opts.env_check:
        check_env = load_sibling("check_env")

        needed = sorted({v.cell.backend for v in todo})
        env = None
        if opts.env_cache and opts.env_cache.is_file():  # probed ok earlier on this machine
            cached = json.loads(opts.env_cache.read_text(encoding="utf-8"))
            if cached.get("ok") and set(needed) <= set(cached.get("backends", {})):
                env = cached
                print(f"[matrix] backends probed earlier on this machine: {opts.env_cache}", flush=True)
        if env is None:
            env = check_env.check(needed) if needed else {"backends": {}}
            if opts.env_cache and env.get("ok"):
                opts.env_cache.write_text(json.dumps(env, indent=2) + "\n", encoding="utf-8")
        (root / "env.json").write_text(json.dumps(env, indent=2) + "\n", encoding="utf-8")
        for b, res in env["backends"].items():
            if not res.get("ok"):
                broken[b] = f"backend {b} does not import: {res.get('error', '?')} (see env.json)"
                notes.append(broken[b])
                print(f"[matrix] {broken[b]}", flush=True)

    store = ModelStore(opts.model_store, "cuda" if opts.device.startswith("cuda") else "cpu", tiny=opts.tiny)
    measured: dict[tuple[str, str], list[float]] = {}
    fails: dict[str, int] = {}
    stopped = None
    for k, v in enumerate(todo, 1):
        cid, cell = v.cell.id, v.cell
        cell_dir = root / cid
        if cell.backend in broken:
            records[cid] = {"status": "skipped", "reason": broken[cell.backend]}
            print(f"[matrix] [{k}/{len(todo)}] {cid}: skipped ({cell.backend} unavailable)", flush=True)
            continue
        elapsed = time.monotonic() - started
        need = expected_seconds(v, measured)
        if not store.path(cell.model).exists():
            need += 30 + 2 * v.plan["prediction"]["params"]["base"] / 1e9  # build: init + write at ~1 GB/s
        if opts.budget_s is not None and elapsed + need + REPORT_RESERVE_S > opts.budget_s:
            stopped = (f"time budget: {elapsed:.0f} s used of {opts.budget_s:.0f}; next cell {cid} needs "
                       f"~{need:.0f} s; {len([x for x in todo if x.cell.id not in records])} cells not started")
            break
        cell_dir.mkdir(parents=True, exist_ok=True)
        log = cell_dir / "cell.log"
        t0 = time.monotonic()
        rec: dict[str, Any] = {"id": cid, "cell": cell.to_json(), "status": "running",
                               "plan": str(root / "plans" / f"{cid}.json"),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "attempts": (read_cell_record(cell_dir) or {}).get("attempts", 0) + 1}
        try:
            model_dir = store.ensure(cell.model, int(2 * v.plan["prediction"]["params"]["base"]), log)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            rec.update(status="failed", reason=f"model build: {exc}", seconds=round(time.monotonic() - t0, 1))
            _save_record(cell_dir, rec)
            records[cid] = rec
            print(f"[matrix] {cid}: {rec['reason']}", flush=True)
            continue
        cmd = [sys.executable, "-m", "qplan.cli.main", "run", rec["plan"], "--model-dir", str(model_dir),
               "--device", opts.device, "--out-dir", str(cell_dir), "--format", "json"]
        if opts.steps is not None:
            cmd += ["--steps", str(opts.steps)]
        timeout = opts.cell_timeout
        if opts.budget_s is not None:
            timeout = min(timeout, opts.budget_s - (time.monotonic() - started) - REPORT_RESERVE_S)
        rc, timed_out = run_cell_process(cmd, cell_dir, timeout, log)
        runs = finished_runs(cell_dir)
        status = run_status(runs[-1]) if runs else None
        seconds = round(time.monotonic() - t0, 1)
        rec.update(cmd=cmd, rc=rc, timed_out=timed_out, seconds=seconds, model_dir=str(model_dir),
                   finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   run_dir=str(runs[-1]) if runs else None,
                   status=("timeout" if timed_out and status in (None, "interrupted") else status or "failed"))
        if not runs:
            rec["reason"] = f"qplan run exited {rc} without a measured.json; see {log}"
        _save_record(cell_dir, rec)
        records[cid] = rec
        if rec["status"] in ("ok", "oom"):
            measured.setdefault((cell.model, cell.backend), []).append(seconds)
            fails[cell.backend] = 0
        else:
            fails[cell.backend] = fails.get(cell.backend, 0) + 1
            if fails[cell.backend] >= opts.max_backend_failures:
                broken[cell.backend] = (f"backend {cell.backend}: {fails[cell.backend]} cells in a row failed; "
                                        f"its remaining cells are skipped (last: {cid}, see its cell.log)")
                notes.append(broken[cell.backend])
        print(f"[matrix] [{k}/{len(todo)}] {cid}: {rec['status']} in {seconds:.0f} s"
              + (f" -> {Path(rec['run_dir']).relative_to(root)}" if rec.get("run_dir") else ""), flush=True)
        write_status(root, opts, m, records, started, store, notes)
    for v in todo:
        if v.cell.id not in records:
            records[v.cell.id] = {"status": "not started", "reason": "time budget" if stopped else "limit"}
    if stopped:
        notes.append(stopped)
        print(f"[matrix] stopped: {stopped}", flush=True)
    write_status(root, opts, m, records, started, store, notes)
    if opts.report:
        _report(root, m, records)
    write_status(root, opts, m, records, started, store, notes)
    print(f"[matrix] done in {time.monotonic() - started:.0f} s: {root}/matrix.md", flush=True)
    return 0


def _save_record(cell_dir: Path, rec: dict[str, Any]) -> None:
    tmp = cell_dir / "cell.json.tmp"
    tmp.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, cell_dir / "cell.json")


def _report(root: Path, m: mx.Matrix, records: dict[str, dict[str, Any]]) -> None:
    run_dirs = []
    for v in m.order:
        runs = finished_runs(root / v.cell.id)
        if runs:
            run_dirs.append(str(runs[-1]))
    if not run_dirs:
        print("[matrix] no finished runs: no summary", flush=True)
        return
    out = root / "summary"
    if out.exists() and (out / "summary.json").is_file():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "qplan.cli.main", "report", *run_dirs, "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), timeout=600)
    (root / "summary.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    print(f"[matrix] qplan report over {len(run_dirs)} runs: exit {proc.returncode} -> {out}", flush=True)


def _warn_stale_qplan(notes: list[str]) -> None:
    """Warn when the qplan that cells will import is not this checkout's code (a stale wheel)."""
    try:
        import qplan.backends
        import qplan.planner
    except ImportError as exc:
        notes.append(f"qplan does not import: {exc}")
        return
    for pkg, folder in ((qplan.planner, "planner"), (qplan.backends, "backends")):
        installed = Path(pkg.__file__).resolve().parent
        here = REPO / folder
        if installed == here.resolve():
            continue
        differ = [p.name for p in here.glob("*.py")
                  if not (installed / p.name).is_file() or (installed / p.name).read_bytes() != p.read_bytes()]
        if differ:
            msg = (f"the installed qplan ({installed}) differs from this checkout in {folder}/{', '.join(sorted(differ)[:5])}: "
                   f"reinstall it (bench/gpu/README.md) or the cells run old code")
            notes.append(msg)
            print(f"[matrix] warning: {msg}", flush=True)


def parse(argv: list[str] | None = None) -> Options:
    ap = argparse.ArgumentParser(description="Run the qplan GPU matrix (issue 5) in one go; resumable.",
                                 epilog="See bench/gpu/README.md.")
    ap.add_argument("--dry-run", action="store_true", help="plans, order, skips and resume state only; no torch")
    ap.add_argument("--gpu", default=None, help="planner GPU for the fits verdict [default: from nvidia-smi, else h100-80gb]")
    ap.add_argument("--gpu-name", default=None, help="name for the report folder [default: nvidia-smi's name]")
    ap.add_argument("--out-root", default=None, help="[default: reports/gpu; bench/gpu/_dry-run for --dry-run and --tiny]")
    ap.add_argument("--model-store", default=DEFAULT_STORE, help=f"where models are built once [default: {DEFAULT_STORE}]")
    ap.add_argument("--device", default="cuda", help="device for `qplan run` [default: cuda]")
    ap.add_argument("--budget-seconds", type=float, default=None, help="stop starting cells when this is nearly used")
    ap.add_argument("--cell-timeout", type=float, default=900, help="seconds per cell before SIGINT [default: 900]")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per cell [default: qplan run's, 4]")
    ap.add_argument("--limit", type=int, default=None, help="run at most N cells (in order)")
    ap.add_argument("--only", default=None, help="regex on cell ids")
    ap.add_argument("--backend", action="append", choices=list(mx.BACKENDS), help="only this backend (repeatable)")
    ap.add_argument("--include-skipped", action="store_true", help="also run cells predicted not to fit, last")
    ap.add_argument("--retry-failed", action="store_true", help="retry cells that failed without a measured.json")
    ap.add_argument("--max-backend-failures", type=int, default=3,
                    help="skip a backend's remaining cells after this many failures in a row [default: 3]")
    ap.add_argument("--tiny", action="store_true", help="shrink every model (smoke test; use with --device cpu)")
    ap.add_argument("--no-report", action="store_true", help="skip the final `qplan report`")
    ap.add_argument("--no-env-check", action="store_true", help="skip check_env.py's backend probes")
    ap.add_argument("--env-cache", default=None, help="reuse (and write) a successful probe here, e.g. /tmp/site/.qplan-env.json")
    a = ap.parse_args(argv)

    smi = None if a.dry_run else gpu_name_from_smi()
    name = a.gpu_name or smi
    gpu = a.gpu or planner_gpu_for(name) or mx.DEFAULT_GPU
    if a.tiny:
        slug = slugify(f"tiny-{a.device}")
    elif name:
        slug = slugify(name)
    else:
        slug = "no-gpu" if a.dry_run else None
    if slug is None:
        ap.error("no GPU found by nvidia-smi: pass --gpu-name (and --device), or use --dry-run / --tiny --device cpu")
    if not a.dry_run and a.device.startswith("cuda") and not smi:
        ap.error("--device cuda but nvidia-smi finds no GPU")
    default_root = HERE / "_dry-run" if (a.dry_run or a.tiny) else REPO / "reports" / "gpu"
    return Options(
        out_root=Path(a.out_root) if a.out_root else default_root, slug=slug, gpu=gpu, device=a.device,
        model_store=Path(a.model_store), budget_s=a.budget_seconds, cell_timeout=a.cell_timeout, steps=a.steps,
        limit=a.limit, only=a.only, backends=tuple(a.backend) if a.backend else None,
        include_skipped=a.include_skipped, retry_failed=a.retry_failed,
        max_backend_failures=a.max_backend_failures, tiny=a.tiny, dry_run=a.dry_run,
        report=not a.no_report, env_check=not a.no_env_check,
        env_cache=Path(a.env_cache) if a.env_cache else None)


def main(argv: list[str] | None = None) -> int:
    return run(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
