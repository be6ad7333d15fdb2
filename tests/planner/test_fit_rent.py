"""Which GPU to rent (issue 31): ranking by time or cost keeps the trained model, prices come from the user.

`qplan fit --objective time|cost` searches only what leaves the trained model unchanged (the GPU, the micro-batch x
accumulation split of the global batch, checkpointing); rank, targets, quantization, optimizer, sequence length and
global batch stay as given, else `qplan estimate`'s defaults. `--search-recipe` opts into searching them, and each row
says what it changed. Prices come from a file or a flag; none is invented. Every row is what `qplan estimate` plans.
"""

from __future__ import annotations

import json

import pytest

from qplan.cli.main import main
from qplan.planner.api import plan_dict
from qplan.planner.errors import QPlanError
from qplan.planner.search.fit import search


def test_time_ranking_keeps_the_model_and_the_global_batch():
    res = search("llama-3.2-1b", "t4,l4,a100-80gb,h100-80gb", objective="time", global_batch=8, tokens=10 ** 7)
    assert res["recipe"] == {"r": 16, "targets": "all-linear", "quant": "nf4", "optimizer": "adamw_torch",
                             "seq_len": 512, "global_batch": 8}
    rows = res["best"]
    assert len({r["gpu"] for r in rows}) == len(rows) == 4  # one row per GPU: its best plan
    assert [r["tokens_per_second"] for r in rows] == sorted((r["tokens_per_second"] for r in rows), reverse=True)
    for r in rows:
        assert (r["r"], r["targets"], r["quant"], r["optimizer"], r["seq_len"]) == (16, "all-linear", "nf4",
                                                                                  "adamw_torch", 512)
        assert r["batch_size"] * r["grad_accum"] == r["global_batch"] == 8 and "changed" not in r
        p = plan_dict(model="llama-3.2-1b", gpu=r["gpu"], batch_size=r["batch_size"], grad_accum=r["grad_accum"],
                      grad_ckpt=r["grad_ckpt"] == "hf", tokens=10 ** 7)["prediction"]
        assert p["memory"]["peak"] == r["peak"]
        assert p["time"]["step_seconds"] == pytest.approx(r["step_seconds"], rel=1e-12)
        assert p["time"]["total_seconds"] == pytest.approx(r["total_seconds"], rel=1e-12)


def test_given_recipe_and_micro_batch_are_kept():
    res = search("qwen2.5-0.5b", "l4", objective="time", r=64, targets="qv", quant="bf16", seq_len=1024,
                 batch_size=2, global_batch=8)
    assert {(r["r"], r["targets"], r["quant"], r["seq_len"], r["batch_size"], r["grad_accum"]) for r in res["best"]} \
        == {(64, "qv", "bf16", 1024, 2, 4)}
    with pytest.raises(QPlanError, match="does not divide"):
        search("qwen2.5-0.5b", "l4", objective="time", batch_size=3, global_batch=8)
    with pytest.raises(QPlanError, match="--global-batch goes with"):
        search("qwen2.5-0.5b", "l4", global_batch=8)
    with pytest.raises(QPlanError, match="--search-recipe goes with"):
        search("qwen2.5-0.5b", "l4", search_recipe=True)


def test_searching_the_recipe_is_opt_in_and_rows_say_what_changed():
    res = search("llama-3.2-1b", "l4", objective="time", search_recipe=True, top=50)
    assert "recipe" not in res
    rows = res["best"]
    assert any(r["changed"] for r in rows)
    for r in rows:
        for what in r["changed"]:
            key, _, rest = what.partition(" ")
            before, _, after = rest.partition(" -> ")
            assert str(r[key]) == after and before != after
        if r["r"] != 16:
            assert f"r 16 -> {r['r']}" in r["changed"]


