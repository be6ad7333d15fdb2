#!/usr/bin/env python3
"""The measured GPU matrix of issue 5: which fine-tunes to run, in which order, and which to skip.

Axes (every combination is one *cell*; r=16, alpha=32, all-linear targets throughout)::

    model        llama-3.2-1b  llama-3.2-3b  llama-3.1-8b  qwen2.5-7b   (bundled specs)
    quant        nf4 (+ double quant, bf16 compute)  |  bf16
    shape        1x512  2x2048  4x4096                                   (batch x sequence)
    grad_ckpt    on  |  off
    backend      peft  |  unsloth
    optimizer    adamw_torch  |  paged_adamw_8bit

4 x 2 x 3 x 2 x 2 x 2 = 192 cells. A cell whose plan the planner predicts not to fit the target
GPU (``qplan estimate --gpu h100-80gb`` -> ``prediction.fits``) is skipped and listed with the
predicted peak; ``--include-skipped`` runs those last, as out-of-memory checks.

Order: greedy and deterministic. The next cell is the runnable one that covers the most axis
values not yet covered, then the most *pairs* of axis values not yet covered (a pairwise
covering design: the first ~25 cells already show every model with every quant, shape,
checkpointing mode, backend and optimizer), then the most new *triples* (spreads the rest of the
budget over models and settings), then the cheapest by ``estimate_cell_seconds``,
then the first in canonical (itertools.product) order. So a run cut short by its time budget
still spans the whole matrix, and the first 24 cells cover every value of every axis
(tests/bench/test_matrix.py checks both).

    python bench/gpu/matrix.py --list                 # the ordered cells and the skipped ones
    python bench/gpu/matrix.py --dry-run --out DIR    # write DIR/plans/<cell>.json + DIR/matrix.json

Only the planner is needed (no torch): plans come from ``qplan.planner`` in-process, exactly
what ``qplan estimate ... --format json`` prints for the same options.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODELS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-7b")
QUANTS = ("nf4", "bf16")
SHAPES = ((1, 512), (2, 2048), (4, 4096))
GRAD_CKPT = (True, False)
BACKENDS = ("peft", "unsloth")
OPTIMIZERS = ("adamw_torch", "paged_adamw_8bit")
RANK = 16
TARGETS = "all-linear"
DEFAULT_GPU = "h100-80gb"
#: How many cells must cover every value of every axis (issue 5).
COVER_WITHIN = 24

AXES: tuple[tuple[str, tuple], ...] = (
    ("model", MODELS),
    ("quant", QUANTS),
    ("shape", SHAPES),
    ("grad_ckpt", GRAD_CKPT),
    ("backend", BACKENDS),
    ("optimizer", OPTIMIZERS),
)


@dataclass(frozen=True)
class Cell:
    model: str
    quant: str
    shape: tuple[int, int]
    grad_ckpt: bool
    backend: str
    optimizer: str

    @property
    def batch_size(self) -> int:
        return self.shape[0]

    @property
    def seq_len(self) -> int:
        return self.shape[1]

    @property
    def id(self) -> str:
        """Folder-safe, unique, stable: ``llama-3.2-1b__nf4dq__b1x512__gc-on__peft__adamw_torch``."""
        q = "nf4dq" if self.quant == "nf4" else self.quant
        gc = "gc-on" if self.grad_ckpt else "gc-off"
        return f"{self.model}__{q}__b{self.batch_size}x{self.seq_len}__{gc}__{self.backend}__{self.optimizer}"

    def values(self) -> tuple:
        return tuple(getattr(self, name) for name, _ in AXES)

    def estimate_options(self) -> dict[str, Any]:
        """The `qplan estimate` options of this cell (names as in cli/main.py)."""
        return {"model": self.model, "r": RANK, "targets": TARGETS, "quant": self.quant,
                "double_quant": True, "compute_dtype": "bf16", "batch_size": self.batch_size,
                "seq_len": self.seq_len, "grad_ckpt": self.grad_ckpt, "backend": self.backend,
                "optimizer": self.optimizer}

    def estimate_argv(self, gpu: str = DEFAULT_GPU) -> list[str]:
        """The same cell as `qplan estimate` arguments (for people, and the CLI cross-check)."""
        return ["estimate", "--model", self.model, "--r", str(RANK), "--targets", TARGETS,
                "--quant", self.quant, "--double-quant", "--compute-dtype", "bf16",
                "--batch-size", str(self.batch_size), "--seq-len", str(self.seq_len),
                "--grad-ckpt" if self.grad_ckpt else "--no-grad-ckpt", "--backend", self.backend,
                "--optimizer", self.optimizer, "--gpu", gpu]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "quant": self.quant, "double_quant": self.quant == "nf4",
                "batch_size": self.batch_size, "seq_len": self.seq_len, "grad_ckpt": self.grad_ckpt,
                "backend": self.backend, "optimizer": self.optimizer, "r": RANK, "targets": TARGETS}


def all_cells(axes: Sequence[tuple[str, tuple]] = AXES) -> list[Cell]:
    """Every cell in canonical order (itertools.product over AXES)."""
    return [Cell(*vals) for vals in itertools.product(*(values for _, values in axes))]


# ----------------------------------------------------------------------------- planning


def _estimate_defaults() -> dict[str, Any]:
    """`qplan estimate`'s option defaults, read from the click command itself."""
    import click

    from qplan.cli.main import estimate

    ctx = click.Context(estimate)
    return {p.name: p.get_default(ctx) for p in estimate.params}


