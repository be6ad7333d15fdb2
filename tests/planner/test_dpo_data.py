"""``--objective dpo --data FILE``: preference pairs (prompt, chosen, rejected) counted as TRL 1.16's DPOTrainer
prepares and batches them. The oracle is TRL's own code: ``DPOTrainer._prepare_dataset`` (called on a
``datasets.Dataset`` with a stand-in ``self`` holding the tokenizer) and ``DataCollatorForPreference``, whose padded
batch width is the longest row of the batch's chosen and rejected rows, truncated at ``max_length``."""

from __future__ import annotations

import json
import random
import types
import warnings

import pytest

pytest.importorskip("transformers")
pytest.importorskip("trl")

from test_trainer_configs import one_line, qplan
from test_user_data import tok, tokenizer_dir, write_jsonl  # noqa: F401 - fixtures

from qplan.planner.data import data_profile
from qplan.planner.data.batching import padded_tokens_sequential


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(["tea", "a", "quantization", "GPU", "ok"]) for _ in range(rng.randint(lo, hi)))


def pairs(kind: str) -> list[dict]:
    rng = random.Random(11)
    if kind == "plain":
        return ([{"prompt": _words(rng, 1, 12), "chosen": " " + _words(rng, 1, 30), "rejected": " " + _words(rng, 1, 30)}
                 for _ in range(30)]
                + [{"prompt": _words(rng, 60, 60), "chosen": " x", "rejected": " y"},  # its prompt fills max_length
                   {"prompt": "q", "chosen": " ends with eos</s>", "rejected": " r"}])
    return [{"prompt": [{"role": "user", "content": _words(rng, 1, 12)}],
             "chosen": [{"role": "assistant", "content": _words(rng, 1, 30)}],
             "rejected": [{"role": "assistant", "content": _words(rng, 1, 30)}]} for _ in range(24)]


def trl_batches(tokenizer, rows: list[dict], max_length: int | None, batch_size: int) -> list[int]:
    """The padded width of each batch TRL's DPOTrainer makes of ``rows`` in order (its own preparation and collator)."""
    from datasets import Dataset, disable_progress_bars
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    disable_progress_bars()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = DPOConfig(output_dir="/tmp/unused", max_length=max_length, report_to=[], use_cpu=True, bf16=False)
    me = types.SimpleNamespace(_tokenizer=tokenizer)
    ds = DPOTrainer._prepare_dataset(me, Dataset.from_list(rows), tokenizer, args, "train")
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id or 0, max_length=max_length)
    examples = [{k: ds[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(ds))]
    return [collate(examples[i:i + batch_size])["input_ids"].shape[1] for i in range(0, len(examples), batch_size)]


@pytest.mark.parametrize("kind", ["plain", "conversational"])
@pytest.mark.parametrize("max_length", [None, 48])
def test_preference_pairs_are_counted_as_dpo_trainer_batches_them(tmp_path, tok, tokenizer_dir, kind, max_length):  # noqa: F811
    rows = pairs(kind)
    per_pair = trl_batches(tok, rows, max_length, 1)  # one pair a batch: the pair's padded width
    got = data_profile(str(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer=str(tokenizer_dir), model_source={},
                       fmt="auto", max_length=max_length, batching="sequential", packing_strategy="bfd", batch_size=4)
    assert got["format"] == "preference"
    assert got["samples"] - got["dropped"] == len(per_pair)
    assert got["worst_batch"]["seq_len"] == max(per_pair)
    assert got["trained_tokens"] == sum(per_pair)
    # batches of 4 pairs in order: each padded to its longest row, as the collator pads it
    assert got["padded_tokens_per_epoch"] == padded_tokens_sequential(per_pair, 4) == 4 * sum(
        trl_batches(tok, rows, max_length, 4)[:-1]) + len(per_pair[-(len(per_pair) % 4 or 4):]) * trl_batches(
        tok, rows, max_length, 4)[-1]
    if kind == "plain" and max_length:
        assert got["dropped"] >= 1  # pairs whose prompt alone fills max_length: DPOTrainer filters them out


@pytest.mark.parametrize("objective, rows, needle", [
    ("dpo", [{"text": "plain text"}], "trains on preference pairs"),
    ("sft", [{"prompt": "p", "chosen": "c", "rejected": "r"}], "plan them with --objective dpo"),
    ("dpo", [{"chosen": "c", "rejected": "r"}], "implicit prompt"),
    ("kto", [{"prompt": "p", "chosen": "c", "rejected": "r"}], "trains on unpaired completions"),
    ("dpo", [{"prompt": "p", "completion": "c", "label": True}], "trains on preference pairs"),
    ("sft", [{"prompt": "p", "completion": "c", "label": False}], "plan them with --objective kto"),
    ("kto", [{"prompt": "p", "completion": "c", "label": 1}], "must be true or false"),
])
def test_data_of_the_other_objective_is_one_line(tmp_path, capsys, tokenizer_dir, objective, rows, needle):  # noqa: F811
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    rc, out, err = qplan(capsys, "estimate", "--model", "smollm2-135m", "--objective", objective, "--data", str(data),
                         "--tokenizer", str(tokenizer_dir), "--batch-size", "2")
    assert rc == 2 and out == ""
    one_line(err, needle)


def test_dpo_batches_its_pairs_as_the_trainer_does(tmp_path, capsys, tokenizer_dir):  # noqa: F811
    data = write_jsonl(tmp_path / "d.jsonl", pairs("plain"))
    rc, out, err = qplan(capsys, "estimate", "--model", "smollm2-135m", "--objective", "dpo", "--data", str(data),
                         "--tokenizer", str(tokenizer_dir), "--batching", "packing", "--max-seq-len", "64")
    assert rc == 2
    one_line(err, "leave out --batching")


# ------------------------------------------------------------------------------------------- KTO's unpaired rows


def unpaired(kind: str) -> list[dict]:
    rng = random.Random(5)
    if kind == "plain":
        return ([{"prompt": _words(rng, 1, 12), "completion": " " + _words(rng, 1, 30), "label": rng.random() < 0.5}
                 for _ in range(29)]
                + [{"prompt": _words(rng, 60, 60), "completion": " x", "label": True}])  # its prompt fills max_length
    return [{"prompt": [{"role": "user", "content": _words(rng, 1, 12)}],
             "completion": [{"role": "assistant", "content": _words(rng, 1, 30)}], "label": i % 3 == 0}
            for i in range(22)]


def trl_kto_batches(tokenizer, rows: list[dict], max_length: int | None, batch_size: int) -> list[tuple[int, int]]:
    """(width of input_ids, width of KL_input_ids) of each batch TRL's KTOTrainer makes of ``rows`` in file order (its
    own preparation, KL rotation included, and collator)."""
    from datasets import Dataset, disable_progress_bars
    from trl import KTOConfig
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer

    disable_progress_bars()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = KTOConfig(output_dir="/tmp/unused", max_length=max_length, per_device_train_batch_size=batch_size,
                         report_to=[], use_cpu=True, bf16=False)
    me = types.SimpleNamespace(_tokenizer=tokenizer, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
    ds = KTOTrainer._prepare_dataset(me, Dataset.from_list(rows), tokenizer, args, "train")
    collate = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id or 0, max_length=max_length)
    keys = ("prompt_ids", "completion_ids", "KL_completion_ids", "label")
    examples = [{k: ds[i][k] for k in keys} for i in range(len(ds))]
    out = []
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size])
        out.append((b["input_ids"].shape[1], b["KL_input_ids"].shape[1]))
    return out


