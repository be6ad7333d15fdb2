"""``--loss cce``: Cut Cross Entropy as axolotl's CutCrossEntropyPlugin runs it (axolotl-ai-cloud/ml-cross-entropy
5f0c7a7). Its Triton kernels run on neither meta nor the CPU, so the oracle is the meta trace of the fork's step with
each kernel stood in by the tensors it allocates (``qplan.observe.trace.cce``): the loss's own bytes to within the
rows the plan rounds up, the whole step within 0.5% (what is left is in the decoder layers' backward and forward
moments, which the full logits used to hide)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from test_trainer_configs import one_line, qplan  # noqa: E402

from qplan.observe.summary import Curve  # noqa: E402
from qplan.observe.trace import trace_plan  # noqa: E402
from qplan.observe.trace.cce import apply_lce  # noqa: E402
from qplan.observe.tracker import LiveTensorTracker  # noqa: E402
from qplan.planner.api import plan_dict  # noqa: E402
from qplan.planner.memory.lin import most  # noqa: E402
from qplan.planner.memory.loss import cce_terms  # noqa: E402
from qplan.planner.memory.terms import dims  # noqa: E402
from qplan.planner.model.catalog import load_spec  # noqa: E402
from qplan.planner.model.weights import QuantSettings  # noqa: E402


@pytest.mark.parametrize(("model", "b", "s", "quant", "softcap"), [
    ("llama-3.2-1b", 2, 64, "nf4", False),     # fp32 hidden states (k-bit upcast): R = 4
    ("qwen2.5-0.5b", 1, 4096, "bf16", False),  # bf16 hidden states; 24 n > 16 n + 4 V at this length
    ("gemma-2-9b", 2, 32, "nf4", True),        # final_logit_softcapping: the softcapped target logits
])
def test_the_loss_bytes_are_the_stand_ins_allocations(model, b, s, quant, softcap):
    """The planned loss moments against the fork's step alone (hidden state and head as inputs): the end of the
    forward and the start of the backward, each above what existed before."""
    spec = load_spec(model)
    q = QuantSettings(quant, True, "bfloat16", True)
    d = dims(spec)
    assert d.final_softcap == softcap
    R = 4 if q.unquantized_dtype == "float32" else 2
    dtype = torch.float32 if R == 4 else torch.bfloat16
    e = torch.empty(b, s, d.h, device="meta", dtype=dtype, requires_grad=True)
    c = torch.empty(d.V, d.h, device="meta", dtype=dtype)
    labels = torch.empty(b, s, device="meta", dtype=torch.int64)
    items = torch.empty((), device="meta", dtype=torch.int64)
    tracker = LiveTensorTracker("meta")
    with tracker:
        for t in (e, c, labels, items):
            tracker.add_existing(t, "input")
        tracker.set_phase("forward", 1)
        loss = apply_lce(e, c, labels, softcap=30.0 if softcap else None, num_items_in_batch=items)
        tracker.set_phase("backward")
        loss.backward()
        del loss
        tracker.set_phase("end")
    tracker.detach()
    res = Curve(tracker).summarize(("forward", "backward"))
    base = res["baseline"]
    T = b * s
    terms = cce_terms(spec, q)
    fwd, bwd = most(terms["forward"], T, s), most(terms["backward"], T, s)
    # the plan counts the final hidden state in the backward (saved by the loss); here it is an input
    bwd -= R * d.h * T
    traced_fwd, traced_bwd = res["phase_peaks"]["forward"] - base, res["phase_peaks"]["backward"] - base
    # planned with n = T rows (the trace has B (s - 1)) and the locks rounded up per row: never under, at most
    # 28 B + T bytes (+ the loss's scalars) over
    assert 0 <= fwd - traced_fwd <= 28 * b + 64, (fwd, traced_fwd)
    assert 0 <= bwd - traced_bwd <= 28 * b + T + 64, (bwd, traced_bwd)


@pytest.mark.parametrize("kw", [
    dict(model="llama-3.2-1b", seq_len=512, batch_size=2),
    dict(model="llama-3.2-1b", seq_len=512, batch_size=2, grad_ckpt=False),
    dict(model="qwen2.5-0.5b", seq_len=1024, quant="bf16"),
    dict(model="llama-3.2-1b", seq_len=256, batch_size=2, quant="bf16", compute_dtype="fp32"),  # pure bf16
])
def test_a_cce_plan_is_its_traced_step(kw):
    """The whole step, analytic against the meta trace of the fork's forward: no T x V tensor is made, the peak
    moves into the decoder layers, and the plan stays within 0.5% of the trace."""
    plan = plan_dict(loss="cce", gpu="a100-80gb", **kw)
    assert plan["training"]["loss"] == "cce"
    full = plan_dict(gpu="a100-80gb", **kw)
    traced = trace_plan(plan, steps=2)
    a, t = plan["prediction"]["memory"]["tensor_peak"], traced["tensor_peak"]
    assert abs(a - t) <= 0.005 * t, (a, t, plan["prediction"]["memory_detail"]["peak_phase"])
    assert traced["breakdown_at_peak"]["logits"] == 0
    # what the loss saves, planned and traced: the same within the same 0.5%
    saved = full["prediction"]["memory"]["tensor_peak"] - a
    assert saved > 0 and abs(saved - (trace_plan(full, steps=2)["tensor_peak"] - t)) <= 0.005 * t


@pytest.mark.parametrize(("args", "needle"), [
    (["--gpu", "t4"], "needs an Ampere or newer GPU (bf16); t4 has none"),
    (["--backend", "unsloth"], "the unsloth backend computes its own fused cross-entropy"),
    (["--modules-to-save", "lm_head"], "reads lm_head.weight as it is"),
    (["--targets", "q_proj,lm_head"], "reads lm_head.weight as it is"),
    (["--gpus", "2", "--strategy", "fsdp", "--quant", "bf16"], "--strategy fsdp"),
    (["--loss", "chunked"], "--loss"),
])
def test_a_cce_plan_it_cannot_run_is_one_line(capsys, args, needle):
    rc, out, err = qplan(capsys, "estimate", "--model", "llama-3.2-1b", "--loss", "cce", *args)
    assert rc == 2 and out == ""
    one_line(err, needle)


def test_plan_json_says_the_loss_and_round_trips(capsys, tmp_path):
    out = tmp_path / "plan.json"
    rc, _, err = qplan(capsys, "estimate", "--model", "llama-3.2-1b", "--loss", "cce", "--gpu", "a100-80gb",
                         "--output", str(out))
    assert rc == 0, err
    plan = json.loads(out.read_text())
    assert plan["training"]["loss"] == "cce"
    rc, text, _ = qplan(capsys, "estimate", "--model", "llama-3.2-1b", "--gpu", "a100-80gb")
    assert rc == 0 and "tensor peak" in text and "Cut Cross Entropy" not in text
    rc, text, _ = qplan(capsys, "estimate", "--model", "llama-3.2-1b", "--loss", "cce", "--gpu", "a100-80gb")
    assert rc == 0 and "loss: Cut Cross Entropy" in text
    from qplan.planner.api import plan_settings

    assert plan_settings(plan)["loss"] == "cce"
    assert "loss" not in plan_dict(model="llama-3.2-1b")["training"]  # the full logits: plan.json as before


def test_fit_with_cce_trains_longer_sequences_than_with_the_full_logits():
    from qplan.planner.search.fit import fit_document

    full = fit_document({"model": "llama-3.2-3b", "gpu": "l4", "r": 16, "targets": "all-linear", "quant": "nf4",
                         "optimizer": "adamw_8bit", "batch_size": 1})
    cce = fit_document({"model": "llama-3.2-3b", "gpu": "l4", "r": 16, "targets": "all-linear", "quant": "nf4",
                        "optimizer": "adamw_8bit", "batch_size": 1, "loss": "cce"})
    assert cce["loss"] == "cce" and "loss" not in full
    assert max(r["seq_len"] for r in cce["best"]) > max(r["seq_len"] for r in full["best"])


def test_run_refuses_a_cce_plan_on_the_cpu(capsys, tmp_path):
    plan = tmp_path / "plan.json"
    assert qplan(capsys, "estimate", "--model", "smollm2-135m", "--loss", "cce", "--output", str(plan))[0] == 0
    rc, out, err = qplan(capsys, "run", str(plan), "--device", "cpu", "--random-init", "--out-dir", str(tmp_path / "runs"))
    assert rc == 2
    one_line(err, "cannot train on the CPU")


def test_export_to_axolotl_writes_the_plugin_and_reads_back_the_same_plan(capsys, tmp_path):
    plan_file, cfg = tmp_path / "plan.json", tmp_path / "axolotl.yml"
    assert qplan(capsys, "estimate", "--model", "llama-3.2-1b", "--loss", "cce", "--gpu", "a100-80gb",
                   "--output", str(plan_file))[0] == 0
    rc, text, err = qplan(capsys, "export", str(plan_file), "--to", "axolotl")
    assert rc == 0, err
    import yaml

    written = yaml.safe_load(text)
    assert written["plugins"] == ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"]
    assert written["cut_cross_entropy"] is True
    cfg.write_text(text)
    rc, out, err = qplan(capsys, "estimate", "--from-config", str(cfg), "--model", "llama-3.2-1b", "--gpu",
                           "a100-80gb", "--format", "json")
    assert rc == 0, err
    again, first = json.loads(out), json.loads(plan_file.read_text())
    assert again["training"]["loss"] == "cce"
    assert again["prediction"]["memory"]["tensor_peak"] == first["prediction"]["memory"]["tensor_peak"]
    for to in ("trl", "llamafactory"):
        rc, out, err = qplan(capsys, "export", str(plan_file), "--to", to)
        assert rc == 2
        one_line(err, "no Cut Cross Entropy option")
