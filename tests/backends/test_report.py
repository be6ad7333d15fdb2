"""Comparison terms and reports, on run folders written by hand (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend_helpers import build_plan, llama_spec
from qplan.backends.compare import components, errors, pairs
from qplan.backends.report import summarize, write_run_report
from qplan.cli.main import main
from qplan.planner.errors import QPlanError

pytest.importorskip("matplotlib")


def _cpu_doc(plan):
    m = plan["prediction"]["memory"]
    return {
        "status": "ok", "backend": "peft",
        "measured": {
            "params": {"trainable": plan["prediction"]["params"]["trainable"], "all": 1},
            "memory": {"device": "cpu", "tensor_peak": int(plan["prediction"]["memory_detail"]["tensor_peak_cpu"] * 1.25),
                       "weights": m["weights"],
                       "weights_footprint": m["weights_footprint"] // 2,
                       "breakdown_at_peak": {"weights": 120, "activations": 300, "temporaries": 6,
                                             "logits": 0}},
            "loss": [2.0, 1.5], "adapter_file_bytes": plan["prediction"]["adapter_file_bytes"],
        },
    }


def _cuda_doc(plan):
    m = plan["prediction"]["memory"]
    return {
        "status": "ok", "backend": "peft",
        "measured": {
            "params": {"trainable": plan["prediction"]["params"]["trainable"] + 10},
            "memory": {"device": "cuda", "peak_allocated": m["tensor_peak"], "peak_reserved": m["tensor_peak"] + 1000,
                       "cuda_context": 499_000, "peak": m["tensor_peak"] + 500_000, "weights": m["weights"],
                       "weights_footprint": m["weights_footprint"]},
            "adapter_file_bytes": None,
        },
    }


def test_cpu_terms_and_signed_errors():
    plan = build_plan(llama_spec())
    e = errors(plan, _cpu_doc(plan))
    assert e["tensor_peak"] == pytest.approx(1 / 1.25 - 1, abs=1e-6)  # over-measured: negative error
    assert e["weights"] == 0.0 and e["weights_footprint"] == pytest.approx(1.0, abs=1e-5)
    assert e["trainable"] == 0.0 and e["adapter_file_bytes"] == 0.0
    assert e["peak"] is None  # the CPU has no reserved/context counters
    comp = {c["term"]: c["measured_at_peak"] for c in components(plan, _cpu_doc(plan))}
    assert comp["weights"] == 120 and comp["activations"] == 300 and comp["temporaries"] == 6


def test_cuda_terms_use_allocator_counters():
    plan = build_plan(llama_spec())
    p = pairs(plan, _cuda_doc(plan))
    assert p["tensor_peak"]["measured"] == plan["prediction"]["memory"]["tensor_peak"]
    assert p["tensor_peak"]["error"] == 0.0 and "max_memory_allocated" in p["tensor_peak"]["measured_as"]
    assert p["peak"]["measured"] == plan["prediction"]["memory"]["tensor_peak"] + 500_000
    assert p["peak"]["error"] is not None and "reserved" in p["peak"]["measured_as"]
    assert p["trainable"]["error"] < 0 and p["adapter_file_bytes"]["error"] is None


def _run_folder(root: Path, name: str, plan, doc) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "plan.json").write_text(json.dumps(plan))
    (d / "measured.json").write_text(json.dumps(doc))
    return d


def test_run_report_files(tmp_path):
    plan = build_plan(llama_spec())
    d = _run_folder(tmp_path, "r1", plan, _cpu_doc(plan))
    files = write_run_report(d, plan, _cpu_doc(plan))
    md = files["md"].read_text()
    assert "| tensor_peak |" in md and "-20.00%" in md
    assert "| weights | 0.814 MiB | 0.814 MiB | +0.00% |" in md
    html = files["html"].read_text()
    assert "data:image/png;base64," in html and "<h1>" in html


def test_summary_across_runs_in_a_new_folder(tmp_path, capsys, monkeypatch):
    cpu_plan, cuda_plan = build_plan(llama_spec()), build_plan(llama_spec(), quant="nf4", grad_ckpt=False)
    a = _run_folder(tmp_path / "runs", "a", cpu_plan, _cpu_doc(cpu_plan))
    b = _run_folder(tmp_path / "runs", "b", cuda_plan, _cuda_doc(cuda_plan))
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| a | tiny-llama | peft | bf16 | hf |" in out and "| b | tiny-llama | peft | nf4 | off |" in out
    assert "-20.00%" in out
    made = sorted((tmp_path / "reports").iterdir())
    assert len(made) == 1 and made[0].name.startswith("summary-")
    assert {p.name for p in made[0].iterdir()} == {"summary.md", "summary.html", "summary.json"}
    summary = json.loads((made[0] / "summary.json").read_text())
    assert [r["run"] for r in summary["runs"]] == ["a", "b"]
    assert "data:image/png;base64," in (made[0] / "summary.html").read_text()
    # an explicit --output that exists is refused; a second summary gets a new folder
    with pytest.raises(QPlanError, match="already exists"):
        summarize([str(a)], output=str(made[0]))
    summarize([str(a)])
    assert len(list((tmp_path / "reports").iterdir())) == 2


def test_summary_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["report", str(tmp_path / "x")]) == 2
    assert "has no plan.json" in capsys.readouterr().err
