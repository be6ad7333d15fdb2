"""How a trainer turns token lengths into batches: the worst batch (the planned shape) and the tokens of an epoch.

Pure functions of a list of per-sample token counts (after formatting and truncation). Each models what the
trainer does, with its source:

* ``padding`` — transformers' ``Trainer`` with a ``RandomSampler`` (shuffled every epoch) and a collator padding
  to the longest sample of the batch (``DataCollatorWithPadding``, TRL's ``DataCollatorForLanguageModeling``).
  Whatever the order, the batch holding the longest sample is padded to it: the worst batch is
  ``batch_size × max(lengths)``. The padded tokens of an epoch are a random quantity; their *expectation* is
  exact: in a random permutation cut into batches, each batch is (marginally) a uniformly random subset of its
  size, so by linearity E[padded] = Σ_batches size × E[max of a random subset of that size], and for sorted
  lengths l(1) ≤ … ≤ l(n), P(max of a k-subset = l(i)) = C(i−1, k−1) / C(n, k).
* ``sequential`` — the same without shuffling (``SequentialSampler``): exact, batch by batch in file order.
* ``group_by_length`` — transformers' ``LengthGroupedSampler`` (``trainer_pt_utils.get_length_grouped_indices``,
  built by the Trainer with ``B`` = micro-batch × gradient accumulation):
  a random permutation cut into mega-batches of ``min(n // (4 B), 50) × B`` samples (at least ``B``), each
  sorted longest first, the mega-batch holding the longest sample moved to the front. Its padded tokens are
  estimated as the mean over ``GROUPED_SHUFFLES`` seeded shuffles (not an exact expectation).
* ``buckets`` — PEFT's benchmark harness (``method_comparison/MetaMathQA``, ``utils.BucketIterator`` with
  ``BUCKET_FACTOR`` 20): the data in file order cut into buckets of ``batch × 20`` samples, each sorted longest
  first and cut into batches (a bucket's last batch may be short); when the data is not a whole number of
  buckets, the last bucket is yielded a second time (its loop already covers the remainder, then a second
  statement yields it again). Exact, no shuffling.
* ``packing`` — TRL's ``pack_dataset``: ``bfd`` (best-fit decreasing: sequences cut to ``max_len``, then each
  placed, longest first, in the open pack with the least room that holds it, else a new pack) and ``wrapped``
  (all tokens concatenated and cut every ``max_len``). With ``bfd`` TRL's collator is padding-free: a batch's
  ``B`` packs are one row of at most ``B × max_len`` tokens; ``wrapped`` rows are batched (and padded) as rows.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from collections.abc import Sequence

BATCHINGS = ("padding", "sequential", "group_by_length", "buckets", "packing")
#: PEFT's benchmark harness (method_comparison/MetaMathQA/run.py ``BUCKET_FACTOR``): batches per length bucket
BUCKET_FACTOR = 20
PACKING_STRATEGIES = ("bfd", "wrapped")
#: shuffles averaged for the padded tokens of group_by_length
GROUPED_SHUFFLES = 8


def round_up(n: int, multiple: int | None) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (a collator's ``pad_to_multiple_of``; None or 1: ``n``)."""
    return n if not multiple else -(-n // multiple) * multiple


def padded(batching: str, batch_size: int, multiple: int | None = None) -> bool:
    """Whether a batch of samples has pads: several padded to the longest, or one rounded up to the collator's
    ``pad_to_multiple_of`` (one sample alone is not padded), so attention gets a 4-D mask
    (``memory.masks.padding_mask_activation``). Packs: ``planner.data.data_profile`` says per packing."""
    return batching != "packing" and (batch_size > 1 or (multiple or 1) > 1)


def expected_max_of_subset(sorted_lengths: Sequence[int], k: int) -> float:
    """E[max of a uniformly random ``k``-subset] of ``sorted_lengths`` (ascending): Σ l(i) C(i−1,k−1)/C(n,k)."""
    n = len(sorted_lengths)
    if not 1 <= k <= n:
        raise ValueError(f"subset size {k} of {n}")
    log_total = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    out = 0.0
    for i in range(k, n + 1):  # i = rank of the maximum (1-based)
        log_ways = math.lgamma(i) - math.lgamma(k) - math.lgamma(i - k + 1)
        out += sorted_lengths[i - 1] * math.exp(log_ways - log_total)
    return out


def padded_tokens_shuffled(lengths: Sequence[int], batch_size: int, drop_last: bool = False) -> float:
    """Expected padded tokens of one shuffled epoch (``RandomSampler``, pad to the longest of each batch)."""
    s = sorted(lengths)
    n = len(s)
    full, rest = divmod(n, batch_size)
    total = full * batch_size * expected_max_of_subset(s, batch_size) if full else 0.0
    if rest and not drop_last:
        total += rest * expected_max_of_subset(s, rest)
    return total


def padded_tokens_sequential(lengths: Sequence[int], batch_size: int, drop_last: bool = False) -> int:
    """Padded tokens of one epoch in file order (exact)."""
    total = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i:i + batch_size]
        if len(chunk) < batch_size and drop_last:
            break
        total += len(chunk) * max(chunk)
    return total


def bucket_batches(lengths: Sequence[int], batch_size: int, factor: int = BUCKET_FACTOR) -> list[list[int]]:
    """The batches (sample indices) of PEFT's harness, in order (see the module docstring)."""
    n, size = len(lengths), batch_size * factor
    buckets = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    if n % size:
        buckets.append(list(range(n - n % size, n)))  # the remainder, a second time (as the harness yields it)
    out = []
    for b in buckets:
        order = sorted(b, key=lambda j: -lengths[j])  # longest first; ties keep file order
        out.extend(order[k:k + batch_size] for k in range(0, len(order), batch_size))
    return out


