"""``qplan fit --max-gpus N``: the fewest GPUs of one kind, and the engine, that train a plan.

Every candidate is a whole plan from ``api.plan_dict`` (the numbers ``qplan estimate`` prints for it,
per rank), over world sizes 1, 2, 3, ... up to ``max_gpus`` and the strategies ddp, zero2, fsdp,
zero3, each without and then with CPU offload (ddp has none).  The answer lists every candidate that
fits at the smallest world size that has one, least offload first.
"""

from __future__ import annotations

from typing import Any

from qplan.planner.errors import QPlanError

#: tried in this order at each world size (cheapest in communication first)
CANDIDATES = (("ddp", False), ("zero2", False), ("fsdp", False), ("zero3", False),
              ("zero2", True), ("fsdp", True), ("zero3", True))


def fewest_gpus(*, gpu: str, max_gpus: int, gpus_per_node: int = 8, **options: Any) -> dict[str, Any]:
    """The plans that fit on the fewest ``gpu`` cards (``options``: ``plan_dict``'s keywords)."""
    from qplan.planner.api import plan_dict

    if max_gpus < 1:
        raise QPlanError(f"--max-gpus must be >= 1, got {max_gpus}")
    if "," in gpu or gpu == "all":
        raise QPlanError("--max-gpus searches one kind of GPU: give a single --gpu")
    tried = 0
    for world in range(1, max_gpus + 1):
        nodes = -(-world // gpus_per_node)
        if world % nodes:
            continue  # a world size that does not split evenly over whole nodes
        rows = []
        for strategy, offload in (CANDIDATES if world > 1 else (("ddp", False),)):
            kw = {} if world == 1 else dict(gpus=world // nodes, nodes=nodes, strategy=strategy, cpu_offload=offload)
            try:
                plan = plan_dict(gpu=gpu, **options, **kw)
            except QPlanError:
                if world == 1:
                    raise  # one GPU has no strategy to refuse: the options themselves cannot be planned
                continue  # e.g. int8 weights cannot be sharded
            tried += 1
            p = plan["prediction"]
            if p["fits"]:
                rows.append({"gpus": world, "nodes": nodes, "strategy": strategy if world > 1 else "single",
                             "cpu_offload": offload, "peak_per_rank": p["memory"]["peak"], "headroom": p["headroom"],
                             "host_offload_per_node": (plan.get("distributed") or {}).get("host_offload_per_node", 0)})
        if rows:
            return {"gpu": gpu, "world_size": world, "candidates": tried, "fitting": rows, **_loss(options)}
    return {"gpu": gpu, "world_size": None, "candidates": tried, "fitting": [], **_loss(options)}


def _loss(options: dict[str, Any]) -> dict[str, str]:
    """The loss, said where it is not the full logits (as the batch search says it)."""
    loss = options.get("loss", "full")
    return {} if loss == "full" else {"loss": loss}
