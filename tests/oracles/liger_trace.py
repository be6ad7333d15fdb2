"""Oracle: Liger-Kernel's own fused linear cross-entropy, traced on the meta device (``qplan.observe.trace.liger``).

Run with ``.oracles/liger`` (liger-kernel 0.8.0 and Triton's Python front end, ``scripts/setup-oracles.sh``) on
``PYTHONPATH``; Triton stays out of the test process. Reads a JSON list of plan documents on stdin and prints, for
each, the trace of two steps (``tensor_peak``, ``phase_peaks``, ``breakdown_at_peak``) as one JSON list; with
``--model-types``, prints Liger's own list of the model types it patches instead.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    if sys.argv[1:] == ["--model-types"]:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        print(json.dumps(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)))
        return
    from qplan.observe.trace import trace_plan

    out = []
    for plan in json.load(sys.stdin):
        t = trace_plan(plan, steps=2)
        out.append({k: t[k] for k in ("tensor_peak", "phase_peaks", "breakdown_at_peak")})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
