"""Refactoring guard: the SHA-256 of every plan of a fixed grid, to compare two commits byte for byte.

    python bench/plan_identity.py --out /tmp/before.json      # at the old commit
    python bench/plan_identity.py --out /tmp/after.json       # at the new one
    python bench/plan_identity.py --compare /tmp/before.json /tmp/after.json

``--rename OLD=NEW`` replaces a string in each plan's text before hashing, for a change that is meant
(e.g. a module path a plan names, moved): run the old commit with it, so that only that string may
differ and everything else must still be byte-identical.

The grid (12 bundled models + 3 tiny fixture families: GPT-2 Conv1D, Phi-3 fused, Qwen2-MoE, built
on the fly; quant x checkpointing x targets x attention x dropout x batch x sequence x
accumulation x optimizer, with a GPU, DoRA, biases and the Unsloth backend in some cells) is
walked with a fixed stride, so the same cases come out at every commit.  A plan that raises
records the error message instead of a digest.  Only the public planner API is used:
``qplan.planner.api.make_plan`` (or, at commits before it existed, the CLI's
``plan_from_options``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "configs"

QUANTS = ("nf4", "int8", "bf16", "fp32")
CKPTS = (True, False)
TARGETS = ("qv", "attn", "all-linear")
ATTNS = ("auto", "eager")
DROPOUTS = (0.0, 0.05)
SHAPES = ((1, 256), (4, 1024), (8, 4096))
ACCUM = (1, 4)
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adafactor")
EXTRAS = (
    {},
    {"gpu": "t4"},
    {"gpu": "rtx-4090", "backend": "unsloth"},
    {"dora": True, "bias": "lora_only", "gpu": "a100-80gb"},
)


def _make_plan_fn():
    try:
        from qplan.planner.api import plan_dict

        return lambda o: plan_dict(**o)
    except ImportError:
        pass
    try:
        from qplan.planner.api import make_plan

        return lambda o: make_plan(**o)
    except ImportError:
        from qplan.planner.cli import plan_from_options

        def old(o):
            full = dict(r=16, alpha=None, dropout=0.05, targets="all-linear", bias="none", dora=False,
                        rslora=False, modules_to_save="", quant="nf4", double_quant=True, compute_dtype="bf16",
                        upcast=True, gpu=None, seq_len=512, batch_size=1, grad_accum=1, grad_ckpt=True,
                        optimizer="adamw_torch", attn_impl="auto", backend="peft", strict_dtype=False)
            full.update(o)
            if isinstance(full["modules_to_save"], (list, tuple)):
                full["modules_to_save"] = ",".join(full["modules_to_save"])
            return plan_from_options(full)

        return old


def _dumps(plan) -> str:
    return json.dumps(plan, indent=2, ensure_ascii=False) + "\n"


def models() -> list[str]:
    names = sorted(p.stem for p in (ROOT / "model_specs").glob("*.json"))
    return names + [str(FIXTURES / f"{f}.json") for f in ("gpt2-conv1d", "phi3-fused", "qwen2-moe")]


def grid(stride: int):
    combos = itertools.product(models(), QUANTS, CKPTS, TARGETS, ATTNS, DROPOUTS, SHAPES, ACCUM, OPTIMIZERS, EXTRAS)
    for i, (m, q, ck, tg, at, dr, (b, s), ac, op, ex) in enumerate(combos):
        if i % stride:
            continue
        yield dict(model=m, quant=q, grad_ckpt=ck, targets=tg, attn_impl=at, dropout=dr, batch_size=b, seq_len=s,
                   grad_accum=ac, optimizer=op, r=8 if i % 3 else 64, **ex)


def run(stride: int, renames: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    make = _make_plan_fn()
    out = {}
    for o in grid(stride):
        key = json.dumps({k: (Path(v).name if k == "model" else v) for k, v in sorted(o.items())}, sort_keys=True)
        try:
            text = _dumps(make(o))
            for old, new in renames:
                text = text.replace(old, new)
            out[key] = hashlib.sha256(text.encode()).hexdigest()
        except Exception as exc:  # noqa: BLE001 - the error message is part of the behaviour
            out[key] = "error: " + " ".join(str(exc).split())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--stride", type=int, default=7)
    ap.add_argument("--compare", nargs=2)
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                    help="replace OLD by NEW in each plan before hashing (a meant change)")
    a = ap.parse_args(argv)
    if a.compare:
        x, y = (json.loads(Path(p).read_text()) for p in a.compare)
        diff = [k for k in x if x[k] != y.get(k)] + [k for k in y if k not in x]
        errors = sum(v.startswith("error") for v in x.values())
        print(f"{len(x)} plans ({len(x) - errors} plans, {errors} refusals) vs {len(y)}: {len(diff)} differ")
        for k in diff[:20]:
            print("  ", k, x.get(k), "->", y.get(k))
        return 1 if diff else 0
    res = run(a.stride, tuple(tuple(r.split("=", 1)) for r in a.rename))
    Path(a.out).write_text(json.dumps(res, indent=0, sort_keys=True) + "\n")
    errors = sum(v.startswith("error") for v in res.values())
    print(f"{len(res)} cases: {len(res) - errors} plans, {errors} refusals -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
