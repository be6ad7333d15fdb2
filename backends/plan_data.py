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

Packed plans are not trained here yet (one line says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError

#: batch shapes kept in measured.json (the first ones: largest-first puts the worst there)
KEEP_SHAPES = 64
SAMPLING = {"padding": "random", "sequential": "sequential", "group_by_length": "group_by_length"}


class PlanData:
    """The kept samples of a ``--data`` plan, a list-like dataset of ``{input_ids, labels}``."""

    def __init__(self, samples: list[dict[str, list[int]]], pad_id: int, batching: str, largest_first: bool,
                 source: str, first_measured: int = 0, multiple: int | None = None) -> None:
        self.samples, self.batching, self.largest_first, self.source = samples, batching, largest_first, source
        self.first_measured = first_measured  # the micro-batch index of the first measured step
        self.collate = PadCollator(pad_id, multiple)
        self.notes: list[str] = []
        self.tokens_in_file = sum(len(s["input_ids"]) for s in samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.samples[i]

    @property
    def sampling_strategy(self) -> str:
        return SAMPLING[self.batching]

    def wrap_sampler(self, sampler: Any, batch_size: int) -> Any:
        if not self.largest_first:
            return sampler
        return LargestFirst(sampler, [len(s["input_ids"]) for s in self.samples], batch_size, self.first_measured)


class LargestFirst:
    """A sampler's order with the longest sample swapped into the first place of batch ``to`` (every epoch): that
    batch is padded to the longest; every other sample keeps its place but the one it swapped with (as
    transformers' ``get_length_grouped_indices`` moves its longest sample to the front)."""

    def __init__(self, base: Any, lengths: list[int], batch_size: int, to: int = 0) -> None:
        self.base, self.lengths, self.batch_size, self.to = base, lengths, batch_size, to

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        order = list(iter(self.base))
        if order:
            full_batches = max(1, len(order) // self.batch_size)  # a full batch (a last partial one may be dropped)
            dest = min(self.to, full_batches - 1) * self.batch_size
            at = max(range(len(order)), key=lambda p: self.lengths[order[p]])
            order[dest], order[at] = order[at], order[dest]
        return iter(order)


class PadCollator:
    """Pad a batch to its longest sample (rounded up to a multiple of ``multiple``, as ``pad_to_multiple_of``);
    record its shape."""

    def __init__(self, pad_id: int, multiple: int | None = None) -> None:
        self.pad_id, self.multiple = pad_id, multiple or 1
        self.shapes: list[list[int]] = []

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        n = -(-max(len(f["input_ids"]) for f in features) // self.multiple) * self.multiple
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


def load_plan_data(plan: dict[str, Any], tokenizer: Any, path: str | None, model_vocab: int,
                   largest_first: bool, first_measured: int = 0) -> PlanData:
    """The plan's dataset (``path``, else the file the plan was made from), prepared as the plan counted it."""
    from qplan.planner.data import select
    from qplan.planner.data.formats import Formatter
    from qplan.planner.data.sources import read_records

    d = plan["prediction"]["data"]  # the runner refused packed and axolotl-formatted plans before starting this worker
    source = path or d.get("path") or d["source"]
    if not Path(source).exists():
        raise QPlanError(f"the plan's data {source} is not there: pass --data with the same file")
    rows = read_records(source)
    ids, prompt = Formatter(tokenizer).sequences(rows, d["format"], str(source))
    kept_rows, kept, _, _ = select([len(x) for x in ids], prompt, d["max_length"], False, "bfd")
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
    data = PlanData(samples, int(pad), d["batching"], largest_first, str(source), first_measured,
                    d.get("pad_to_multiple_of"))
    from qplan.planner.data.cache import tokenizer_identity

    if d.get("tokenizer_sha256") and tokenizer_identity(tokenizer) != d["tokenizer_sha256"]:
        data.notes.append(f"the run's tokenizer is not the one the plan counted with ({d['tokenizer']}): its batches "
                          "may be longer or shorter than planned (see batch_shapes)")
    longest = -(-max(kept) // (d.get("pad_to_multiple_of") or 1)) * (d.get("pad_to_multiple_of") or 1)
    if len(samples) != d["samples"] - d["dropped"] or longest != d["worst_batch"]["seq_len"]:
        data.notes.append(f"the run has {len(samples)} samples, the longest padded to {longest} tokens; the plan "
                          f"counted {d['samples'] - d['dropped']}, the longest padded to {d['worst_batch']['seq_len']}")
    return data
