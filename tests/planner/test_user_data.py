"""--data (issue 27): a dataset's token counts, truncation, packing and padded batches, against independent oracles.

* Formatting, tokenizing, truncation and packing: TRL's own ``SFTTrainer._prepare_dataset`` (the code the trainer
  runs; called on a ``datasets.Dataset`` with a stand-in ``self`` holding the tokenizer), per row.
* The expected padded tokens of a shuffled epoch: every permutation enumerated (small sets).
* Padded batches in file order: transformers' ``DataCollatorWithPadding`` on the real batches.
* group_by_length: transformers' ``get_length_grouped_indices`` given the same permutation.
* Readers: the same records as Parquet, CSV, Arrow and a ``save_to_disk`` folder (written by ``datasets``) give the
  lengths of the JSONL.
The tokenizer is built here (a byte-level BPE with a chat template): no download.
"""

from __future__ import annotations

import itertools
import json
import random
import types
import warnings
from pathlib import Path

import pytest

pytest.importorskip("trl")

from qplan.planner.data import data_profile
from qplan.planner.data.batching import (
    expected_max_of_subset,
    length_grouped_order,
    pack_bfd,
    pack_wrapped,
    padded_tokens_sequential,
    padded_tokens_shuffled,
)
from qplan.planner.data.formats import Formatter
from qplan.planner.errors import QPlanError

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from qplan.backends.modelsrc import byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = CHAT
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(["tea", "a", "quantization", "GPU", "ok"]) for _ in range(rng.randint(lo, hi)))


def datasets_() -> dict[str, list[dict]]:
    rng = random.Random(7)
    chat = [{"messages": [{"role": "user", "content": _words(rng, 1, 9)},
                          {"role": "assistant", "content": _words(rng, 1, 40)}]} for _ in range(40)]
    return {
        "text": [{"text": _words(rng, 1, 60)} for _ in range(60)] + [{"text": "ends with eos</s>"}],
        "messages": chat,
        "conversations": [{"conversations": [{"from": "human", "value": _words(rng, 1, 9)},
                                             {"from": "gpt", "value": _words(rng, 1, 30)}]} for _ in range(30)],
        "prompt-completion": [{"prompt": _words(rng, 1, 9), "completion": _words(rng, 1, 20)} for _ in range(40)]
        + [{"prompt": _words(rng, 60, 60), "completion": "x"}],  # the prompt alone fills max_length: TRL drops it
        "chat prompt-completion": [{"prompt": [{"role": "user", "content": _words(rng, 1, 12)}],
                                    "completion": [{"role": "assistant", "content": _words(rng, 1, 30)}]}
                                   for _ in range(30)],
    }


