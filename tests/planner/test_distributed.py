"""Multi-GPU plans: per-rank terms against independent oracles.

* FSDP2: the plan's model really sharded by ``fully_shard`` on the meta device over torch's fake
  process group (``qplan.observe.trace.dist.shard_one_rank``): the bytes rank 0 holds, to the byte.
* DeepSpeed ZeRO-2/3: DeepSpeed's own ``estimate_zero2/3_model_states_mem_needs`` on the plan's
  trainable parameter count (DeepSpeed installs and imports on the CPU here).
* Single-GPU plans are unchanged by the new options.
"""

from __future__ import annotations

import pytest

from conftest import tiny_spec
from qplan.planner.api import plan_dict
from qplan.planner.document import check_plan, dumps
from qplan.planner.errors import QPlanError


def test_one_gpu_plan_is_unchanged():
    base = dict(model="llama-3.2-3b", r=32, gpu="t4")
    plain = dumps(plan_dict(**base))
    assert dumps(plan_dict(**base, gpus=1, nodes=1)) == plain
    assert '"distributed"' not in plain


@pytest.mark.parametrize("quant,upcast", [("bf16", True), ("nf4", True), ("nf4", False)])
@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_rank_matches_fully_shard_on_fake_process_group(quant, upcast, world):
    from qplan.observe.trace.dist import shard_one_rank

    plan = plan_dict(model=tiny_spec("llama-tied"), quant=quant, upcast=upcast, gpus=world, strategy="fsdp")
    check_plan(plan)
    d = plan["distributed"]
    assert d["quant_storage"] == ("bfloat16" if quant == "nf4" else None)
    got = shard_one_rank(plan)
    r = d["per_rank"]
    assert r["weights_sharded"] == got["params"]
    assert r["quant_state_replicated"] == got["quant_state"]
    assert r["buffers_replicated"] == got["buffers"]
    assert r["adapters"] == got["trainable"]
    # an all-gather allocates W padded shards (foreach_all_gather), at least the unsharded layer
    assert r["gathered_layer"] == world * got["layer_shard"] >= got["layer_full"]
    assert plan["prediction"]["memory"]["weights"] == got["params"] + got["quant_state"] + got["buffers"]


@pytest.mark.parametrize("nodes,gpus,quant", [(2, 2, "nf4"), (3, 2, "bf16"), (2, 3, "nf4")])
def test_hsdp_rank_matches_fully_shard_on_a_2d_mesh(nodes, gpus, quant):
    """HSDP: FSDP2 on a (nodes, GPUs per node) mesh shards each parameter over the node's ranks only."""
    from qplan.observe.trace.dist import shard_one_rank

    plan = plan_dict(model=tiny_spec("llama-tied"), quant=quant, gpus=gpus, nodes=nodes, strategy="hsdp")
    check_plan(plan)
    d = plan["distributed"]
    assert (d["world_size"], d["shard_group"], d["replicas"]) == (nodes * gpus, gpus, nodes)
    got = shard_one_rank(plan)
    r = d["per_rank"]
    assert (r["weights_sharded"], r["quant_state_replicated"], r["buffers_replicated"], r["adapters"]) == \
        (got["params"], got["quant_state"], got["buffers"], got["trainable"])
    assert r["gathered_layer"] == gpus * got["layer_shard"]


def _trainable(plan):
    return plan["prediction"]["params"]["trainable"]


@pytest.mark.parametrize("gpus,nodes", [(2, 1), (8, 1), (4, 2)])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_equal_deepspeed_estimator(gpus, nodes, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    plan = plan_dict(model="llama-3.1-8b", quant="nf4", gpus=gpus, nodes=nodes, strategy="zero2", cpu_offload=offload)
    r, P, W = plan["distributed"]["per_rank"], _trainable(plan), gpus * nodes
    cpu, gpu = estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=offload, additional_buffer_factor=1.0)
    ours = r["adapters"] + r["gradients"] + r["optimizer"]
    # DeepSpeed truncates 18 P / W; qplan pads each partition to ceil(P / W) (as DeepSpeed allocates it)
    assert 0 <= ours - gpu < 18 * W
    if offload:
        host = plan["distributed"]["host_offload_per_node"]
        assert 0 < host <= cpu  # DeepSpeed's host estimate is a bound (it takes max(4 W, 16) bytes a param)


