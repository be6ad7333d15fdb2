"""``--objective grpo`` (TRL 1.16's GRPOTrainer with transformers' generate) against measured oracles on the CPU:
the KV cache of a real ``generate`` to the byte, the generation moments of a tracked real ``generate``, and the phase
peaks of a tracked real ``GRPOTrainer`` run (``qplan.observe.grpo_probe``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qplan.planner.api import make_plan
from qplan.planner.errors import QPlanError
from qplan.planner.memory.generation import GenerationShape, generation_terms
from qplan.planner.model.catalog import load_spec

HERE = Path(__file__).resolve().parent
TINY = str(HERE.parent / "backends" / "data" / "tiny-llama.json")
ALL = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


def grpo_plan(model: str = TINY, **kw):
    opts = {"model": model, "objective": "grpo", "quant": "bf16", "num_generations": 4, "max_prompt_length": 16,
            "max_completion_length": 8, "batch_size": 4, "dropout": 0.0, **kw}
    return make_plan(**opts).to_dict()


def config(model: str) -> dict:
    data = json.loads(Path(model).read_text())
    return data.get("config", data)


@pytest.mark.parametrize("model,n,p,c,dtype,dropout", [
    (TINY, 3, 5, 4, "bfloat16", 0.0),
    (TINY, 4, 16, 40, "float32", 0.05),
])  # SmolLM2-135M and Qwen2.5-0.5B cases: bench/grpo_cpu_runs.py (reports/accuracy/grpo-cpu)
def test_generation_matches_a_tracked_generate(model, n, p, c, dtype, dropout):
    """The KV cache equals the returned cache to the byte (``P + C - 1`` positions); the prefill and last-sampling
    moments are within 1% of the tracked live bytes, the last decode forward within 5% (it is never the largest here),
    and the moment's peak within 1%."""
    from qplan.observe.grpo_probe import tracked_generate
    from qplan.planner.model.weights import QuantSettings

    measured = tracked_generate(config(model), n, p, c, dtype=dtype, dropout=dropout)
    assert measured["positions"] == p + c - 1 and measured["forwards"] == c
    quant = "bf16" if dtype == "bfloat16" else "fp32"
    q = QuantSettings(quant, False, dtype)
    planned = generation_terms(load_spec(model), q, "float32", ALL, GenerationShape(n, p, c), dropout, "cpu")
    assert planned["kv_cache"] == measured["kv_cache"]
    for moment in ("prefill", "sample"):
        assert planned[moment] == pytest.approx(measured[moment], rel=0.01), moment
    assert planned["decode"] == pytest.approx(measured["decode"], rel=0.05)
    assert planned["peak"] == pytest.approx(max(measured[m] for m in ("prefill", "decode", "sample")), rel=0.01)
    plan = make_plan(model=model, objective="grpo", quant=quant, num_generations=n, batch_size=n, max_prompt_length=p,
                     max_completion_length=c, dropout=dropout).to_dict()
    assert plan["prediction"]["generation"]["kv_cache"] == measured["kv_cache"]


@pytest.mark.parametrize("kw", [{"grad_ckpt": False}])
def test_grpo_trainer_run_within_5_percent(kw):
    """A real GRPOTrainer run without checkpointing: its tensor peak within 5% of the CPU plan's, the generation
    phase's within 1%. With checkpointing, a generation inside the accumulation window and on a 4-bit base:
    ``qplan run``'s own runs (tests/backends/test_preference_run.py); more in bench/grpo_cpu_runs.py."""
    from qplan.observe.grpo_probe import tracked_grpo_run

    run = {"batch": 4, "generations": 4, "grad_accum": 1, "steps_per_generation": None, "grad_ckpt": True,
           "dropout": 0.0, **kw}
    measured = tracked_grpo_run(config(TINY), run["batch"], run["generations"], 16, 8, run["grad_accum"],
                                run["steps_per_generation"], run["grad_ckpt"], run["dropout"])
    assert measured["prompt_tokens"] == 16
    plan = grpo_plan(batch_size=run["batch"], num_generations=run["generations"], grad_accum=run["grad_accum"],
                     steps_per_generation=run["steps_per_generation"], grad_ckpt=run["grad_ckpt"],
                     dropout=run["dropout"])
    phases = plan["prediction"]["memory_detail"]["phases_cpu"]
    assert max(phases.values()) == pytest.approx(measured["tensor_peak"], rel=0.05)
    assert phases["generation"] == pytest.approx(measured["phase_peaks"]["generation"], rel=0.01)


