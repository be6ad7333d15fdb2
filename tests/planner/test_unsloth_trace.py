"""Unsloth plans against the Unsloth mode of the trace: Unsloth's own GPU code path run on meta.

The oracle is ``qplan.observe.trace.unsloth_mode`` — Unsloth's decoder forwards, fast LoRA
autograd Functions, offloaded checkpointing (``UnslothCheckpointFunction``) and fused
cross-entropy executed on meta tensors in Unsloth's venv — never ``planner.memory.unsloth``'s own
formulas. It needs that venv (``QPLAN_UNSLOTH_PYTHON``, as tests/backends/test_unsloth_backend.py);
without it these tests skip. All cases run in one Unsloth process (~30 s).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import unsloth_missing

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "configs" / "llama-tied.json"


_SKIP = unsloth_missing()
pytestmark = [pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
              pytest.mark.slow]  # one Unsloth process of ~30 s, the CLI's own ~16 s

#: (quant, checkpointing, batch, seq): offloading on (layer inputs > 2 MiB), offloading asked for
#: below 512 tokens (Unsloth falls back to plain checkpointing), torch's checkpoint, none
CASES = [("nf4", "unsloth", 2, 2048), ("bf16", "unsloth", 1, 256), ("nf4", "hf", 2, 1024), ("bf16", "off", 2, 1024)]


def _config(tmp: Path) -> Path:
    """The tiny Llama fixture widened (meta tensors cost nothing) so that a layer input passes
    Unsloth's 2 MiB offload threshold at 2 x 2048 tokens, untied like the Llama-3 8B."""
    cfg = json.loads(FIXTURE.read_text())
    cfg.update(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
               head_dim=64, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096)
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _plan(path: Path, quant: str, ckpt: str, b: int, s: int) -> dict:
    from qplan.planner.api import plan_inputs
    from qplan.planner.plan import build_plan

    inp, warnings = plan_inputs(model=str(path), quant=quant, r=8, alpha=8.0, dropout=0.0, targets="all-linear",
                                optimizer="adamw_8bit", seq_len=s, batch_size=b, backend="unsloth",
                                grad_ckpt=ckpt != "off")
    inp = dataclasses.replace(inp, training=dataclasses.replace(inp.training, grad_ckpt=ckpt))
    return build_plan(inp, warnings).to_dict()


def _plans_and_traces(cases: list) -> tuple[list, list]:
    """The plans of ``cases`` ((config path, case) pairs) and their Unsloth traces, all in one Unsloth process."""
    from qplan.observe.trace.unsloth_run import run_unsloth_mode, trace_doc

    plans = [_plan(path, *c) for path, c in cases]
    return plans, run_unsloth_mode({"cases": [trace_doc(p) for p in plans]})


@pytest.fixture(scope="module")
def traced(traced_all):
    plans, results = traced_all
    return plans[:len(CASES)], results[:len(CASES)]


@pytest.mark.parametrize("i", range(len(CASES)), ids=["-".join(map(str, c)) for c in CASES])
def test_unsloth_plan_matches_unsloth_trace(traced, i):
    plans, results = traced
    plan, tr = plans[i], results[i]
    assert "error" not in tr, tr
    pred = plan["prediction"]
    peak = pred["memory"]["tensor_peak"]
    err = (peak - tr["tensor_peak"]) / tr["tensor_peak"]
    print(f"{CASES[i]}: plan {peak:,} ({pred['memory_detail']['peak_phase']}), trace {tr['tensor_peak']:,} "
          f"{tr['phase_peaks']} ({err:+.3%}); host plan {pred['host']['offloaded_checkpoints']:,}, "
          f"trace {tr['host_peak']:,}; {tr['notes']}")
    assert tr["trainable_params"] == pred["params"]["trainable"]
    assert abs(err) <= 0.01
    # pinned host memory of the offload: exactly what UnslothCheckpointFunction allocated
    assert pred["host"]["offloaded_checkpoints"] == tr["host_peak"]
    assert pred["memory_detail"]["phases"]["optimizer"] == pytest.approx(tr["phase_peaks"]["optimizer"], rel=1e-3)


