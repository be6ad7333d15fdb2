"""Training data: JSONL reading, the instruction template, packing, the byte tokenizer."""

from __future__ import annotations

import json

import pytest

from qplan.backends.data import TEMPLATE, pack, read_jsonl, sample_data_path
from qplan.planner.errors import QPlanError


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_reads_text_and_instruction_records(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [
        {"text": "plain text"},
        {"instruction": "Add 2 and 3.", "response": "5"},
        {"instruction": "Reverse it.", "input": "abc", "response": "cba"},
    ])
    texts = read_jsonl(f)
    assert texts[0] == "plain text"
    assert texts[1] == TEMPLATE.format(instruction="Add 2 and 3.", response="5")
    assert "### Input:\nabc" in texts[2] and texts[2].endswith("### Response:\ncba")


@pytest.mark.parametrize("line, needle", [
    ("{not json}\n", "d.jsonl:2 is not valid JSON"),
    ('{"prompt": "x"}\n', "d.jsonl:2: needs a string 'text'"),
    ('["a list"]\n', "d.jsonl:2: expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, needle):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n' + line, encoding="utf-8")
    with pytest.raises(QPlanError, match=needle):
        read_jsonl(f)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(QPlanError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(QPlanError, match="has no records"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_packing_gives_full_blocks_with_eos_between_records():
    data = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=0)
    # stream: 1 2 3 0 4 5 0 6 7 8 9 0 -> three blocks of 4
    assert data.blocks == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert data.repeats == 1 and data.tokens_in_file == 12
    assert data[1] == {"input_ids": [4, 5, 0, 6], "labels": [4, 5, 0, 6]}


def test_short_data_is_repeated_to_fill_one_step():
    data = pack([[1, 2, 3]], seq_len=4, eos_id=9, min_blocks=3)  # 4 tokens, a step needs 12
    assert len(data) >= 3 and all(len(b) == 4 for b in data.blocks)
    assert data.repeats == 3 and "repeated 3 times" in data.notes[0]


def test_bundled_sample_is_varied_and_valid():
    texts = read_jsonl(sample_data_path())
    assert len(texts) >= 250
    assert len(set(texts)) > 0.9 * len(texts)
    assert sum("### Instruction:" in t for t in texts) > 100
    assert sum("### Instruction:" not in t for t in texts) > 100


def test_byte_tokenizer_ids_fit_a_small_vocabulary():
    pytest.importorskip("tokenizers")
    from qplan.backends.modelsrc import BYTE_VOCAB, byte_tokenizer

    tok = byte_tokenizer()
    assert len(tok) == BYTE_VOCAB == 259
    ids = tok("héllo, wörld")["input_ids"]
    assert all(3 <= i < 259 for i in ids)
    assert len(ids) == len("héllo, wörld".encode())  # one id per UTF-8 byte
    assert tok.decode(ids) == "héllo, wörld"
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0
