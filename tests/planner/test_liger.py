"""``--loss liger``: Liger-Kernel 0.8.0's fused linear cross-entropy (axolotl's ``LigerPlugin`` with
``liger_fused_linear_cross_entropy``): the loss and the hidden states' gradient computed in the forward, a chunk of rows
at a time, never the ``T x V`` logits.

The oracle is Liger's own code (installed by ``scripts/setup-oracles.sh`` into ``.oracles/liger`` with Triton's
Python front end, run in a subprocess: ``tests/oracles/liger_trace.py``), traced on meta as a GPU runs it — only its
Triton launches, which write into the buffers they are given, are stood in (``qplan.observe.trace.liger``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")

from test_trainer_configs import one_line, qplan

from qplan.planner.api import plan_dict
from qplan.planner.memory.loss import LIGER_MODEL_TYPES

ROOT = Path(__file__).resolve().parents[2]
ORACLE = Path(os.environ.get("QPLAN_LIGER_ORACLE", ROOT / ".oracles" / "liger"))


def liger(*args: str, stdin: str = "") -> str:
    if not (ORACLE / "liger_kernel").is_dir():
        pytest.skip(f"liger-kernel is not installed in {ORACLE}: run scripts/setup-oracles.sh")
    env = dict(os.environ, PYTHONPATH=str(ORACLE), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tests" / "oracles" / "liger_trace.py"), *args],
                       input=stdin, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1]


def test_the_model_types_planned_are_the_ones_liger_patches():
    assert list(LIGER_MODEL_TYPES) == json.loads(liger("--model-types"))


#: (plan, the loss's forward is the forward's peak): a head in fp32 (PEFT's k-bit upcast) is cast for each chunk's
#: two matmuls, so the loss is the step's largest moment there; with 16-bit weights the decoder layers are larger
CASES = [
    (dict(model="llama-3.2-1b", seq_len=512, batch_size=2), True),    # fp32 head and rows cast to bf16, 32 chunks
    (dict(model="qwen2.5-0.5b", seq_len=3000), True),                 # a last chunk shorter than the others
    (dict(model="gemma-2-9b", seq_len=128), True),                    # final softcapping (in the kernel), eager
    (dict(model="qwen2.5-0.5b", seq_len=700, batch_size=3, quant="bf16", compute_dtype="fp32"), False),  # pure bf16
    (dict(model="small-vocab", seq_len=1000, grad_ckpt=False), False),  # V < h: one chunk of every row
    # Liger's kernels in the decoder layers (axolotl's liger_rms_norm / liger_glu_activation / liger_rope)
    (dict(model="llama-3.2-1b", seq_len=2048, loss="full", liger_kernels="rms_norm,swiglu,rope"), False),
    (dict(model="qwen2.5-0.5b", seq_len=2048, quant="bf16", liger_kernels="rms_norm"), False),  # a 16-bit residual
    (dict(model="qwen2.5-0.5b", seq_len=2048, quant="bf16", grad_ckpt=False, liger_kernels="swiglu"), False),
    # (1000 tokens: with T = h the head's (h, V) autocast copy would be labelled logits by the trace)
    (dict(model="qwen3-0.6b", seq_len=1000, grad_ckpt=False, liger_kernels="rms_norm,swiglu,rope"), True),  # q/k norms
    # TRL 1.16's use_liger_kernel: the layer kernels under TRL's own fused LM head
    (dict(model="qwen2.5-0.5b", seq_len=2048, quant="bf16", loss="trl", liger_kernels="rms_norm,swiglu"), False),
]
#: the same plans without Liger's kernels: the kernels' bytes, planned and traced, are compared through them
TWINS = [(dict({k: v for k, v in kw.items() if k != "liger_kernels"}), False) for kw, _ in CASES if "liger_kernels" in kw]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    cfg = json.loads((ROOT / "model_specs" / "smollm2-135m.json").read_text())["config"]
    small = tmp_path_factory.mktemp("liger") / "config.json"
    small.write_text(json.dumps({**cfg, "vocab_size": 512}))  # SmolLM2-135M with a 512-token vocabulary: V < h
    plans = [plan_dict(gpu="a100-80gb", **{"loss": "liger", **kw, "model": str(small) if kw["model"] == "small-vocab"
                                           else kw["model"]}) for kw, _ in CASES + TWINS]
    return plans, json.loads(liger(stdin=json.dumps(plans)))


@pytest.mark.parametrize("i", range(len(CASES)), ids=[str(kw) for kw, _ in CASES])
def test_a_liger_plan_is_its_traced_step(traced, i):
    plans, traces = traced
    plan, t = plans[i], traces[i]
    loss_peak = CASES[i][1]
    assert plan["training"].get("loss", "full") == CASES[i][0].get("loss", "liger")
    if plan["training"].get("loss") == "liger":
        assert t["breakdown_at_peak"]["logits"] == 0  # no [T, V] tensor
    phases = plan["prediction"]["memory_detail"]["phases"]
    if loss_peak:  # the loss's forward, planned and traced: to the byte but for the chunks' rounding (0.01%)
        assert phases["forward"] >= phases.get("mlp_forward", 0)
        tf = t["phase_peaks"]["forward"]
        assert abs(phases["forward"] - tf) <= 1e-4 * tf, (phases["forward"], tf)
    # the whole step: the peak sits in the decoder layers where the loss is small, whose moments are within ~1%
    a, tp = plan["prediction"]["memory"]["tensor_peak"], t["tensor_peak"]
    assert abs(a - tp) <= 0.011 * tp, (a, tp, plan["prediction"]["memory_detail"]["peak_phase"])
    # the optimizer step has no loss in it: as exact as any plan's (a few scalars: under 64 KiB)
    assert abs(phases["optimizer"] - t["phase_peaks"]["optimizer"]) <= max(1e-4 * t["phase_peaks"]["optimizer"], 2**16)
    kw = CASES[i][0]
    if "liger_kernels" in kw:  # the kernels add no error: the plan with them is as close to its trace as without
        j = len(CASES) + [k for k, _ in TWINS].index({k: v for k, v in kw.items() if k != "liger_kernels"})
        twin, tt = plans[j], traces[j]
        assert plan["training"]["liger_kernels"] == kw["liger_kernels"].split(",")
        err = abs(a - tp) / tp
        assert err <= abs(twin["prediction"]["memory"]["tensor_peak"] - tt["tensor_peak"]) / tt["tensor_peak"] + 1e-3
        assert tp <= tt["tensor_peak"] and a <= twin["prediction"]["memory"]["tensor_peak"]  # they save memory


@pytest.mark.parametrize(("args", "needle"), [
    (["--backend", "unsloth"], "the unsloth backend computes its own fused cross-entropy"),
    (["--targets", "q_proj,lm_head"], "reads lm_head.weight as it is"),
    (["--gpus", "2", "--strategy", "fsdp", "--quant", "bf16"], "--strategy fsdp"),
    (["--liger-kernels", "rms_norm,geglu"], "unknown kernel 'geglu'"),
    (["--liger-kernels", "rope", "--backend", "unsloth"], "--liger-kernels is for the peft backend"),
])
def test_a_liger_plan_it_cannot_run_is_one_line(capsys, args, needle):
    rc, out, err = qplan(capsys, "estimate", "--model", "llama-3.2-1b", "--loss", "liger", *args)
    assert rc == 2 and out == ""
    one_line(err, needle)


@pytest.mark.parametrize(("args", "needle"), [
    (["--model", "deepseek-v2-lite", "--loss", "liger"], "no patch for model type 'deepseek_v2'"),
    (["--model", "deepseek-v2-lite", "--liger-kernels", "rope"], "no patch for model type 'deepseek_v2'"),
    (["--model", "gemma-2-9b", "--liger-kernels", "swiglu"], "not SiLU-gated"),
])
def test_a_model_liger_does_not_patch_is_one_line(capsys, args, needle):
    rc, out, err = qplan(capsys, "estimate", *args)
    assert rc == 2 and out == ""
    one_line(err, needle)


def test_the_fused_loss_plans_far_less_than_the_full_logits_on_a_t4(capsys):
    """Llama-3.2-3B QLoRA on a free T4 at 2 x 4096 tokens: the full logits do not fit, Liger's loss does."""
    full = plan_dict(model="llama-3.2-3b", gpu="t4", seq_len=4096, batch_size=2)
    fused = plan_dict(model="llama-3.2-3b", gpu="t4", seq_len=4096, batch_size=2, loss="liger")
    assert full["prediction"]["fits"] is False and fused["prediction"]["fits"] is True
    rc, text, _ = qplan(capsys, "estimate", "--model", "llama-3.2-3b", "--loss", "liger", "--gpu", "t4")
    assert rc == 0 and "loss: Liger's fused linear cross-entropy" in text


