"""axolotl's dataset types (issue 27): the samples qplan counts equal the samples axolotl itself makes.

Oracle: axolotl 0.19.0's own code — ``get_dataset_wrapper`` (its type dispatch and prompt strategies), then
``handle_long_seq_in_dataset`` and, with ``sample_packing``, ``process_datasets_for_packing`` — run in a
subprocess (``tests/oracles/axolotl_prepare.py``) with axolotl from ``scripts/setup-oracles.sh`` on its path.
Two tokenizers: a byte-level BPE without specials around the text, and the same with a BOS prepended (as
Llama 3's), which axolotl strips from each Alpaca response.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from qplan.planner.data import axolotl, data_profile
from qplan.planner.data.formats import Formatter
from qplan.planner.errors import QPlanError

ROOT = Path(__file__).resolve().parents[2]
ORACLE = Path(os.environ.get("QPLAN_AXOLOTL_ORACLE", ROOT / ".oracles" / "axolotl"))
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SEQ = 48
#: sequence_len per type (an Alpaca prompt alone is about 140 bytes: its system sentence)
SEQ_OF = {"alpaca": 200, "completion": SEQ, "chat_template": SEQ}


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(["tea", "a", "quantization", "GPU", "ok"]) for _ in range(rng.randint(lo, hi)))


def records() -> dict[str, list[dict]]:
    rng = random.Random(11)
    alpaca = [{"instruction": _words(rng, 1, 6), "input": _words(rng, 1, 4) if i % 3 == 0 else "",
               "output": _words(rng, 0, 12) if i % 5 else ""} for i in range(40)]
    alpaca += [{"instruction": "x", "output": "no input field"}, {"instruction": "y", "input": "", "output": "ends</s>"},
               {"instruction": _words(rng, 60, 60), "input": "", "output": "a prompt over sequence_len"},
               {"instruction": "z", "input": "", "output": _words(rng, 50, 50)},  # a response over sequence_len
               {"instruction": _words(rng, 60, 60), "input": "", "output": ""}]  # nothing to train on
    completion = [{"text": _words(rng, 0, 25)} for _ in range(30)]
    completion += [{"text": ""}, {"text": "ends with eos</s>"}, {"text": "x" * SEQ},  # + EOS: a 1-token last chunk
                   {"text": "y" * (SEQ * 64 + 7)}, {"text": "z" * (SEQ * 3 - 1)}]  # over axolotl's 64 x cap
    chat = [{"messages": [{"role": "user", "content": _words(rng, 1, 5)},
                          {"role": "assistant", "content": _words(rng, 1, 14)}]} for _ in range(25)]
    chat += [{"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "mapped roles"}]},
             {"messages": [{"role": "user", "content": "no answer"}]},  # nothing to train on
             {"system": "be brief", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
             {"messages": [{"role": "user", "content": _words(rng, 30, 30)}, {"role": "assistant", "content": "k"}]}]
    return {"alpaca": alpaca, "completion": completion, "chat_template": chat}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from tokenizers import processors
    from transformers import AutoTokenizer

    from qplan.backends.modelsrc import byte_tokenizer

    out = {}
    for name in ("plain", "bos"):
        tok = byte_tokenizer()
        tok.chat_template = CHAT
        if name == "bos":
            tok._tokenizer.post_processor = processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
        d = tmp_path_factory.mktemp(name)
        tok.save_pretrained(d)
        out[name] = (str(d), AutoTokenizer.from_pretrained(d))
    return out


#: the jobs axolotl runs (one subprocess for the module): (tokenizer, type, sequence_len, strategy, packing)
STRATEGIES = ((None, False), ("truncate", False), (None, True), ("truncate", True))
JOBS = [(t, typ, SEQ_OF[typ], st, pk) for t in ("plain", "bos") for typ in SEQ_OF for st, pk in STRATEGIES] + [
    ("plain", "alpaca", 200, "raise", False), ("bos", "alpaca", 200, None, False)]
TWO_TEXTS = [{"text": "q" * 100}, {"text": "short"}]
#: ShareGPT records, read by axolotl with the mapping a config gives them (qplan maps from/value itself)
SHAREGPT = [{"conversations": [{"from": "human", "value": "hi " * k}, {"from": "gpt", "value": "yo " * (k + 2)}]}
            for k in range(1, 9)] + [{"conversations": [{"from": "gpt", "value": "an answer first"}]}]
SHAREGPT_CFG = {"field_messages": "conversations", "message_property_mappings": {"role": "from", "content": "value"}}


@pytest.fixture(scope="module")
def axolotl_says(tokenizers, tmp_path_factory):
    """{job: axolotl's answer} for ``JOBS`` and the two-text completion job."""
    if not (ORACLE / "axolotl").is_dir():
        pytest.skip(f"axolotl's own data code is not installed in {ORACLE}: run scripts/setup-oracles.sh")
    recs = records()
    jobs = [{"tokenizer": tokenizers[t][0], "records": recs[typ], "type": typ, "sequence_len": seq,
             "excess_length_strategy": st, "sample_packing": pk} for t, typ, seq, st, pk in JOBS]
    jobs.append({"tokenizer": tokenizers["plain"][0], "records": TWO_TEXTS, "type": "completion", "sequence_len": SEQ})
    jobs.append({"tokenizer": tokenizers["plain"][0], "records": SHAREGPT, "type": "chat_template", "sequence_len": SEQ,
                 "sample_packing": True, "dataset": SHAREGPT_CFG})
    f = tmp_path_factory.mktemp("oracle") / "jobs.json"
    f.write_text(json.dumps(jobs))
    env = dict(os.environ, PYTHONPATH=str(ORACLE), AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TMPDIR=str(f.parent))
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "oracles" / "axolotl_prepare.py"), str(f)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    answers = json.loads(p.stdout.strip().splitlines()[-1])
    return dict(zip([*JOBS, "two texts", "sharegpt"], answers, strict=True))


