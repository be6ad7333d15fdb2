"""Training on a ``--data`` plan's own dataset, batched as the plan says (``prediction.data``).

The samples are what the planner counted (``planner.data``: the same reader, formatter, truncation and dropping),
with labels as TRL builds them (``-100`` on a prompt-completion sample's prompt). Batches are padded to their
longest sample (``PadCollator``: pad id in ``input_ids``, ``-100`` in ``labels``, zeros in ``attention_mask``),
in the order the plan's batching gives: the Trainer's own samplers (``train_sampling_strategy`` ``random``,
``sequential`` or ``group_by_length``). ``largest_first`` moves the batch holding the longest sample to the first
measured step of every epoch (the micro-batch after the warm-up steps, which exist to leave out one-time
allocations: the measured peak is the worst batch's), the rest of the order unchanged, so an out-of-memory comes
within the first steps. The collator records
the shape of every batch it makes (``shapes``), in order, so a run shows which step was the longest.

Packed plans train packs, as TRL's ``pack_dataset`` and collator make them: ``bfd`` — the planner's packs
(``planner.data.batching.bfd_packs``), and TRL's padding-free collator (``FlatCollator``): the micro-batch's packs
concatenated into one row, ``position_ids`` restarting at each document, no ``attention_mask``, the first label of
each document ``-100``; ``largest_first`` puts the fullest packs together in the first measured step. ``wrapped``
— every kept token concatenated and cut every ``max_length``, batched as rows padded to the longest (only the last
row is shorter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qplan.planner.data.batching import round_up
from qplan.planner.errors import QPlanError

#: batch shapes kept in measured.json (the first ones: largest-first puts the worst there)
KEEP_SHAPES = 64
SAMPLING = {"padding": "random", "sequential": "sequential", "group_by_length": "group_by_length",
            "packing": "random", "buckets": "sequential"}  # TRL shuffles the packs; buckets: BucketOrder


class PlanData:
    """The kept samples of a ``--data`` plan, a list-like dataset of ``{input_ids, labels}``."""

    def __init__(self, samples: list[dict[str, list[int]]], pad_id: int, batching: str, largest_first: bool,
                 source: str, first_measured: int = 0, multiple: int | None = None, flat: bool = False) -> None:
        self.samples, self.batching, self.largest_first, self.source = samples, batching, largest_first, source
        self.first_measured = first_measured  # the micro-batch index of the first measured step
        self.flat = flat  # padding-free packs: the worst batch is the fullest packs together, not one long sample
        self.collate: Any = FlatCollator(pad_id, multiple) if flat else PadCollator(pad_id, multiple)
        self.notes: list[str] = []
        self.tokens_in_file = sum(len(s["input_ids"]) for s in samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.samples[i]

    @property
    def sampling_strategy(self) -> str:
        return SAMPLING[self.batching]

    def batch_order(self, batch_size: int) -> list[list[int]] | None:
        """PEFT's harness (``--batching buckets``): its batches, in its order (the remainder bucket twice), the batch
        holding the longest sample moved to the first measured step with ``largest_first``; None otherwise (the
        Trainer's sampler makes the batches)."""
        if self.batching != "buckets":
            return None
        from qplan.planner.data.batching import bucket_batches

        lengths = [len(s["input_ids"]) for s in self.samples]
        batches = bucket_batches(lengths, batch_size)
        if self.largest_first:
            worst = max(range(len(batches)), key=lambda k: max(lengths[j] for j in batches[k]))
            dest = min(self.first_measured, len(batches) - 1)
            batches[dest], batches[worst] = batches[worst], batches[dest]
        return batches

    def wrap_sampler(self, sampler: Any, batch_size: int) -> Any:
        if not self.largest_first:
            return sampler
        return LargestFirst(sampler, [len(s["input_ids"]) for s in self.samples], batch_size, self.first_measured,
                            fill=self.flat)


class LargestFirst:
    """A sampler's order with the longest sample swapped into the first place of batch ``to`` (every epoch): that
    batch is padded to the longest; every other sample keeps its place but the one it swapped with (as
    transformers' ``get_length_grouped_indices`` moves its longest sample to the front). ``fill``: the batch's
    every place gets one of the longest (padding-free packs: the worst batch is the fullest packs together)."""

    def __init__(self, base: Any, lengths: list[int], batch_size: int, to: int = 0, fill: bool = False) -> None:
        self.base, self.lengths, self.batch_size, self.to, self.fill = base, lengths, batch_size, to, fill

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        order = list(iter(self.base))
        if order:
            full_batches = max(1, len(order) // self.batch_size)  # a full batch (a last partial one may be dropped)
            dest = min(self.to, full_batches - 1) * self.batch_size
            if not self.fill:
                at = max(range(len(order)), key=lambda p: self.lengths[order[p]])
                order[dest], order[at] = order[at], order[dest]
                return iter(order)
            slots = range(dest, min(dest + self.batch_size, len(order)))
            top = set(sorted(range(len(order)), key=lambda p: -self.lengths[order[p]])[:len(slots)])
            outside = [p for p in top if p not in slots]
            for slot in slots:  # each slot not holding one of the longest takes one from outside the batch
                if slot not in top:
                    at = outside.pop()
                    order[slot], order[at] = order[at], order[slot]
        return iter(order)


class PadCollator:
    """Pad a batch to its longest sample (rounded up to a multiple of ``multiple``, as ``pad_to_multiple_of``);
    record its shape."""

    def __init__(self, pad_id: int, multiple: int | None = None) -> None:
        self.pad_id, self.multiple = pad_id, multiple or 1
        self.shapes: list[list[int]] = []

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        n = round_up(max(len(f["input_ids"]) for f in features), self.multiple)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), -100, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for r, f in enumerate(features):
            k = len(f["input_ids"])
            ids[r, :k] = torch.tensor(f["input_ids"])
            labels[r, :k] = torch.tensor(f["labels"])
            mask[r, :k] = 1
        self.shapes.append([len(features), n])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class FlatCollator:
    """TRL's padding-free collator (``DataCollatorForLanguageModeling(padding_free=True)``): the packs of a batch
    concatenated into one row; ``position_ids`` restart at each document; no ``attention_mask``; the first label
    of each document is ``-100``. Records each batch's shape."""

    def __init__(self, pad_id: int, multiple: int | None = None) -> None:
        self.pad_id, self.multiple = pad_id, multiple or 1
        self.shapes: list[list[int]] = []

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        ids = [t for f in features for t in f["input_ids"]]
        labels = [t for f in features for t in f["labels"]]
        pos = [p for f in features for n in f["seq_lengths"] for p in range(n)]
        extra = round_up(len(ids), self.multiple) - len(ids)  # the row padded (pad ids, labels -100, positions 0)
        ids, labels, pos = ids + [self.pad_id] * extra, labels + [-100] * extra, pos + [0] * extra
        out = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos])}
        out["labels"][out["position_ids"] == 0] = -100
        self.shapes.append([1, len(ids)])
        return out