@pytest.mark.parametrize("flags", [["--loss", "liger"], ["--liger-kernels", "rms_norm"]])
def test_run_refuses_a_liger_plan_on_the_cpu(capsys, tmp_path, flags):
    plan = tmp_path / "plan.json"
    assert qplan(capsys, "estimate", "--model", "smollm2-135m", *flags, "--output", str(plan))[0] == 0
    rc, out, err = qplan(capsys, "run", str(plan), "--device", "cpu", "--random-init", "--out-dir",
                           str(tmp_path / "runs"))
    assert rc == 2
    one_line(err, flags[0], "cannot train on the CPU")


AXOLOTL = ROOT / "tests" / "fixtures" / "trainer_configs" / "axolotl-qlora-llama-3.1-8b.yml"
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"


def _axolotl(tmp_path: Path, **extra) -> Path:
    f = tmp_path / f"a{len(list(tmp_path.glob('a*.yml')))}.yml"
    f.write_text(yaml.safe_dump({**yaml.safe_load(AXOLOTL.read_text()), **extra}))
    return f


def test_axolotls_liger_plugin_with_the_fused_loss_is_planned(capsys, tmp_path):
    f = _axolotl(tmp_path, plugins=[LIGER_PLUGIN], liger_fused_linear_cross_entropy=True, liger_rms_norm=False)
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(f), "--format", "json")
    assert rc == 0, err
    assert json.loads(out)["training"]["loss"] == "liger"


