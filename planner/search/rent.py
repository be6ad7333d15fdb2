"""``qplan fit --objective time|cost --max-gpus N``: which GPU, and how many, to rent for a given training run.

The run is kept as given: rank, targets, quantization, optimizer, sequence length and the global batch (sequences per
optimizer step, over every rank). Searched, for each GPU kind: the count (1, 2, 4, ... up to ``N``, within one node:
the communication across nodes is not predicted), the strategy (ddp, zero2, fsdp, zero3: CPU offload is left out, its
PCIe traffic is not predicted), each rank's micro-batch x accumulation split of its share of the global batch, and
checkpointing. Every candidate is a whole plan from ``api.plan_dict`` (what ``qplan estimate`` prints for it: the
per-rank memory, the step time with the ranks' communication, the cost of every GPU); each (GPU, count)'s best plan
is listed, ranked by tokens/s or by cost per million tokens.
"""

from __future__ import annotations

from typing import Any

from qplan.planner.errors import QPlanError

#: GPUs per node: counts above it would cross nodes
NODE = 8
STRATEGIES = ("ddp", "zero2", "fsdp", "zero3")
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def counts_up_to(max_gpus: int) -> list[int]:
    """1, 2, 4, ... up to ``max_gpus`` and at most one node (``NODE``)."""
    out, n = [], 1
    while n <= min(max_gpus, NODE):
        out.append(n)
        n *= 2
    return out


def rank_gpus(*, model: str, gpus: list, max_gpus: int, recipe: dict[str, Any], objective: str,
              tokens: int | None, prices: dict[str, float], top: int, **options: Any) -> dict[str, Any]:
    """The best plan of every (GPU kind, count) that trains ``recipe`` (``options``: further ``plan_dict``
    keywords: loss, adapter dtype, Liger kernels, reentrant checkpointing), ranked by ``objective``."""
    from qplan.planner.api import plan_dict

    if max_gpus < 1:
        raise QPlanError(f"--max-gpus must be >= 1, got {max_gpus}")
    fixed = {k: recipe[k] for k in ("r", "targets", "quant", "optimizer", "seq_len")}
    gb = recipe["global_batch"]
    rows, tried = [], 0
    for g in gpus:
        price = prices.get(g.name)
        for world in counts_up_to(max_gpus):
            if gb % world:
                continue  # the global batch does not split over this many ranks
            share = gb // world
            best = None
            for strategy in (STRATEGIES if world > 1 else ("single",)):
                dist = {} if world == 1 else {"gpus": world, "strategy": strategy}
                for b in (m for m in sorted(set(MICRO_BATCHES) | {share}) if m <= share and share % m == 0):
                    for ckpt in ((True,) if options.get("reentrant") else (False, True)):
                        try:
                            plan = plan_dict(model=model, gpu=g.name, batch_size=b, grad_accum=share // b, grad_ckpt=ckpt,
                                             tokens=tokens, price_per_hour=price, **fixed, **options, **dist)
                        except QPlanError:
                            if world == 1:
                                raise  # the run itself cannot be planned (not one strategy refusing it)
                            continue  # e.g. int8 weights cannot be sharded
                        tried += 1
                        p = plan["prediction"]
                        t = p.get("time") or {}
                        if not p["fits"] or not t.get("step_seconds"):
                            continue
                        row = {"gpu": g.name, "gpus": world, "strategy": strategy, "batch_size": b,
                               "grad_accum": share // b, "grad_ckpt": "hf" if ckpt else "off",
                               "peak_per_rank": p["memory"]["peak"], "headroom": p["headroom"],
                               "step_seconds": t["step_seconds"], "tokens_per_second": t["tokens_per_second"],
                               "communication_seconds": (t.get("communication") or {}).get("seconds", 0.0)}
                        if t.get("total_seconds") is not None:
                            row["total_seconds"] = t["total_seconds"]
                        if p.get("cost"):
                            row["cost_per_million_tokens"] = p["cost"]["per_step"] / t["tokens_per_step"] * 1e6
                            if p["cost"].get("total") is not None:
                                row["total_cost"] = p["cost"]["total"]
                        if best is None or _key(row, objective) < _key(best, objective):
                            best = row
            if best is not None:
                rows.append(best)
    rows.sort(key=lambda r: _key(r, objective))
    return {"model": model, "gpu": ",".join(g.name for g in gpus), "objective": objective, "recipe": recipe,
            "searched": ["gpu", "gpus (within one node)", "strategy", "micro-batch x gradient accumulation",
                         "checkpointing"],
            "candidates": tried, "fitting": len(rows), "best": rows[:top]}


def _key(row: dict[str, Any], objective: str) -> tuple:
    if objective == "cost":
        return (row["cost_per_million_tokens"], -row["tokens_per_second"])
    return (-row["tokens_per_second"], row["gpus"])
