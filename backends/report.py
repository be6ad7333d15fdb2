"""Reports: one run (report.md, report.html) and a summary across runs (``qplan report``).

The HTML pages are self-contained: matplotlib (Agg backend, no display) draws the charts into
PNGs embedded as base64. Nothing here imports torch.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError

from .compare import components, pairs

MiB = 2**20


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "—"
    return f"{n / MiB:,.3f} MiB" if abs(n) >= 0.01 * MiB else f"{int(n):,} B"


def fmt_err(e: float | None) -> str:
    return "—" if e is None else f"{e * 100:+.2f}%"


def fmt_value(term: str, v: Any) -> str:
    if v is None:
        return "—"
    if term == "step_seconds":
        return f"{v:.3g} s"
    return f"{v:,}" if term == "trainable" else fmt_bytes(v)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise QPlanError("reports need matplotlib: pip install 'qplan[train]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_chart(plan: dict[str, Any], doc: dict[str, Any]) -> str:
    """Base64 PNG: predicted vs measured bytes per component, and the compared totals."""
    plt = _pyplot()
    comp = [c for c in components(plan, doc) if c["measured_at_peak"] is not None]
    tot = [(k, v) for k, v in pairs(plan, doc).items()
           if k not in ("trainable",) and v["measured"] is not None and v["predicted"] is not None]
    ncols = 2 if comp else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    panels = []
    if comp:
        panels.append(("at the measured peak, by component", [c["term"] for c in comp],
                       [c["predicted"] for c in comp], [c["measured_at_peak"] for c in comp]))
    panels.append(("compared totals", [k for k, _ in tot], [v["predicted"] for _, v in tot],
                   [v["measured"] for _, v in tot]))
    for ax, (title, labels, pred, meas) in zip(axes[0], panels, strict=True):
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], [p / MiB for p in pred], width=0.4, label="predicted term")
        ax.bar([i + 0.2 for i in x], [m / MiB for m in meas], width=0.4,
               label="measured at the peak" if title.startswith("at") else "measured")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.set_ylabel("MiB")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{plan['model']['name']} · {doc.get('backend')} · {plan['quant']['quant']} · "
                 f"{(doc.get('measured') or {}).get('memory', {}).get('device', '?')}")
    out = _png(fig)
    plt.close(fig)
    return out


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run_markdown(plan: dict[str, Any], doc: dict[str, Any]) -> str:
    meas = doc.get("measured") or {}
    mem = meas.get("memory") or {}
    t, q = plan["training"], plan["quant"]
    lines = [
        f"# qplan run: {plan['model']['name']} · {doc.get('backend')}",
        "",
        f"- status: **{doc.get('status')}**" + (f" — {doc['failure']['message']}" if doc.get("failure") else ""),
        f"- device: {mem.get('device', '?')} ({(doc.get('device') or {}).get('name', '?')})",
        f"- plan: quant {q['quant']} (compute {q['compute_dtype']}), r={plan['lora']['r']}, "
        f"targets {', '.join(plan['lora']['target_modules'])}, batch {t['batch_size']} × seq {t['seq_len']} "
        f"× accum {t.get('grad_accum', 1)}, grad ckpt {t['grad_ckpt']}, {t['optimizer']}, "
        f"{t.get('mixed_precision')}",
        f"- run: {json.dumps(doc.get('run', {}), sort_keys=True)}",
        f"- measured with: {mem.get('counters', '—')}",
        "",
        "## Predicted vs measured",
        "",
        _table(["term", "predicted", "measured", "error", "measured as"],
               [[k, fmt_value(k, v["predicted"]), fmt_value(k, v["measured"]), fmt_err(v["error"]), v["measured_as"]]
                for k, v in pairs(plan, doc).items()]),
        "",
        "error = (predicted − measured) / measured.",
    ]
    comp = components(plan, doc)
    if any(c["measured_at_peak"] is not None for c in comp):
        lines += ["", f"## At the measured peak (step {mem.get('tensor_peak_step')}, phase "
                      f"{mem.get('tensor_peak_phase')})", "",
                  _table(["component", "predicted term", "measured at peak", "tracker categories"],
                         [[c["term"], fmt_bytes(c["predicted"]), fmt_bytes(c["measured_at_peak"]),
                           ", ".join(c["categories"])] for c in comp]),
                  "", "Tracker categories at the peak: " + ", ".join(
                      f"{k} {fmt_bytes(v)}" for k, v in (mem.get("breakdown_at_peak") or {}).items()),
                  "", "Peak per phase: " + ", ".join(
                      f"{k} {fmt_bytes(v)}" for k, v in (mem.get("phase_peaks") or {}).items())]
    phases = mem.get("phases") or {}
    if phases:
        cuda = str(mem.get("device", "")).startswith("cuda")
        head = ["phase", "model tensors"] + (["allocated", "reserved", "device used"] if cuda else [])
        rows = [[k, fmt_bytes(v.get("model_tensors"))]
                + ([fmt_bytes(v.get("allocated")), fmt_bytes(v.get("reserved")), fmt_bytes(v.get("device_used"))]
                   if cuda else []) for k, v in phases.items()]
        lines += ["", "## Loading phases", "", _table(head, rows)]
    timing = meas.get("timing") or {}
    if timing:
        tps = timing.get("tokens_per_second")
        mean = timing.get("mean_step_seconds")
        lines += ["", "## Speed and loss", "",
                  f"- mean step: {mean:.4f} s over steps {timing.get('timed_steps')}" if mean else "- mean step: —",
                  f"- tokens/s: {tps:,.1f} ({timing.get('tokens_per_step')} tokens per step)" if tps else "- tokens/s: —",
                  f"- tracked (slower) steps: {timing.get('tracked_steps')}"]
    if meas.get("loss"):
        lines.append("- loss per step: " + ", ".join(f"{x:.4f}" for x in meas["loss"]))
    if meas.get("params"):
        lines.append(f"- parameters: {meas['params'].get('trainable', 0):,} trainable of {meas['params'].get('all', 0):,}")
    if doc.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    fail = doc.get("failure") or {}
    if fail.get("traceback"):
        lines += ["", "## Traceback", "", "```", fail["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _md_to_html(md: str) -> str:
    """Just enough Markdown for these reports: headings, bullets, tables, code blocks."""
    out, in_table, in_code = [], False, False
    for line in md.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        text = html.escape(line).replace("**", "")
        if line.startswith("## "):
            out.append(f"<h2>{text[3:]}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{text[2:]}</h1>")
        elif line.startswith("- "):
            out.append(f"<li>{text[2:]}</li>")
        elif line.strip():
            out.append(f"<p>{text}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
        "td:first-child,th:first-child{text-align:left}pre{background:#f6f6f6;padding:1em;overflow:auto}")


def html_page(title: str, md: str, png_b64: str | None) -> str:
    img = f'<p><img alt="predicted vs measured" src="data:image/png;base64,{png_b64}"></p>' if png_b64 else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n{img}\n{_md_to_html(md)}\n</body></html>\n")


def write_run_report(run_dir: str | Path, plan: dict[str, Any], doc: dict[str, Any]) -> dict[str, Path]:
    """Write report.md and report.html into ``run_dir`` (a folder qplan just made)."""
    run_dir = Path(run_dir)
    md = run_markdown(plan, doc)
    (run_dir / "report.md").write_text(md, encoding="utf-8")
    png = run_chart(plan, doc)
    (run_dir / "report.html").write_text(html_page(f"qplan run {run_dir.name}", md, png), encoding="utf-8")
    return {"md": run_dir / "report.md", "html": run_dir / "report.html"}


# -------------------------------------------------------------------------------- summary


def new_folder(parent: str | Path, name: str) -> Path:
    """Create ``parent/name`` — or ``name-2``, ``name-3`` ... if it exists; never reuses one."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        p = parent / (name if i == 1 else f"{name}-{i}")
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue
    raise QPlanError(f"cannot create a new folder {name} under {parent}")  # pragma: no cover


def utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run folder's plan.json and measured.json, each checked against its schema."""
    from qplan.planner.files import safe_exists
    from qplan.planner.schema import check_measured, check_plan, read_json

    p = Path(run_dir)
    if not safe_exists(p) or not p.is_dir():
        raise QPlanError(f"{run_dir} is not a run folder")
    for name in ("plan.json", "measured.json"):
        if not (p / name).is_file():
            raise QPlanError(f"{run_dir} has no {name}: is it a `qplan run` folder?")
    plan = check_plan(read_json(p / "plan.json", "plan"), str(p / "plan.json"))
    doc = check_measured(read_json(p / "measured.json", "measurements"), str(p / "measured.json"))
    return plan, doc


SUMMARY_TERMS = ("tensor_peak", "peak", "weights", "weights_footprint", "trainable", "adapter_file_bytes", "step_seconds")


def summarize(run_dirs: list[str], output: str | None = None) -> dict[str, Any]:
    """Summary across run folders: summary.md, summary.html (error chart), summary.json.

    Written into a new folder: ``output`` (must not exist yet), or
    ``reports/summary-<UTC time>`` (suffixed if taken).
    """
    if not run_dirs:
        raise QPlanError("give one or more run folders (reports/runs/...)")
    runs = []
    skipped: list[str] = []
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
    if output:
        from qplan.planner.files import safe_exists

        out = Path(output)
        if safe_exists(out):
            raise QPlanError(f"{output} already exists: choose another --output")
        try:
            out.mkdir(parents=True)
        except OSError as exc:
            raise QPlanError(f"--output {output}: cannot create the folder ({exc.strerror or exc})") from exc
    else:
        out = new_folder("reports", f"summary-{utc_stamp()}")
    headers = ["run", "model", "backend", "quant", "ckpt", "b×s", "device", "status",
               "tensor peak pred", "tensor peak meas"] + [f"err {k}" for k in SUMMARY_TERMS]
    rows = [[r["run"], r["model"], r["backend"], r["quant"], r["grad_ckpt"], r["batch_x_seq"], str(r["device"]),
             str(r["status"]), fmt_bytes(r["terms"]["tensor_peak"]["predicted"]),
             fmt_bytes(r["terms"]["tensor_peak"]["measured"])]
            + [fmt_err(r["terms"][k]["error"]) for k in SUMMARY_TERMS] for r in runs]
    md = "\n".join([f"# qplan summary of {len(runs)} run(s)", "",
                    "error = (predicted − measured) / measured; — = not measured.", "", _table(headers, rows)]) + "\n"
    png = summary_chart(runs)
    (out / "summary.md").write_text(md, encoding="utf-8")
    (out / "summary.html").write_text(html_page("qplan summary", md, png), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps({"runs": runs}, indent=2) + "\n", encoding="utf-8")
    return {"output": str(out), "runs": runs, "skipped": skipped,
            "summary": md + f"\nwritten to {out}/summary.md and summary.html"}


def summary_chart(runs: list[dict[str, Any]]) -> str | None:
    """Base64 PNG: signed prediction error (%) per run and term."""
    plt = _pyplot()
    terms = [k for k in SUMMARY_TERMS if any(r["terms"][k]["error"] is not None for r in runs)]
    if not terms:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(runs) * len(terms) / 2), 4.2))
    width = 0.8 / len(terms)
    for j, k in enumerate(terms):
        xs = [i + (j - (len(terms) - 1) / 2) * width for i in range(len(runs))]
        ax.bar(xs, [(r["terms"][k]["error"] or 0.0) * 100 for r in runs], width=width, label=k)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([f"{r['model']}\n{r['backend']} {r['quant']} ckpt={r['grad_ckpt']}" for r in runs],
                       rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("prediction error, % of measured")
    ax.set_title("(predicted − measured) / measured")
    ax.legend(fontsize=8)
    out = _png(fig)
    plt.close(fig)
    return out