def test_axolotls_liger_kernels_are_planned(capsys, tmp_path):
    """The keys axolotl's Liger examples set: RMSNorm, the GLU activation, RoPE, the fused loss; liger_layer_norm
    patches nothing in a Llama (named in a warning)."""
    f = _axolotl(tmp_path, plugins=[LIGER_PLUGIN], liger_fused_linear_cross_entropy=True, liger_rms_norm=True,
                 liger_glu_activation=True, liger_rope=True, liger_layer_norm=True)
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(f), "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["training"]["loss"] == "liger" and doc["training"]["liger_kernels"] == ["rms_norm", "swiglu", "rope"]
    assert any("liger_layer_norm" in w["text"] for w in doc["trainer_config"]["warnings"])


@pytest.mark.parametrize(("extra", "needle"), [
    (dict(plugins=[LIGER_PLUGIN], liger_fused_linear_cross_entropy=True, liger_rms_norm_gated=True),
     "liger_rms_norm_gated"),
    (dict(plugins=[LIGER_PLUGIN], liger_cross_entropy=True), "liger_cross_entropy"),
    (dict(liger_rope=True), "without plugins"),
    (dict(plugins=[LIGER_PLUGIN], liger_fused_linear_cross_entropy=True, liger_use_token_scaling=True),
     "liger_use_token_scaling"),
    (dict(liger_fused_linear_cross_entropy=True), "without plugins"),
    (dict(plugins=[LIGER_PLUGIN], liger_fused_linear_cross_entropy="yes"), "must be bool"),
    (dict(plugins=[LIGER_PLUGIN, "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"],
          liger_fused_linear_cross_entropy=True), "keep one"),
])
def test_an_axolotl_liger_config_qplan_cannot_plan_is_one_line(capsys, tmp_path, extra, needle):
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(_axolotl(tmp_path, **extra)))
    assert rc == 2 and out == ""
    one_line(err, needle)


