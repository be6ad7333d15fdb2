"""The report of one run: report.html (self-contained) and report.md, in the order a person reads.

1. the title and one verdict line: measured vs predicted tensor peak, the error, the counters
   and the device;
2. what the bytes are at the measured peak: the plan's composition of *the same moment* with
   *the same kernels* (``compare.composition_at_peak``) beside the tracker's categories, as
   stacked bars that add up to the two totals of the verdict;
3. the memory timeline of the measured steps (``measured.memory.timeline``), phases shaded,
   the peak marked, the predicted peak of each phase drawn across it;
4. details, collapsed: every compared number, the settings, per-module parameters, the
   predicted moments, loading phases, speed and loss, the largest tensors at the peak.

What is computed (``compare``) is apart from how it is drawn (``charts``: inline SVG, no
plotting library). The summary across runs is ``backends.summary``. Nothing here imports torch.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from pathlib import Path
from typing import Any

from qplan.planner.errors import QPlanError
from qplan.planner.render import method_text
from qplan.planner.vocab import CATEGORIES, MOMENT_NAMES, PEFT_METHODS

from .charts import histogram_svg, stacked_bars_svg, timeline_svg
from .compare import _ints, composition_at_peak, pairs

MiB = 2**20
PARTS = [c for c in CATEGORIES if c != "optimizer_paged"]
TOLERANCE = 0.05  # the target of the CPU measurement (tests/backends/test_peft_backend.py)


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "—"
    return f"{n / MiB:,.3f} MiB" if abs(n) >= 0.01 * MiB else f"{int(n):,} B"


def fmt_err(e: float | None) -> str:
    return "—" if e is None else f"{e * 100:+.2f}%"


def fmt_err_fine(e: float | None) -> str:
    """An error with the digits it needs: +0.0011% rather than -0.00%."""
    if e is None:
        return "—"
    if e == 0 or abs(e) >= 1e-3:
        return fmt_err(e)
    return f"{e * 100:+.{max(2, 1 - math.floor(math.log10(abs(e * 100))))}f}%"


def fmt_value(term: str, v: Any) -> str:
    if v is None:
        return "—"
    if term == "step_seconds":
        return f"{v:.3g} s"
    return f"{v:,}" if term == "trainable" else fmt_bytes(v)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def html_table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------- computing


def verdict(plan: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """The one line a reader sees first, and its parts (``predicted``, ``measured``, ``error``)."""
    meas = doc.get("measured") or {}
    mem = meas.get("memory") or {}
    tp = pairs(plan, doc)["tensor_peak"]
    device = mem.get("device") or "?"
    dev_name = (doc.get("device") or {}).get("name")
    cuda = str(device).startswith("cuda")
    status = doc.get("status")
    kind = "ok" if tp["error"] is not None and abs(tp["error"]) <= TOLERANCE else "off"
    if status != "ok":
        kind = "failed"
    if tp["measured"] is None:
        text = f"No tensor peak was measured (status {status})."
    else:
        how = "over-predicts" if tp["error"] > 0 else "under-predicts" if tp["error"] < 0 else "matches"
        text = (f"Tensor peak: measured {fmt_bytes(tp['measured'])}, predicted {fmt_bytes(tp['predicted'])}: "
                f"error {fmt_err_fine(tp['error'])} (the plan {how}"
                + (f" by {fmt_bytes(abs(tp['predicted'] - tp['measured']))}" if tp["error"] else "") + ").")
    counters = ("torch.cuda.max_memory_allocated" if cuda
                else "live tensor storages (qplan's tracker)") + f" on {device}" + (f" ({dev_name})" if dev_name else "")
    against = "the plan's GPU-kernel prediction" if cuda else "the plan's CPU-kernel prediction (memory_detail.tensor_peak_cpu)"
    steps = mem.get("window_steps")
    sub = f"Measured with {counters}" + (f", steps {steps[0]}–{steps[1]}" if steps and steps[1] else "") + \
        f"; compared with {against}."
    failure = (doc.get("failure") or {}).get("message")
    return {"kind": kind, "text": text, "sub": sub, "status": status, "failure": failure,
            "predicted": tp["predicted"], "measured": tp["measured"], "error": tp["error"]}


def _moment_sentence(comp: dict[str, Any]) -> str:
    if comp["kernels"] == "cuda":
        return (f"On CUDA the allocator gives only a total; the predicted bar is the plan's own peak moment, "
                f"the {comp['moment_name']}.")
    where = f"the {comp['moment_name']}" + (f" (step {comp['step']})" if comp.get("step") else "")
    if comp["moment"] is None:
        return "The measured peak is outside the step's phases."
    if comp["predicted_peak"] is None:
        return f"The peak was measured at {where}, where the plan predicts its peak."
    return (f"The peak was measured at {where}; the plan predicts its own peak at the "
            f"{comp['predicted_peak_moment_name']}, drawn as a third bar.")


def composition_stacks(comp: dict[str, Any]) -> list[dict[str, Any]]:
    """The bars of the composition chart; each ``total`` is the sum of its parts (or the compared
    total where there are no parts)."""
    stacks = []
    pred = comp["predicted"]
    k = comp["kernels"].upper()
    if pred is not None:
        stacks.append({"key": "predicted", "label": f"predicted\n{comp['moment_name']} ({k} kernels)",
                       "parts": pred, "total": sum(pred.values())})
    elif comp["compared"]["predicted"] is not None:
        stacks.append({"key": "predicted", "label": "predicted\n(no breakdown in this plan)", "parts": None,
                       "total": comp["compared"]["predicted"]})
    meas = comp["measured"]
    if meas is not None:
        stacks.append({"key": "measured", "label": "measured\nat the peak", "parts": meas, "total": sum(meas.values())})
    elif comp["compared"]["measured"] is not None:
        stacks.append({"key": "measured", "label": "measured\n(allocator total)", "parts": None,
                       "total": comp["compared"]["measured"]})
    if comp["predicted_peak"] is not None:
        pp = comp["predicted_peak"]
        stacks.append({"key": "predicted_peak", "label": f"predicted peak\n{comp['predicted_peak_moment_name']}",
                       "parts": pp, "total": sum(pp.values())})
    return stacks


def _composition_rows(comp: dict[str, Any]) -> list[list[str]]:
    pred, meas = comp["predicted"] or {}, comp["measured"] or {}
    rows = []
    for c in PARTS:
        p, m = pred.get(c), meas.get(c)
        if not p and not m:
            continue
        rows.append([c, fmt_bytes(p), fmt_bytes(m), fmt_bytes(p - m) if p is not None and m is not None else "—"])
    tp, tm = (sum(pred.values()) if pred else comp["compared"]["predicted"]), \
        (sum(meas.values()) if meas else comp["compared"]["measured"])
    rows.append(["total", fmt_bytes(tp), fmt_bytes(tm), fmt_bytes(tp - tm) if tp is not None and tm is not None else "—"])
    return rows


def settings_rows(plan: dict[str, Any], doc: dict[str, Any]) -> list[list[str]]:
    t, q, lo = plan["training"], plan["quant"], plan["lora"]
    rows = [["model", f"{plan['model']['name']} ({plan['model'].get('architecture')})"],
            ["source", str((plan["model"].get("source") or {}).get("hub_id") or "—")],
            ["backend", str(doc.get("backend") or plan.get("backend"))],
            ["base weights", f"{q['quant']}" + (" + double quant" if q.get("double_quant") and q["quant"] in ("nf4", "fp4")
                                                else "") + f", compute {q['compute_dtype']}"],
            *([["method", "full fine-tuning: every parameter trains"]] if plan.get("method") == "full" else
              [["method", method_text(plan)]] if lo is None else
              [["LoRA", f"r={lo['r']}, alpha={lo['alpha']}, dropout={lo['dropout']}, targets {lo['targets']}"],
               ["target modules", ", ".join(lo["target_modules"])]]),
            ["batch × sequence × accumulation", f"{t['batch_size']} × {t['seq_len']} × {t.get('grad_accum', 1)}"],
            ["gradient checkpointing", str(t["grad_ckpt"])], ["optimizer", str(t["optimizer"])],
            ["attention", str(t.get("attn_impl"))], ["mixed precision", str(t.get("mixed_precision"))]]
    run = dict(doc.get("run") or {})
    trainer = run.pop("trainer", None) or {}
    rows += [[f"run: {k}", "—" if v is None else str(v)] for k, v in sorted(run.items())]
    rows += [[f"trainer: {k}", str(v)] for k, v in sorted(trainer.items())]
    return rows


def _moment_rows(plan: dict[str, Any], doc: dict[str, Any]) -> list[list[str]]:
    detail = plan["prediction"].get("memory_detail") or {}
    gpu, cpu = _ints(detail.get("phases")) or {}, _ints(detail.get("phases_cpu")) or {}
    from qplan.planner.vocab import MOMENTS_OF_PHASE

    mem = (doc.get("measured") or {}).get("memory") or {}
    measured = mem.get("phase_peaks") or {}
    passes = mem.get("passes") or {}  # a pass before training (precompute_ref_log_probs), measured apart
    rows = []
    for m in gpu:
        phase = next((p for p, ms in MOMENTS_OF_PHASE.items() if m in ms), "before training" if m in passes else "")
        got = passes[m].get("tensor_peak", passes[m].get("peak_allocated")) if m in passes else measured.get(phase)
        rows.append([MOMENT_NAMES.get(m, m), phase, fmt_bytes(gpu.get(m)), fmt_bytes(cpu.get(m)), fmt_bytes(got)])
    return rows


MOMENT_HEADERS = ["moment", "phase", "predicted, GPU kernels", "predicted, CPU kernels", "measured peak of the phase"]


# ------------------------------------------------------------------------------- markdown


def run_markdown(plan: dict[str, Any], doc: dict[str, Any], images: bool = True) -> str:
    """report.md: the same order as the page; ``images``: link the SVGs written beside it."""
    v = verdict(plan, doc)
    meas = doc.get("measured") or {}
    mem = meas.get("memory") or {}
    lines = [f"# {_title(plan, doc)}", ""]
    if v["status"] != "ok":
        lines += [f"status: **{v['status']}**" + (f" — {v['failure']}" if v["failure"] else ""), ""]
    lines += [f"**{v['text']}**", "", v["sub"], ""]
    if doc.get("ranks"):
        lines += ["## Ranks", "", _ranks_sentence(doc), "", _table(rank_headers(doc), rank_rows(doc)), ""]
    if doc.get("nodes"):
        lines += ["## Nodes", "", _table(NODE_HEADERS, node_rows(doc)), ""]
    comp = composition_at_peak(plan, doc)
    if comp["compared"]["measured"] is not None:
        lines += ["## What the bytes are at the measured peak", "", _moment_sentence(comp), ""]
        if images:
            lines += ["![predicted and measured bytes at the peak, by category](composition.svg)", ""]
        lines += [_table(["category", "predicted", "measured", "predicted − measured"], _composition_rows(comp)), ""]
    ds = data_sentence(plan, doc)
    if ds:
        lines += ["## Your data", "", ds, ""] + (["![tokens per sample, the longest in red](data.svg)", ""] if images
                                                 else [])
    lines += ["## Memory over the measured steps", ""]
    if mem.get("timeline"):
        lines += ["![live bytes over the measured steps](timeline.svg)" if images else "(see report.html)", ""]
    else:
        lines += [_no_timeline(mem), ""]
    lines += ["## Details", "", "### Every compared number", "",
              _table(["term", "predicted", "measured", "error", "measured as"],
                     [[k, fmt_value(k, p["predicted"]), fmt_value(k, p["measured"]), fmt_err(p["error"]), p["measured_as"]]
                      for k, p in pairs(plan, doc).items()]),
              "", "error = (predicted − measured) / measured.", "", "### Settings", "",
              _table(["setting", "value"], settings_rows(plan, doc)), "",
              "### Predicted moments of the step", "",
              _table(MOMENT_HEADERS, _moment_rows(plan, doc))]
    lines += _details_md(plan, doc)
    return "\n".join(lines) + "\n"


RANK_HEADERS = ["rank", "status", "tensor peak", "error vs per-rank prediction", "peak in", "mean step", "failure"]


NODE_HEADERS = ["node", "host", "ranks", "status", "last step", "host memory (peak RSS of its ranks)", "launcher"]


def rank_headers(doc: dict[str, Any]) -> list[str]:
    return (["node"] if doc.get("nodes") else []) + RANK_HEADERS


def node_rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row per node of a multi-node run (measured.json ``nodes``)."""
    rows = []
    for n in doc.get("nodes") or []:
        hm, la = n.get("host_memory") or {}, n.get("launcher") or {}
        total = f" of {fmt_bytes(hm['total'])}" if hm.get("total") else ""
        rows.append([str(n.get("node")), str(n.get("host") or "—"), ", ".join(str(r) for r in n.get("ranks") or []) or "—",
                     str(n.get("status")), "—" if n.get("last_step") is None else str(n["last_step"]),
                     (fmt_bytes(hm["rss_peak_sum"]) + total) if hm.get("rss_peak_sum") else "—",
                     (la.get("exit", "") + (" (stopped by qplan)" if la.get("stopped_by_qplan") else "")) if la
                     else "started elsewhere"])
    return rows


