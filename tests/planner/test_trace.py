"""qplan.observe.trace: the meta-device trace against the same step really run on the CPU.

The oracle (``device="cpu"``) builds the tiny model with real random weights, quantizes it with the
real bitsandbytes CPU path (``from_pretrained(..., quantization_config=...)``), trains one or two real
steps and tracks live tensors with the same tracker.  The meta trace is run with
``kernels="cpu"`` (CPU autocast lists, the CPU flash-attention kernel: what the oracle runs), so the
two must agree; they agree to the byte on the pinned versions, and the tests allow the 1% the
planner needs.  Both runs route bitsandbytes' kernels through the same CUDA-faithful stand-ins
(see the module docstring); the oracle computes real values through them and really runs
everything else (transformers, PEFT, autograd, checkpointing, torch/bitsandbytes optimizers).

Subset (family x quant x gradient checkpointing x optimizer), chosen so every family meets every
quant kind somewhere and the file stays well under 90 s on a 2-core CPU:

  llama (GQA, tied)          nf4+dq/gc/adamw_torch(+upcast), nf4/no-gc/adamw_8bit, int8/gc/adamw_torch,
                             bf16/no-gc/adamw_8bit, fp32/gc/adamw_torch
  qwen2 (qkv bias)           nf4+dq/no-gc/adamw_torch, int8/no-gc/adamw_8bit, bf16/gc/adamw_torch,
                             fp32/no-gc/adamw_8bit
  gemma2 (eager, softcap,    nf4+dq/gc/adamw_8bit(+upcast), bf16/no-gc/adamw_torch, int8/gc/adamw_torch
   sliding window, tied)
  gpt2 (Conv1D, LayerNorm,   nf4+dq/no-gc/adamw_torch, int8/gc/adamw_8bit, fp32/no-gc/adamw_torch
   attention dropout)
  phi3 (fused qkv/gate_up)   nf4+dq/gc/adamw_torch(+upcast), bf16/no-gc/adamw_8bit, int8/no-gc/adamw_torch
  qwen2_moe (MoE+shared)     bf16/gc/adamw_torch, nf4+dq/no-gc/adamw_8bit
  mixtral (MoE)              nf4+dq/gc/adamw_torch(+upcast)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from qplan.observe.trace import trace_training_step
from qplan.observe.trace.autocast import CPU_AUTOCAST, CUDA_AUTOCAST, CUDA_AUTOCAST_EXTRA
from qplan.planner.vocab import CATEGORIES

B, S = 2, 48

FAMILIES = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                  tie_word_embeddings=True, max_position_embeddings=256),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                  tie_word_embeddings=False, max_position_embeddings=256),
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000,
                   sliding_window=16, max_position_embeddings=256),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=256),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                 max_position_embeddings=256, pad_token_id=0),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=160,
                      moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                      num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_local_experts=4,
                    num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256),
}
ATTN = {"gemma2": "eager"}  # gemma2's softcapping is not available with sdpa in transformers
# PEFT targets mixtral's fused expert tensors with ParamWrapper, which refuses lora_dropout != 0
DROPOUT = {"mixtral": 0.0}

LORA = dict(r=8, alpha=16, dropout=0.05, target_modules="all-linear", bias="none", use_dora=False,
            use_rslora=False, modules_to_save=None)

# (family, quant, grad_ckpt, optimizer, upcast_kbit)
CASES = [
    ("llama", "nf4", True, "adamw_torch", True),
    ("llama", "nf4", False, "adamw_8bit", False),
    ("llama", "int8", True, "adamw_torch", False),
    ("llama", "bf16", False, "adamw_8bit", False),
    ("llama", "fp32", True, "adamw_torch", False),
    ("qwen2", "nf4", False, "adamw_torch", False),
    ("qwen2", "int8", False, "adamw_8bit", False),
    ("qwen2", "bf16", True, "adamw_torch", False),
    ("qwen2", "fp32", False, "adamw_8bit", False),
    ("gemma2", "nf4", True, "adamw_8bit", True),
    ("gemma2", "bf16", False, "adamw_torch", False),
    ("gemma2", "int8", True, "adamw_torch", False),
    ("gpt2", "nf4", False, "adamw_torch", False),
    ("gpt2", "int8", True, "adamw_8bit", False),
    ("gpt2", "fp32", False, "adamw_torch", False),
    ("phi3", "nf4", True, "adamw_torch", True),
    ("phi3", "bf16", False, "adamw_8bit", False),
    ("phi3", "int8", False, "adamw_torch", False),
    ("qwen2_moe", "bf16", True, "adamw_torch", False),
    ("qwen2_moe", "nf4", False, "adamw_8bit", False),
    ("mixtral", "nf4", True, "adamw_torch", True),
]


def _pair(config, **kw):
    base = dict(double_quant=True, compute_dtype="bf16", upcast_kbit=False, lora=LORA,
                batch_size=B, seq_len=S, grad_ckpt=False, optimizer="adamw_torch", seed=0)
    base.update(kw)
    if base["quant"] == "fp32":
        base["compute_dtype"] = "fp32"
    cpu = trace_training_step(config, device="cpu", **base)
    meta = trace_training_step(config, device="meta", kernels="cpu", **base)
    return cpu, meta


def _rel(a, b):
    return abs(a - b) / max(b, 1)


def _check_schema(r, steps=1):
    assert isinstance(r["tensor_peak"], int) and r["tensor_peak"] > 0
    assert set(r["breakdown_at_peak"]) == set(CATEGORIES)
    assert all(isinstance(v, int) and v >= 0 for v in r["breakdown_at_peak"].values())
    paged = r["breakdown_at_peak"]["optimizer_paged"]
    assert sum(r["breakdown_at_peak"].values()) - paged == r["tensor_peak"]
    assert len(r["per_step_peak"]) == steps and max(r["per_step_peak"]) == r["tensor_peak"]
    assert set(r["phase_peaks"]) == {"forward", "backward", "optimizer"}
    assert max(r["phase_peaks"].values()) == r["tensor_peak"]
    assert 0 < r["baseline"] <= r["tensor_peak"]
    assert r["trainable_params"] > 0 and r["all_params"] > r["trainable_params"]


@pytest.mark.parametrize(
    "family,quant,grad_ckpt,optimizer,upcast",
    CASES,
    ids=[f"{f}-{q}-{'gc' if g else 'nogc'}-{o}{'-upcast' if u else ''}" for f, q, g, o, u in CASES],
)
def test_meta_matches_cpu_oracle(family, quant, grad_ckpt, optimizer, upcast):
    cpu, meta = _pair(FAMILIES[family], quant=quant, grad_ckpt=grad_ckpt, optimizer=optimizer,
                      upcast_kbit=upcast, attn_impl=ATTN.get(family, "sdpa"),
                      lora=dict(LORA, dropout=DROPOUT.get(family, LORA["dropout"])))
    _check_schema(cpu)
    _check_schema(meta)
    # what exists before the step (weights, quant states, adapters, batch) is structural: exact
    assert meta["baseline"] == cpu["baseline"]
    err = _rel(meta["tensor_peak"], cpu["tensor_peak"])
    assert err <= 0.01, (meta["tensor_peak"], cpu["tensor_peak"], meta["breakdown_at_peak"],
                         cpu["breakdown_at_peak"])
    for phase, v in cpu["phase_peaks"].items():
        assert _rel(meta["phase_peaks"][phase], v) <= 0.01, phase
    for cat in CATEGORIES:
        diff = abs(meta["breakdown_at_peak"][cat] - cpu["breakdown_at_peak"][cat])
        assert diff <= 0.01 * cpu["tensor_peak"], cat
    assert meta["trainable_params"] == cpu["trainable_params"]
    assert meta["all_params"] == cpu["all_params"]


@pytest.mark.parametrize("family,quant", [("llama", "nf4"), ("llama", "int8"), ("qwen2_moe", "bf16")])
def test_reentrant_checkpointing_meta_matches_cpu_oracle(family, quant):
    """torch's reentrant ``CheckpointFunction`` (axolotl's and LLaMA-Factory's default) runs on meta as on the
    CPU: the same peak, phases and categories to the byte; and it is not the non-reentrant step (int8: no
    per-layer retained state, the checkpointed forward runs under no_grad)."""
    config = dict(FAMILIES[family], vocab_size=32)
    cpu, meta = _pair(config, quant=quant, grad_ckpt=True, reentrant=True)
    assert meta["tensor_peak"] == cpu["tensor_peak"]
    assert meta["phase_peaks"] == cpu["phase_peaks"]
    assert meta["breakdown_at_peak"] == cpu["breakdown_at_peak"]
    if family == "llama":  # (the MoE step's peak is outside the layers' backward)
        plain = trace_training_step(config, device="meta", kernels="cpu", **dict(
            double_quant=True, compute_dtype="bf16", upcast_kbit=False, lora=LORA, batch_size=B, seq_len=S,
            grad_ckpt=True, optimizer="adamw_torch", seed=0, quant=quant))
        assert plain["tensor_peak"] != meta["tensor_peak"]


def test_pure_bf16_step_meta_matches_cpu_oracle():
    """bf16 weights without autocast (``compute_dtype`` fp32 on a 16-bit load: PEFT's benchmark harness): the meta
    trace equals the real CPU step to the byte."""
    config = dict(FAMILIES["llama"], vocab_size=32)
    base = dict(quant="bf16", double_quant=False, compute_dtype="fp32", upcast_kbit=False, lora=LORA, batch_size=B,
                seq_len=S, grad_ckpt=True, optimizer="adamw_torch", seed=0)
    cpu = trace_training_step(config, device="cpu", **base)
    meta = trace_training_step(config, device="meta", kernels="cpu", **base)
    assert (meta["tensor_peak"], meta["breakdown_at_peak"]) == (cpu["tensor_peak"], cpu["breakdown_at_peak"])


def test_lora_variants_paged_optimizer_two_steps():
    """DoRA + bias + modules_to_save on a k-bit upcast model with a paged 8-bit optimizer over two
    steps: the lm_head copy (2048 x 64 >= 1e5 elements) gets paged optimizer state."""
    cfg = dict(FAMILIES["llama"], vocab_size=2048, tie_word_embeddings=False)
    lora = dict(LORA, use_dora=True, bias="lora_only", target_modules=["q_proj", "v_proj", "down_proj"],
                modules_to_save=["lm_head"], use_rslora=True)
    cpu, meta = _pair(cfg, quant="nf4", upcast_kbit=True, grad_ckpt=True, optimizer="paged_adamw_8bit",
                      lora=lora, steps=2)
    _check_schema(cpu, steps=2)
    _check_schema(meta, steps=2)
    assert meta["per_step_peak"] == cpu["per_step_peak"]
    assert _rel(meta["tensor_peak"], cpu["tensor_peak"]) <= 0.01
    # step 2 carries the optimizer state made in step 1
    assert meta["per_step_peak"][1] > meta["per_step_peak"][0]
    # the paged state (made in step 1) is alive at step 2's peak, reported outside tensor_peak
    paged = meta["breakdown_at_peak"]["optimizer_paged"]
    assert paged == cpu["breakdown_at_peak"]["optimizer_paged"] == 2 * 2048 * 64  # uint8 state1+2
    assert any("optimizer_paged" in n for n in meta["notes"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_kernels_trace_runs(family):
    """kernels="cuda" (the default on meta) takes other code paths: CUDA autocast lists, flash /
    memory-efficient attention, `torch.is_autocast_enabled()` True inside PEFT's bnb layers."""
    r = trace_training_step(FAMILIES[family], quant="nf4", double_quant=True, compute_dtype="bf16",
                            upcast_kbit=True, lora=dict(LORA, dropout=DROPOUT.get(family, LORA["dropout"])),
                            batch_size=B, seq_len=S, grad_ckpt=True, optimizer="adamw_torch",
                            attn_impl=ATTN.get(family, "sdpa"))
    _check_schema(r)


def _llama8b():
    return dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=500000.0)


