#!/usr/bin/env python3
"""Check that this machine can run the GPU matrix: versions, the GPU, bitsandbytes, unsloth.

    python bench/gpu/check_env.py [--out env.json] [--backend peft --backend unsloth]

Each backend is probed in its own process (unsloth patches transformers and peft on import):

* peft: import torch, transformers, peft, bitsandbytes; on CUDA, one nf4 ``Linear4bit``
  forward/backward and one ``PagedAdamW8bit`` step (proves the trimmed bitsandbytes wheel holds
  the CUDA library this torch needs).
* unsloth: ``import unsloth`` with a recorder of every module that could not be found, so a
  missing optional package shows up by name even where unsloth swallows the ImportError.

Prints one JSON object (and writes it with --out); exit status 0 when every probed backend
imports. Used by run_matrix.py before the first cell; safe on a CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROBE = r'''
import importlib.abc, json, sys, time, traceback
MISSING = []
class _Recorder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if "." not in name:
            MISSING.append(name)
        return None
sys.meta_path.append(_Recorder())
backend = sys.argv[1]
out = {"backend": backend, "ok": False}
t0 = time.time()
try:
    if backend == "unsloth":
        import unsloth  # noqa: F401  (must come first)
        out["unsloth"] = getattr(unsloth, "__version__", "?")
        import unsloth_zoo
        out["unsloth_zoo"] = getattr(unsloth_zoo, "__version__", "?")
    import torch, transformers, peft, accelerate
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, transformers=transformers.__version__,
               peft=peft.__version__, accelerate=accelerate.__version__)
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    import bitsandbytes as bnb
    out["bitsandbytes"] = bnb.__version__
    try:
        from bitsandbytes.cextension import lib
        out["bitsandbytes_lib"] = str(getattr(lib, "_name", None) or getattr(getattr(lib, "_lib", None), "_name", "?"))
    except Exception as e:  # noqa: BLE001
        out["bitsandbytes_lib"] = f"unknown ({type(e).__name__})"
    for name in ("trl", "datasets", "qplan"):
        try:
            m = __import__(name)
            out[name] = getattr(m, "__version__", "?")
            if name == "qplan":
                out["qplan_file"] = getattr(m, "__file__", None) or str(list(m.__path__))
        except Exception as e:  # noqa: BLE001
            out[name] = f"missing ({type(e).__name__}: {e})"
    if torch.cuda.is_available() and backend == "peft":
        lin = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                compress_statistics=True).cuda()
        x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        lin(x).float().sum().backward()
        p = torch.nn.Parameter(torch.randn(512, 512, device="cuda"))
        opt = bnb.optim.PagedAdamW8bit([p], lr=1e-3)
        p.grad = torch.randn_like(p)
        opt.step()
        torch.cuda.synchronize()
        out["bnb_cuda_smoke"] = "ok: nf4 Linear4bit fwd/bwd and PagedAdamW8bit step"
    out["ok"] = True
except BaseException as e:  # noqa: BLE001
    out["error"] = f"{type(e).__name__}: {e}"
    out["traceback"] = traceback.format_exc()[-3000:]
out["seconds"] = round(time.time() - t0, 1)
out["missing_modules"] = sorted(set(MISSING))
print("QPLAN-PROBE " + json.dumps(out))
'''


def interpreter_for(backend: str) -> str:
    """The interpreter `qplan run` uses for ``backend``: ``$QPLAN_<NAME>_PYTHON`` or this one."""
    return os.environ.get(f"QPLAN_{backend.upper()}_PYTHON") or sys.executable


def probe(backend: str, timeout: int = 600) -> dict:
    """Run the probe for one backend in a fresh interpreter; return its JSON (or the failure)."""
    python = interpreter_for(backend)
    try:
        proc = subprocess.run([python, "-c", PROBE, backend], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"backend": backend, "ok": False, "error": f"probe timed out after {timeout}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("QPLAN-PROBE "):
            return {**json.loads(line[len("QPLAN-PROBE "):]), "python": python}
    return {"backend": backend, "ok": False, "error": f"probe exited {proc.returncode}",
            "stderr_tail": proc.stderr[-3000:]}


def nvidia_smi() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def check(backends: list[str]) -> dict:
    env = {"python": sys.version.split()[0], "executable": sys.executable, "nvidia_smi": nvidia_smi(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "backends": {}}
    for b in backends:
        env["backends"][b] = probe(b)
    env["ok"] = all(v.get("ok") for v in env["backends"].values())
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Probe torch/bitsandbytes/peft/unsloth for the GPU matrix.")
    ap.add_argument("--backend", action="append", choices=["peft", "unsloth"],
                    help="probe this backend (repeatable) [default: both]")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    env = check(args.backend or ["peft", "unsloth"])
    text = json.dumps(env, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0 if env["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
