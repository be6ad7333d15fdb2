"""Training data: JSONL records -> token blocks of exactly ``seq_len`` tokens.

Each line of the file is a JSON object with ``text``, or with ``instruction`` and ``response``
(and optionally ``input``), joined by ``TEMPLATE``. Every record is tokenized with the model's
tokenizer (its own special tokens), an end-of-sequence id is appended, the records are
concatenated and cut into blocks of ``seq_len`` (packing; the tail that does not fill a block is
dropped). Every micro-batch is therefore ``batch_size × seq_len`` real tokens with no padding —
what the prediction assumes. ``labels`` are the ``input_ids`` (the model shifts them).

When the file holds fewer tokens than one optimizer step needs, the token stream is repeated
until it fills one (noted in measured.json). Blocks are plain lists of ints; the collator
makes the tensors of one batch at a time. Without ``--data`` the bundled sample is used
(``qplan/model_specs/data/sample.jsonl``: a few hundred short public-domain-style texts and
instruction/response pairs written for qplan).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError

#: the most of a JSONL data file qplan reads (a sample data set for a measured run, not a corpus)
MAX_DATA_BYTES = 256 << 20
TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n{response}"
TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{response}"


def sample_data_path() -> Path:
    """The bundled sample dataset."""
    return Path(str(resources.files("qplan.model_specs") / "data" / "sample.jsonl"))


def record_text(rec: Any, where: str) -> str:
    """The training text of one record: ``text``, or instruction/(input)/response in TEMPLATE."""
    if not isinstance(rec, dict):
        raise QPlanError(f"{where}: expected a JSON object with 'text' or 'instruction'/'response'")
    if isinstance(rec.get("text"), str):
        return rec["text"]
    if isinstance(rec.get("instruction"), str) and isinstance(rec.get("response"), str):
        if rec.get("input"):
            return TEMPLATE_WITH_INPUT.format(**rec)
        return TEMPLATE.format(instruction=rec["instruction"], response=rec["response"])
    raise QPlanError(f"{where}: needs a string 'text', or string 'instruction' and 'response' fields")


def read_jsonl(path: str | Path) -> list[str]:
    """Texts of a JSONL file; a missing file, bad line or empty file is one clear error."""
    from qplan.planner.files import read_limited, safe_is_file
    from qplan.planner.validate import loads

    p = Path(path)
    if not safe_is_file(p):
        raise QPlanError(f"data file {path} does not exist")
    texts: list[str] = []
    try:
        lines = read_limited(p, "data file", MAX_DATA_BYTES).decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise QPlanError(f"data file {p} is not UTF-8 text (byte {exc.start}): give a JSONL file") from exc
    except OSError as exc:
        raise QPlanError(f"cannot read data file {p}: {exc.strerror or exc}") from exc
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = loads(line, f"{p}:{i}")
        texts.append(record_text(rec, f"{p}:{i}"))
    if not texts:
        raise QPlanError(f"data file {p} has no records")
    return texts


@dataclass
class PackedData:
    """Blocks of ``seq_len`` token ids; ``repeats`` > 1 when the text was repeated to fill a step."""

    blocks: list[list[int]]
    seq_len: int
    tokens_in_file: int
    repeats: int = 1
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": list(ids)}


def pack(token_lists: list[list[int]], seq_len: int, eos_id: int | None, min_blocks: int = 1) -> PackedData:
    """Concatenate (with ``eos_id`` after each record) and cut into ``seq_len`` blocks."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    if not stream:
        raise QPlanError("the data produced no tokens")
    n = len(stream)
    repeats = max(1, -(-min_blocks * seq_len // n))
    full = stream * repeats
    blocks = [full[i:i + seq_len] for i in range(0, len(full) - seq_len + 1, seq_len)]
    data = PackedData(blocks, seq_len, n, repeats)
    if repeats > 1:
        data.notes.append(f"data has {n} tokens, fewer than one step needs ({min_blocks} x {seq_len}): "
                          f"repeated {repeats} times")
    return data


def load_dataset(path: str | Path | None, tokenizer: Any, seq_len: int, step_blocks: int,
                 model_vocab: int) -> PackedData:
    """Read, tokenize and pack ``path`` (default: the bundled sample) for one model.

    ``step_blocks`` = blocks one optimizer step consumes (batch × grad_accum); ids must be
    below ``model_vocab`` (the model's embedding rows).
    """
    texts = read_jsonl(path or sample_data_path())
    enc = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    worst = max((max(ids) for ids in enc if ids), default=0)
    if worst >= model_vocab:
        raise QPlanError(f"the tokenizer produces id {worst} but the model has {model_vocab} embeddings: "
                         f"the model folder's tokenizer does not match its config")
    return pack(enc, seq_len, tokenizer.eos_token_id, min_blocks=step_blocks)
