"""Start the Unsloth mode of the trace (``unsloth_mode``) in Unsloth's own interpreter.

Unsloth pins older transformers/trl than qplan's ``train`` extra, so its trace runs in the venv named
by ``QPLAN_UNSLOTH_PYTHON`` (the same variable ``qplan run --backend unsloth`` uses), with this
qplan on a PYTHONPATH shim (``shim_dir``): ``python -m qplan.observe.trace.unsloth_mode IN OUT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: ``FastLanguageModel``'s ``use_gradient_checkpointing`` for a plan's ``grad_ckpt``
UNSLOTH_CKPT = {"unsloth": "unsloth", "hf": True, "off": False}
#: the GPU assumed when the plan names none (``planner.memory.unsloth``, shared with the plan)
from qplan.planner.memory.unsloth import DEFAULT_FREE_BYTES, DEFAULT_TOTAL_BYTES  # noqa: E402


def shim_dir() -> str:
    """A folder whose ``qplan/`` links to this qplan's packages, for a foreign interpreter's
    PYTHONPATH: the child runs the same qplan code without installing it there."""
    import qplan.backends
    import qplan.hf
    import qplan.model_specs
    import qplan.observe
    import qplan.planner

    d = tempfile.mkdtemp(prefix="qplan-shim-")
    (Path(d) / "qplan").mkdir()
    for mod in (qplan.planner, qplan.backends, qplan.model_specs, qplan.hf, qplan.observe):
        src = Path(mod.__file__).resolve().parent
        (Path(d) / "qplan" / mod.__name__.split(".")[-1]).symlink_to(src, target_is_directory=True)
    return d


def unsloth_python() -> str:
    """``$QPLAN_UNSLOTH_PYTHON``, or this interpreter when it imports Unsloth itself."""
    from qplan.planner.errors import QPlanError

    py = os.environ.get("QPLAN_UNSLOTH_PYTHON")
    if py:
        return py
    import importlib.util

    if importlib.util.find_spec("unsloth") is not None:
        return sys.executable
    raise QPlanError("--method trace of an Unsloth plan runs Unsloth: set QPLAN_UNSLOTH_PYTHON to the python of "
                     "its venv (bash scripts/setup-unsloth-venv.sh makes one)")


def device_bytes(plan: dict[str, Any]) -> tuple[int, int]:
    """(free, total) bytes of the plan's GPU for Unsloth's ``mem_get_info`` questions: the GPU's
    memory and, free, what the plan's weights leave of it (without a GPU: ``DEFAULT_*``)."""
    gpu = plan.get("gpu") or {}
    total = gpu.get("total_bytes") or gpu.get("usable_bytes")
    if not total:
        return DEFAULT_FREE_BYTES, DEFAULT_TOTAL_BYTES
    free = max(int(total) - int(plan["prediction"]["memory"]["weights"]), 0)
    return free, int(total)


def trace_doc(plan: dict[str, Any], steps: int = 2) -> dict[str, Any]:
    """What ``unsloth_mode`` traces for a plan: its config, settings, checkpointing and GPU bytes."""
    lora, q, t = plan["lora"], plan["quant"], plan["training"]
    settings = dict(
        quant=q["quant"], double_quant=bool(q.get("double_quant", False)),
        compute_dtype={"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[q["compute_dtype"]],
        upcast_kbit=False, lora=lora, batch_size=t["batch_size"], seq_len=t["seq_len"],
        grad_ckpt=t["grad_ckpt"] != "off", optimizer=t["optimizer"], attn_impl=t["attn_impl"], steps=steps)
    free, total = device_bytes(plan)
    return {"config": plan["model"]["config"], "settings": settings, "ckpt": UNSLOTH_CKPT[t["grad_ckpt"]],
            "free_bytes": free, "total_bytes": total}


def run_unsloth_mode(doc: dict[str, Any], timeout: int = 1800) -> Any:
    """Run ``unsloth_mode`` on ``doc`` (one case or ``{"cases": [...]}``) in Unsloth's interpreter."""
    from qplan.planner.errors import QPlanError

    py = unsloth_python()
    with tempfile.TemporaryDirectory(prefix="qplan-utrace-") as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(doc), encoding="utf-8")
        env = dict(os.environ)
        shim = shim_dir() if py != sys.executable else None
        if shim:
            env["PYTHONPATH"] = shim + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        try:
            # in the temporary folder: Unsloth writes an ``unsloth_compiled_cache/`` into its working directory
            p = subprocess.run([py, "-m", "qplan.observe.trace.unsloth_mode", str(src), str(dst)], env=env,
                               capture_output=True, text=True, timeout=timeout, cwd=tmp)
        except OSError as exc:  # a QPLAN_UNSLOTH_PYTHON that is not an interpreter
            raise QPlanError(f"cannot start Unsloth's python {py!r} (QPLAN_UNSLOTH_PYTHON): {exc.strerror or exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise QPlanError(f"the Unsloth trace took longer than {timeout} s and was stopped") from exc
        finally:
            if shim:
                import shutil

                shutil.rmtree(shim, ignore_errors=True)
        if p.returncode != 0 or not dst.is_file():
            last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise QPlanError(f"the Unsloth trace failed ({py}): {last}")
        return json.loads(dst.read_text(encoding="utf-8"))


def trace_unsloth_plan(plan: dict[str, Any], steps: int = 2, timeout: int = 1800) -> dict[str, Any]:
    """The trace of an Unsloth plan (``--method trace`` with ``--backend unsloth``)."""
    doc = trace_doc(plan, steps)
    free, total = doc["free_bytes"], doc["total_bytes"]
    res = run_unsloth_mode(doc, timeout)
    res.setdefault("notes", []).append(f"Unsloth trace: GPU assumed {total} bytes, {free} free "
                                       "(Unsloth sizes its loss chunks and offload buffers from mem_get_info)")
    return res