def test_prices_come_from_a_file_and_none_is_invented(tmp_path):
    f = tmp_path / "prices.yaml"
    f.write_text("l4: 0.8\nh100: 3.2\nb200: 6.0\n")  # an alias (h100), and a GPU the search leaves out (b200)
    res = search("llama-3.2-1b", "l4,h100-80gb,a100-80gb", objective="cost", prices=str(f), tokens=10 ** 7)
    assert {r["gpu"] for r in res["best"]} == {"l4", "h100-80gb"} and res["unpriced"] == ["a100-80gb"]
    for r in res["best"]:
        price = {"l4": 0.8, "h100-80gb": 3.2}[r["gpu"]]
        assert r["cost_per_million_tokens"] == pytest.approx(price * r["step_seconds"] / 3600 / r["tokens"] * 1e6)
    timed = search("llama-3.2-1b", "l4,a100-80gb", objective="time", prices=str(f))
    assert {r["gpu"]: "cost_per_million_tokens" in r for r in timed["best"]} == {"l4": True, "a100-80gb": False}
    (tmp_path / "p.json").write_text(json.dumps({"l4": 0.8}))
    assert search("llama-3.2-1b", "l4", objective="cost", prices=str(tmp_path / "p.json"))["best"]


@pytest.mark.parametrize("content, message", [
    ("l4: cheap\n", "must be a number"),
    ("l4: true\n", "must be a number"),
    ("no-such-gpu: 1\n", "no-such-gpu"),
    ("- l4\n", "not a mapping"),
    ("l4: -1\n", "from 0 to 1,000,000"),
    ("l4: .nan\n", "from 0 to 1,000,000"),
])
def test_bad_price_files_are_one_line_errors(tmp_path, capsys, content, message):
    f = tmp_path / "prices.yaml"
    f.write_text(content)
    code = main(["fit", "--model", "llama-3.2-1b", "--gpu", "l4", "--objective", "cost", "--prices", str(f)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err


def test_both_price_options_and_max_gpus_with_ranking_flags_are_refused(tmp_path, capsys):
    f = tmp_path / "prices.yaml"
    f.write_text("l4: 1\n")
    assert main(["fit", "--model", "llama-3.2-1b", "--gpu", "l4", "--objective", "cost", "--prices", str(f),
                 "--price-per-hour", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["fit", "--model", "llama-3.2-1b", "--gpu", "l4", "--max-gpus", "4", "--global-batch", "8"]) == 2
    assert "--max-gpus" in capsys.readouterr().err


def test_which_gpu_and_how_many_keeps_the_global_batch(tmp_path):
    """`--max-gpus` with `--objective time|cost`: each (GPU, count)'s best plan is a whole `qplan estimate` plan with
    the run's global batch over all ranks; ranked; prices multiply by the GPUs a row rents."""
    f = tmp_path / "prices.json"
    f.write_text(json.dumps({"l4": 0.7, "a100-80gb": 1.9}))
    res = search("llama-3.2-1b", "l4,a100-80gb", objective="cost", max_gpus=4, global_batch=8, seq_len=1024,
                 prices=str(f), tokens=10 ** 7)
    rows = res["best"]
    assert res["recipe"]["global_batch"] == 8 and {r["gpus"] for r in rows} <= {1, 2, 4}
    assert len({(r["gpu"], r["gpus"]) for r in rows}) == len(rows)  # one best plan per (GPU, count)
    assert [r["cost_per_million_tokens"] for r in rows] == sorted(r["cost_per_million_tokens"] for r in rows)
    for r in rows:
        assert r["batch_size"] * r["grad_accum"] * r["gpus"] == 8
        dist = {} if r["gpus"] == 1 else {"gpus": r["gpus"], "strategy": r["strategy"]}
        p = plan_dict(model="llama-3.2-1b", gpu=r["gpu"], seq_len=1024, batch_size=r["batch_size"],
                      grad_accum=r["grad_accum"], grad_ckpt=r["grad_ckpt"] == "hf", tokens=10 ** 7,
                      price_per_hour={"l4": 0.7, "a100-80gb": 1.9}[r["gpu"]], **dist)["prediction"]
        assert p["memory"]["peak"] == r["peak_per_rank"] and p["fits"]
        assert p["time"]["tokens_per_second"] == pytest.approx(r["tokens_per_second"], rel=1e-12)
        assert p["cost"]["total"] == pytest.approx(r["total_cost"], rel=1e-12)
        assert p["cost"]["gpus"] == r["gpus"]
    with pytest.raises(QPlanError, match="--seq-len instead of --data"):
        from qplan.planner.search.fit import fit_document

        fit_document({"model": "llama-3.2-1b", "gpu": "l4", "objective": "time", "max_gpus": 2,
                      "data": str(tmp_path / "x.jsonl")})