@pytest.mark.parametrize("offload", [False, True])
def test_zero3_model_states_equal_deepspeed_estimator(offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    plan = plan_dict(model="llama-3.1-8b", quant="bf16", gpus=4, strategy="zero3", cpu_offload=offload)
    r, P = plan["distributed"]["per_rank"], _trainable(plan)
    # largest_layer_params=0: the trainable states alone; the gathered working set separately below
    _, gpu, _ = estimate_zero3_model_states_mem_needs(P, 0, 4, 1, cpu_offload=offload, cpu_offload_params=False)
    assert 0 <= r["adapters"] + r["gradients"] + r["optimizer"] - gpu < 18 * 4
    # the largest module of Llama-3.1-8B is the 128256 x 4096 embedding (and untied head)
    _, _, largest = estimate_zero3_model_states_mem_needs(P, 128256 * 4096, 4, 1)
    assert r["gathered"] == largest


def test_70b_fsdp_qlora_on_two_24gb_cards():
    one = plan_dict(model="llama-3.1-70b", gpu="rtx-4090", seq_len=2048, upcast=False)
    two = plan_dict(model="llama-3.1-70b", gpu="rtx-4090", seq_len=2048, upcast=False, gpus=2, strategy="fsdp")
    check_plan(two)
    w1, w2 = one["prediction"]["memory"]["weights"], two["prediction"]["memory"]["weights"]
    qs = one["prediction"]["memory_detail"]["weights"]["quant_state"]
    # half the weights, plus the quantization constants every rank keeps whole, plus padding
    assert two["distributed"]["sharding_cost"] == w2 - (w1 + 1) // 2
    assert qs // 2 <= two["distributed"]["sharding_cost"] < qs // 2 + 2**20
    assert two["prediction"]["fits"] is (two["prediction"]["memory"]["peak"] <= two["gpu"]["usable_bytes"])
    assert two["prediction"]["memory"]["peak"] < one["prediction"]["memory"]["peak"]


@pytest.mark.parametrize("kw,msg", [
    (dict(gpus=2, strategy="ddp", cpu_offload=True), "--cpu-offload needs"),
    (dict(gpus=2, strategy="fsdp", quant="int8"), "int8 weights cannot be sharded"),
    (dict(gpus=2, backend="unsloth"), "one GPU"),
    (dict(gpus=0), "--gpus"),
    (dict(gpus=2, strategy="zero4"), "--strategy"),
    (dict(gpus=2, strategy="hsdp"), "--strategy hsdp shards inside a node and replicates across nodes: give --nodes 2"),
    (dict(gpus=1, nodes=2, strategy="hsdp"), "--strategy hsdp with 1 GPU per node"),
    (dict(gpus=2, nodes=2, strategy="hsdp", quant="int8"), "int8 weights cannot be sharded"),
])
def test_bad_distributed_options_are_one_line(kw, msg):
    with pytest.raises(QPlanError, match=msg):
        plan_dict(model="llama-3.2-1b", **kw)


def test_fit_finds_the_fewest_cards_for_70b_qlora():
    from qplan.planner.search.fewest_gpus import fewest_gpus

    res = fewest_gpus(model="llama-3.1-70b", gpu="rtx-4090", max_gpus=8, seq_len=2048, upcast=False)
    assert res["world_size"] == 2
    for row in res["fitting"]:  # each row is the plan estimate prints, and one world size fewer has none
        kw = dict(model="llama-3.1-70b", gpu="rtx-4090", seq_len=2048, upcast=False, gpus=2,
                  strategy=row["strategy"], cpu_offload=row["cpu_offload"])
        assert plan_dict(**kw)["prediction"]["memory"]["peak"] == row["peak_per_rank"]
    assert plan_dict(model="llama-3.1-70b", gpu="rtx-4090", seq_len=2048, upcast=False)["prediction"]["fits"] is False


def test_cli_multi_gpu_table_and_json(tmp_path):
    from click.testing import CliRunner

    from qplan.cli.main import cli

    args = ["estimate", "--model", "llama-3.1-70b", "--gpu", "rtx-4090", "--gpus", "2", "--strategy", "fsdp",
            "--seq-len", "2048", "--no-upcast", "--cpu-offload"]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    assert "memory above is per rank: 2 GPUs" in out.output and "FITS on 2 × rtx-4090" in out.output
    js = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "plan.json")])
    assert js.exit_code == 0
    check_plan(__import__("json").loads((tmp_path / "plan.json").read_text()))
    bad = CliRunner().invoke(cli, ["estimate", "--model", "llama-3.2-1b", "--gpus", "2", "--strategy", "ddp",
                                   "--cpu-offload"])
    # main() turns a QPlanError into one line on stderr and exit 2 (tests/planner/test_cli.py)
    assert isinstance(bad.exception, QPlanError) and "\n" not in str(bad.exception)


def test_host_memory_is_per_node_and_holds_the_offloaded_states():
    from qplan.planner.api import plan_dict

    one = plan_dict(model="llama-3.2-1b", optimizer="paged_adamw_8bit")["prediction"]["host"]
    two = plan_dict(model="llama-3.2-1b", optimizer="paged_adamw_8bit", gpus=2, strategy="fsdp", cpu_offload=True)
    host, dist = two["prediction"]["host"], two["distributed"]
    assert host["offloaded_states"] == dist["host_offload_per_node"] > 0
    assert host["peak"] == host["offloaded_states"] + host["offloaded_checkpoints"] + host["paged_optimizer"]
    assert one["paged_optimizer"] > 0
    # each rank pages its own (sharded) optimizer state: per node, the ranks' paged bytes
    assert host["paged_optimizer"] == 2 * two["prediction"]["memory_detail"]["optimizer_paged"]
