"""The traced step of one FSDP2 rank against the analytic per-rank plan.

Oracle: ``qplan.observe.trace.dist.trace_rank_step`` -- the plan's PEFT model really sharded by
``fully_shard`` on the meta device over torch's fake process group, two training steps run under the
live-tensor tracker (FSDP's own all-gather / reduce-scatter buffers, the sharded gradients and
optimizer states, the per-device batch's activations).  The analytic plan (``planner.memory.per_rank``)
must give the traced peak of each phase within 1% (tiny models: the gathered units are a large part
of the peak, so the terms of ``planner.memory.sharding`` show here).
"""

from __future__ import annotations

import pytest

from conftest import tiny_spec
from qplan.planner.api import plan_dict
from qplan.planner.vocab import MOMENTS_OF_PHASE


def assert_within_1_percent_of(plan: dict, tr: dict) -> None:
    """The plan's tensor peak and each phase's within 1% of the traced rank's."""
    mem, phases = plan["prediction"]["memory"], plan["prediction"]["memory_detail"]["phases"]
    assert abs(mem["tensor_peak"] - tr["tensor_peak"]) <= 0.01 * tr["tensor_peak"]
    for phase, traced in tr["phase_peaks"].items():
        predicted = max(phases[m] for m in MOMENTS_OF_PHASE[phase] if m in phases)
        assert abs(predicted - traced) <= 0.01 * traced, (phase, predicted, traced)


@pytest.mark.parametrize("world,quant,ckpt", [
    (2, "nf4", True), (2, "bf16", False), (4, "nf4", False), (4, "bf16", True), (3, "nf4", True), (3, "bf16", False),
])
def test_fsdp_rank_step_matches_the_trace(world, quant, ckpt):
    from qplan.observe.trace.dist import trace_rank_step

    plan = plan_dict(model=tiny_spec("llama-tied"), quant=quant, gpus=world, strategy="fsdp", seq_len=64,
                     grad_ckpt=ckpt)
    tr = trace_rank_step(plan)
    assert_within_1_percent_of(plan, tr)
    # the static state of the rank is exact: sharded weights, quantization constants, buffers, states
    bd = tr["breakdown_at_peak"]
    r = plan["distributed"]["per_rank"]
    assert bd["adapters"] == r["adapters"] and bd["optimizer"] == r["optimizer"]


@pytest.mark.parametrize("nodes,gpus,quant,ckpt", [(2, 2, "nf4", True), (3, 2, "bf16", True), (2, 3, "nf4", False)])
def test_hsdp_rank_step_matches_the_trace_and_holds_what_fsdp_over_one_node_holds(nodes, gpus, quant, ckpt):
    """HSDP's traced step (FSDP2 on a 2-D fake mesh: its all-reduce across replicas, in place on the reduce-scattered
    shard, and the buffer it keeps per layer) against the analytic plan, and against FSDP2's traced step over the
    ranks of one node: the same bytes."""
    from qplan.observe.trace.dist import trace_rank_step

    kw = dict(model=tiny_spec("llama-tied"), quant=quant, gpus=gpus, seq_len=64, grad_ckpt=ckpt)
    plan = plan_dict(**kw, nodes=nodes, strategy="hsdp")
    tr = trace_rank_step(plan)
    assert_within_1_percent_of(plan, tr)
    one_node = trace_rank_step(plan_dict(**kw, strategy="fsdp"))
    assert tr["tensor_peak"] == one_node["tensor_peak"] and tr["phase_peaks"] == one_node["phase_peaks"]


def test_cli_traces_an_fsdp_rank_and_refuses_what_it_does_not_trace():
    from click.testing import CliRunner

    from qplan.cli.main import cli
    from qplan.planner.errors import QPlanError

    model = str(tiny_spec_config())
    out = CliRunner().invoke(cli, ["estimate", "--model", model, "--gpus", "2", "--strategy", "fsdp", "--seq-len", "32",
                                   "--method", "trace", "--format", "json"])
    assert out.exit_code == 0, out.output
    doc = __import__("json").loads(out.output)
    assert doc["prediction"]["method"] == "trace" and "fake process group" in doc["prediction"]["trace"]["notes"][-1]
    bad = CliRunner().invoke(cli, ["estimate", "--model", model, "--gpus", "2", "--strategy", "ddp", "--method", "trace"])
    assert isinstance(bad.exception, QPlanError) and "not traced" in str(bad.exception)


def tiny_spec_config():
    from pathlib import Path

    return Path(__file__).parents[1] / "fixtures" / "configs" / "llama-tied.json"