def plan_dict(cell: Cell, gpu: str = DEFAULT_GPU, model: str | None = None) -> dict[str, Any]:
    """The plan `qplan estimate <cell options> --gpu GPU` would write (in-process).

    ``model`` replaces the spec name (the --tiny smoke test plans shrunken user specs).
    """
    from qplan.planner.api import plan_dict as plan_of

    opts = dict(_estimate_defaults())
    opts.update(cell.estimate_options())
    for key in ("method", "fmt", "output", "force", "from_config", "config_format"):  # the command's, not the plan's
        opts.pop(key, None)
    if model is not None:
        opts["model"] = model
    opts["gpu"] = gpu
    return plan_of(**opts)


def estimate_cell_seconds(plan: dict[str, Any], steps: int = 6) -> float:
    """A rough prior for one cell's wall time on an H100, for ordering and the time budget only.

    Process start and imports (~20 s; unsloth +25 s), loading the bf16 checkpoint from local disk
    at ~2 GB/s (+ quantizing on load), and ``steps`` training steps at 6·N·tokens FLOPs
    (x4/3 with checkpointing) at 300 TFLOP/s. Not a measurement: run_matrix.py replaces it with
    the measured time of earlier cells of the same model and backend as soon as it has one.
    """
    base = plan["prediction"]["params"]["base"]
    tokens = plan["training"]["batch_size"] * plan["training"]["seq_len"]
    flops = 6.0 * base * tokens * steps * (4 / 3 if plan["training"]["grad_ckpt"] != "off" else 1.0)
    seconds = 20.0 + (25.0 if plan["backend"] == "unsloth" else 0.0)
    seconds += 2.0 * base / 2e9  # bf16 bytes from disk
    seconds += flops / 300e12
    return round(seconds, 1)


@dataclass
class Verdict:
    cell: Cell
    plan: dict[str, Any] | None
    fits: bool | None
    reason: str | None = None  # why it is skipped
    seconds: float = 0.0


def judge(cells: Iterable[Cell], gpu: str = DEFAULT_GPU, plan_fn=plan_dict) -> list[Verdict]:
    """Plan every cell and read the planner's ``prediction.fits`` for ``gpu``."""
    from qplan.planner.errors import QPlanError

    out: list[Verdict] = []
    for cell in cells:
        try:
            plan = plan_fn(cell, gpu)
        except QPlanError as exc:
            out.append(Verdict(cell, None, None, f"planner refused: {exc}"))
            continue
        pred = plan["prediction"]
        fits = pred["fits"]
        reason = None
        if fits is False:
            usable = plan["gpu"]["usable_bytes"]
            reason = (f"predicted peak {pred['memory']['peak'] / 2**30:.1f} GiB > usable "
                      f"{usable / 2**30:.1f} GiB on {plan['gpu']['name']}")
        elif fits is None:
            reason = "planner gave no fits verdict (no GPU in the plan)"
        out.append(Verdict(cell, plan, fits, reason, estimate_cell_seconds(plan)))
    return out


# ----------------------------------------------------------------------------- ordering


def _combos(values: tuple, k: int) -> set[tuple]:
    """The k-subsets of a cell's (axis index, value) pairs: k=2 pairs, k=3 triples."""
    return set(itertools.combinations(list(enumerate(values)), k))


def order_cells(cells: Sequence[Cell], cost: dict[Cell, float] | None = None) -> list[Cell]:
    """Greedy coverage order (see the module docstring). Deterministic for the same input."""
    cost = cost or {}
    canon = {c: i for i, c in enumerate(cells)}
    remaining = list(cells)
    seen: tuple[set, set, set] = (set(), set(), set())
    ordered: list[Cell] = []
    info = {c: (set(enumerate(c.values())), _combos(c.values(), 2), _combos(c.values(), 3)) for c in cells}
    while remaining:
        def key(c: Cell):
            new = [len(mine - done) for mine, done in zip(info[c], seen)]
            return (-new[0], -new[1], -new[2], cost.get(c, 0.0), canon[c])

        best = min(remaining, key=key)
        remaining.remove(best)
        ordered.append(best)
        for mine, done in zip(info[best], seen):
            done |= mine
    return ordered


def uncovered_values(cells: Sequence[Cell], axes: Sequence[tuple[str, tuple]] = AXES) -> list[str]:
    """Axis values that none of ``cells`` has, as ``axis=value`` strings (empty: all covered)."""
    missing = []
    for i, (name, values) in enumerate(axes):
        have = {c.values()[i] for c in cells}
        missing += [f"{name}={v}" for v in values if v not in have]
    return missing


