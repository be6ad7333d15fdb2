"""qplan's library API: one call from options to the plan document.

    from qplan.planner.api import make_plan, plan_dict
    plan = make_plan(model="llama-3.2-3b", r=32, gpu="t4")      # a PlanDoc: plan.prediction.memory.peak
    doc = plan_dict(model="llama-3.2-3b", r=32, gpu="t4")       # == qplan estimate --format json

The CLI, ``qplan serve``, ``qplan fit``, the benchmarks and the tests call this. The options are
``planner.options.PlanOptions`` (the CLI's options, by their Python names); the plan is a typed
``planner.document.PlanDoc``, and plan.json is its encoding (``plan_dict`` / ``document.dumps``). Torch-free for
bundled specs; a config path builds its inventory with transformers on the meta device.
Bad input raises ``QPlanError`` with one line that names the option and the fix.
"""

from __future__ import annotations

from typing import Any

from qplan.planner.document import PlanDoc
from qplan.planner.model.spec import Gpu, ModelSpec
from qplan.planner.options import PlanOptions
from qplan.planner.plan import build_plan, plan_inputs

__all__ = ["make_plan", "plan_dict", "plan_inputs", "PlanOptions", "PlanDoc"]

def make_plan(options: PlanOptions | dict[str, Any] | None = None, /, *, spec: ModelSpec | None = None,
              device: Gpu | None = None, **fields: Any) -> PlanDoc:
    """The plan of ``options`` — a ``PlanOptions``, or its fields as keywords (``make_plan(model="llama-3.2-3b",
    r=32)``) — as a typed ``PlanDoc`` (plan.json is its encoding: ``plan.to_dict()``, ``document.dumps``),
    with ``suggestions`` when it does not fit its GPU. ``spec`` / ``device``: see ``plan_inputs``."""
    if options is not None and fields:
        raise TypeError("make_plan takes PlanOptions or keywords, not both")
    inputs, warnings = plan_inputs(options, spec=spec, device=device, **fields)
    plan = build_plan(inputs, warnings)
    if plan.prediction.fits is False and inputs.dist is not None:
        plan.suggestions = ["`qplan fit --max-gpus N` searches the number of GPUs and the strategy"
                            + ("" if inputs.dist.cpu_offload or inputs.dist.strategy == "ddp"
                               else "; --cpu-offload moves the sharded states to host memory")]
    elif plan.prediction.fits is False:
        from qplan.planner.search.suggest import suggestions

        plan.suggestions = suggestions(inputs)
    return plan


def plan_dict(options: PlanOptions | dict[str, Any] | None = None, /, *, spec: ModelSpec | None = None,
              device: Gpu | None = None, **fields: Any) -> dict[str, Any]:
    """``make_plan(...)`` as plan.json's JSON value (what ``qplan estimate --format json`` prints)."""
    return make_plan(options, spec=spec, device=device, **fields).to_dict()
