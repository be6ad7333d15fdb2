"""Communication of a multi-GPU step (issue 31): the bytes ``planner.compute.comm`` times, against FSDP2's own step.

The oracle is FSDP2 itself: one rank's step traced on the meta device with torch's fake process group
(``qplan.observe.trace.dist``), where every collective FSDP issues is a ``c10d`` op the tracker records with its
full-size tensor (an all-gather's output, a reduce-scatter's input). The plan's gathered bytes per micro-batch
(forward: every unit; backward: the decoder layers) and its gradient bytes must equal them to the byte; the link
bytes are then the ring's ``(N-1)/N`` of them, and the seconds those bytes over the catalog's link (a bound: no GPU
has measured it).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from qplan.observe.trace.dist import trace_rank_step
from qplan.planner.api import plan_dict
from qplan.planner.compute.comm import all_reduce_bytes, comm_bytes, gather_bytes


@pytest.mark.parametrize("model, world, options", [
    ("smollm2-135m", 4, {}),                                           # nf4 in bf16 storage, checkpointing
    ("qwen2.5-0.5b", 2, {"quant": "bf16", "grad_ckpt": False, "targets": "qv"}),
])
def test_fsdp_collectives_are_the_planned_bytes(model, world, options):
    plan = plan_dict(model=model, gpu="l40s", gpus=world, strategy="fsdp", batch_size=1, seq_len=64, **options)
    col = trace_rank_step(plan, steps=2)["collectives"]
    c = plan["prediction"]["time"]["communication"]["bytes_per_step"]
    gathered = col["forward:_allgather_base_"] + col["backward:_allgather_base_"]
    assert c["weight_all_gather"] == gather_bytes(col["forward:_allgather_base_"], world) + \
        gather_bytes(col["backward:_allgather_base_"], world)
    assert c["gradient_reduce_scatter"] == gather_bytes(col["backward:_reduce_scatter_base_"], world)
    assert c["total"] == c["weight_all_gather"] + c["gradient_reduce_scatter"] and gathered > 0


def test_time_adds_the_link_time_and_says_what_it_leaves_out():
    p = plan_dict(model="llama-3.1-8b", gpu="h100-pcie", gpus=4, strategy="ddp", grad_accum=2)["prediction"]
    t = p["time"]
    c = t["communication"]
    assert c["link"] == "PCIe Gen5 x16" and c["link_bytes_per_second_one_way"] == 64e9
    assert c["seconds"] == pytest.approx(c["bytes_per_step"]["total"] / 64e9)
    single = plan_dict(model="llama-3.1-8b", gpu="h100-pcie", grad_accum=2)["prediction"]["time"]
    assert t["step_seconds"] == pytest.approx(single["step_seconds"] + c["seconds"])
    nodes = plan_dict(model="llama-3.1-8b", gpu="h100-pcie", gpus=4, nodes=2, strategy="ddp")["prediction"]["time"]
    assert "communication" not in nodes and "across nodes" in nodes["not_in_time"][0]


def test_hsdp_collectives_are_the_planned_bytes_and_cross_nodes_as_all_reduces():
    """HSDP (2 nodes x 2 GPUs): inside the node FSDP2's own all-gathers and reduce-scatter over 2 ranks; across nodes
    its all-reduce of each reduce-scattered shard (FSDP2's ``foreach_reduce``: the trace's ``allreduce_``), G rings of
    M ranks through each node's network."""
    plan = plan_dict(model="smollm2-135m", gpu="h100-80gb", gpus=2, nodes=2, strategy="hsdp", batch_size=1, seq_len=64,
                     network_gbps=400)
    col = trace_rank_step(plan, steps=2)["collectives"]
    c = plan["prediction"]["time"]["communication"]
    g, m = 2, 2
    assert c["bytes_per_step"]["weight_all_gather"] == gather_bytes(col["forward:_allgather_base_"], g) + \
        gather_bytes(col["backward:_allgather_base_"], g)
    assert c["bytes_per_step"]["gradient_reduce_scatter"] == gather_bytes(col["backward:_reduce_scatter_base_"], g)
    shard = col["backward:allreduce_"]
    assert 0 < shard and shard * g >= col["backward:_reduce_scatter_base_"]  # the padded shard of the gradients
    a = c["across_nodes"]
    assert a["bytes_per_step_per_node"] == g * all_reduce_bytes(shard, m)
    assert a["network_bytes_per_second_one_way"] == 400e9 / 8 and a["seconds"] == a["bytes_per_step_per_node"] / 50e9
    assert c["seconds"] == pytest.approx(c["bytes_per_step"]["total"] / c["link_bytes_per_second_one_way"] + a["seconds"])


def test_a_ring_across_nodes_moves_at_its_slowest_edge():
    kw = dict(model="llama-3.1-8b", gpu="h100-80gb", strategy="ddp")
    one = plan_dict(**kw, gpus=8)["prediction"]["time"]["communication"]
    two = plan_dict(**kw, gpus=4, nodes=2, network_gbps=400)["prediction"]["time"]["communication"]
    assert two["bytes_per_step"] == one["bytes_per_step"]  # the same ring of 8 ranks
    assert two["across_nodes"]["bytes_per_step_per_node"] == two["bytes_per_step"]["total"]
    assert two["seconds"] == pytest.approx(two["bytes_per_step"]["total"] / 50e9)  # 400 Gbit/s < NVLink
    fast = plan_dict(**kw, gpus=4, nodes=2, network_gbps=8 * 400 * 100)["prediction"]["time"]["communication"]
    assert fast["seconds"] == pytest.approx(one["seconds"])  # a network faster than NVLink: the link bounds it
    single = plan_dict(**kw, gpus=1, nodes=2, network_gbps=400)["prediction"]["time"]["communication"]
    assert single["seconds"] == pytest.approx(single["bytes_per_step"]["total"] / 50e9)


def test_network_option_is_refused_on_one_node():
    from qplan.planner.errors import QPlanError

    with pytest.raises(QPlanError, match="--network-gbps 400 is the network between nodes: this plan has 1 node"):
        plan_dict(model="llama-3.2-1b", gpus=2, network_gbps=400)


def test_ring_formulas():
    assert all_reduce_bytes(1000, 4) == 1500 and gather_bytes(1000, 4) == 750
    assert comm_bytes("ddp", 1, 4, 10, (0, 0)) == {"total": 0}
    z2 = comm_bytes("zero2", 4, 3, 1000, (0, 0))
    assert z2 == {"gradient_reduce_scatter": 2250, "parameter_all_gather": 750, "total": 3000}
