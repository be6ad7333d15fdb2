"""``qplan report``: the summary of many runs — predicted vs measured, worst cases first.

The page: a verdict line (how many runs within ±5%, the worst), the log-log scatter of
predicted vs measured tensor peak (``y = x`` line, ±5% band, colored by backend, marker by
quantization), and a table sorted by |error| (click a header to sort by another column).

``--output``: a name ending in ``.html``, ``.md`` or ``.json`` is one file of that format
(never over an existing file); any other name is a new folder holding summary.html,
summary.md and summary.json (never an existing one). Without it: a new folder
``reports/summary-<UTC time>``. Nothing here imports torch.
"""

from __future__ import annotations

import html
import json
import os
import statistics
from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError

from .charts import scatter_svg
from .compare import pairs
from .report import TOLERANCE, _table, fmt_bytes, fmt_err, free_name, html_table, page, read_run, utc_stamp

SUMMARY_TERMS = ("tensor_peak", "peak", "weights", "weights_footprint", "trainable", "adapter_file_bytes", "step_seconds")
FILE_KINDS = (".html", ".md", ".json")


def collect(run_dirs: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per readable run folder, worst |tensor peak error| first; the skipped folders."""
    if not run_dirs:
        raise QPlanError("give one or more run folders (reports/runs/...)")
    runs, skipped = [], []
    for d in run_dirs:
        try:
            plan, doc = read_run(d)
        except QPlanError as exc:  # a bad folder is skipped with a warning; the good ones are reported
            skipped.append(f"skipped {d}: {exc}")
            continue
        prs = pairs(plan, doc)
        mem = (doc.get("measured") or {}).get("memory") or {}
        runs.append({
            "run": Path(d).name, "path": str(d), "model": plan["model"]["name"], "backend": str(doc.get("backend")),
            "quant": plan["quant"]["quant"], "grad_ckpt": plan["training"]["grad_ckpt"],
            "batch_x_seq": f"{plan['training']['batch_size']}x{plan['training']['seq_len']}",
            "device": mem.get("device"), "status": doc.get("status"),
            "terms": {k: prs[k] for k in SUMMARY_TERMS},
        })
    if not runs:
        raise QPlanError(f"no readable run folder among {len(run_dirs)}: " + "; ".join(skipped)[:400])
    runs.sort(key=lambda r: -abs(r["terms"]["tensor_peak"]["error"]) if r["terms"]["tensor_peak"]["error"] is not None
              else 1.0)
    return runs, skipped


def headline(runs: list[dict[str, Any]]) -> str:
    errs = [(abs(r["terms"]["tensor_peak"]["error"]), r) for r in runs if r["terms"]["tensor_peak"]["error"] is not None]
    if not errs:
        return f"{len(runs)} run(s), none with a measured tensor peak."
    within = sum(1 for e, _ in errs if e <= TOLERANCE)
    median = statistics.median(e for e, _ in errs)
    _, worst = max(errs, key=lambda x: x[0])
    return (f"Tensor peak: {within} of {len(errs)} measured runs within ±{TOLERANCE * 100:g}% of the prediction; "
            f"median |error| {median * 100:.2f}%, worst {fmt_err(worst['terms']['tensor_peak']['error'])} "
            f"({worst['run']}).")


def scatter_points(runs: list[dict[str, Any]], term: str = "tensor_peak") -> list[dict[str, Any]]:
    """One point per run with ``term`` measured (``peak``: CUDA runs only)."""
    return [{"x": r["terms"][term]["predicted"], "y": r["terms"][term]["measured"],
             "color": r["backend"] + (f" · {r['device']}" if r["device"] else ""), "marker": r["quant"],
             "label": f"{r['run']} ({r['model']}, {r['quant']}, ckpt {r['grad_ckpt']}, {r['batch_x_seq']})"}
            for r in runs if r["terms"][term]["measured"] is not None and r["terms"][term]["predicted"] is not None]


def peak_scatter(runs: list[dict[str, Any]]) -> str | None:
    """GPU runs: what the GPU must have (allocator reserve + CUDA context) against ``peak``."""
    pts = scatter_points(runs, "peak")
    if not pts:
        return None
    return scatter_svg(pts, "predicted peak, tensors + context + slack (log)",
                       "measured max_memory_reserved + CUDA context (log)", "backend · device", "quantization", TOLERANCE)


def _row(r: dict[str, Any]) -> list[str]:
    tp = r["terms"]["tensor_peak"]
    return [r["run"], r["model"], r["backend"], r["quant"], r["grad_ckpt"], r["batch_x_seq"], str(r["device"]),
            str(r["status"]), fmt_bytes(tp["predicted"]), fmt_bytes(tp["measured"])] + \
        [fmt_err(r["terms"][k]["error"]) for k in SUMMARY_TERMS]


HEADERS = ["run", "model", "backend", "quant", "ckpt", "b×s", "device", "status",
           "tensor peak pred", "tensor peak meas"] + [f"err {k}" for k in SUMMARY_TERMS]

SORT_JS = """<script>
document.querySelectorAll('table.sortable').forEach(function (t) {
  t.querySelectorAll('th').forEach(function (th, i) {
    th.classList.add('sort');
    th.addEventListener('click', function () {
      var rows = Array.from(t.tBodies[0].rows), asc = th.dataset.dir !== 'asc';
      var key = function (r) { var c = r.cells[i], v = c.dataset.v; return v !== undefined ? parseFloat(v) : c.textContent; };
      rows.sort(function (a, b) { var x = key(a), y = key(b);
        var d = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
        return asc ? d : -d; });
      th.dataset.dir = asc ? 'asc' : 'desc';
      rows.forEach(function (r) { t.tBodies[0].appendChild(r); });
    });
  });
});
</script>"""


def summary_markdown(runs: list[dict[str, Any]], scatter_file: str | None = None) -> str:
    lines = [f"# qplan summary of {len(runs)} run(s)", "", f"**{headline(runs)}**", ""]
    if scatter_file:
        lines += [f"![predicted vs measured tensor peak]({scatter_file})", ""]
    lines += ["Worst first. error = (predicted − measured) / measured; — = not measured.", "",
              _table(HEADERS, [_row(r) for r in runs])]
    return "\n".join(lines) + "\n"


def summary_html(runs: list[dict[str, Any]], out_dir: Path | None = None) -> str:
    """The page; ``out_dir``: where it is written (for relative links to each run's report)."""
    e = html.escape
    svg = scatter_svg(scatter_points(runs), "predicted tensor peak (log)", "measured tensor peak (log)",
                      "backend · device", "quantization", TOLERANCE)
    rows = []
    for r in runs:
        cells = _row(r)
        link = Path(r["path"]) / "report.html"
        href = os.path.relpath(link.resolve(), out_dir.resolve()) if out_dir is not None else str(link)
        tds = [f"<td><a href='{e(href)}'>{e(cells[0])}</a></td>"]
        for h, c in zip(HEADERS[1:], cells[1:], strict=True):
            v = None
            if h.startswith("err "):
                err = r["terms"][h[4:]]["error"]
                v = "" if err is None else f"{abs(err):.9f}"
            elif h.startswith("tensor peak"):
                b = r["terms"]["tensor_peak"]["predicted" if h.endswith("pred") else "measured"]
                v = "" if b is None else str(b)
            tds.append(f"<td data-v='{v}'>{e(c)}</td>" if v else f"<td>{e(c)}</td>")
        err = r["terms"]["tensor_peak"]["error"]
        rows.append((f"<tr data-err='{abs(err):.9f}'>" if err is not None else "<tr>") + "".join(tds) + "</tr>")
    head = "".join(f"<th>{e(h)}</th>" for h in HEADERS)
    gpu_svg = peak_scatter(runs)
    gpu = ("<h2>What the GPU must have</h2><p class='caption'>CUDA runs: the plan's peak (tensor peak + CUDA context "
           "+ allocator slack) against max_memory_reserved + the measured CUDA context.</p>" + gpu_svg) if gpu_svg else ""
    errs = [r["terms"]["tensor_peak"]["error"] for r in runs]
    kind = "ok" if errs and all(x is not None and abs(x) <= TOLERANCE for x in errs) else "off"
    body = (f"<h1>qplan summary of {len(runs)} run(s)</h1><p class='verdict {kind}' id='verdict'>{e(headline(runs))}</p>"
            "<p class='sub'>Each point is one run: the plan's predicted tensor peak (for the kernels the run used) "
            "against the measured one; on the line the prediction is exact, in the green band within ±5%.</p>"
            f"{svg}{gpu}<h2>Runs, worst first</h2><p class='caption'>Sorted by |tensor peak error|; click a header to "
            "sort by it (errors sort by their size). error = (predicted − measured) / measured; — = not measured.</p>"
            f"<div class='wide'><table class='sortable runs'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}"
            "</tbody></table></div>")
    return page("qplan summary", body, SORT_JS)


def summarize(run_dirs: list[str], output: str | None = None) -> dict[str, Any]:
    """Summary across run folders (see the module docstring for ``output``). The destination is checked
    before any folder is read; a folder of outputs appears whole or not at all (``files.StagedFolder``)."""
    from qplan.planner.files import (
        StagedFolder,
        check_new_folder,
        check_output_file,
        nearest_folder,
        probe_writable,
        safe_exists,
        write_new_file,
    )

    kind = Path(output).suffix.lower() if output else None
    if output and kind in FILE_KINDS:
        check_output_file(output, force=False)
    elif output:
        if safe_exists(output):
            raise QPlanError(f"{output} already exists: choose another --output (a new folder, or a file "
                             f"name ending in {', '.join(FILE_KINDS)})")
        check_new_folder(output, "--output")
    else:
        probe_writable(nearest_folder(Path("reports")), "qplan report (the default folder reports/)")
    runs, skipped = collect(run_dirs)
    md = summary_markdown(runs)
    doc = json.dumps({"runs": runs}, indent=2) + "\n"
    if output and kind in FILE_KINDS:
        out = Path(output)
        text = {".html": lambda: summary_html(runs, out.parent), ".md": lambda: md, ".json": lambda: doc}[kind]()
        write_new_file(out, text, force=False)
        files = [out]
    else:
        name = f"summary-{utc_stamp()}"
        out = Path(output) if output else free_name(Path("reports"), name)
        svg = scatter_svg(scatter_points(runs), "predicted tensor peak (log)", "measured tensor peak (log)",
                          "backend · device", "quantization", TOLERANCE)
        # the default folder takes the next free name if another report took this one meanwhile; --output does not
        staged = StagedFolder(out, "--output", free=None if output else lambda: free_name(Path("reports"), name))
        with staged as stage:
            (stage / "scatter.svg").write_text(svg + "\n", encoding="utf-8")
            (stage / "summary.md").write_text(summary_markdown(runs, "scatter.svg"), encoding="utf-8")
            (stage / "summary.html").write_text(summary_html(runs, out), encoding="utf-8")
            (stage / "summary.json").write_text(doc, encoding="utf-8")
        out = staged.final
        files = [out / n for n in ("summary.html", "summary.md", "summary.json", "scatter.svg")]
    where = ", ".join(str(f) for f in files)
    return {"output": str(out), "files": [str(f) for f in files], "runs": runs, "skipped": skipped,
            "summary": md + f"\nwritten: {where}"}


__all__ = ["summarize", "collect", "headline", "scatter_points", "summary_html", "summary_markdown", "html_table"]
