"""`qplan fit` must agree with `qplan estimate` on every plan it proposes."""

from __future__ import annotations

from pathlib import Path

import pytest

from qplan.planner.errors import QPlanError
from qplan.planner.memory.terms import TrainingSettings
from qplan.planner.model.catalog import load_gpu, load_spec
from qplan.planner.model.lora import LoraSettings
from qplan.planner.model.weights import QuantSettings
from qplan.planner.plan import PlanInputs, build_plan
from qplan.planner.search.fit import search


def test_fit_results_reproduce_with_estimate():
    res = search("llama-3.2-3b", "t4", seq_len=2048, top=15)
    assert res["fitting"] > 0 and res["best"]
    spec, gpu = load_spec("llama-3.2-3b"), load_gpu("t4")
    for c in res["best"]:
        plan = build_plan(PlanInputs(
            spec, LoraSettings(r=c["r"], alpha=2.0 * c["r"], targets=c["targets"]),
            QuantSettings(c["quant"], True, "float16", True),
            TrainingSettings(c["batch_size"], c["seq_len"], 1, c["grad_ckpt"], c["optimizer"], "sdpa"),
            gpu)).to_dict()
        assert plan["prediction"]["memory"]["peak"] == c["peak"], c
        assert plan["prediction"]["fits"]


def test_fit_respects_the_gpu():
    small = search("llama-3.1-8b", "rtx-3060-12gb", seq_len=1024)
    big = search("llama-3.1-8b", "h100-80gb", seq_len=1024)
    assert big["fitting"] > small["fitting"]
    assert all(c["peak"] <= small["usable_bytes"] for c in small["best"])


def test_time_and_cost_objectives_agree_with_estimate_and_rank():
    """`--objective time|cost` over several GPUs: every proposed plan's tokens/s and cost equal what
    `qplan estimate` predicts for it; rows are ranked by the objective."""
    from qplan.planner.api import plan_dict

    prices = "t4=1,a100-80gb=4,h100-80gb=6"
    price = {k: float(v) for k, v in (x.split("=") for x in prices.split(","))}
    for gpus, kw in (("t4,a100-80gb,h100-80gb", {}), ("a100-80gb", {"global_batch": 16}),
                     ("t4,a100-80gb,h100-80gb", {"search_recipe": True})):
        res = search("llama-3.2-1b", gpus, seq_len=1024, top=12, objective="cost", tokens=10 ** 8,
                     price_per_hour=",".join(x for x in prices.split(",") if x.split("=")[0] in gpus), **kw)
        rows = res["best"]
        assert rows and res["objective"] == "cost"
        assert [r["cost_per_million_tokens"] for r in rows] == sorted(r["cost_per_million_tokens"] for r in rows)
        for c in rows[:5]:
            p = plan_dict(model="llama-3.2-1b", gpu=c["gpu"], r=c["r"], targets=c["targets"], quant=c["quant"],
                          grad_ckpt=c["grad_ckpt"] == "hf", optimizer=c["optimizer"], batch_size=c["batch_size"],
                          grad_accum=c.get("grad_accum", 1), seq_len=c["seq_len"], tokens=10 ** 8,
                          price_per_hour=price[c["gpu"]])
            t = p["prediction"]["time"]
            assert p["prediction"]["memory"]["peak"] == c["peak"]
            assert t["tokens_per_second"] == pytest.approx(c["tokens_per_second"], rel=1e-9)
            assert t["total_seconds"] == pytest.approx(c["total_seconds"], rel=1e-9)
            assert p["prediction"]["cost"]["total"] == pytest.approx(c["total_cost"], rel=1e-9)
    fastest = search("llama-3.2-1b", "t4,h100-80gb", seq_len=1024, objective="time", top=3)["best"]
    assert fastest[0]["gpu"] == "h100-80gb"
    with pytest.raises(QPlanError, match="needs a price"):
        search("llama-3.2-1b", "t4", objective="cost")


@pytest.mark.parametrize("model,gpu,quants", [
    ("tests/fixtures/configs/qwen3-moe.json", "t4", None),               # PEFT adapts its experts: dropout 0
    ("tests/fixtures/prequantized/llama-bnb-4bit.json", "t4", {"nf4"}),  # saved in nf4: loads only so
])
def test_fit_rows_are_what_estimate_plans(model, gpu, quants):
    """Every row `qplan fit` proposes equals `qplan estimate` with those options (defaults included:
    no dropout where PEFT adapts fused experts; a pre-quantized checkpoint keeps its quantization)."""
    from qplan.planner.api import plan_dict

    model = str(Path(__file__).parents[2] / model)
    res = search(model, gpu, seq_len=128, top=12)
    assert res["best"]
    if quants is not None:
        assert {c["quant"] for c in res["best"]} == quants
    for c in res["best"]:
        plan = plan_dict(model=model, gpu=gpu, r=c["r"], targets=c["targets"], quant=c["quant"],
                         batch_size=c["batch_size"], seq_len=c["seq_len"], grad_ckpt=c["grad_ckpt"] != "off",
                         optimizer=c["optimizer"])
        assert plan["prediction"]["memory"]["peak"] == c["peak"], c