def trl_prepared(tok, rows, max_length, packing, strategy="bfd") -> list[int]:
    """Lengths of the rows TRL's SFTTrainer trains on (its own preparation code)."""
    from datasets import Dataset, disable_progress_bars
    from trl import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    disable_progress_bars()
    with warnings.catch_warnings():  # TRL's defaults set transformers' deprecated gradient_checkpointing name
        warnings.simplefilter("ignore", FutureWarning)
        args = SFTConfig(output_dir="/tmp/unused", max_length=max_length, packing=packing, packing_strategy=strategy,
                         report_to=[], use_cpu=True, bf16=False)
    # as SFTTrainer.__init__ sets it when completion_only_loss is None: on for prompt-completion data
    me = types.SimpleNamespace(_tokenizer=tok, chat_template=None,
                               completion_only_loss="prompt" in rows[0] and "completion" in rows[0])
    ds = SFTTrainer._prepare_dataset(me, Dataset.from_list(rows), tok, args, packing, None, "train")
    return [len(x) for x in ds["input_ids"]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", list(datasets_()))
@pytest.mark.parametrize("max_length", [None, 48])
def test_token_counts_and_truncation_equal_trls_preparation(tmp_path, tok, tokenizer_dir, name, max_length):
    rows = datasets_()[name]
    want = trl_prepared(tok, rows, max_length, packing=False)
    got = data_profile(str(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer=str(tokenizer_dir), model_source={},
                       fmt="auto", max_length=max_length, batching="sequential", packing_strategy="bfd", batch_size=4)
    assert got["samples"] - got["dropped"] == len(want)
    assert got["trained_tokens"] == sum(want)
    assert got["worst_batch"]["seq_len"] == max(want)
    assert got["padded_tokens_per_epoch"] == padded_tokens_sequential(want, 4)
    if max_length is not None:
        full = Formatter(tok).lengths(rows, got["format"], "d")[0]
        assert got["truncated"] == sum(n > max_length for n in full) > 0
    if name == "prompt-completion" and max_length:
        assert got["dropped"] >= 1  # the long prompt at least


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
@pytest.mark.parametrize("name", ["text", "messages", "prompt-completion"])
def test_packing_equals_trls_pack_dataset(tmp_path, tok, tokenizer_dir, name, strategy):
    rows = datasets_()[name]
    want = trl_prepared(tok, rows, 64, packing=True, strategy=strategy)
    got = data_profile(str(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer=str(tokenizer_dir), model_source={},
                       fmt="auto", max_length=64, batching="packing", packing_strategy=strategy, batch_size=2)
    assert got["packs"] == len(want) and got["tokens_per_epoch"] == sum(want)
    assert got["worst_batch"] == {**got["worst_batch"], "seq_len": 64, "tokens": 2 * 64}
    full = Formatter(tok).lengths(rows, got["format"], "d")[0]
    packs = pack_bfd(full, 64) if strategy == "bfd" else pack_wrapped(full, 64)
    assert sorted(packs) == sorted(want)


def test_expected_padded_tokens_of_a_shuffled_epoch_by_enumeration():
    lengths = [3, 9, 1, 7, 7, 2, 5]
    for b in (1, 2, 3, 4, 7):
        perms = list(itertools.permutations(lengths))
        mean = sum(padded_tokens_sequential(list(p), b) for p in perms) / len(perms)
        assert padded_tokens_shuffled(lengths, b) == pytest.approx(mean, rel=1e-12)
    assert expected_max_of_subset(sorted(lengths), len(lengths)) == pytest.approx(9)


def test_padded_batches_in_file_order_equal_the_collator(tok):
    from transformers import DataCollatorWithPadding

    rng = random.Random(3)
    ids = [[5] * rng.randint(1, 50) for _ in range(23)]
    collate = DataCollatorWithPadding(tok, return_tensors="pt")
    real = sum(collate([{"input_ids": x} for x in ids[i:i + 4]])["input_ids"].numel() for i in range(0, 23, 4))
    assert padded_tokens_sequential([len(x) for x in ids], 4) == real


def test_group_by_length_orders_as_transformers_does(monkeypatch):
    import torch
    from transformers import trainer_pt_utils

    rng = random.Random(11)
    lengths = [rng.randint(1, 500) for _ in range(203)]
    perm = list(range(203))
    random.Random(5).shuffle(perm)
    monkeypatch.setattr(trainer_pt_utils.torch, "randperm", lambda n, generator=None: torch.tensor(perm))
    want = trainer_pt_utils.get_length_grouped_indices(lengths, 4)

    class Fixed:
        def shuffle(self, xs):
            xs[:] = perm

    assert length_grouped_order(lengths, 4, Fixed()) == want
    assert lengths[want[0]] == max(lengths)


@pytest.mark.parametrize("kind", ["parquet", "csv", "arrow", "save_to_disk", "json"])
def test_every_reader_gives_the_lengths_of_the_jsonl(tmp_path, tokenizer_dir, kind):
    from datasets import Dataset

    rows = datasets_()["prompt-completion"][:20]
    ds = Dataset.from_list(rows)
    path = {"parquet": tmp_path / "d.parquet", "csv": tmp_path / "d.csv", "arrow": tmp_path / "d.arrow",
            "save_to_disk": tmp_path / "saved", "json": tmp_path / "d.json"}[kind]
    if kind == "parquet":
        ds.to_parquet(path)
    elif kind == "csv":
        ds.to_csv(path, index=False)
    elif kind == "arrow":
        ds.save_to_disk(tmp_path / "tmp")
        path.write_bytes(next((tmp_path / "tmp").glob("*.arrow")).read_bytes())
    elif kind == "save_to_disk":
        ds.save_to_disk(path)
    else:
        path.write_text(json.dumps(rows))

    def profile(p):
        return data_profile(str(p), tokenizer=str(tokenizer_dir), model_source={}, fmt="auto", max_length=None,
                            batching="sequential", packing_strategy="bfd", batch_size=3)

    a, b = profile(path), profile(write_jsonl(tmp_path / "d.jsonl", rows))
    assert {k: a[k] for k in a if k not in ("source", "path")} == {k: b[k] for k in b if k not in ("source", "path")}


@pytest.mark.parametrize("content,needle", [
    (b"", "has no records"),
    (b'{"text": "a"}\n{"txt": "b"}\n', "row 2"),
    (b'{"text": "a"}\n{"messages": [{"role": "user", "content": "x"}]}\n', "mixed formats"),
    (b'{"text": "a"}\nnot json\n', ":2: not JSON"),
    (b'{"text": "a"}\n{"text": "\xff"}\n', ":2: not UTF-8"),
    (b'["a list"]\n', "expected an object"),
    (b'{"text": 5}\n', "must be a string"),
    (b'{"prompt": "a"}\n', "no training field"),
])
def test_bad_data_is_one_line_naming_the_row(tmp_path, tokenizer_dir, content, needle):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(QPlanError, match=needle.replace("(", r"\(")) as e:
        data_profile(str(p), tokenizer=str(tokenizer_dir), model_source={}, fmt="auto", max_length=None,
                     batching="padding", packing_strategy="bfd", batch_size=1)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ the command line

TINY = str(Path(__file__).resolve().parents[1] / "backends" / "data" / "tiny-llama.json")


def _cli(capsys, *args):
    from qplan.cli.main import main

    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_estimate_plans_the_worst_batch_and_the_real_tokens(tmp_path, tok, tokenizer_dir, capsys):
    """The planned shape is the worst batch (TRL's longest kept sequence), the time counts the padded tokens of every
    epoch, and the plan says which row is the longest; the table shows the histogram with it marked."""
    rows = datasets_()["text"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    want = trl_prepared(tok, rows, 100, packing=False)
    rc, out, err = _cli(capsys, "estimate", "--model", TINY, "--data", str(data), "--tokenizer", str(tokenizer_dir),
                        "--max-seq-len", "100", "--batch-size", "4", "--gpu", "t4", "--epochs", "3", "--format", "json")
    assert rc == 0, err
    plan = json.loads(out)
    d = plan["prediction"]["data"]
    assert plan["training"]["seq_len"] == max(want) == 100
    full = Formatter(tok).lengths(rows, "text", "d")[0]
    assert d["longest_sample"] == {"index": full.index(max(full)), "row": full.index(max(full)) + 1, "tokens": max(full)}
    # an expectation, rounded to whole tokens per epoch
    assert plan["prediction"]["time"]["tokens"] == pytest.approx(padded_tokens_shuffled(want, 4) * 3, abs=3)
    rc, out, _ = _cli(capsys, "estimate", "--model", TINY, "--data", str(data), "--tokenizer", str(tokenizer_dir),
                      "--max-seq-len", "100", "--batch-size", "4")
    assert rc == 0 and "← longest" in out and f"(row {d['longest_sample']['row']})" in out


@pytest.mark.parametrize("args,needle", [
    (["--max-seq-len", "64"], "--max-seq-len describes --data"),
    (["--batching", "packing"], "--batching describes --data"),
    (["--data", "D.jsonl", "--seq-len", "64"], "--seq-len is set by --data"),
    (["--data", "D.jsonl", "--tokens", "1000"], "--data counts the tokens"),
    (["--data", "D.jsonl", "--batching", "packing"], "--packing needs --max-seq-len"),
    (["--data", "D.jsonl"], "over tiny-llama's context of 256"),
    (["--data", "FIFO.jsonl"], "not a regular file"),
    (["--data", "D.jsonl", "--tokenizer", "NOTOK"], "no tokenizer found"),
    (["--data", "D.txt"], "unknown kind"),
    (["--data", "S.jsonl", "--batch-size", "2", "--method", "trace"], "--method trace steps unpadded batch × seq_len batches"),
])
def test_data_options_misused_are_one_line(tmp_path, tokenizer_dir, capsys, args, needle):
    import os

    (tmp_path / "D.jsonl").write_text("".join(json.dumps({"text": "x" * 300}) + "\n" for _ in range(3)))
    (tmp_path / "D.txt").write_text("x")
    (tmp_path / "S.jsonl").write_text("".join(json.dumps({"text": "x" * n}) + "\n" for n in (5, 9, 30)))
    (tmp_path / "NOTOK").mkdir()
    os.mkfifo(tmp_path / "FIFO.jsonl")
    args = [str(tmp_path / a) if (tmp_path / a).exists() else a for a in args]
    if "--data" in args and "--tokenizer" not in args:
        args += ["--tokenizer", str(tokenizer_dir)]
    rc, _, err = _cli(capsys, "estimate", "--model", TINY, *args)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_a_second_plan_of_the_same_data_does_not_tokenize(tmp_path, tokenizer_dir, monkeypatch):
    """The token counts are cached by the data's content, tokenizer and format: the second plan is the first's,
    without a tokenizer call, and so is a copy of the file elsewhere or a touched file; a file whose content changed
    is counted again even with its size and mtime restored."""
    import os

    from qplan.planner.data import formats

    monkeypatch.setenv("QPLAN_DATA_CACHE_DIR", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", datasets_()["text"])

    def profile():
        return data_profile(str(data), tokenizer=str(tokenizer_dir), model_source={}, fmt="auto", max_length=64,
                            batching="padding", packing_strategy="bfd", batch_size=4)

    first = profile()
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1

    def refuse(*_a, **_k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(formats.Formatter, "lengths", refuse)
    assert profile() == first
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched, the same content: a hit
    assert profile() == first
    copy = tmp_path / "elsewhere" / "copy.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(data.read_bytes())
    assert data_profile(str(copy), tokenizer=str(tokenizer_dir), model_source={}, fmt="auto", max_length=64,
                        batching="padding", packing_strategy="bfd", batch_size=4)["trained_tokens"] == first["trained_tokens"]
    st = data.stat()
    body = data.read_bytes()
    data.write_bytes(body.replace(b"tea", b"TEA", 1))  # another content, the same size, its mtime put back
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(AssertionError, match="tokenized again"):
        profile()
    monkeypatch.undo()
    monkeypatch.setenv("QPLAN_DATA_CACHE", "0")
    monkeypatch.setenv("QPLAN_DATA_CACHE_DIR", str(tmp_path / "off"))
    assert profile()["trained_tokens"] == first["trained_tokens"] and not (tmp_path / "off").exists()


def _hub_dataset(tmp_path: Path, rows: list[dict]) -> Path:
    """A Hub dataset as `datasets.load_dataset` leaves it in the HF cache: a snapshot with data/train-*.parquet (and
    a test split that must not be read)."""
    from datasets import Dataset

    snap = tmp_path / "hub" / "datasets--me--chat" / "snapshots" / "0123abc"
    (snap / "data").mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(snap / "data" / "train-00000-of-00001.parquet")
    Dataset.from_list([{"text": "x" * 999}]).to_parquet(snap / "data" / "test-00000-of-00001.parquet")
    return tmp_path / "hub"


def test_a_hub_dataset_id_is_read_from_the_hf_cache(tmp_path, tokenizer_dir, monkeypatch):
    rows = datasets_()["messages"]
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_dataset(tmp_path, rows)))
    got = data_profile("me/chat", tokenizer=str(tokenizer_dir), model_source={}, fmt="auto", max_length=None,
                       batching="sequential", packing_strategy="bfd", batch_size=2)
    local = data_profile(str(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer=str(tokenizer_dir), model_source={},
                         fmt="auto", max_length=None, batching="sequential", packing_strategy="bfd", batch_size=2)
    assert got["samples"] == len(rows) and got["trained_tokens"] == local["trained_tokens"]  # the test split unread
    assert got["source"] == "me/chat" and got["path"].endswith("snapshots/0123abc")
    with pytest.raises(QPlanError, match="Hub dataset id in the HF cache"):
        data_profile("me/absent", tokenizer=str(tokenizer_dir), model_source={}, fmt="auto", max_length=None,
                     batching="padding", packing_strategy="bfd", batch_size=2)


@pytest.mark.parametrize("packing", [False, True])
def test_a_trl_config_naming_its_dataset_plans_the_data(tmp_path, tok, tokenizer_dir, capsys, packing):
    """TRL's `dataset_name` (beside the config, or in the HF cache) becomes --data; `max_length` truncates and sizes
    packs; the numbers are TRL's own preparation's. A dataset not found keeps the old plan, with a warning."""
    rows = datasets_()["text"]
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model_name_or_path: {TINY}\ndataset_name: train.jsonl\nuse_peft: true\nlora_target_modules: "
                   f"all-linear\nper_device_train_batch_size: 2\nmax_length: 100\ndtype: bfloat16\nbf16: true\n"
                   f"packing: {'true' if packing else 'false'}\n")
    rc, out, err = _cli(capsys, "estimate", "--from-config", str(cfg), "--tokenizer", str(tokenizer_dir), "--format",
                        "json")
    assert rc == 0, err
    plan = json.loads(out)
    d = plan["prediction"]["data"]
    want = trl_prepared(tok, rows, 100, packing=packing)
    assert d["batching"] == ("packing" if packing else "padding") and d["max_length"] == 100
    assert plan["training"]["seq_len"] == (100 if packing else max(want))
    assert (d["packs"] if packing else d["samples"]) == len(want) and d["trained_tokens"] == sum(want)
    cfg.write_text(cfg.read_text().replace("dataset_name: train.jsonl", "dataset_name: nobody/absent"))
    rc, out, err = _cli(capsys, "estimate", "--from-config", str(cfg), "--format", "json")
    assert rc == 0 and "data" not in json.loads(out)["prediction"] and "nobody/absent" in err


def test_fit_searches_at_the_datas_worst_length(tmp_path, tok, tokenizer_dir, capsys):
    rows = datasets_()["text"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    want = trl_prepared(tok, rows, 100, packing=False)
    rc, out, err = _cli(capsys, "fit", "--model", TINY, "--gpu", "t4", "--data", str(data), "--tokenizer",
                        str(tokenizer_dir), "--max-seq-len", "100", "--quant", "bf16", "--format", "json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["data"]["seq_len"] == max(want) and {c["seq_len"] for c in res["best"]} == {max(want)}
    # each row is what `qplan estimate --data` plans for its batch (the padding mask included)
    row = next(c for c in res["best"] if c["batch_size"] > 1)
    rc, out, _ = _cli(capsys, "estimate", "--model", TINY, "--gpu", "t4", "--data", str(data), "--tokenizer",
                      str(tokenizer_dir), "--max-seq-len", "100", "--quant", "bf16", "--batch-size",
                      str(row["batch_size"]), "--r", str(row["r"]), "--targets", row["targets"], "--optimizer",
                      row["optimizer"], *([] if row["grad_ckpt"] == "hf" else ["--no-grad-ckpt"]), "--format", "json")
    assert rc == 0 and json.loads(out)["prediction"]["memory"]["peak"] == row["peak"]
    rc, out, _ = _cli(capsys, "fit", "--model", TINY, "--gpu", "t4", "--data", str(data), "--tokenizer",
                      str(tokenizer_dir), "--max-seq-len", "100", "--quant", "bf16")
    assert rc == 0 and f"sequence length {max(want)} from --data" in out
    rc, _, err = _cli(capsys, "fit", "--model", TINY, "--gpu", "t4", "--max-seq-len", "100")
    assert rc == 2 and "--max-seq-len describes --data" in err


def test_the_prompt_share_is_where_prompt_and_full_diverge_as_trl(tmp_path, tokenizer_dir):
    """A chat template that renders the generation prompt with a newline the full conversation lacks: the prompt's
    share is the common prefix (TRL's common_prefix_length), one token shorter than the prompt alone. At a
    max_length equal to a prompt's own length TRL keeps that sample (one completion token is left): so must qplan."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    rows = datasets_()["chat prompt-completion"]
    alone = len(tok.apply_chat_template(rows[0]["prompt"], tokenize=True, add_generation_prompt=True,
                                        return_dict=True)["input_ids"])
    want = trl_prepared(tok, rows, alone, packing=False)
    got = data_profile(str(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer="t", model_source={}, fmt="auto",
                       max_length=alone, batching="sequential", packing_strategy="bfd", batch_size=2,
                       tokenizer_obj=tok)
    assert got["samples"] - got["dropped"] == len(want) and got["trained_tokens"] == sum(want)


def test_a_corrupt_cache_entry_is_recounted(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setenv("QPLAN_DATA_CACHE_DIR", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", datasets_()["text"])

    def profile():
        return data_profile(str(data), tokenizer=str(tokenizer_dir), model_source={}, fmt="auto", max_length=None,
                            batching="padding", packing_strategy="bfd", batch_size=4)

    first = profile()
    (entry,) = (tmp_path / "cache").glob("*.json")
    for bad in ('{"version": 2, "format": "text", "columns": {"lengths": [1, "x"]}}', "[]", "{", '{"version": 2}',
                '{"version": 2, "format": "text", "columns": {"lengths": [1, 2], "prompt": [1]}}',
                '{"version": 2, "format": "text", "columns": {}}'):
        entry.write_text(bad)
        assert profile() == first


def test_a_huge_number_in_a_record_is_one_line(tmp_path, tokenizer_dir):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(QPlanError, match=":1: not JSON"):
        data_profile(str(p), tokenizer=str(tokenizer_dir), model_source={}, fmt="auto", max_length=None,
                     batching="padding", packing_strategy="bfd", batch_size=1)


def test_data_on_the_command_line_takes_the_configs_length_as_its_truncation(tmp_path, tok, tokenizer_dir, capsys):
    rows = datasets_()["text"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model_name_or_path: {TINY}\nuse_peft: true\nlora_target_modules: all-linear\n"
                   "per_device_train_batch_size: 2\nmax_length: 90\ndtype: bfloat16\nbf16: true\n")
    for cmd in (["estimate"], ["fit", "--gpu", "t4", "--quant", "bf16"]):
        rc, out, err = _cli(capsys, *cmd, "--from-config", str(cfg), "--data", str(data), "--tokenizer",
                            str(tokenizer_dir), "--format", "json")
        assert rc == 0, err
        res = json.loads(out)
        seq = res["training"]["seq_len"] if cmd == ["estimate"] else res["data"]["seq_len"]
        assert seq == max(trl_prepared(tok, rows, 90, packing=False)) == 90


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path, tokenizer_dir):
    plain, bom = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(plain, datasets_()["text"][:5])
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())

    def profile(p):
        return data_profile(str(p), tokenizer=str(tokenizer_dir), model_source={}, fmt="auto", max_length=None,
                            batching="sequential", packing_strategy="bfd", batch_size=2)

    a, b = profile(plain), profile(bom)
    assert {k: a[k] for k in a if k not in ("source", "path")} == {k: b[k] for k in b if k not in ("source", "path")}


def test_peft_harness_buckets():
    """PEFT's MetaMathQA harness (utils.BucketIterator, read from its source): buckets of batch × factor samples in
    file order, each sorted longest first, then batched; a remainder bucket is yielded twice. Worked by hand:
    lengths 5 1 4 2 3 6 7, batch 2, factor 1 -> buckets [5 1] [4 2] [3 6] [7] and [7] again."""
    from qplan.planner.data.batching import bucket_batches, padded_tokens_buckets

    lengths = [5, 1, 4, 2, 3, 6, 7]
    assert bucket_batches(lengths, 2, factor=1) == [[0, 1], [2, 3], [5, 4], [6], [6]]
    # factor 20: one bucket of all 7 (lengths 7 6 | 5 4 | 3 2 | 1), then the same bucket again
    assert padded_tokens_buckets(lengths, 2) == 2 * (2 * 7 + 2 * 5 + 2 * 3 + 1 * 1)
    assert bucket_batches(lengths, 2) == [[6, 5], [0, 2], [4, 3], [1], [6, 5], [0, 2], [4, 3], [1]]


def test_buckets_profile_is_what_the_run_batches(tmp_path, tokenizer_dir):
    """The planned epoch of --batching buckets equals the batches qplan run's sampler makes (every batch padded
    to its longest, DataCollatorWithPadding)."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from qplan.backends.plan_data import PlanData

    rows = datasets_()["text"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    got = data_profile(str(data), tokenizer=str(tokenizer_dir), model_source={}, fmt="auto", max_length=None,
                       batching="buckets", packing_strategy="bfd", batch_size=3)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = Formatter(tok).sequences(rows, "text", "d")[0]
    pd = PlanData([{"input_ids": x, "labels": x} for x in ids], 0, "buckets", False, "d")
    batches = pd.batch_order(3)
    collate = DataCollatorWithPadding(tok)
    assert len(rows) % 60 == 1  # a remainder bucket of one sample: it comes twice, in a batch of its own
    padded = sum(collate([{"input_ids": ids[j]} for j in b])["input_ids"].numel() for b in batches)
    assert got["padded_tokens_per_epoch"] == padded and got["batches_per_epoch"] == len(batches) == 22
    assert sorted(j for b in batches[:-1] for j in b) == list(range(len(rows)))
    assert got["worst_batch"]["seq_len"] == max(len(x) for x in ids)
