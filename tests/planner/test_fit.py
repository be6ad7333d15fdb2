"""`qplan fit` must agree with `qplan estimate` on every plan it proposes."""

from __future__ import annotations

from qplan.planner.fit import search
from qplan.planner.lora import LoraSettings
from qplan.planner.memory import TrainingSettings
from qplan.planner.plan import PlanInputs, build_plan
from qplan.planner.specs import load_gpu, load_spec
from qplan.planner.weights import QuantSettings


def test_fit_results_reproduce_with_estimate():
    res = search("llama-3.2-3b", "t4", seq_len=2048, top=15)
    assert res["fitting"] > 0 and res["best"]
    spec, gpu = load_spec("llama-3.2-3b"), load_gpu("t4")
    for c in res["best"]:
        plan = build_plan(PlanInputs(
            spec, LoraSettings(r=c["r"], alpha=2.0 * c["r"], targets=c["targets"]),
            QuantSettings(c["quant"], True, "float16", True),
            TrainingSettings(c["batch_size"], c["seq_len"], 1, c["grad_ckpt"], c["optimizer"], "sdpa"),
            gpu))
        assert plan["prediction"]["memory"]["peak"] == c["peak"], c
        assert plan["prediction"]["fits"]


def test_fit_respects_the_gpu():
    small = search("llama-3.1-8b", "rtx-3060-12gb", seq_len=1024)
    big = search("llama-3.1-8b", "h100-80gb", seq_len=1024)
    assert big["fitting"] > small["fitting"]
    assert all(c["peak"] <= small["usable_bytes"] for c in small["best"])
