"""From a tracker's storage histories to peaks and what the bytes at a moment are.

One category vocabulary (``qplan.planner.vocab.CATEGORIES``), decided by ``category`` for the
trace and for ``qplan run``'s measurement alike:

* ``optimizer_paged`` — bitsandbytes paged state (CUDA unified memory; outside ``tensor_peak``);
* ``weights`` — frozen parameters, buffers, quantization constants;
* ``adapters`` — trainable parameters;
* ``gradients`` — storages that were a trainable parameter's ``.grad`` by then;
* ``optimizer`` — optimizer state;
* ``logits`` — ``[rows, vocab]`` tensors of the step (the head's output, its fp32 copies,
  log-softmax and their gradients; see ``LogitsRule``);
* ``activations`` — the batch and other tensors alive before the step, and storages made in a
  forward pass (or in a checkpoint recomputation) that autograd saved or that outlived it;
* ``temporaries`` — everything else: transients, gradients in flight, optimizer scratch.

The live bytes after every event come from the (alloc event, free event, bytes) records;
host tensors (``rec.host``) and paged state (``rec.paged``) are outside the curve.
"""

from __future__ import annotations

import itertools
from typing import Any

from qplan.planner.vocab import CATEGORIES, PHASES


def category(r: Any, at: int, segment_end: dict[Any, int | None]) -> str:
    """What the storage of record ``r`` is at event ``at`` (see the module docstring)."""
    if r.paged:
        return "optimizer_paged"
    if r.kind == "frozen":
        return "weights"
    if r.kind == "trainable":
        return "adapters"
    if r.grad_at is not None and r.grad_at <= at:
        return "gradients"
    if r.opt:
        return "optimizer"
    if r.logits:
        return "logits"
    if r.kind == "input":
        return "activations"
    # made by the forward (or a checkpoint recomputation) and saved by autograd or kept past the
    # end of that forward / recomputation: an activation; else a transient
    if r.rc is not None:
        end = segment_end.get(("rc", r.rc))
    elif r.phase == "forward":
        end = segment_end.get(r.seg)
    else:
        return "temporaries"
    if r.saved or r.free is None or end is None or r.free > end:
        return "activations"
    return "temporaries"


class Curve:
    """Live bytes after each event of one tracker, and its segments between phase marks."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        delta = [0] * (tracker.event + 1)
        base = 0
        for r in tracker.records:
            if r.host or r.paged:
                continue
            if r.alloc < 0:
                base += r.nbytes
            else:
                delta[r.alloc] += r.nbytes
            if r.free is not None:
                delta[r.free] -= r.nbytes
        self.base = base
        self.live = list(itertools.accumulate(delta, initial=base))[1:]  # live[e]: after event e
        marks = tracker.marks
        self.segments = [(ev, (marks[i + 1][0] if i + 1 < len(marks) else tracker.event), phase, step)
                         for i, (ev, phase, step) in enumerate(marks)]
        # where each segment that makes activations ends: a forward pass, a recomputation
        self.ends: dict[Any, int | None] = {i: hi for i, (_, hi, _, _) in enumerate(self.segments)}
        self.ends.update({("rc", k): v for k, v in tracker.rc_end.items()})

    def before(self, e: int) -> int:
        return self.live[e - 1] if e > 0 else self.base

    def seg_max(self, lo: int, hi: int) -> tuple[int, int]:
        """Max over events lo..hi-1, and the event after which it holds (the state entering lo,
        made by event lo - 1, if no event of the segment exceeds it)."""
        best, at = self.before(lo), lo - 1
        for e in range(lo, hi):
            if self.live[e] > best:
                best, at = self.live[e], e
        return best, at

    def breakdown(self, at: int) -> dict[str, int]:
        """Bytes alive at event ``at`` by category (host storages excluded)."""
        out = dict.fromkeys(CATEGORIES, 0)
        for r in self.tracker.records:
            if r.host or r.alloc > at or (r.free is not None and r.free <= at):
                continue
            out[category(r, at, self.ends)] += r.nbytes
        return out

    def summarize(self, phases: tuple[str, ...] = PHASES) -> dict[str, Any]:
        """The peak over every segment from the first ``phases[0]`` mark on, its step, phase and
        categories; the peak of each phase; the live bytes entering the first one (baseline)."""
        segs = [s for s in self.segments if s[2] in phases]
        if not segs:
            raise ValueError("the tracker saw no step (no phase marks)")
        first = segs[0][0]
        phase_peaks = dict.fromkeys(phases, 0)
        per_step: dict[int, int] = {}
        peak, peak_at, peak_step, peak_phase = -1, first, segs[0][3], segs[0][2]
        for lo, hi, phase, step in self.segments:
            if lo < first:
                continue
            v, at = self.seg_max(lo, hi)
            if phase in phase_peaks:
                phase_peaks[phase] = max(phase_peaks[phase], v)
            per_step[step] = max(per_step.get(step, 0), v)
            if v > peak:
                peak, peak_at, peak_step, peak_phase = v, at, step, phase
        breakdown = self.breakdown(peak_at)
        if sum(v for k, v in breakdown.items() if k != "optimizer_paged") != peak:  # pragma: no cover
            raise AssertionError(f"breakdown {breakdown} does not add up to the peak {peak}")
        return {
            "tensor_peak": int(peak),
            "breakdown_at_peak": {k: int(v) for k, v in breakdown.items()},
            "baseline": int(self.before(first)),
            "per_step_peak": [int(v) for _, v in sorted(per_step.items())],
            "phase_peaks": {k: int(v) for k, v in phase_peaks.items()},
            "peak_step": peak_step,
            "peak_phase": peak_phase,
            "peak_event": peak_at,
        }

    def timeline(self, first: int, last: int | None = None, buckets: int = 1000) -> dict[str, Any]:
        """Live bytes over the events ``first..last`` (default: to the end), downsampled for a
        picture: at most ``buckets`` runs of consecutive events, each kept as its lowest and
        highest live bytes (an envelope: no peak is lost), with the phase segments and the peak.
        Events are counted from ``first`` (x = allocation/free events, not seconds)."""
        last = self.tracker.event if last is None else last
        n = max(0, last - first)
        width = max(1, -(-n // buckets))
        t, lo, hi = [], [], []
        for start in range(first, first + n, width):
            chunk = self.live[start:min(start + width, first + n)]
            t.append(start - first)
            lo.append(int(min(chunk)))
            hi.append(int(max(chunk)))
        phases = [[max(a, first) - first, min(b, last) - first, ph, st] for a, b, ph, st in self.segments
                  if b > first and a < last and b > a]
        top, at = self.seg_max(first, first + n) if n else (self.before(first), first - 1)
        return {"x": "event", "events": n, "bucket_events": width, "t": t, "lo": lo, "hi": hi,
                "start_bytes": int(self.before(first)), "phases": phases,
                "peak": {"event": max(0, at - first), "bytes": int(top)}}

    def detail(self, at: int, top: int = 40) -> list[dict[str, Any]]:
        """The largest (category, op dtype shape) groups of bytes alive at ``at`` (needs origins)."""
        groups: dict[tuple[str, str], int] = {}
        for r in self.tracker.records:
            if r.host or r.alloc > at or (r.free is not None and r.free <= at):
                continue
            shape, dtype, op = r.info or ((), "", "?")
            key = (category(r, at, self.ends), f"{op} {dtype} {list(shape)}")
            groups[key] = groups.get(key, 0) + r.nbytes
        rows = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
        return [{"category": c, "origin": o, "bytes": b} for (c, o), b in rows]