#: Qwen2: q, k, v have base biases, so ``patch_peft_model`` leaves them on PEFT's forward
#: (``unsloth_memory.peft_qkv_saved_bytes``) while o and the MLP take the fast Functions
QWEN2_CASES = [("bf16", "off", 2, 1024), ("nf4", "hf", 2, 1024)]


@pytest.fixture(scope="module")
def traced_all(tmp_path_factory):
    """The Llama ``CASES`` and the Qwen2 ``QWEN2_CASES`` traced in one Unsloth process: Unsloth's
    import is most of a process's ~15 s, and the traces are the same as in one process per model
    (checked: every field but the ``seconds`` each case took)."""
    cfg = json.loads((FIXTURE.parent / "qwen2-bias.json").read_text())
    cfg.update(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
               vocab_size=32000, max_position_embeddings=4096)
    qwen2 = tmp_path_factory.mktemp("unsloth-qwen2") / "config.json"
    qwen2.write_text(json.dumps(cfg))
    llama = _config(tmp_path_factory.mktemp("unsloth-trace"))
    return _plans_and_traces([(llama, c) for c in CASES] + [(qwen2, c) for c in QWEN2_CASES])


@pytest.fixture(scope="module")
def traced_qwen2(traced_all):
    plans, results = traced_all
    return plans[len(CASES):], results[len(CASES):]


@pytest.mark.parametrize("i", range(len(QWEN2_CASES)), ids=["-".join(map(str, c)) for c in QWEN2_CASES])
def test_unsloth_plan_with_biased_qkv_matches_unsloth_trace(traced_qwen2, i):
    plans, results = traced_qwen2
    plan, tr = plans[i], results[i]
    assert "error" not in tr, tr
    peak = plan["prediction"]["memory"]["tensor_peak"]
    err = (peak - tr["tensor_peak"]) / tr["tensor_peak"]
    print(f"qwen2 {QWEN2_CASES[i]}: plan {peak:,} ({plan['prediction']['memory_detail']['peak_phase']}), "
          f"trace {tr['tensor_peak']:,} {tr['phase_peaks']} ({err:+.3%})")
    assert not any("approximate" in w for w in plan["warnings"])
    assert abs(err) <= 0.01


def test_offloading_is_what_unsloth_chose(traced):
    """Offloading only at >= 512 tokens and > 2 MiB per layer input (the trace says which mode ran)."""
    plans, results = traced
    modes = [r["notes"][-1] for r in results]
    assert modes == ["unsloth checkpointing in effect: 'unsloth'", "unsloth checkpointing in effect: True",
                     "unsloth checkpointing in effect: True", "unsloth checkpointing in effect: False"]
    assert results[0]["host_peak"] > 200 * 256 * 1024  # the pool and the offloaded layer inputs
    assert results[1]["host_peak"] == 0 and plans[1]["prediction"]["host"]["offloaded_checkpoints"] == 0


def test_estimate_method_trace_runs_unsloth(tmp_path):
    """`qplan estimate --backend unsloth --method trace` runs the Unsloth trace (not PEFT's)."""
    from click.testing import CliRunner

    from qplan.cli.main import cli

    path = _config(tmp_path)
    res = CliRunner().invoke(cli, ["estimate", "-m", str(path), "--backend", "unsloth", "--quant", "nf4", "--r", "8",
                                   "--dropout", "0", "--seq-len", "2048", "--batch-size", "2", "--optimizer",
                                   "adamw_8bit", "--method", "trace", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    tr = doc["prediction"]["trace"]
    assert doc["prediction"]["method"] == "trace"
    assert tr["host_peak"] == doc["prediction"]["host"]["offloaded_checkpoints"] > 0
    assert any("Unsloth trace" in n for n in tr["notes"])