@pytest.mark.parametrize("tok_name", ["plain", "bos"])
@pytest.mark.parametrize("typ", ["alpaca", "completion", "chat_template"])
def test_samples_and_filters_equal_axolotls(tokenizers, axolotl_says, tok_name, typ):
    """Every sample's token count before the length filter, and the samples kept after it (drop, truncate;
    with sample_packing, the drop of samples with nothing to train on), equal axolotl's."""
    _, tok = tokenizers[tok_name]
    recs = records()[typ]
    fmt = f"axolotl:{typ}"
    seq = SEQ_OF[typ]
    cols = axolotl.columns(Formatter(tok), recs, fmt, "d")
    of_row, lengths, trainable = axolotl.samples(cols, fmt, seq)
    for strategy, packing in STRATEGIES:
        want = axolotl_says[(tok_name, typ, seq, strategy, packing)]
        assert lengths == want["before_filter"]
        _, kept, truncated, dropped = axolotl.select(of_row, lengths, trainable, seq, strategy or "drop", packing, "d")
        assert kept == want["lengths"], (strategy, packing)
        assert dropped == len(lengths) - len(want["lengths"])
        assert truncated == (sum(n > seq for n in lengths) if strategy == "truncate" else 0)
    if typ != "completion":  # completion chunks are never over sequence_len
        assert any(n > seq for n in lengths)
    assert any(n < 2 or t < 0 for n, t in zip(lengths, trainable, strict=True))


def test_raise_stops_where_axolotl_stops(tokenizers, axolotl_says):
    _, tok = tokenizers["plain"]
    assert "exceeds the maximum" in axolotl_says[("plain", "alpaca", 200, "raise", False)]["error"]
    cols = axolotl.columns(Formatter(tok), records()["alpaca"], "axolotl:alpaca", "d")
    with pytest.raises(QPlanError, match=r"d row \d+: .* over sequence_len 200 — axolotl stops here"):
        axolotl.select(*axolotl.samples(cols, "axolotl:alpaca", 200), 200, "raise", False, "d")