def _packs(samples: list[dict[str, list[int]]], strategy: str, max_length: int) -> list[dict[str, list[int]]]:
    """The packs TRL's ``pack_dataset`` makes of the samples (see the module docstring)."""
    from qplan.planner.data.batching import bfd_packs

    if strategy == "bfd":
        out = []
        for members in bfd_packs([len(s["input_ids"]) for s in samples], max_length):
            cut = [{k: v[:max_length] for k, v in samples[i].items()} for i in members]
            out.append({"input_ids": [t for c in cut for t in c["input_ids"]],
                        "labels": [t for c in cut for t in c["labels"]], "seq_lengths": [len(c["input_ids"]) for c in cut]})
        return out
    ids = [t for s in samples for t in s["input_ids"]]
    labels = [t for s in samples for t in s["labels"]]
    return [{"input_ids": ids[i:i + max_length], "labels": labels[i:i + max_length]}
            for i in range(0, len(ids), max_length)]


def load_plan_data(plan: dict[str, Any], tokenizer: Any, path: str | None, model_vocab: int,
                   largest_first: bool, first_measured: int = 0) -> PlanData:
    """The plan's dataset (``path``, else the file the plan was made from), prepared as the plan counted it."""
    from qplan.planner.data import select
    from qplan.planner.data.formats import Formatter
    from qplan.planner.data.sources import read_records

    d = plan["prediction"]["data"]  # the runner refused axolotl-formatted plans before starting this worker
    source = path or d.get("path") or d["source"]
    if not Path(source).exists():
        raise QPlanError(f"the plan's data {source} is not there: pass --data with the same file")
    rows = read_records(source)
    ids, prompt = Formatter(tokenizer).sequences(rows, d["format"], str(source))
    packing = d["batching"] == "packing"
    kept_rows, kept, _, _ = select([len(x) for x in ids], prompt, d["max_length"], packing,
                                   d.get("packing_strategy", "bfd"))
    if not kept_rows:
        raise QPlanError(f"{source}: every sample is dropped by --max-seq-len {d['max_length']}")
    worst = max((max(x) for x in ids if x), default=0)
    if worst >= model_vocab:
        raise QPlanError(f"the tokenizer produces id {worst} but the model has {model_vocab} embeddings: "
                         "the tokenizer does not match the model")
    samples = []
    for i, n in zip(kept_rows, kept, strict=True):
        x = list(ids[i][:n])
        y = list(x)
        if prompt is not None:  # TRL trains a prompt-completion sample on its completion
            y[:min(prompt[i], n)] = [-100] * min(prompt[i], n)
        samples.append({"input_ids": x, "labels": y})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise QPlanError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    flat = packing and d.get("packing_strategy") == "bfd"
    if packing:
        samples = _packs(samples, d["packing_strategy"], d["max_length"])
    data = PlanData(samples, int(pad), d["batching"], largest_first, str(source), first_measured,
                    d.get("pad_to_multiple_of"), flat=flat)
    from qplan.planner.data.cache import tokenizer_identity

    if d.get("tokenizer_sha256") and tokenizer_identity(tokenizer) != d["tokenizer_sha256"]:
        data.notes.append(f"the run's tokenizer is not the one the plan counted with ({d['tokenizer']}): its batches "
                          "may be longer or shorter than planned (see batch_shapes)")
    if packing:
        if len(samples) != d["packs"] or sum(len(p["input_ids"]) for p in samples) != d["tokens_per_epoch"]:
            data.notes.append(f"the run has {len(samples)} packs of {sum(len(p['input_ids']) for p in samples):,} "
                              f"tokens; the plan counted {d['packs']} of {d['tokens_per_epoch']:,}")
        return data
    longest = round_up(max(kept), d.get("pad_to_multiple_of"))
    if len(samples) != d["samples"] - d["dropped"] or longest != d["worst_batch"]["seq_len"]:
        data.notes.append(f"the run has {len(samples)} samples, the longest padded to {longest} tokens; the plan "
                          f"counted {d['samples'] - d['dropped']}, the longest padded to {d['worst_batch']['seq_len']}")
    return data
