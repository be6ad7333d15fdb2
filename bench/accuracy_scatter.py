"""Draw the committed accuracy matrix: analytic vs trace tensor peak, log-log, y = x, ±5% band.

Reads ``reports/accuracy/matrix.json`` (written by ``bench/accuracy.py``; this script does not
re-run the matrix) and writes ``scatter.svg`` and ``scatter.html`` (self-contained) beside it,
with the same chart function as ``qplan report`` (``qplan.backends.charts.scatter_svg``).

    python bench/accuracy_scatter.py                                  # reports/accuracy/
    python bench/accuracy_scatter.py --matrix /tmp/acc/matrix.json --out /tmp/acc
"""

from __future__ import annotations

import argparse
import html
import json
import statistics
from pathlib import Path

from qplan.backends.charts import scatter_svg
from qplan.backends.report import html_table, page

ROOT = Path(__file__).resolve().parents[1]


def points(cases: list[dict]) -> list[dict]:
    return [{"x": c["analytic_tensor_peak"], "y": c["trace_tensor_peak"], "color": c["model"], "marker": c["quant"],
             "label": f"{c['model']} {c['quant']} {c['b']}x{c['s']} ckpt {'on' if c['ckpt'] else 'off'} r={c['r']} "
                      f"{c['targets']} {c['optimizer']}"} for c in cases]


def write(matrix: Path, out: Path) -> dict[str, Path]:
    doc = json.loads(matrix.read_text(encoding="utf-8"))
    cases = doc["cases"]
    svg = scatter_svg(points(cases), "analytic tensor peak (qplan estimate, log)", "trace tensor peak (log)",
                      "model", "base weights", 0.05, names=("analytic", "trace"))
    errs = [abs(c["error"]) for c in cases]
    within = sum(1 for e in errs if e <= 0.05)
    worst = max(cases, key=lambda c: abs(c["error"]))
    head = (f"{len(cases)} cases: {within} of {len(cases)} within ±5%; median |error| {statistics.median(errs) * 100:.4f}%, "
            f"worst {worst['error'] * 100:+.4f}% ({worst['model']} {worst['quant']} {worst['b']}x{worst['s']} "
            f"ckpt {'on' if worst['ckpt'] else 'off'} r={worst['r']} {worst['targets']} {worst['optimizer']}).")
    rows = sorted(cases, key=lambda c: -abs(c["error"]))[:15]
    table = html_table(["model", "quant", "b×s", "ckpt", "r", "targets", "optimizer", "analytic", "trace", "error"],
                       [[c["model"], c["quant"], f"{c['b']}×{c['s']}", "on" if c["ckpt"] else "off", str(c["r"]),
                         c["targets"], c["optimizer"], f"{c['analytic_tensor_peak']:,}", f"{c['trace_tensor_peak']:,}",
                         f"{c['error'] * 100:+.4f}%"] for c in rows])
    e = html.escape
    body = (f"<h1>Accuracy: analytic training-memory model vs the exact trace</h1><p class='verdict ok' id='verdict'>"
            f"{e(head)}</p><p class='sub'>Each point is one plan of the matrix: the analytic tensor peak against the "
            f"live-tensor trace of two training steps of the full-size model on the meta device. Data: "
            f"{e(matrix.name)} (commit {e(str(doc.get('commit', '?'))[:12])}, {e(str(doc.get('generated', '?')))}).</p>"
            f"{svg}<h2>The 15 largest errors</h2>{table}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scatter.svg").write_text(svg + "\n", encoding="utf-8")
    (out / "scatter.html").write_text(page("qplan accuracy matrix", body), encoding="utf-8")
    return {"svg": out / "scatter.svg", "html": out / "scatter.html"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrix", type=Path, default=ROOT / "reports" / "accuracy" / "matrix.json")
    ap.add_argument("--out", type=Path, default=None, help="folder (default: the matrix's folder)")
    a = ap.parse_args(argv)
    files = write(a.matrix, a.out or a.matrix.parent)
    print(f"wrote {files['svg']} and {files['html']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