def test_profile_of_an_axolotl_dataset(tmp_path, tokenizers, axolotl_says):
    """The plan's statistics from axolotl's samples: pads to a multiple of 64 as axolotl's collator does by
    default, and the worst batch is the longest kept sample rounded up."""
    tok_dir, _ = tokenizers["bos"]
    recs = records()["alpaca"]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    want = axolotl_says[("bos", "alpaca", 200, None, False)]
    got = data_profile(str(data), tokenizer=tok_dir, model_source={}, fmt="axolotl:alpaca", max_length=200,
                       batching="sequential", packing_strategy="bfd", batch_size=4, pad_to_multiple_of=64)
    kept = want["lengths"]
    assert got["samples"] == got["records"] == len(recs)
    assert got["dropped"] == len(recs) - len(kept) and got["long_samples"] == "drop"
    assert got["trained_tokens"] == got["tokens_per_epoch"] == sum(kept)
    assert got["worst_batch"]["seq_len"] == -(-max(kept) // 64) * 64
    up = [-(-max(kept[i:i + 4]) // 64) * 64 * len(kept[i:i + 4]) for i in range(0, len(kept), 4)]
    assert got["padded_tokens_per_epoch"] == sum(up)  # file order: the batches themselves
    assert got["longest_sample"]["tokens"] == max(want["before_filter"])


def test_completion_record_makes_several_samples(tmp_path, tokenizers, axolotl_says):
    tok_dir, _ = tokenizers["plain"]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TWO_TEXTS))
    got = data_profile(str(data), tokenizer=tok_dir, model_source={}, fmt="axolotl:completion", max_length=SEQ,
                       batching="padding", packing_strategy="bfd", batch_size=1)
    want = axolotl_says["two texts"]
    assert got["records"] == 2 and got["samples"] == len(want["before_filter"]) == 4  # 100 + EOS = 48 + 48 + 5
    assert got["longest_sample"]["row"] == 1


def test_axolotl_format_needs_sequence_len_and_trl_refuses_drop(tmp_path, tokenizers):
    tok_dir, _ = tokenizers["plain"]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(QPlanError, match="needs --max-seq-len"):
        data_profile(str(data), tokenizer=tok_dir, model_source={}, fmt="axolotl:completion", max_length=None,
                     batching="padding", packing_strategy="bfd", batch_size=1)
    with pytest.raises(QPlanError, match="--long-samples drop is axolotl's"):
        data_profile(str(data), tokenizer=tok_dir, model_source={}, fmt="text", max_length=8, batching="padding",
                     packing_strategy="bfd", batch_size=1, long_samples="drop")


TINY = str(Path(__file__).resolve().parents[1] / "backends" / "data" / "tiny-llama.json")


def _cli(capsys, *args):
    from qplan.cli.main import main

    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("packing", [False, True])
def test_an_axolotl_config_plans_its_dataset(tmp_path, tokenizers, axolotl_says, capsys, packing):
    """An axolotl config's one dataset becomes --data: its type formats, sequence_len drops (axolotl's default),
    the collator pads to 64 (sample_packing: to sequence_len rounded up to 64, every batch); the kept samples are
    axolotl's own."""
    tok_dir, _ = tokenizers["bos"]
    recs = records()["alpaca"]
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = tmp_path / "qlora.yml"
    cfg.write_text(f"base_model: {TINY}\nadapter: qlora\nload_in_4bit: true\nlora_r: 8\nlora_alpha: 16\n"
                   "lora_target_linear: true\nmicro_batch_size: 2\nsequence_len: 200\nbf16: true\n"
                   f"sample_packing: {'true' if packing else 'false'}\n"
                   f"datasets:\n  - path: {tmp_path / 'alpaca.jsonl'}\n    type: alpaca\n")
    rc, out, err = _cli(capsys, "estimate", "--from-config", str(cfg), "--tokenizer", tok_dir, "--format", "json")
    assert rc == 0, err
    plan = json.loads(out)
    d = plan["prediction"]["data"]
    want = axolotl_says[("bos", "alpaca", 200, None, packing)]["lengths"]
    assert d["format"] == "axolotl:alpaca" and d["long_samples"] == "drop" and d["max_length"] == 200
    if packing:  # the no-trainable drop, then packs padded to 256 = 200 rounded up to 64
        assert d["batching"] == "packing" and d["pad_to_multiple_of"] == 256
        assert d["trained_tokens"] == sum(want) and plan["training"]["seq_len"] == 256
        assert "multipack" in err
    else:
        assert d["batching"] == "padding" and d["pad_to_multiple_of"] == 64
        assert d["samples"] - d["dropped"] == len(want) and d["trained_tokens"] == sum(want)
        assert plan["training"]["seq_len"] == -(-max(want) // 64) * 64 and plan["training"]["padded"] is True
    # a dataset qplan cannot read: the plan is the bound, with a warning that says so
    cfg.write_text(cfg.read_text().replace("type: alpaca", "type: oasst"))
    rc, out, err = _cli(capsys, "estimate", "--from-config", str(cfg), "--format", "json")
    assert rc == 0 and "data" not in json.loads(out)["prediction"]
    assert json.loads(out)["training"]["seq_len"] == 256 and "dataset type 'oasst'" in err


def test_sharegpt_conversations_as_axolotl_maps_them(tokenizers, axolotl_says):
    """ShareGPT ``conversations`` of ``from``/``value`` (human/gpt): qplan's mapping equals axolotl's with a config's
    ``field_messages: conversations`` and ``message_property_mappings: {role: from, content: value}``; a record
    opening with the answer is trained from its first token (kept under packing)."""
    _, tok = tokenizers["plain"]
    cols = axolotl.columns(Formatter(tok), SHAREGPT, "axolotl:chat_template", "d")
    of_row, lengths, untrained = axolotl.samples(cols, "axolotl:chat_template", SEQ)
    want = axolotl_says["sharegpt"]
    assert lengths == want["before_filter"]
    assert axolotl.select(of_row, lengths, untrained, SEQ, "drop", True, "d")[1] == want["lengths"]
    assert untrained[-1] == 0