@pytest.mark.parametrize("kind", ["plain", "conversational"])
@pytest.mark.parametrize("max_length", [None, 48])
def test_unpaired_rows_are_batched_as_kto_trainer_batches_them(tmp_path, tok, tokenizer_dir, kind, max_length):  # noqa: F811
    rows = unpaired(kind)
    want = trl_kto_batches(tok, rows, max_length, 4)
    got = data_profile(str(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer=str(tokenizer_dir), model_source={},
                       fmt="auto", max_length=max_length, batching="padding", packing_strategy="bfd", batch_size=4)
    assert got["format"] == "unpaired" and got["batching"] == "sequential"
    assert got["batches_per_epoch"] == len(want)
    assert got["kl_seq_len"] == max(k for _, k in want)
    assert got["worst_batch"]["seq_len"] == max(max(w, k) for w, k in want)
    kept = got["samples"] - got["dropped"]
    sizes = [min(4, kept - i) for i in range(0, kept, 4)]
    assert got["padded_tokens_per_epoch"] == sum(n * w for n, (w, _) in zip(sizes, want, strict=True))
    if kind == "plain" and max_length:
        assert got["dropped"] >= 1


@pytest.mark.parametrize("objective, rows, per_row", [("dpo", lambda: pairs("plain"), 2),
                                                     ("kto", lambda: unpaired("plain"), 1)])
def test_a_plan_of_the_objective_s_data_plans_its_worst_batch(tmp_path, capsys, tokenizer_dir, objective,  # noqa: F811
                                                              rows, per_row):
    data = write_jsonl(tmp_path / "rows.jsonl", rows())
    rc, out, err = qplan(capsys, "estimate", "--model", "smollm2-135m", "--objective", objective, "--data", str(data),
                         "--tokenizer", str(tokenizer_dir), "--max-seq-len", "48", "--batch-size", "4",
                         "--gpu", "a100-80gb", "--format", "json")
    assert rc == 0, err
    plan = json.loads(out)
    d = plan["prediction"]["data"]
    assert plan["training"]["seq_len"] == d["worst_batch"]["seq_len"] <= 48
    # the time counts every row the step runs: both of a DPO pair's
    assert plan["prediction"]["time"]["tokens"] == per_row * d["padded_tokens_per_epoch"]