def test_export_to_axolotl_writes_the_plugin_and_reads_back_the_same_plan(capsys, tmp_path):
    plan_file = tmp_path / "plan.json"
    assert qplan(capsys, "estimate", "--model", "llama-3.2-1b", "--loss", "liger", "--liger-kernels", "rope,rms_norm",
                   "--gpu", "a100-80gb", "--output", str(plan_file))[0] == 0
    rc, text, err = qplan(capsys, "export", str(plan_file), "--to", "axolotl")
    assert rc == 0, err
    written = yaml.safe_load(text)
    assert written["plugins"] == [LIGER_PLUGIN] and written["liger_fused_linear_cross_entropy"] is True
    assert written["liger_rms_norm"] is True and written["liger_rope"] is True and "liger_glu_activation" not in written
    cfg = tmp_path / "axolotl.yml"
    cfg.write_text(text)
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(cfg), "--gpu", "a100-80gb", "--format", "json")
    assert rc == 0, err
    back, original = json.loads(out), json.loads(plan_file.read_text())
    assert back["training"]["loss"] == "liger" and back["training"]["liger_kernels"] == ["rms_norm", "rope"]
    assert back["prediction"]["memory"] == original["prediction"]["memory"]


@pytest.mark.parametrize("tool", ["trl", "llamafactory"])
@pytest.mark.parametrize("flags", [["--loss", "liger"], ["--liger-kernels", "rms_norm,swiglu"]])
def test_export_elsewhere_is_refused(capsys, tmp_path, tool, flags):
    plan_file = tmp_path / "plan.json"
    assert qplan(capsys, "estimate", "--model", "llama-3.2-1b", *flags, "--no-upcast",
                   "--output", str(plan_file))[0] == 0
    rc, out, err = qplan(capsys, "export", str(plan_file), "--to", tool)
    assert rc == 2 and out == ""
    one_line(err, "--to axolotl")


def test_fit_searches_with_the_files_liger_loss_and_kernels(capsys, tmp_path):
    f = _axolotl(tmp_path, plugins=[LIGER_PLUGIN], liger_fused_linear_cross_entropy=True, liger_rms_norm=True,
                 liger_glu_activation=True)
    rc, out, err = qplan(capsys, "fit", "--from-config", str(f), "--gpu", "a100-80gb", "--top", "3", "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["loss"] == "liger" and doc["liger_kernels"] == ["rms_norm", "swiglu"] and doc["best"]
    rc, out, err = qplan(capsys, "fit", "--model", "gemma-2-9b", "--gpu", "a100-80gb", "--liger-kernels", "swiglu")
    assert rc == 2
    one_line(err, "not SiLU-gated")


def test_trl_and_llamafactory_liger_switches_are_planned(capsys, tmp_path):
    """TRL 1.16's ``use_liger_kernel`` applies Liger's layer kernels only (its fused LM head stays the loss; each kernel
    switchable in ``liger_kernel_config``); LLaMA-Factory's ``enable_liger_kernel`` applies the patch's defaults for
    sft: the fused linear cross-entropy and RMSNorm, SwiGLU, RoPE."""
    trl = ROOT / "tests" / "fixtures" / "trainer_configs" / "trl-lora-smollm2-1.7b.yaml"
    cfg = yaml.safe_load(trl.read_text())
    f = tmp_path / "trl.yaml"
    f.write_text(yaml.safe_dump({**cfg, "use_liger_kernel": True, "liger_kernel_config": {"rope": False}}))
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(f), "--format", "json")
    assert rc == 0, err
    t = json.loads(out)["training"]
    assert t["loss"] == "trl" and t["liger_kernels"] == ["rms_norm", "swiglu"]
    f.write_text(yaml.safe_dump({**cfg, "use_liger_kernel": True, "liger_kernel_config": {"cross_entropy": True}}))
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(f))
    assert rc == 2
    one_line(err, "cross_entropy")
    lf = ROOT / "tests" / "fixtures" / "trainer_configs" / "llamafactory-qlora-qwen2.5-7b.yaml"
    g = tmp_path / "lf.yaml"
    g.write_text(yaml.safe_dump({**yaml.safe_load(lf.read_text()), "enable_liger_kernel": True}))
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(g), "--format", "json")
    assert rc == 0, err
    t = json.loads(out)["training"]
    assert t["loss"] == "liger" and t["liger_kernels"] == ["rms_norm", "swiglu", "rope"]
