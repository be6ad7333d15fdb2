"""The pages as a person sees them: real CPU runs, opened in headless Chromium.

Three real runs (the bundled smollm2-135m, and the tiny Llama with nf4 without checkpointing and
with bf16) are trained on the CPU; their report.html, the summary page of the three and the
accuracy-matrix page are loaded in Chromium and read back from the DOM it renders. Checked:
the verdict line comes first and states the numbers of measured.json / plan.json; each
composition bar adds up to the total it is compared with; the timeline and the scatter are
drawn. ``QPLAN_SCREENSHOTS=DIR`` also saves the screenshots the README shows.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from backend_helpers import build_plan, llama_spec, read_measured, write_plan
from qplan.backends.runner import run_plan

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package `chromium`); "
                                                           ".ci/run installs it"),
              pytest.mark.slow]  # its fixture: three real 4-step CPU runs, ~38 s


def chromium(url: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-dev-shm-usage", *args, url.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


class Dom(HTMLParser):
    """Elements (tag, attributes) in document order, and the text of each element with an id."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: dict[str, str] = {}
        self._open: list[str | None] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        self._open.append(a.get("id"))
        if a.get("id"):
            self.text[a["id"]] = ""

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for i in self._open:
            if i:
                self.text[i] += data

    def find(self, tag: str | None = None, **attrs: str | bool) -> list[dict[str, str]]:
        """Elements with these attributes (``class_`` is ``class``, ``data_x`` is ``data-x``): a
        string value must be one of the attribute's words; ``True``: the attribute is there."""
        want = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [a for t, a in self.elements if (tag is None or t == tag)
                and all(k in a and (v is True or v in a[k].split()) for k, v in want.items())]


def rendered(page: Path) -> tuple[str, Dom]:
    res = chromium(page, "--dump-dom")
    assert res.returncode == 0 and "<html" in res.stdout, res.stderr[-2000:]
    return res.stdout, Dom(res.stdout)


def screenshot(page: Path, name: str, size: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("QPLAN_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / name
    res = chromium(page, f"--window-size={size}", f"--screenshot={out}")
    assert out.is_file() and out.stat().st_size > 20_000, res.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from qplan.planner.api import plan_dict

    d = tmp_path_factory.mktemp("browser")
    plans = {
        "smollm2": plan_dict(model="smollm2-135m", quant="bf16", batch_size=2, seq_len=64),
        "tiny-nf4": build_plan(llama_spec(), quant="nf4", grad_ckpt=False),
        "tiny-bf16": build_plan(llama_spec(), quant="bf16", grad_ckpt=True),
    }
    out = {}
    for name, plan in plans.items():
        res = run_plan(write_plan(d / f"{name}.json", plan), random_init=True, steps=4, device="cpu",
                       out_dir=d / "runs")
        assert res["status"] == "ok", res["summary"]
        out[name] = Path(res["run_dir"])
    return out


def test_run_report_reads_verdict_first_and_its_bars_add_up(runs, tmp_path):
    for name, run in runs.items():
        doc = read_measured(run)
        plan = __import__("json").loads((run / "plan.json").read_text())
        text, dom = rendered(run / "report.html")
        # the verdict is the first thing after the title, with the numbers of the run's own files
        assert re.search(r"<h1>qplan run: [^<]+</h1>\s*<p class=\"verdict \w+\" id=\"verdict\"", text), name
        measured = doc["measured"]["memory"]["tensor_peak"]
        predicted = plan["prediction"]["memory_detail"]["tensor_peak_cpu"]
        v = dom.find("p", id="verdict")[0]
        assert int(v["data-measured"]) == measured and int(v["data-predicted"]) == predicted
        assert dom.text["verdict"].startswith(f"Tensor peak: measured {measured / 2**20:,.3f} MiB, "
                                              f"predicted {predicted / 2**20:,.3f} MiB: error ")
        # the composition: each bar's parts add up to its total, and the totals are the verdict's
        stacks = {a["data-stack"]: int(a["data-total"]) for a in dom.find("g", class_="stack")}
        parts = [a for a in dom.find("rect", class_="part")]
        assert len(parts) == 7 * len(stacks)
        sums: dict[str, int] = {}
        order = [a["data-stack"] for t, a in dom.elements if t == "g" and "stack" in a.get("class", "").split()]
        for i, key in enumerate(order):  # rects come in stack order, 7 categories each
            sums[key] = sum(int(p["data-bytes"]) for p in parts[7 * i:7 * (i + 1)])
        assert sums == stacks
        assert stacks["measured"] == measured
        assert (stacks.get("predicted_peak") or stacks["predicted"]) == predicted
        # the timeline: drawn, phases shaded, its peak is the measured peak
        tl = dom.find("svg", class_="timeline")
        assert tl and int(tl[0]["data-peak"]) == measured
        assert {a["data-phase"] for a in dom.find("rect", class_="phase")} == {"forward", "backward", "optimizer"}
        assert dom.find("circle", class_="peak") and dom.find("line", class_="predicted")
        # details are collapsed, the settings a table
        assert "<details><summary>Settings</summary><table" in text
        if name == "smollm2":
            screenshot(run / "report.html", "run-report.png", "1280,1900", tmp_path)


def test_summary_page_has_the_scatter_worst_first(runs, tmp_path):
    from qplan.backends.runs_summary import summarize

    res = summarize([str(p) for p in runs.values()], output=str(tmp_path / "summary"))
    page = Path(res["output"]) / "summary.html"
    text, dom = rendered(page)
    assert dom.text["verdict"].startswith("Tensor peak: ") and "measured runs within ±5%" in dom.text["verdict"]
    points = dom.find(class_="point")
    assert len(points) == 3
    want = {(int(r["terms"]["tensor_peak"]["predicted"]), int(r["terms"]["tensor_peak"]["measured"]))
            for r in res["runs"]}
    assert {(int(p["data-x"]), int(p["data-y"])) for p in points} == want
    assert dom.find("line", class_="identity") and dom.find("polygon", class_="band")
    errs = [float(a["data-err"]) for a in dom.find("tr", data_err=True)]
    assert len(errs) == 3 and errs == sorted(errs, reverse=True)  # worst first
    assert errs == pytest.approx(sorted(abs(r["terms"]["tensor_peak"]["error"]) for r in res["runs"])[::-1], abs=1e-8)
    screenshot(page, "summary.png", "1280,1150", tmp_path)


def test_accuracy_matrix_page(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import accuracy_scatter
    finally:
        sys.path.pop(0)
    files = accuracy_scatter.write(ROOT / "reports" / "accuracy" / "matrix.json", tmp_path)
    _, dom = rendered(files["html"])
    assert len(dom.find(class_="point")) == 480
    assert dom.text["verdict"].startswith("480 cases: 480 of 480 within ±5%")
    screenshot(files["html"], "accuracy.png", "1280,900", tmp_path)
