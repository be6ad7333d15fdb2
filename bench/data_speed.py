"""How fast `--data` plans a large dataset: reading, tokenizing, and each batching, in samples per second.

    python bench/data_speed.py [--samples 1000000] [--out reports/benchmarks/data-speed.md]

The dataset is generated (JSONL of `text` records, 10 to 150 words drawn from a fixed list; seeded) and the
tokenizer is qplan's byte-level BPE (one token per byte: the slowest case per character). Each stage is timed
once on this machine; the table says which machine. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

WORDS = ["the", "model", "fine-tune", "quantization", "GPU", "memory", "a", "of", "tokens", "batch", "adapter"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--out", default="reports/benchmarks/data-speed.md")
    a = ap.parse_args()
    from qplan.backends.modelsrc import byte_tokenizer
    from qplan.planner.data.batching import pack_bfd, padded_tokens_grouped, padded_tokens_shuffled
    from qplan.planner.data.formats import Formatter
    from qplan.planner.data.sources import read_records

    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "d.jsonl"
    with data.open("w") as f:
        for _ in range(a.samples):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 150)))}) + "\n")
    size = data.stat().st_size
    tok = byte_tokenizer()
    rows: list = []
    times: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t
        return out

    rows = timed("read JSONL", lambda: read_records(data))
    lengths = timed("format + tokenize", lambda: Formatter(tok).lengths(rows, "text", str(data))[0])
    timed("padding (expected, shuffled)", lambda: padded_tokens_shuffled(lengths, 8))
    timed("group_by_length (8 shuffles)", lambda: padded_tokens_grouped(lengths, 8))
    timed("packing bfd (max 4096)", lambda: pack_bfd(lengths, 4096))
    n = len(lengths)
    from qplan.planner.data import cache, data_profile

    os.environ["QPLAN_DATA_CACHE_DIR"] = str(tmp / "cache")
    timed("content digest (SHA-256; first call only)", lambda: cache.data_identity(data))
    cache.store(cache.key(data, tok, "auto"), "text", {"lengths": lengths})  # what the first call leaves
    warm = timed("second call: the whole profile from the cache", lambda: data_profile(
        str(data), tokenizer=None, model_source={}, fmt="auto", max_length=2048, batching="padding",
        packing_strategy="bfd", batch_size=8, tokenizer_obj=tok))
    assert warm["samples"] == n
    from qplan.planner.data import axolotl

    alpaca = [{"instruction": " ".join(r["text"].split()[:8]), "input": "", "output": " ".join(r["text"].split()[8:])}
              for r in rows]
    timed("axolotl:alpaca format + tokenize (prompt and response apart)",
          lambda: axolotl.columns(Formatter(tok), alpaca, "axolotl:alpaca", "bench"))
    lines = [
        "# `--data` speed", "",
        f"Command: `python bench/data_speed.py --samples {a.samples}` — {n:,} samples, {sum(lengths):,} tokens, "
        f"{size / 2**20:,.0f} MiB of JSONL; byte-level tokenizer; {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), Python {platform.python_version()}.", "",
        "| stage | seconds | samples/s |", "|---|---:|---:|",
        *[f"| {k} | {v:.2f} | {n / v:,.0f} |" for k, v in times.items()],
        "", "The first call runs read, format + tokenize, the content digest and one batching (the group-by-length "
        "and packing rows only with those batchings); a second call of the same data, tokenizer and format finds "
        "the file's digest remembered against its stat, reads the counts from the cache (`planner/data/cache.py`) "
        "and runs one batching. axolotl's Alpaca type tokenizes prompt and response apart (two texts per "
        "record, the prompt with axolotl's template), so it takes longer per sample than the text format.", "",
    ]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
