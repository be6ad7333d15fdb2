"""`qplan run` of a --data plan (issue 27): it trains on the plan's own samples, padded per batch as planned, and
`--largest-first` puts the batch holding the longest sample at the first measured step — so the measured peak is
the worst batch's, and an out-of-memory comes in the first steps. A real CPU run; the batch shapes are the
collator's record of what it made, in order."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("torch")

from backend_helpers import read_measured
from qplan.backends import runner
from qplan.cli.main import main

TINY = str(Path(__file__).resolve().parent / "data" / "tiny-llama.json")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from qplan.backends.modelsrc import byte_tokenizer

    d = tmp_path_factory.mktemp("tok")
    byte_tokenizer().save_pretrained(d)  # the tokenizer --random-init trains with
    return d


def _plan(tmp_path: Path, tokenizer_dir: Path, capsys, *extra: str) -> Path:
    rng = random.Random(3)
    rows = [{"text": "word " * rng.randint(2, 10)} for _ in range(40)]
    rows[29] = {"text": "long " * 40}  # 201 tokens: cut to 128
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = tmp_path / "plan.json"
    rc = main(["estimate", "--model", TINY, "--quant", "bf16", "--data", str(data), "--tokenizer", str(tokenizer_dir),
               "--batch-size", "2", "--max-seq-len", "128", "--output", str(plan), *extra])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(plan.read_text())["training"]["seq_len"] == 128
    return plan


@pytest.mark.parametrize("largest_first", ["run flag", "plan setting", None])
def test_a_data_plan_trains_its_samples_padded_per_batch(tmp_path, tokenizer_dir, capsys, largest_first):
    plan = _plan(tmp_path, tokenizer_dir, capsys, *(["--largest-first"] if largest_first == "plan setting" else []))
    result = runner.run_plan(plan, random_init=True, steps=4, device="cpu", out_dir=tmp_path / "runs",
                             largest_first=largest_first == "run flag")
    assert result["status"] == "ok", result["summary"]
    doc = read_measured(result["run_dir"])
    shapes = doc["run"]["batch_shapes"]
    assert all(b == 2 and n <= 128 for b, n in shapes)
    assert doc["measured"]["memory"]["window_steps"] == [2, 3]
    if largest_first:
        # the first measured step (after 1 warm-up step) is the worst batch, padded to the planned length
        assert shapes[1] == [2, 128] and all(n < 128 for i, (_, n) in enumerate(shapes) if i != 1)
        assert doc["run"]["largest_first"] is True
        # the report shows the data: the histogram with the longest sample's bin marked, and the batches in order
        run = Path(result["run_dir"])
        svg = (run / "data.svg").read_text()
        assert svg.count("class='bin'") == 12 and svg.count("#c0392b") == 2 and "longest: 201" in svg
        assert "the longest was batch 2 (2×128) — placed by --largest-first" in (run / "report.md").read_text()
        assert "<h2>Your data</h2>" in (run / "report.html").read_text()


def test_largest_first_needs_a_data_plan(tmp_path, capsys):
    plan = tmp_path / "plain.json"
    assert main(["estimate", "--model", TINY, "--quant", "bf16", "--seq-len", "64", "--output", str(plan)]) == 0
    capsys.readouterr()
    rc = main(["run", str(plan), "--random-init", "--largest-first", "--out-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and "--largest-first orders the batches of a --data plan" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("n,batch,to", [(10, 4, 0), (10, 4, 1), (9, 2, 1), (3, 4, 0), (7, 3, 5)])
def test_largest_first_is_a_permutation_with_the_longest_in_the_chosen_batch(n, batch, to):
    """Only one swap: the sampler's order stays a permutation of its samples (a dataset whose size is not a multiple
    of the batch, the longest in the last, partial batch included)."""
    from qplan.backends.plan_data import LargestFirst

    for longest in range(n):
        lengths = [1] * n
        lengths[longest] = 9
        base = list(reversed(range(n)))
        order = list(LargestFirst(base, lengths, batch, to))
        assert sorted(order) == sorted(base) and len(order) == n
        dest = min(to, max(1, n // batch) - 1) * batch
        assert order[dest] == longest
        assert sum(a != b for a, b in zip(order, base)) in (0, 2)


@pytest.mark.parametrize("ckpt", [[], ["--no-grad-ckpt"]])
def test_the_padding_mask_is_planned(tmp_path, tokenizer_dir, capsys, ckpt):
    """A padded batch costs the 4-D attention mask SDPA gets (a bool kept by checkpointing, a float copy saved by each
    layer's attention). Before it was planned, the padded run was under-predicted by it (-5.4% against -2.5% for the
    same shape without padding, at 2 x 128 with checkpointing). Now the padded run's error equals the fixed-shape
    run's: the mask is exactly what the plan adds (the tracker's bytes on a real CPU step are the oracle)."""
    data_plan = _plan(tmp_path, tokenizer_dir, capsys, "--largest-first", *ckpt)
    plain = tmp_path / "plain.json"
    assert main(["estimate", "--model", TINY, "--quant", "bf16", "--batch-size", "2", "--seq-len", "128", *ckpt,
                 "--output", str(plain)]) == 0
    capsys.readouterr()
    assert json.loads(data_plan.read_text())["training"]["padded"] is True
    errors = []
    for plan in (data_plan, plain):
        result = runner.run_plan(plan, random_init=True, steps=4, device="cpu", out_dir=tmp_path / "runs")
        assert result["status"] == "ok", result["summary"]
        errors.append(result["error"]["tensor_peak"])
    assert abs(errors[0] - errors[1]) < 0.002, errors


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_a_packed_plan_trains_packs_as_trl_batches_them(tmp_path, tokenizer_dir, capsys, strategy):
    """bfd: TRL's padding-free batches — the micro-batch's packs in one row, documents told apart by position ids;
    under SDPA transformers builds a block-causal [1, 1, T, T] mask from them, which the plan counts
    (``training.flat_tokens``, ``training.padded``). The packed run's error equals that of a fixed-shape run of
    the same row length without a mask plus exactly the mask — i.e. the two errors agree. wrapped: rows of
    max_length, the last, shorter one padded."""
    plan = _plan(tmp_path, tokenizer_dir, capsys, "--batching", "packing", "--packing-strategy", strategy,
                 "--largest-first")
    p = json.loads(plan.read_text())
    result = runner.run_plan(plan, random_init=True, steps=4, device="cpu", out_dir=tmp_path / "runs")
    assert result["status"] == "ok", result["summary"]
    doc = read_measured(result["run_dir"])
    shapes = doc["run"]["batch_shapes"]
    d = p["prediction"]["data"]
    if strategy == "bfd":
        flat = p["training"]["flat_tokens"]
        assert flat == d["worst_batch"]["flat_tokens"] and p["training"]["padded"] is True
        assert all(b == 1 for b, _ in shapes) and shapes[1] == [1, flat] and max(n for _, n in shapes) == flat
        plain = tmp_path / "plain.json"
        assert main(["estimate", "--model", TINY, "--quant", "bf16", "--batch-size", "1", "--seq-len", str(flat),
                     "--output", str(plain)]) == 0
        capsys.readouterr()
        fixed = runner.run_plan(plain, random_init=True, steps=4, device="cpu", out_dir=tmp_path / "runs")
        assert abs(result["error"]["tensor_peak"] - fixed["error"]["tensor_peak"]) < 0.002, (result["error"],
                                                                                          fixed["error"])
    else:
        assert all(b == 2 and n == 128 for b, n in shapes[:-1]) and sum(1 for _, n in shapes if n == 128) >= 3
        assert abs(result["error"]["tensor_peak"]) < 0.05
    assert "the run has" not in " ".join(doc["run"].get("notes", []))  # the packs the plan counted


@pytest.mark.parametrize("n,batch,to", [(10, 4, 0), (10, 4, 1), (9, 2, 1), (3, 4, 0), (7, 3, 5)])
def test_largest_first_fill_puts_the_longest_together(n, batch, to):
    """Padding-free packs: the worst batch is the fullest packs together — every place of the chosen batch gets one
    of the longest, the order stays a permutation, the rest keep their places."""
    from qplan.backends.plan_data import LargestFirst

    rng = random.Random(n * 100 + batch * 10 + to)
    for _ in range(20):
        lengths = [rng.randint(1, 50) for _ in range(n)]
        base = rng.sample(range(n), n)
        order = list(LargestFirst(base, lengths, batch, to, fill=True))
        assert sorted(order) == sorted(base)
        dest = min(to, max(1, n // batch) - 1) * batch
        got = sorted((lengths[i] for i in order[dest:dest + batch]), reverse=True)
        assert got == sorted(lengths, reverse=True)[:len(got)]
        moved = sum(a != b for a, b in zip(order, base, strict=True))
        assert moved <= 2 * len(got)


def test_a_buckets_plan_trains_peft_harness_batches(tmp_path, tokenizer_dir, capsys):
    """--batching buckets: the run's batches are PEFT's harness batches, in its order (a batch sampler: the
    Trainer does not re-chunk them), each padded to its longest."""
    from qplan.backends.modelsrc import byte_tokenizer
    from qplan.planner.data.batching import bucket_batches
    from qplan.planner.data.formats import Formatter

    plan = _plan(tmp_path, tokenizer_dir, capsys, "--batching", "buckets")
    result = runner.run_plan(plan, random_init=True, steps=4, device="cpu", out_dir=tmp_path / "runs")
    assert result["status"] == "ok", result["summary"]
    shapes = read_measured(result["run_dir"])["run"]["batch_shapes"]
    rows = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    lengths = [min(128, n) for n in Formatter(byte_tokenizer()).lengths(rows, "text", "d")[0]]
    want = [[len(b), max(lengths[j] for j in b)] for b in bucket_batches(lengths, 2)]
    assert shapes == want[:len(shapes)] and len(shapes) >= 4


def test_the_padding_free_collator_is_trls():
    """qplan run's padding-free batches equal TRL's own DataCollatorForLanguageModeling(padding_free=True) on the
    same packs: input ids, labels (the first of each document -100) and position ids, with and without a multiple."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from qplan.backends.plan_data import FlatCollator

    packs = [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [3, 2]},
             {"input_ids": [10, 11, 12, 13], "labels": [-100, 11, 12, 13], "seq_lengths": [4]}]
    for multiple in (None, 8):
        ours = FlatCollator(0, multiple)(packs)
        trl = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=multiple)(packs)
        for k in ("input_ids", "labels", "position_ids"):
            assert torch.equal(ours[k], trl[k]), (k, multiple, ours[k], trl[k])
        assert "attention_mask" not in ours and "attention_mask" not in trl