def rank_rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row per rank of a multi-process run (measured.json ``ranks``); its node first in a multi-node run."""
    rows = []
    nodes = bool(doc.get("nodes"))
    for r in doc.get("ranks") or []:
        mem, tm = r.get("memory") or {}, r.get("timing") or {}
        where = (f"step {mem['tensor_peak_step']}, {mem.get('tensor_peak_phase')}"
                 if mem.get("tensor_peak_step") is not None else "—")
        step = tm.get("mean_step_seconds")
        rows.append(([str(r.get("node", "?"))] if nodes else [])
                    + [str(r.get("rank")), str(r.get("status")), fmt_bytes(mem.get("tensor_peak")),
                       fmt_err((r.get("error") or {}).get("tensor_peak")), where,
                       "—" if step is None else f"{step:.3g} s", (r.get("failure") or {}).get("message") or ""])
    return rows


def _ranks_sentence(doc: dict[str, Any]) -> str:
    run = doc.get("run") or {}
    meas = doc.get("measured") or {}
    peak_rank = (meas.get("memory") or {}).get("peak_rank")
    slow = (meas.get("timing") or {}).get("slowest_rank")
    launcher = (run.get("launcher") or {}).get("tool", "?")
    la = run.get("launcher") or {}
    where = (f" on {run['nodes']} nodes × {run.get('gpus_per_node')} ({la.get('where')}; rendezvous "
             f"{la.get('rendezvous')})," if run.get("nodes") else "")
    what = f"{run.get('strategy')}: {run.get('engine')}"
    return (f"{run.get('world_size')} ranks" + (f"{where} {what}" if where else f" ({what})") + f", launched by {launcher}. "
            "Each rank measured itself; the tensor peak compared above is the largest rank's"
            + (f" (rank {peak_rank})" if peak_rank is not None else "")
            + (f", the step time the slowest rank's (rank {slow})" if slow is not None else "")
            + "; the prediction is per rank.")


def _details_md(plan: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    meas = doc.get("measured") or {}
    mem = meas.get("memory") or {}
    lines = ["", f"### {_modules_title(plan)}", "", _table(*_module_table(plan))]
    phases = mem.get("phases") or {}
    if phases:
        lines += ["", "### Loading phases", "", _table(*_loading_table(mem))]
    sp = _speed_lines(meas)
    if sp:
        lines += ["", "### Speed and loss", ""] + [f"- {s}" for s in sp]
    if mem.get("peak_detail"):
        lines += ["", "### Largest tensors at the peak", "", _table(*_peak_detail_table(mem))]
    if doc.get("notes"):
        lines += ["", "### Notes", ""] + [f"- {n}" for n in doc["notes"]]
    fail = doc.get("failure") or {}
    if fail.get("traceback"):
        lines += ["", "### Traceback", "", "```", fail["traceback"].rstrip(), "```"]
    return lines


def _title(plan: dict[str, Any], doc: dict[str, Any]) -> str:
    mem = ((doc.get("measured") or {}).get("memory") or {})
    q = plan["quant"]
    method = method_text(plan, short=True)
    return f"qplan run: {plan['model']['name']} · {method} · {q['quant']} · {doc.get('backend')} · {mem.get('device', '?')}"


def _no_timeline(mem: dict[str, Any]) -> str:
    if str(mem.get("device", "")).startswith("cuda"):
        return "No timeline: on CUDA qplan reads the allocator's peak counters, not every allocation."
    return ("No timeline: this run's measured.json has none (measured by an older qplan, or the run stopped "
            "before the measured steps).")


def _modules_title(plan: dict[str, Any]) -> str:
    """What the per-module table lists: LoRA's parameters, every parameter (full fine-tuning), or the method's
    tensors (named as the plan's one-line method text names it)."""
    method = plan.get("method", "lora")
    if method in PEFT_METHODS:
        return f"{PEFT_METHODS[method][0]} tensors per module"
    return "Trainable parameters per module" if method == "full" else "LoRA parameters per module"


def _module_table(plan: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [[e["module"], e["kind"], str(e["shape"]), str(e["instances"]), f"{e['params_per_instance']:,}",
             f"{e['total']:,}", fmt_bytes(e["bytes"])] for e in plan["prediction"]["params"]["per_module"]]
    return ["module", "kind", "in→out", "instances", "params each", "params", "bytes"], rows


def _loading_table(mem: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    cuda = str(mem.get("device", "")).startswith("cuda")
    head = ["phase", "model tensors"] + (["allocated", "reserved", "device used"] if cuda else [])
    rows = [[k, fmt_bytes(v.get("model_tensors"))]
            + ([fmt_bytes(v.get("allocated")), fmt_bytes(v.get("reserved")), fmt_bytes(v.get("device_used"))]
               if cuda else []) for k, v in (mem.get("phases") or {}).items()]
    return head, rows


def _peak_detail_table(mem: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    return ["category", "made by (operator, dtype, shape)", "bytes"], \
        [[r["category"], r["origin"], fmt_bytes(r["bytes"])] for r in mem.get("peak_detail") or []]


def _speed_lines(meas: dict[str, Any]) -> list[str]:
    timing = meas.get("timing") or {}
    out = []
    if timing:
        mean, tps = timing.get("mean_step_seconds"), timing.get("tokens_per_second")
        out.append(f"mean step: {mean:.4f} s over steps {timing.get('timed_steps')}" if mean else "mean step: —")
        out.append(f"tokens/s: {tps:,.1f} ({timing.get('tokens_per_step')} tokens per step)" if tps else "tokens/s: —")
        out.append(f"steps under the tracker (slower, not timed): {timing.get('tracked_steps')}")
    if meas.get("loss"):
        out.append("loss per step: " + ", ".join("NaN" if x is None else f"{x:.4f}" for x in meas["loss"])
                   + (" (the loss went NaN or infinite: the run diverged)" if None in meas["loss"] else ""))
    if meas.get("params"):
        out.append(f"parameters: {meas['params'].get('trainable', 0):,} trainable of {meas['params'].get('all', 0):,}")
    return out


# ----------------------------------------------------------------------------------- HTML

CSS = ("body{font-family:system-ui,sans-serif;max-width:64em;margin:1.5em auto;padding:0 1em;color:#222;line-height:1.4}"
       "h1{font-size:1.45em;margin:.2em 0 .4em}h2{font-size:1.15em;margin:1.6em 0 .3em}"
       ".verdict{font-size:1.2em;font-weight:600;padding:.6em .8em;border-radius:6px;margin:.3em 0}"
       ".verdict.ok{background:#e6f4ea;border-left:6px solid #2e7d32}.verdict.off{background:#fff4e5;"
       "border-left:6px solid #ed6c02}.verdict.failed{background:#fdecea;border-left:6px solid #c62828}"
       ".sub,.caption{color:#555;margin:.2em 0 .6em}table{border-collapse:collapse;margin:.4em 0}"
       "td,th{border:1px solid #ddd;padding:.2em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"
       "th{background:#f5f5f5}table.kv td{text-align:left}"
       "table.ranks td:last-child,table.nodes td:last-child,table.nodes td:nth-child(2),table.ranks th:last-child,"
       "table.nodes th:last-child,table.nodes th:nth-child(2){text-align:left}"
       "details{margin:.4em 0;border:1px solid #e3e3e3;border-radius:4px;padding:.3em .8em}"
       "summary{cursor:pointer;font-weight:600}pre{background:#f6f6f6;padding:1em;overflow:auto}"
       ".wide{overflow-x:auto}table.runs{font-size:.85em}"
       "svg{max-width:100%;height:auto}th.sort{cursor:pointer}th.sort:after{content:' ⇅';color:#999}")


def page(title: str, body: str, script: str = "") -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n{script}</body></html>\n")


def _details(summary: str, inner: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{html.escape(summary)}</summary>{inner}</details>"


def charts_for(plan: dict[str, Any], doc: dict[str, Any]) -> dict[str, str]:
    """The run's SVGs by name (``composition``, ``timeline``), those it has data for."""
    comp = composition_at_peak(plan, doc)
    out = {}
    if comp["compared"]["measured"] is not None:
        out["composition"] = stacked_bars_svg(composition_stacks(comp), PARTS)
    tl = ((doc.get("measured") or {}).get("memory") or {}).get("timeline")
    if tl:
        out["timeline"] = timeline_svg(tl, comp["predicted_phase_peaks"])
    d = plan["prediction"].get("data")
    if d:
        out["data"] = histogram_svg(d["histogram"], d["longest_sample"]["tokens"], d.get("max_length"))
    return out


def data_sentence(plan: dict[str, Any], doc: dict[str, Any]) -> str | None:
    """A --data plan's dataset and the batches the run made (their shapes, in order)."""
    d = plan["prediction"].get("data")
    if not d:
        return None
    w = d["worst_batch"]
    text = (f"{d['source']}: {d['samples']:,} samples ({d['format']}), p50 {d['tokens']['p50']:,} · max "
            f"{d['tokens']['max']:,} tokens (row {d['longest_sample']['row']:,}, red); {d['batching']}: planned "
            + (f"worst batch 1 × {w['flat_tokens']:,} ({w['batch_size']} packs in one row, padding-free)."
               if w.get("flat_tokens") else f"worst batch {w['batch_size']} × {w['seq_len']:,}."))
    shapes = (doc.get("run") or {}).get("batch_shapes")
    if shapes:
        first = ", ".join(f"{b}×{n}" for b, n in shapes[:8])
        worst = max(range(len(shapes)), key=lambda i: shapes[i][1])
        text += (f" Batches made, in order (the data loader may make one ahead of training): {first}"
                 f"{' …' if len(shapes) > 8 else ''}; the longest was batch "
                 f"{worst + 1} ({shapes[worst][0]}×{shapes[worst][1]})"
                 + (" — placed by --largest-first at the first measured step." if (doc.get("run") or {}).get(
                     "largest_first") else "."))
    return text


def run_html(plan: dict[str, Any], doc: dict[str, Any], charts: dict[str, str] | None = None) -> str:
    v = verdict(plan, doc)
    meas = doc.get("measured") or {}
    mem = meas.get("memory") or {}
    comp = composition_at_peak(plan, doc)
    charts = charts_for(plan, doc) if charts is None else charts
    e = html.escape
    body = [f"<h1>{e(_title(plan, doc))}</h1>"]
    if v["status"] != "ok":
        body.append(f"<p class='verdict failed'>status: {e(str(v['status']))}" + (f" — {e(v['failure'])}" if v["failure"] else "")
                    + "</p>")
    body.append(f"<p class='verdict {v['kind']}' id='verdict' data-predicted='{v['predicted'] or 0}' "
                f"data-measured='{v['measured'] or 0}'>{e(v['text'])}</p><p class='sub'>{e(v['sub'])}</p>")
    if doc.get("ranks"):
        body.append(f"<h2>Ranks</h2><p class='caption'>{e(_ranks_sentence(doc))}</p>"
                    + html_table(rank_headers(doc), rank_rows(doc), "ranks"))
    if doc.get("nodes"):
        body.append("<h2>Nodes</h2>" + html_table(NODE_HEADERS, node_rows(doc), "nodes"))
    if "composition" in charts:
        body.append("<h2>What the bytes are at the measured peak</h2>"
                    f"<p class='caption'>{e(_moment_sentence(comp))} Each bar adds up to its total in the line above: "
                    "predicted from the plan's composition of that moment (plan.json memory_detail), measured from the "
                    "tracker's categories at the peak (measured.json breakdown_at_peak).</p>")
        body.append(charts["composition"])
        body.append(html_table(["category", "predicted", "measured", "predicted − measured"], _composition_rows(comp),
                               "composition"))
    if "data" in charts:
        body.append(f"<h2>Your data</h2><p class='caption'>{e(data_sentence(plan, doc) or '')}</p>" + charts["data"])
    body.append("<h2>Memory over the measured steps</h2>")
    if "timeline" in charts:
        body.append("<p class='caption'>Live tensor bytes after every allocation and free, in order (downsampled: the "
                    "band is each run of events' lowest to highest). Dashed red: the plan's predicted peak for each "
                    "phase.</p>" + charts["timeline"])
    else:
        body.append(f"<p class='caption'>{e(_no_timeline(mem))}</p>")
    body.append("<h2>Details</h2>")
    body.append(_details("Every compared number", html_table(
        ["term", "predicted", "measured", "error", "measured as"],
        [[k, fmt_value(k, p["predicted"]), fmt_value(k, p["measured"]), fmt_err_fine(p["error"]), p["measured_as"]]
         for k, p in pairs(plan, doc).items()]) + "<p class='caption'>error = (predicted − measured) / measured.</p>"))
    body.append(_details("Settings", html_table(["setting", "value"], settings_rows(plan, doc), "kv")))
    body.append(_details("Predicted moments of the step", html_table(MOMENT_HEADERS, _moment_rows(plan, doc))))
    body.append(_details(_modules_title(plan), html_table(*_module_table(plan))))
    if mem.get("phases"):
        body.append(_details("Loading phases", html_table(*_loading_table(mem))))
    sp = _speed_lines(meas)
    if sp:
        body.append(_details("Speed and loss", "<ul>" + "".join(f"<li>{e(s)}</li>" for s in sp) + "</ul>"))
    if mem.get("peak_detail"):
        body.append(_details("Largest tensors at the peak", html_table(*_peak_detail_table(mem))))
    if doc.get("notes"):
        body.append(_details("Notes", "<ul>" + "".join(f"<li>{e(n)}</li>" for n in doc["notes"]) + "</ul>", True))
    tb = (doc.get("failure") or {}).get("traceback")
    if tb:
        body.append(_details("Traceback", f"<pre>{e(tb.rstrip())}</pre>", True))
    return page(_title(plan, doc), "\n".join(body))


def write_run_report(run_dir: str | Path, plan: dict[str, Any], doc: dict[str, Any]) -> dict[str, Path]:
    """Write report.html, report.md and the SVGs report.md links to into ``run_dir`` (a folder
    qplan just made)."""
    run_dir = Path(run_dir)
    charts = charts_for(plan, doc)
    for name, svg in charts.items():
        (run_dir / f"{name}.svg").write_text(svg + "\n", encoding="utf-8")
    md = run_markdown(plan, doc)
    (run_dir / "report.md").write_text(md, encoding="utf-8")
    (run_dir / "report.html").write_text(run_html(plan, doc, charts), encoding="utf-8")
    return {"md": run_dir / "report.md", "html": run_dir / "report.html"}


# -------------------------------------------------------------------------------- run folders


def free_name(parent: str | Path, name: str, suffix: str = "") -> Path:
    """``parent/name`` — or ``name-2``, ``name-3`` ... — the first for which neither ``name`` nor
    ``name + suffix`` exists (not created)."""
    from qplan.planner.files import safe_exists

    parent = Path(parent)
    for i in range(1, 10_000):
        p = parent / (name if i == 1 else f"{name}-{i}")
        if not safe_exists(p) and not (suffix and safe_exists(p.with_name(p.name + suffix))):
            return p
    raise QPlanError(f"cannot find a free folder name {name} under {parent}")  # pragma: no cover


def new_folder(parent: str | Path, name: str, suffix: str = "") -> Path:
    """Create ``parent/name + suffix`` — or ``name-2 + suffix`` ... — such that neither it nor the name
    without ``suffix`` exists; never reuses one."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        p = free_name(parent, name, suffix)
        try:
            (p.with_name(p.name + suffix)).mkdir()
            return p.with_name(p.name + suffix)
        except FileExistsError:  # made meanwhile by someone else
            continue
    raise QPlanError(f"cannot create a new folder {name} under {parent}")  # pragma: no cover


def utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run folder's plan.json and measured.json, each checked against its schema."""
    from qplan.planner.document import check_plan
    from qplan.planner.files import refuse_partial, safe_exists
    from qplan.planner.validate import check_measured, read_json

    p = Path(run_dir)
    if not safe_exists(p) or not p.is_dir():
        raise QPlanError(f"{run_dir} is not a run folder")
    refuse_partial(p)
    for name in ("plan.json", "measured.json"):
        if not (p / name).is_file():
            raise QPlanError(f"{run_dir} has no {name}: is it a `qplan run` folder?")
    plan = check_plan(read_json(p / "plan.json", "plan"), str(p / "plan.json"))
    doc = check_measured(read_json(p / "measured.json", "measurements", nonfinite=True), str(p / "measured.json"))
    return plan, doc