@dataclass
class Matrix:
    gpu: str
    order: list[Verdict]                      # runnable cells, in run order
    skipped: list[Verdict]                    # predicted not to fit (or refused by the planner)
    verdicts: dict[str, Verdict] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def row(v: Verdict, i: int | None = None) -> dict[str, Any]:
            pred = v.plan["prediction"] if v.plan else None
            r = {**v.cell.to_json()}
            if i is not None:
                r["order"] = i
            r["fits"] = v.fits
            if pred:
                r["predicted_peak_bytes"] = pred["memory"]["peak"]
                r["headroom_bytes"] = pred["headroom"]
                r["estimated_seconds"] = v.seconds
            if v.reason:
                r["reason"] = v.reason
            return r

        return {
            "gpu": self.gpu,
            "axes": {name: [list(x) if isinstance(x, tuple) else x for x in values] for name, values in AXES},
            "r": RANK,
            "targets": TARGETS,
            "cells_total": len(self.order) + len(self.skipped),
            "runnable": len(self.order),
            "skipped_count": len(self.skipped),
            "estimated_seconds_total": round(sum(v.seconds for v in self.order), 0),
            "order": [row(v, i) for i, v in enumerate(self.order, 1)],
            "skipped": [row(v) for v in self.skipped],
        }


def build_matrix(gpu: str = DEFAULT_GPU, plan_fn=plan_dict, include_skipped: bool = False,
                 cells: Sequence[Cell] | None = None) -> Matrix:
    verdicts = judge(cells if cells is not None else all_cells(), gpu, plan_fn)
    runnable = [v for v in verdicts if v.fits]
    skipped = [v for v in verdicts if not v.fits]
    by_cell = {v.cell: v for v in runnable}
    ordered = [by_cell[c] for c in order_cells([v.cell for v in runnable], {v.cell: v.seconds for v in runnable})]
    if include_skipped:  # out-of-memory checks, after everything predicted to fit
        extra = [v for v in skipped if v.plan is not None]
        extra_by = {v.cell: v for v in extra}
        ordered += [extra_by[c] for c in order_cells([v.cell for v in extra], {v.cell: v.seconds for v in extra})]
        skipped = [v for v in skipped if v.plan is None]
    return Matrix(gpu, ordered, skipped, {v.cell.id: v for v in verdicts})


# ----------------------------------------------------------------------------- output


def format_list(m: Matrix) -> str:
    lines = [f"{len(m.order)} cells to run on {m.gpu} (in this order), {len(m.skipped)} skipped; "
             f"r={RANK}, {TARGETS}; rough time {sum(v.seconds for v in m.order) / 3600:.1f} h (estimate, not measured)",
             f"{'#':>4}  {'cell':70} {'pred. peak':>10} {'est. s':>7}"]
    for i, v in enumerate(m.order, 1):
        peak = v.plan["prediction"]["memory"]["peak"] / 2**30
        flag = "  (predicted not to fit)" if v.fits is False else ""
        lines.append(f"{i:>4}  {v.cell.id:70} {peak:8.1f} G {v.seconds:7.0f}{flag}")
        if i == COVER_WITHIN:
            miss = uncovered_values([x.cell for x in m.order[:COVER_WITHIN]])
            cover = "every axis value covered" if not miss else "MISSING " + ", ".join(miss)
            lines.append(f"      --- first {COVER_WITHIN}: {cover} ---")
    if m.skipped:
        lines.append(f"\nskipped ({len(m.skipped)}):")
        for v in m.skipped:
            lines.append(f"      {v.cell.id:70} {v.reason}")
    return "\n".join(lines)


def write_plans(m: Matrix, out: Path, force: bool = True) -> list[Path]:
    """Write ``out/plans/<cell>.json`` for every cell to run and ``out/matrix.json``."""
    from qplan.planner.document import dumps

    plans_dir = out / "plans"
    plans_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for v in m.order:
        p = plans_dir / f"{v.cell.id}.json"
        if force or not p.exists():
            p.write_text(dumps(v.plan), encoding="utf-8")
        written.append(p)
    (out / "matrix.json").write_text(json.dumps(m.to_json(), indent=2) + "\n", encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The qplan GPU matrix (issue 5): list it or write its plans.")
    ap.add_argument("--gpu", default=DEFAULT_GPU, help=f"target GPU for the fits verdict [default: {DEFAULT_GPU}]")
    ap.add_argument("--list", action="store_true", help="print the ordered cells and the skipped ones")
    ap.add_argument("--dry-run", action="store_true", help="write the plans (and matrix.json) only")
    ap.add_argument("--out", default=str(Path(__file__).parent / "_dry-run" / "plans-only"),
                    help="folder for --dry-run [default: bench/gpu/_dry-run/plans-only]")
    ap.add_argument("--include-skipped", action="store_true", help="append cells predicted not to fit")
    ap.add_argument("--format", choices=["table", "json"], default="table")
    args = ap.parse_args(argv)
    m = build_matrix(args.gpu, include_skipped=args.include_skipped)
    if args.format == "json":
        print(json.dumps(m.to_json(), indent=2))
    elif args.list or not args.dry_run:
        print(format_list(m))
    if args.dry_run:
        written = write_plans(m, Path(args.out))
        print(f"wrote {len(written)} plans and matrix.json under {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