def padded_tokens_buckets(lengths: Sequence[int], batch_size: int, padded_lengths: Sequence[int] | None = None) -> int:
    """Padded tokens of one pass of PEFT's harness (exact)."""
    pad = lengths if padded_lengths is None else padded_lengths
    return sum(len(b) * max(pad[j] for j in b) for b in bucket_batches(lengths, batch_size))


def length_grouped_order(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[int]:
    """A sample order as ``LengthGroupedSampler`` makes it (its mega-batch rule; Python's RNG, not torch's).
    ``batch_size``: the sampler's, which the Trainer gives as micro-batch × gradient accumulation."""
    n = len(lengths)
    mult = min(n // (batch_size * 4), 50) or 1
    mega = mult * batch_size
    perm = list(range(n))
    rng.shuffle(perm)
    groups = [sorted(perm[i:i + mega], key=lambda j: lengths[j], reverse=True) for i in range(0, n, mega)]
    first = max(range(len(groups)), key=lambda g: lengths[groups[g][0]])
    groups[0][0], groups[first][0] = groups[first][0], groups[0][0]  # the longest sample opens the epoch
    return [j for g in groups for j in g]


def padded_tokens_grouped(lengths: Sequence[int], batch_size: int, drop_last: bool = False, seed: int = 42,
                          grad_accum: int = 1, padded_lengths: Sequence[int] | None = None) -> float:
    """Mean padded tokens of one epoch over ``GROUPED_SHUFFLES`` length-grouped orders (grouped by
    ``batch_size × grad_accum``, as the Trainer builds the sampler; padded per micro-batch of ``batch_size``).
    ``padded_lengths``: what each sample counts once padded (the lengths rounded up to the collator's multiple;
    the order is made from ``lengths``, as the sampler sees them)."""
    rng = random.Random(seed)
    pad = lengths if padded_lengths is None else padded_lengths
    tot = 0
    for _ in range(GROUPED_SHUFFLES):
        order = length_grouped_order(lengths, batch_size * grad_accum, rng)
        tot += padded_tokens_sequential([pad[j] for j in order], batch_size, drop_last)
    return tot / GROUPED_SHUFFLES


class _FreeSpace:
    """Counts of open packs by free space 1..cap, with "the smallest free space ≥ x" in O(log cap) (a segment tree
    over the counts)."""

    def __init__(self, cap: int) -> None:
        self.size = 1
        while self.size < cap + 1:
            self.size *= 2
        self.tree = [0] * (2 * self.size)

    def add(self, space: int, delta: int) -> None:
        i = space + self.size
        while i:
            self.tree[i] += delta
            i //= 2

    def smallest_at_least(self, x: int) -> int | None:
        def go(node: int, lo: int, hi: int) -> int | None:
            if hi < x or not self.tree[node]:
                return None
            if lo == hi:
                return lo
            mid = (lo + hi) // 2
            found = go(2 * node, lo, mid)
            return found if found is not None else go(2 * node + 1, mid + 1, hi)

        return go(1, 0, self.size - 1)


def bfd_packs(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """The packs TRL's ``bfd`` makes, as lists of sample indices: each length cut to ``max_len`` (empty ones
    dropped), then longest first (ties in order) into the open pack with the least free space that holds it, else a
    new pack (open packs of equal space taken first-in, first-out, as TRL's deques)."""
    free = _FreeSpace(max_len)
    packs: list[list[int]] = []
    fill: list[int] = []
    by_space: dict[int, list[int]] = {}  # free space -> open packs with it
    for i in sorted((i for i, x in enumerate(lengths) if x > 0), key=lambda i: min(lengths[i], max_len), reverse=True):
        length = min(lengths[i], max_len)
        space = free.smallest_at_least(length)
        if space is None:
            packs.append([])
            fill.append(0)
            pid = len(packs) - 1
        else:
            pid = by_space[space].pop(0)
            free.add(space, -1)
        packs[pid].append(i)
        fill[pid] += length
        left = max_len - fill[pid]
        if left > 0:
            by_space.setdefault(left, []).append(pid)
            free.add(left, 1)
    return packs


def pack_bfd(lengths: Sequence[int], max_len: int) -> list[int]:
    """The token count of each pack of ``bfd_packs``."""
    return [sum(min(lengths[i], max_len) for i in p) for p in bfd_packs(lengths, max_len)]


def pack_wrapped(lengths: Sequence[int], max_len: int) -> list[int]:
    """The token count of each row of TRL's ``wrapped`` packing: every token concatenated, cut every ``max_len``."""
    total = sum(lengths)
    full, rest = divmod(total, max_len)
    return [max_len] * full + ([rest] if rest else [])


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """The nearest-rank ``q``-th percentile (0 < q ≤ 100) of ascending values."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def histogram(values: Sequence[int], bins: int = 12) -> dict[str, list[int]]:
    """Counts of ``values`` in ``bins`` equal-width bins from 0 to the maximum: ``edges`` (bins + 1) and ``counts``."""
    top = max(values) if values else 0
    width = max(1, math.ceil((top + 1) / bins))
    edges = [i * width for i in range(bins + 1)]
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, bisect_left(edges, v + 1) - 1)] += 1
    return {"edges": edges, "counts": counts}
