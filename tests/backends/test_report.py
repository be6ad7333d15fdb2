"""Comparison terms and reports, on run folders written by hand (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend_helpers import build_plan, llama_spec
from qplan.backends.compare import components, composition_at_peak, errors, pairs
from qplan.backends.report import composition_stacks, write_run_report
from qplan.backends.runs_summary import summarize
from qplan.cli.main import main
from qplan.planner.errors import QPlanError


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
    # the verdict comes first, then the composition; every compared number is in the details
    assert md.index("Tensor peak: measured") < md.index("## What the bytes are") < md.index("## Details")
    assert "error -20.00%" in md and "| tensor_peak |" in md
    assert "| weights | 0.814 MiB | 0.814 MiB | +0.00% |" in md
    assert "No timeline: this run's measured.json has none" in md  # an old run: no timeline, said so
    html = files["html"].read_text()
    assert html.index("<h1>") < html.index("id='verdict'") < html.index("<svg") and "<details>" in html
    assert "data:image" not in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")  # self-contained
    assert (d / "composition.svg").is_file() and not (d / "timeline.svg").exists()


def _peak_doc(plan, phase, kernels="cpu"):
    """A CPU run whose peak was measured in ``phase``, with the bytes of the plan's moment (+1%)."""
    from qplan.planner.memory.phases import moment_in_phase

    detail = plan["prediction"]["memory_detail"]
    moment = moment_in_phase(detail["phases_cpu"], phase)
    measured = {k: int(v * 1.01) for k, v in detail["composition_cpu"][moment].items()}
    doc = _cpu_doc(plan)
    doc["measured"]["memory"].update({"tensor_peak": sum(measured.values()), "tensor_peak_phase": phase,
                                      "tensor_peak_step": 2, "breakdown_at_peak": {**measured, "optimizer_paged": 0}})
    return doc


def test_composition_is_the_same_moment_and_adds_up_to_the_verdict():
    plan = build_plan(llama_spec())
    detail = plan["prediction"]["memory_detail"]
    for phase in ("forward", "backward", "optimizer"):
        doc = _peak_doc(plan, phase)
        comp = composition_at_peak(plan, doc)
        stacks = {s["key"]: s for s in composition_stacks(comp)}
        assert stacks["measured"]["total"] == doc["measured"]["memory"]["tensor_peak"] == comp["compared"]["measured"]
        assert stacks["predicted"]["total"] == detail["phases_cpu"][comp["moment"]]
        # the bar that adds up to the verdict's predicted total is there whatever the moment
        peak_bar = stacks["predicted"] if comp["moment"] == detail["peak_phase_cpu"] else stacks["predicted_peak"]
        assert peak_bar["total"] == comp["compared"]["predicted"] == detail["tensor_peak_cpu"]
        assert ("predicted_peak" in stacks) == (comp["moment"] != detail["peak_phase_cpu"])


def test_cuda_run_composition_has_the_allocator_total_only():
    plan = build_plan(llama_spec())
    comp = composition_at_peak(plan, _cuda_doc(plan))
    stacks = {s["key"]: s for s in composition_stacks(comp)}
    assert comp["kernels"] == "cuda" and comp["moment"] == plan["prediction"]["memory_detail"]["peak_phase"]
    assert stacks["measured"]["parts"] is None and stacks["measured"]["total"] == plan["prediction"]["memory"]["tensor_peak"]
    assert stacks["predicted"]["total"] == plan["prediction"]["memory"]["tensor_peak"]


def test_an_old_plan_without_compositions_still_renders(tmp_path):
    plan = build_plan(llama_spec())
    for k in ("composition", "composition_cpu", "phases_cpu", "peak_phase_cpu"):
        del plan["prediction"]["memory_detail"][k]
    d = _run_folder(tmp_path, "old", plan, _cpu_doc(plan))
    files = write_run_report(d, plan, _cpu_doc(plan))
    assert "no breakdown in this plan" in files["html"].read_text()
    # an edited plan whose compositions are not numbers renders the same way (no traceback)
    plan = build_plan(llama_spec())
    plan["prediction"]["memory_detail"]["composition_cpu"] = {"backward": {"weights": "x"}}
    plan["prediction"]["memory_detail"]["phases_cpu"] = [1, 2]
    files = write_run_report(_run_folder(tmp_path, "edited", plan, _cpu_doc(plan)), plan, _cpu_doc(plan))
    assert "no breakdown in this plan" in files["html"].read_text()


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
    assert {p.name for p in made[0].iterdir()} == {"summary.md", "summary.html", "summary.json", "scatter.svg"}
    summary = json.loads((made[0] / "summary.json").read_text())
    assert [r["run"] for r in summary["runs"]] == ["a", "b"]  # worst |error| first: a is -20%, b exact
    page = (made[0] / "summary.html").read_text()
    assert "class='chart scatter'" in page and page.count("class='point'") == 2 + 1  # + the CUDA run's peak
    assert "What the GPU must have" in page
    assert "1 of 2 measured runs within ±5%" in page
    assert "href='../../runs/a/report.html'" in page  # links to each run's report, relative
    # an explicit --output that exists is refused; a second summary gets a new folder
    with pytest.raises(QPlanError, match="already exists"):
        summarize([str(a)], output=str(made[0]))
    summarize([str(a)])
    assert len(list((tmp_path / "reports").iterdir())) == 2


def test_summary_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["report", str(tmp_path / "x")]) == 2
    assert "has no plan.json" in capsys.readouterr().err


def test_summary_output_is_a_file_or_a_folder_by_its_name(tmp_path, capsys):
    plan = build_plan(llama_spec())
    a = _run_folder(tmp_path / "runs", "a", plan, _cpu_doc(plan))
    assert main(["report", str(a), "--output", str(tmp_path / "summary.html")]) == 0
    assert (tmp_path / "summary.html").is_file() and "class='chart scatter'" in (tmp_path / "summary.html").read_text()
    assert main(["report", str(a), "--output", str(tmp_path / "s.json"), "--format", "json"]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["runs"][0]["run"] == "a"
    capsys.readouterr()
    # never over an existing file: one line, exit 2, the file untouched
    (tmp_path / "mine.html").write_text("mine")
    assert main(["report", str(a), "--output", str(tmp_path / "mine.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and (tmp_path / "mine.html").read_text() == "mine"
    # any other name is a new folder
    assert main(["report", str(a), "--output", str(tmp_path / "sum")]) == 0
    assert (tmp_path / "sum" / "summary.html").is_file()
    assert main(["report", str(a), "--output", str(tmp_path / "sum")]) == 2
    assert "already exists" in capsys.readouterr().err
