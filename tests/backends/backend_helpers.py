"""Helpers and fixtures shared by the backend tests.

A module of its own rather than a conftest.py: tests elsewhere import from ``conftest`` by
name, and a second conftest module would shadow the root one.
"""

from __future__ import annotations

import json
import os
import sys
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).parent
TINY_CONFIG = HERE / "data" / "tiny-llama.json"  # hidden 128, 2 layers, GQA 4/2, vocab 512


def build_plan(spec, quant="bf16", grad_ckpt=True, backend="peft", batch_size=2, seq_len=64,
               optimizer="adamw_torch", r=16, targets="all-linear", dropout=0.05, reentrant=False,
               compute_dtype="bf16", adapter_dtype="fp32"):
    """A plan exactly as `qplan estimate` builds it (the planner's library API, no CLI)."""
    from qplan.planner.api import plan_dict

    return plan_dict(spec=spec, model=spec.name, quant=quant, grad_ckpt=grad_ckpt, backend=backend, batch_size=batch_size,
                     seq_len=seq_len, optimizer=optimizer, r=r, targets=targets, dropout=dropout, reentrant=reentrant,
                     compute_dtype=compute_dtype, adapter_dtype=adapter_dtype)


def write_plan(path: Path, plan: dict) -> Path:
    from qplan.planner.document import dumps

    path.write_text(dumps(plan), encoding="utf-8")
    return path


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a `qplan` child process; tests/backends on PYTHONPATH (for faults.py)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def qplan_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from qplan.cli.main import main; sys.exit(main())", *args]


def read_measured(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "measured.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def llama_spec():
    """The planner's spec of the tiny Llama config (inventory read on the meta device once;
    a frozen ``ModelSpec``, safe to share)."""
    from qplan.planner.model.catalog import load_spec

    return load_spec(str(TINY_CONFIG))


def make_plan_file(tmp_path: Path, **plan_options) -> Path:
    """``tmp_path/plan.json``: by default a bf16 plan with checkpointing for the PEFT backend."""
    return write_plan(tmp_path / "plan.json", build_plan(llama_spec(), **plan_options))


def estimate_and_run(tmp_path: Path, capsys, estimate_args: list[str], steps: int = 3) -> tuple[Path, dict]:
    """`qplan estimate --model TINY_CONFIG ARGS --output plan.json`, then a real CPU `qplan run` of it (random
    weights): the run folder and its measured.json (its status checked ok)."""
    from qplan.backends import runner
    from qplan.cli.main import main

    plan = tmp_path / "plan.json"
    args = ["estimate", "--model", str(TINY_CONFIG), *estimate_args, "--output", str(plan)]
    assert main(args) == 0, capsys.readouterr().err
    result = runner.run_plan(plan, random_init=True, steps=steps, device="cpu", out_dir=tmp_path / "runs")
    run = Path(result["run_dir"])
    doc = read_measured(run)
    assert doc["status"] == "ok", doc.get("failure")
    return run, doc