def test_plan_document():
    """The plan says what it planned: training.grpo (TRL's defaults where not given), the rows' length, the fused
    head without top-1, prediction.generation and the generation moment, and the step's generation work."""
    plan = make_plan(model="qwen2.5-0.5b", objective="grpo", batch_size=8, gpu="a100-40gb").to_dict()
    t = plan["training"]
    assert t["grpo"] == {"num_generations": 8, "prompt_length": 512, "max_completion_length": 512,
                         "steps_per_generation": 1, "beta": 0.0}
    assert t["seq_len"] == 1024 and t["loss"] == "trl" and t["objective"] == "grpo"
    gen = plan["prediction"]["generation"]
    # 2 x 24 layers x 2 kv heads x 64 x 4 bytes (prepare_model_for_kbit_training's fp32 stream) x 8 x 1023 positions
    assert gen["kv_cache"] == 2 * 24 * 2 * 64 * 4 * 8 * 1023
    assert gen["sequences"] == 8 and gen["prompts"] == 1 and gen["tokens"] == 8 * 512
    assert plan["prediction"]["memory_detail"]["phases"]["generation"] == gen["tensor_peak"]
    compute = plan["prediction"]["compute"]
    assert compute["flops_per_step"]["generation"] > 0 and compute["bytes_per_step"]["generation"] > 0
    assert any("GRPO" in w for w in plan["warnings"])
    # a k-bit base: GRPOTrainer casts the adapters to bf16
    assert plan["lora"]["adapter_dtype"] == "bfloat16"


def test_head_scores_the_completion_on_a_gpu():
    """On a GPU TRL's fused head projects the completion positions only (labels -100 elsewhere): a longer prompt adds
    no head rows there; on the CPU every position is projected."""
    short, long = (grpo_plan(max_prompt_length=p, grad_ckpt=False) for p in (16, 64))
    logits = [p["prediction"]["memory"]["logits"] for p in (short, long)]
    assert logits[0] == logits[1]


@pytest.mark.parametrize("kw,message", [
    ({"num_generations": 1, "batch_size": 2}, "at least 2 generations"),
    ({"num_generations": 3}, "must be divisible by --num-generations 3"),
    ({"seq_len": 100}, "give --max-prompt-length and --max-completion-length"),
    ({"full": True, "dropout": None}, "--full is not planned yet"),
    ({"dora": True}, "--dora is not planned in generation"),
    ({"loss": "cce"}, "fused LM head"),
    ({"strategy": "fsdp", "gpus": 2}, "plan one GPU or DDP"),
    ({"max_completion_length": 250}, "--max-prompt-length 16 \\+ --max-completion-length 250 exceeds"),
])
def test_refusals(kw, message):
    with pytest.raises(QPlanError, match=message.replace("(", r"\(")):
        grpo_plan(**kw)


def test_grpo_options_refused_elsewhere_and_models_not_planned():
    with pytest.raises(QPlanError, match="--num-generations is an option of --objective grpo"):
        make_plan(model=TINY, num_generations=4)
    with pytest.raises(QPlanError, match="--beta is an option of --objective grpo"):
        make_plan(model=TINY, objective="dpo", beta=0.1)
    with pytest.raises(QPlanError, match="not gemma2"):
        make_plan(model="gemma-2-9b", objective="grpo", batch_size=8)


