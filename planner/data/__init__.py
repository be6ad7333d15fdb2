"""Planning from the user's own data (``--data``): the longest batch sets the planned shape, the real tokens the time.

``data_profile`` reads the records (``sources``), counts each one's tokens as the trainer formats it with the
model's own tokenizer (``formats``; the counts are cached, ``cache``), truncates as TRL does, and batches as the
trainer batches (``batching``).
It returns ``prediction.data``: the statistics, the worst batch (its padded length becomes ``training.seq_len``)
and the tokens of one epoch (which, times ``--epochs``, set the time and cost).

This path imports transformers (for the tokenizer and its chat template); a plan without ``--data`` does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qplan.planner.data.batching import (
    bucket_batches,
    histogram,
    pack_bfd,
    pack_wrapped,
    padded,
    padded_tokens_buckets,
    padded_tokens_grouped,
    padded_tokens_sequential,
    padded_tokens_shuffled,
    percentile,
    round_up,
)
from qplan.planner.data.formats import Formatter
from qplan.planner.data.sources import read_resolved, resolve_source
from qplan.planner.errors import QPlanError


def load_tokenizer(tokenizer: str | None, source: dict[str, Any]) -> tuple[Any, str]:
    """The tokenizer (and where it came from): ``tokenizer`` (a folder, or a Hub id in the HF cache), else the model's
    own folder (a model planned from a folder or its config.json), else its Hub id from the HF cache (offline)."""
    candidates: list[str] = []
    if tokenizer:
        candidates.append(tokenizer)
    else:
        from qplan.planner.files import NAMES_ONLY

        path = None if NAMES_ONLY.get() else source.get("path")  # qplan serve: the model's Hub id only
        if path:
            p = Path(path)
            candidates.append(str(p if p.is_dir() else p.parent))
        if source.get("hub_id"):
            candidates.append(str(source["hub_id"]))
    if not candidates:
        raise QPlanError("--data needs the model's tokenizer: give --tokenizer DIR (a folder with tokenizer.json), or "
                         "plan a model by its folder or by a Hub id whose tokenizer is in the HF cache")
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:  # pragma: no cover - transformers comes with the data and train extras
        raise QPlanError("--data needs transformers for the model's tokenizer: pip install 'qplan[data]'") from exc
    hf_logging.set_verbosity_error()
    why = ""
    for c in candidates:
        local = Path(c).is_dir()
        try:
            return AutoTokenizer.from_pretrained(c, local_files_only=True), c
        except Exception as exc:  # noqa: BLE001 - transformers raises OSError/ValueError/... for no tokenizer
            why = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
            if local and tokenizer:
                break
    raise QPlanError(f"no tokenizer found in {', '.join(candidates)} ({why}); give --tokenizer DIR (a folder with "
                     "tokenizer.json)")


#: the options that describe --data, at their defaults (one given without --data is an error)
DATA_DEFAULTS = {"tokenizer": None, "data_format": "auto", "max_seq_len": None, "batching": "padding",
                 "packing_strategy": "bfd", "pad_to_multiple_of": None, "long_samples": "auto", "largest_first": False}


def check_data_options(values: dict[str, Any], seq_len: int | None) -> bool:
    """Whether ``--data`` is given; one line for an option that describes data without it, or a ``--seq-len`` beside
    it (``estimate`` and ``fit`` alike)."""
    if values.get("data") is None:
        given = next((k for k, v in DATA_DEFAULTS.items() if k in values and values[k] != v), None)
        if given:
            raise QPlanError(f"--{given.replace('_', '-')} describes --data: give --data FILE too")
        return False
    if seq_len is not None:
        raise QPlanError("--seq-len is set by --data (the worst batch's padded length): leave it out, or cap the "
                         "samples with --max-seq-len")
    return True


def select(full: list[int], prompt: list[int] | None, max_length: int | None, packing: bool,
           packing_strategy: str) -> tuple[list[int], list[int], int, int]:
    """The samples the trainer keeps and their lengths, as TRL's preparation: without packing each is cut to
    ``max_length`` (``keep_start``), and a prompt-completion sample whose prompt alone fills it is dropped (no
    completion token left to learn from); packing cuts in the packer instead. Returns (kept row indices, kept
    lengths, truncated count, dropped count)."""
    rows, kept, truncated, dropped = [], [], 0, 0
    for i, n in enumerate(full):
        if max_length is not None and n > max_length and not (packing and packing_strategy == "wrapped"):
            truncated += 1
            if not packing:
                if prompt is not None and prompt[i] >= max_length:
                    dropped += 1
                    continue
                n = max_length
        rows.append(i)
        kept.append(n)
    return rows, kept, truncated, dropped


def kto_batches(rows: list[int], kept: list[int], full: list[int], prompt: list[int], batch_size: int,
                max_length: int | None) -> list[tuple[int, int]]:
    """KTO's batches in file order (``KTOConfig.train_sampling_strategy``: sequential), each ``(width of its rows,
    width of its KL rows)`` as ``DataCollatorForUnpairedPreference`` pads them: the KL row of each kept row is its
    prompt followed by the previous row's completion within the batch (``KTOTrainer._prepare_dataset``'s
    ``add_kl_completion_ids``, batched by ``batch_size`` after the filter: the first row takes the last one's), cut at
    ``max_length``."""
    out = []
    for i in range(0, len(rows), batch_size):
        idx = rows[i:i + batch_size]
        completion = [full[j] - prompt[j] for j in idx]
        kl = [prompt[j] + completion[k - 1] for k, j in enumerate(idx)]
        cap = (lambda n: min(n, max_length)) if max_length is not None else (lambda n: n)
        out.append((max(kept[i:i + batch_size]), max(cap(n) for n in kl)))
    return out


def _stats(lengths: list[int]) -> dict[str, Any]:
    s = sorted(lengths)
    return {"min": s[0], "p50": percentile(s, 50), "p90": percentile(s, 90), "p99": percentile(s, 99), "max": s[-1],
            "mean": sum(s) / len(s)}


def _counts(resolved: Path, source: str, tok: Any, fmt: str) -> tuple[str, dict[str, list[int]]]:
    """(format found, per-record token columns), from the cache or by tokenizing (then cached)."""
    from qplan.planner.data import axolotl, cache
    from qplan.planner.data.formats import detect

    k = cache.key(resolved, tok, fmt)
    hit = cache.load(k)
    if hit is not None:  # the same data, tokenizer and format: counted before
        return hit["format"], hit["columns"]
    rows = read_resolved(resolved, source)
    if fmt in axolotl.FORMATS:
        found, cols = fmt, axolotl.columns(Formatter(tok), rows, fmt, str(source))
    else:
        try:
            found = detect(rows[0]) if fmt == "auto" else fmt
        except QPlanError as exc:
            raise QPlanError(f"{source} row 1: {exc}") from None
        full, prompt = Formatter(tok).lengths(rows, found, str(source))
        cols = {"lengths": full} | ({"prompt": prompt} if prompt is not None else {})
    cache.store(k, found, cols)
    return found, cols


def data_profile(source: str, *, tokenizer: str | None, model_source: dict[str, Any], fmt: str,
                 max_length: int | None, batching: str, packing_strategy: str, batch_size: int,
                 grad_accum: int = 1, tokenizer_obj: Any = None, pad_to_multiple_of: int | None = None,
                 long_samples: str = "auto") -> dict[str, Any]:
    """``prediction.data`` of ``source`` (see the module docstring). ``tokenizer_obj``: an already loaded tokenizer.
    ``pad_to_multiple_of``: the collator rounds each batch's padded length up to a multiple of it (TRL's
    ``pad_to_multiple_of``); None: the trainer's own (TRL none, axolotl 64); 1: none. ``long_samples``: what
    happens to a sample over ``max_length`` — ``auto`` is the trainer's (TRL truncates; axolotl drops), else
    ``truncate``, ``drop`` or ``raise``."""
    from qplan.planner.data import axolotl, cache

    resolved = resolve_source(source)  # a path, or a Hub dataset id's snapshot in the HF cache (before the tokenizer)
    if tokenizer_obj is None:
        tok, tok_from = load_tokenizer(tokenizer, model_source)
    else:
        tok, tok_from = tokenizer_obj, tokenizer or "(given)"
    packing = batching == "packing"
    if (packing or fmt in axolotl.FORMATS) and max_length is None:
        raise QPlanError("--packing needs --max-seq-len (the length of a pack, TRL's max_length)" if packing else
                         f"--data-format {fmt} needs --max-seq-len (axolotl's sequence_len)")
    found, cols = _counts(resolved, source, tok, fmt)
    if found in axolotl.FORMATS:
        assert max_length is not None
        of_row, full, trainable = axolotl.samples(cols, found, max_length)
        if not full:
            raise QPlanError(f"{source}: no sample (every record's text is empty)")
        long_rule = "drop" if long_samples == "auto" else long_samples
        kept_rows, kept, truncated, dropped = axolotl.select(of_row, full, trainable, max_length, long_rule, packing,
                                                             str(source))
        records = len(next(iter(cols.values())))
    else:
        if long_samples not in ("auto", "truncate"):
            raise QPlanError(f"--long-samples {long_samples} is axolotl's (with --data-format axolotl:TYPE); TRL's "
                             "SFTTrainer truncates")
        full, prompt = cols["lengths"], cols.get("prompt")
        of_row = list(range(len(full)))
        kept_rows, kept, truncated, dropped = select(full, prompt, max_length, packing, packing_strategy)
        records, long_rule = len(full), "truncate"
    if not kept:
        raise QPlanError(f"{source}: every sample is dropped (over or under the lengths kept, or nothing to train on; "
                         f"--max-seq-len {max_length})")
    longest = max(range(len(full)), key=lambda i: full[i])  # the longest sample, kept or not
    # the collator's multiple: given, else the trainer's own (TRL: none; axolotl: 64, core/builders/causal.py)
    m = pad_to_multiple_of if pad_to_multiple_of is not None else (axolotl.PAD_MULTIPLE if found in axolotl.FORMATS
                                                                    else None)
    out: dict[str, Any] = {
        "source": str(source), "path": str(resolved.resolve()), "format": found, "tokenizer": tok_from,
        "tokenizer_sha256": cache.tokenizer_identity(tok),
        "max_length": max_length, "long_samples": long_rule, "pad_to_multiple_of": m,
        "batching": batching, "records": records, "samples": len(full), "dropped": dropped, "truncated": truncated,
        "longest_sample": {"index": of_row[longest], "row": of_row[longest] + 1, "tokens": full[longest]},
        "tokens": _stats(full), "total_tokens": sum(full), "trained_tokens": sum(kept),
        "histogram": histogram(full),
    }
    if packing:
        packs = pack_bfd(kept, max_length) if packing_strategy == "bfd" else pack_wrapped(kept, max_length)
        out["trained_tokens"] = sum(packs)  # bfd cuts each sample to max_length; wrapped keeps every token
        rows = min(batch_size, len(packs))
        batches = -(-len(packs) // batch_size)
        if found in axolotl.FORMATS:  # axolotl's multipack: rows of packs, each batch padded to its longest pack
            seq_len = round_up(max(packs), m)  # (rounded up to the collator's multiple; pad_to_sequence_len: sequence_len)
            padded_total = padded_tokens_shuffled([round_up(p, m) for p in packs], batch_size)
            worst = {"seq_len": seq_len, "batch_size": batch_size, "tokens": rows * seq_len,
                     "padded": min(packs) < seq_len,
                     "note": "a batch of the fullest packs, each row padded to the longest"
                             + (f" rounded up to a multiple of {m}" if m else "")}
        elif packing_strategy == "bfd":  # TRL's padding-free collator: the batch's packs in one row
            seq_len = max_length
            flat = round_up(sum(sorted(packs, reverse=True)[:rows]), m)
            # the row of each batch rounded up (TRL pads the flattened row): counted over the packs in packing order,
            # an estimate of the shuffled epoch's (exact without a multiple)
            padded_total = sum(round_up(sum(packs[i:i + batch_size]), m) for i in range(0, len(packs), batch_size))
            worst = {"seq_len": seq_len, "batch_size": batch_size, "tokens": flat, "flat_tokens": flat,
                     "note": f"padding-free (TRL's bfd): the {rows} fullest packs flattened into one row of {flat:,} "
                             "tokens, documents told apart by position ids"
                             + (f" (rounded up to a multiple of {m})" if m else "")}
        else:  # wrapped: rows of max_length; the last, shorter row pads the batch it falls in
            seq_len = round_up(max_length, m)
            short = (packs[-1] < max_length and rows > 1) or seq_len != max_length
            padded_total = len(packs) * seq_len if short else sum(packs)
            worst = {"seq_len": seq_len, "batch_size": batch_size, "tokens": rows * seq_len, "padded": short,
                     "note": "a batch of full rows" + (" (one of them the last, shorter row: padded)" if short else "")}
        out.update(packing_strategy=packing_strategy, packs=len(packs), batches_per_epoch=batches,
                   tokens_per_epoch=sum(packs), padded_tokens_per_epoch=round(padded_total),
                   efficiency=sum(packs) / padded_total)
    elif found == "unpaired":  # KTO: file order, each batch's rows and KL rows padded to their longest
        assert prompt is not None
        widths = kto_batches(kept_rows, kept, full, prompt, batch_size, max_length)
        sizes = [min(batch_size, len(kept) - i) for i in range(0, len(kept), batch_size)]
        worst_main, worst_kl = max(round_up(w, m) for w, _ in widths), max(round_up(k, m) for _, k in widths)
        seq_len = max(worst_main, worst_kl)
        padded_total = sum(n * round_up(w, m) for n, (w, _) in zip(sizes, widths, strict=True))
        out.update(batches_per_epoch=len(widths), tokens_per_epoch=sum(kept), padded_tokens_per_epoch=padded_total,
                   efficiency=sum(kept) / padded_total, kl_seq_len=worst_kl, batching="sequential")
        worst = {"seq_len": seq_len, "batch_size": batch_size, "tokens": batch_size * seq_len, "padded": True,
                 "note": f"KTO's batches in file order: the widest of its rows ({worst_main:,}) and of its KL rows "
                         f"(each prompt with the previous row's completion: {worst_kl:,}), planned as one width"}
    else:
        seq_len = round_up(max(kept), m)
        rounded = [round_up(n, m) for n in kept]
        batches, tokens = -(-len(kept) // batch_size), sum(kept)
        if batching == "padding":
            padded_total = padded_tokens_shuffled(rounded, batch_size)
        elif batching == "sequential":
            padded_total = padded_tokens_sequential(rounded, batch_size)
        elif batching == "buckets":
            order = bucket_batches(kept, batch_size)
            padded_total = padded_tokens_buckets(kept, batch_size, rounded)
            batches, tokens = len(order), sum(kept[j] for b in order for j in b)  # the remainder bucket comes twice
        else:  # grouped by the real lengths, padded to the rounded longest of each micro-batch
            padded_total = padded_tokens_grouped(kept, batch_size, grad_accum=grad_accum, padded_lengths=rounded)
        out.update(batches_per_epoch=batches, tokens_per_epoch=tokens, padded_tokens_per_epoch=round(padded_total),
                   efficiency=tokens / padded_total)
        worst = {"seq_len": seq_len, "batch_size": batch_size, "tokens": batch_size * seq_len,
                 "padded": padded(batching, batch_size, m),
                 "note": "the batch holding the longest kept sample, padded to it"
                 + (f" (rounded up to a multiple of {m})" if m and seq_len != max(kept) else "")}
    out["worst_batch"] = worst
    return out
