"""Refactoring guard for the trace: every output of 52 traced steps, to compare two commits byte for byte.

    python bench/trace_identity.py --out /tmp/trace-after.json
    cmp /tmp/trace-before.json /tmp/trace-after.json

The cases are tests/planner/test_trace.py's (7 families x quant x checkpointing x optimizer), each
traced on meta with CUDA kernels and with CPU kernels, and the llama / gemma2 / qwen2_moe cases
also run for real on the CPU (the oracle): tensor peak, breakdown, phase peaks, per-step peaks,
baseline, parameter counts and notes (the run time is dropped).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests" / "planner"))
    sys.path.insert(0, str(ROOT / "tests"))
    from test_trace import ATTN, CASES, DROPOUT, FAMILIES, LORA

    from qplan.observe.trace import trace_training_step

    out = {}
    for fam, q, gc, opt, up in CASES:
        for dev, ker in (("meta", "cuda"), ("meta", "cpu"), ("cpu", "cpu")):
            if dev == "cpu" and fam not in ("llama", "gemma2", "qwen2_moe"):
                continue
            kw = dict(quant=q, double_quant=True, compute_dtype="fp32" if q == "fp32" else "bf16", upcast_kbit=up,
                      lora=dict(LORA, dropout=DROPOUT.get(fam, 0.05)), batch_size=2, seq_len=48, grad_ckpt=gc,
                      optimizer=opt, attn_impl=ATTN.get(fam, "sdpa"), device=dev, steps=2)
            if dev == "meta":
                kw["kernels"] = ker
            r = trace_training_step(FAMILIES[fam], **kw)
            r.pop("seconds")
            out[f"{fam}-{q}-{gc}-{opt}-{up}-{dev}-{ker}"] = r
    Path(a.out).write_text(json.dumps(out, indent=1, sort_keys=True))
    print(f"{len(out)} traces -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