def test_cli_one_line_and_text():
    run = [sys.executable, "-m", "qplan.cli.main", "estimate", "--model", "qwen2.5-0.5b", "--objective", "grpo"]
    bad = subprocess.run([*run, "--num-generations", "3", "--batch-size", "4"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    ok = subprocess.run([*run, "--batch-size", "8"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "generation (transformers' generate, no grad): 8 completions" in ok.stdout


@pytest.mark.parametrize("args", [
    {"model": "smollm2-135m", "quant": "bf16"},
    {"model": "qwen2.5-0.5b"},
    {"model": "smollm2-135m", "quant": "bf16", "grad_ckpt": False},
    {"model": "llama-3.2-1b", "beta": 0.04},
])
def test_training_step_equals_the_meta_trace(args):
    """The training step's moments against ``GRPOTrainer._compute_loss`` traced on meta (``observe.trace.grpo``: the
    fused head on the completion positions, as CUDA's Triton path runs it): the forward within 0.1%, the peak within
    0.5%; with a trace the verdict also counts generation's moment."""
    from qplan.observe.trace import trace_plan
    from qplan.planner.plan import attach_trace

    plan = make_plan(objective="grpo", num_generations=4, max_prompt_length=64, max_completion_length=32, batch_size=4,
                     **args).to_dict()
    traced = trace_plan(plan, steps=2)
    phases = plan["prediction"]["memory_detail"]["phases"]
    step = max(v for k, v in phases.items() if k != "generation")
    assert phases["forward"] == pytest.approx(traced["phase_peaks"]["forward"], rel=0.001)
    assert step == pytest.approx(traced["tensor_peak"], rel=0.005)
    attach_trace(plan, traced)
    assert plan["prediction"]["trace"]["tensor_peak"] == max(traced["tensor_peak"], phases["generation"])


def vllm_plan(**kw):
    return make_plan(model="qwen3-1.7b", objective="grpo", batch_size=8, gpu="a100-40gb", **kw).to_dict()


def test_vllm_colocate_takes_its_share_of_the_gpu():
    """Colocated vLLM holds vllm_gpu_memory_utilization x the GPU's total (TRL's 0.3 by default) all run: the
    trainer's headroom is the rest; with sleep mode it holds it only while generating, beside the trainer's static
    bytes. Derived (vLLM does not run here): the arithmetic from the plan's own terms and the catalog's GPU."""
    hf, colo, sleep, server = (vllm_plan(**kw) for kw in (
        {}, {"vllm": "colocate"}, {"vllm": "colocate", "vllm_sleep": True, "vllm_gpu_memory_utilization": 0.5},
        {"vllm": "server"}))
    total = hf["gpu"]["total_bytes"]
    reserved = int(0.3 * total)
    assert colo["training"]["grpo"]["vllm_reserved"] == reserved
    step = {k: v for k, v in hf["prediction"]["memory_detail"]["phases"].items() if k != "generation"}
    assert colo["prediction"]["memory_detail"]["phases"] == step  # vLLM generates inside its share
    peak = colo["prediction"]["memory"]["peak"]
    assert colo["prediction"]["headroom"] == hf["gpu"]["usable_bytes"] - reserved - peak
    gen = colo["prediction"]["generation"]
    assert gen["engine"] == "vllm" and gen["tensor_peak"] is None
    assert any("with vLLM (colocate)" in w for w in colo["warnings"])
    assert not any("transformers' generate (no vLLM)" in w for w in colo["warnings"] + server["warnings"])
    v = gen["vllm"]
    # vLLM's copy of a 4-bit base is bitsandbytes 4-bit (TRL asks for quantization="bitsandbytes"); its KV cache 16-bit
    assert v["weights"] == colo["prediction"]["memory"]["weights"]
    d = colo["model"]["config"]
    assert v["kv_cache_needed"] == 2 * d["num_hidden_layers"] * d["num_key_value_heads"] * d["head_dim"] * 2 * 8 * 1024
    assert v["kv_and_activation_room"] == reserved - v["weights"]
    ph = sleep["prediction"]["memory_detail"]["phases"]
    m = sleep["prediction"]["memory"]
    assert ph["generation"] == m["weights"] + m["adapters"] + m["optimizer"] + int(0.5 * total)
    assert sleep["prediction"]["headroom"] == sleep["gpu"]["usable_bytes"] - sleep["prediction"]["memory"]["peak"]
    assert "generation" not in server["prediction"]["memory_detail"]["phases"]
    assert server["prediction"]["headroom"] == server["gpu"]["usable_bytes"] - server["prediction"]["memory"]["peak"]
    # vLLM's decode steps: no per-kernel launches (CUDA graphs), its own 16-bit copy read per token
    assert "generation" not in (colo["prediction"]["compute"].get("kernel_launches_per_step") or {})
    assert colo["prediction"]["time"]["step_seconds"] < hf["prediction"]["time"]["step_seconds"]


def test_vllm_weights_of_a_16_bit_base():
    plan = vllm_plan(vllm="server", quant="bf16")
    assert plan["prediction"]["generation"]["vllm"]["weights"] == 2 * plan["prediction"]["params"]["base"]


@pytest.mark.parametrize("kw,message", [
    ({"vllm": "colocate", "gpu": None}, "give --gpu"),
    ({"vllm": "colocate", "vllm_gpu_memory_utilization": 0.02}, "does not hold its copy of the weights"),
    ({"vllm": "colocate", "quant": "int8"}, "in-flight 8-bit"),
    ({"vllm": "server", "vllm_sleep": True}, "are for colocate"),
    ({"vllm_sleep": True}, "are for --vllm colocate"),
])
def test_vllm_refusals(kw, message):
    opts = {"model": "qwen3-1.7b", "objective": "grpo", "batch_size": 8, "gpu": "a100-40gb", **kw}
    with pytest.raises(QPlanError, match=message):
        make_plan(**{k: v for k, v in opts.items() if v is not None})
    with pytest.raises(QPlanError, match="is an option of --objective grpo"):
        make_plan(model="qwen3-1.7b", vllm="server")


def test_ddp_ranks_generate_their_share():
    """Over DDP each rank generates its own batch x steps_per_generation rows beside DDP's gradient buckets, which
    exist from the wrapper's construction: the rank's generation moment is the one-GPU moment plus the buckets."""
    one = make_plan(model="qwen2.5-0.5b", objective="grpo", batch_size=4, num_generations=4).to_dict()
    two = make_plan(model="qwen2.5-0.5b", objective="grpo", batch_size=4, num_generations=8, gpus=2).to_dict()
    buckets = two["distributed"]["per_rank"]["ddp_buckets"]
    assert two["prediction"]["generation"]["sequences"] == one["prediction"]["generation"]["sequences"] == 4
    assert (two["prediction"]["memory_detail"]["phases"]["generation"]
            == one["prediction"]["memory_detail"]["phases"]["generation"] + buckets)