def test_llama3_8b_nf4_on_meta():
    cfg = _llama8b()
    r = trace_training_step(cfg, quant="nf4", double_quant=True, compute_dtype="bf16",
                            upcast_kbit=True, lora=dict(LORA, r=16, alpha=32), batch_size=1,
                            seq_len=512, grad_ckpt=True, optimizer="paged_adamw_8bit")
    _check_schema(r)
    h, i, kv = 4096, 14336, 8 * 128
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i  # q,o + k,v + gate,up,down
    packed = 32 * per_layer // 2  # uint8 holds two 4-bit values
    assert r["breakdown_at_peak"]["weights"] > packed
    assert r["tensor_peak"] > packed
    # LoRA r=16 on the 7 projections of 32 layers
    assert r["trainable_params"] == 32 * 16 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)


def test_import_is_light():
    code = ("import sys, qplan.observe.trace, qplan.observe.tracker, qplan.observe.summary, qplan.hf; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cuda_autocast_tables_match_installed_torch():
    """CUDA_AUTOCAST is a copy of the AT_FORALL_* lists of ATen/autocast_mode.h; check it against
    the header shipped with the installed torch."""
    import torch

    header = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
    if not header.exists():
        pytest.skip("torch headers not installed")
    text = header.read_text()

    def macro(name):
        m = re.search(rf"#define {name}\(_\)(.*?)\n\n", text, re.S)
        assert m, name
        return {n for n in re.findall(r"_\((?:ADD_NS\()?(\w+)", m.group(1))}

    assert macro("AT_FORALL_LOWER_PRECISION_FP") == set(CUDA_AUTOCAST["lower"])
    assert macro("AT_FORALL_FP32") == set(CUDA_AUTOCAST["fp32"])
    assert macro("AT_FORALL_FP32_SET_OPT_DTYPE") == set(CUDA_AUTOCAST["fp32_set_opt_dtype"])
    assert macro("AT_FORALL_PROMOTE") == set(CUDA_AUTOCAST["promote"])
    assert macro("AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE") == set(CUDA_AUTOCAST["fp32_append_dtype"])


def test_autocast_tables_cover_the_registered_autocast_kernels():
    """Every aten op with an AutocastCPU / AutocastCUDA kernel in the installed torch (the CUDA
    registrations are compiled into CPU builds too) is in the emulation's tables, and no other."""
    import torch

    def registered(key):
        out = set()
        for name in torch._C._dispatch_get_all_op_names():
            if not name.startswith("aten::"):
                continue
            for line in torch._C._dispatch_dump(name).splitlines():
                if line.startswith(key + ":") and "fallthrough" not in line:
                    out.add(name.split("::")[1].split(".")[0])
        return out

    def names(*tables):
        return {n for t in tables for v in t.values() for n in v}

    assert registered("AutocastCPU") == names(CPU_AUTOCAST)
    assert registered("AutocastCUDA") == names(CUDA_AUTOCAST, CUDA_AUTOCAST_EXTRA)


def test_cuda_autocast_emulation_policies():
    """On meta, ops follow CUDA autocast: matmuls in bf16 (fp32 weight leaves that require grad are
    cast once and cached), layer_norm / exp / pow in fp32, softmax and sum in fp32 through their
    dtype argument, torch.autocast(enabled=False) regions untouched."""
    import torch
    import torch.nn.functional as F

    from qplan.observe.trace.autocast import AmpContext as _AmpContext
    from qplan.observe.trace.autocast import meta_function_mode_cls as _meta_function_mode_cls

    tables = dict(CUDA_AUTOCAST, lower=CUDA_AUTOCAST["lower"] + CUDA_AUTOCAST_EXTRA["lower"])
    mode = _meta_function_mode_cls()("cuda", tables, "cuda")
    x = torch.empty(4, 8, device="meta", dtype=torch.bfloat16)
    w = torch.nn.Parameter(torch.empty(8, 8, device="meta"))  # fp32 leaf, requires grad
    prev = torch.is_autocast_enabled("cuda")
    with mode, _AmpContext("cuda", torch.bfloat16):
        assert torch.is_autocast_enabled()  # what PEFT's bnb LoRA layers ask
        y1, y2 = F.linear(x, w), x @ w.t()
        assert y1.dtype == y2.dtype == torch.bfloat16
        assert len(mode.cache) == 1  # the cast of `w` was reused
        assert F.layer_norm(x, (8,)).dtype == torch.float32
        assert torch.exp(x).dtype == torch.float32 and x.pow(2).dtype == torch.float32
        assert torch.softmax(x, -1).dtype == torch.float32 and x.sum().dtype == torch.float32
        assert torch.softmax(x, -1, dtype=torch.bfloat16).dtype == torch.bfloat16
        assert torch.tanh(x).dtype == torch.bfloat16  # not in any list
        with _AmpContext("cuda", enabled=False):
            assert F.linear(x.float(), w).dtype == torch.float32
    assert not mode.cache  # dropped when the outermost autocast exits
    assert torch.is_autocast_enabled("cuda") == prev
