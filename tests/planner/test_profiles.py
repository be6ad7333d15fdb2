"""Profiles are chosen up front, and none rewrites another's result (issue 22).

The sharded profile reports the single-GPU numbers beside its own; they must be what the plan of the
same options on one GPU says (a plan made without the sharded profile at all)."""

from __future__ import annotations

import pytest

from qplan.planner.api import make_plan
from qplan.planner.memory.profiles import PeftProfile, ShardedProfile, UnslothProfile, select_profile
from qplan.planner.memory.sharding import DistSettings


def test_select_profile_by_backend_and_parallelism():
    assert type(select_profile("peft")) is PeftProfile
    assert type(select_profile("unsloth")) is UnslothProfile
    sharded = select_profile("peft", DistSettings(2, 1, "fsdp", False))
    assert type(sharded) is ShardedProfile and type(sharded.single) is PeftProfile
    assert type(select_profile("unsloth", DistSettings(2, 1, "ddp", False)).single) is UnslothProfile


@pytest.mark.parametrize("strategy,quant", [("fsdp", "nf4"), ("ddp", "bf16"), ("zero3", "bf16")])
def test_sharded_plan_reports_the_single_gpu_plan(strategy, quant):
    opts = dict(model="llama-3.2-1b", quant=quant, seq_len=1024, batch_size=2, gpu="a100-80gb")
    one = make_plan(**opts)
    two = make_plan(**opts, gpus=2, strategy=strategy)
    assert two.distributed.single_gpu == {"weights": one.prediction.memory.weights,
                                          "tensor_peak": one.prediction.memory.tensor_peak,
                                          "peak": one.prediction.memory.peak}
    # the rank's own memory is the sharded profile's: DDP adds its buckets, FSDP/ZeRO-3 shard the weights
    assert two.prediction.memory.tensor_peak != one.prediction.memory.tensor_peak
    if strategy != "ddp":
        assert two.prediction.memory.weights < one.prediction.memory.weights
    assert "distributed" not in one.to_dict() and "distributed" in two.to_dict()


def test_unsloth_settings_come_from_its_profile():
    """Unsloth's stack: its offloaded checkpointing, no k-bit fp32 upcast (its own source), a chunked loss."""
    p = make_plan(model="llama-3.2-1b", backend="unsloth", quant="nf4")
    assert p.training.grad_ckpt == "unsloth" and p.quant.prepare_model_for_kbit_training is False
    assert make_plan(model="llama-3.2-1b", backend="unsloth", grad_ckpt=False).training.grad_ckpt == "off"
    assert make_plan(model="llama-3.2-1b", quant="nf4").quant.prepare_model_for_kbit_training is True
