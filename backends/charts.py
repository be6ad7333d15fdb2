"""Charts as inline SVG text: no plotting library, no network, nothing to install.

Pure functions from numbers to an ``<svg>`` string, for the reports (``backends.report``,
``backends.summary``) and the benchmark pages (``bench/accuracy_scatter.py``,
``bench/gpu``). Every drawn quantity is also written on its element as a ``data-*``
attribute (bytes as integers), so a test reading the page in a browser can check that what is
drawn adds up to what the text says. Nothing here imports torch.
"""

from __future__ import annotations

import html
import math
from typing import Any

MiB = 2**20
GiB = 2**30

#: one color per byte category (the tracker's vocabulary), fixed across every page
CATEGORY_COLORS = {
    "weights": "#4c78a8", "adapters": "#f58518", "gradients": "#e45756", "optimizer": "#72b7b2",
    "optimizer_paged": "#9ecae9", "activations": "#54a24b", "logits": "#eeca3b", "temporaries": "#b279a2",
    "unattributed": "#bab0ac",
}
#: phase shading of a timeline
PHASE_COLORS = {"forward": "#dbe9f6", "backward": "#fde5cc", "optimizer": "#dcefd9", "generation": "#ece3f3"}
#: a qualitative palette for series (backends, models)
PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#b279a2", "#72b7b2", "#eeca3b", "#9d755d", "#ff9da6")
MARKERS = ("circle", "square", "triangle", "diamond", "cross", "star")
FONT = "font-family='system-ui,sans-serif'"


def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def human_bytes(n: float) -> str:
    """Short axis / label text: 388.99 MiB, 12.4 GiB, 512 KiB, 8 B."""
    a = abs(n)
    if a >= GiB:
        return f"{n / GiB:.3g} GiB" if a < 100 * GiB else f"{n / GiB:,.0f} GiB"
    if a >= MiB:
        return f"{n / MiB:.1f} MiB" if a < 1000 * MiB else f"{n / MiB:,.0f} MiB"
    if a >= 1024:
        return f"{n / 1024:.3g} KiB"
    return f"{int(n)} B"


def _text(x: float, y: float, s: str, size: int = 12, anchor: str = "start", extra: str = "") -> str:
    return f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' {FONT} {extra}>{esc(s)}</text>"


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag  # pragma: no cover


def _byte_unit(top: float) -> tuple[float, str]:
    return (GiB, "GiB") if top >= 4 * GiB else (MiB, "MiB")


# ------------------------------------------------------------------------------- stacked bars


def stacked_bars_svg(stacks: list[dict[str, Any]], categories: list[str], title: str = "") -> str:
    """Vertical stacked bars, one per ``{"label", "key", "parts": {category: bytes}, "total"}``.

    Parts are stacked in ``categories`` order (weights at the bottom); a stack without parts
    (``parts`` None) is drawn as one gray ``unattributed`` block of ``total``. Each bar is a
    ``<g class='stack' data-stack=key data-total=...>`` whose rects carry ``data-category`` and
    ``data-bytes``; the total is printed above it. The legend lists the categories present.
    """
    w, h, left, right, top, bottom = 760, 420, 70, 250, 30 + (20 if title else 0), 60
    plot_h = h - top - bottom
    vmax = max([s["total"] for s in stacks] + [1])
    unit, uname = _byte_unit(vmax)
    step = _nice_step(vmax / unit)
    ymax = math.ceil(vmax / unit / step) * step * unit
    y = lambda v: top + plot_h * (1 - v / ymax)  # noqa: E731
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='chart composition' viewBox='0 0 {w} {h}' "
           f"width='{w}' height='{h}' role='img' aria-label='{esc(title or 'composition')}'>"]
    if title:
        out.append(_text(left, 20, title, 14, extra="font-weight='600'"))
    k = 0.0
    while k <= ymax / unit + 1e-9:
        yy = y(k * unit)
        out.append(f"<line x1='{left}' x2='{w - right}' y1='{yy:.1f}' y2='{yy:.1f}' stroke='#e5e5e5'/>")
        out.append(_text(left - 6, yy + 4, f"{k:g}", 11, "end"))
        k += step
    out.append(_text(14, top + plot_h / 2, uname, 12, "middle", f"transform='rotate(-90 14 {top + plot_h / 2:.1f})'"))
    n = len(stacks)
    slot = (w - left - right) / max(1, n)
    bw = min(110.0, slot * 0.6)
    used: list[str] = []
    for i, st in enumerate(stacks):
        cx = left + slot * (i + 0.5)
        x0 = cx - bw / 2
        out.append(f"<g class='stack' data-stack='{esc(st['key'])}' data-total='{int(st['total'])}'>")
        parts = st.get("parts")
        items = [(c, int(parts.get(c, 0))) for c in categories] if parts is not None else \
            [("unattributed", int(st["total"]))]
        base = 0
        for cat, v in items:
            if cat not in used and v > 0:
                used.append(cat)
            y1, y0 = y(base + v), y(base)
            out.append(f"<rect class='part' data-category='{cat}' data-bytes='{v}' x='{x0:.1f}' y='{y1:.2f}' "
                       f"width='{bw:.1f}' height='{max(0.0, y0 - y1):.2f}' fill='{CATEGORY_COLORS.get(cat, '#999')}' "
                       f"stroke='white' stroke-width='0.5'><title>{esc(cat)}: {v:,} B ({esc(human_bytes(v))})</title></rect>")
            base += v
        out.append(_text(cx, y(base) - 6, f"{base / MiB:,.3f} MiB", 12, "middle", "font-weight='600'"))
        out.append("</g>")
        for j, line in enumerate(str(st["label"]).split("\n")):
            out.append(_text(cx, top + plot_h + 18 + 14 * j, line, 12 if j == 0 else 11, "middle"))
    if any(s.get("parts") is None for s in stacks) and "unattributed" not in used:
        used.append("unattributed")
    lx = w - right + 24
    for j, cat in enumerate(reversed([c for c in list(categories) + ["unattributed"] if c in used])):
        yy = top + 10 + 22 * j
        out.append(f"<rect x='{lx}' y='{yy - 10}' width='14' height='14' fill='{CATEGORY_COLORS.get(cat, '#999')}'/>")
        out.append(_text(lx + 20, yy + 2, cat, 12))
    out.append("</svg>")
    return "".join(out)


def histogram_svg(hist: dict[str, list[int]], longest: int, cut: int | None = None,
                  title: str = "tokens per sample") -> str:
    """Bars of a length histogram (``{"edges", "counts"}``, planner.data.batching.histogram); the bin holding the
    ``longest`` sample is red and labelled, and a dashed line marks the truncation ``cut`` (--max-seq-len)."""
    edges, counts = hist["edges"], hist["counts"]
    w, h, left, right, top, bottom = 760, 300, 70, 30, 30, 50
    plot_w, plot_h = w - left - right, h - top - bottom
    cmax = max(counts + [1])
    step = _nice_step(cmax)
    ymax = math.ceil(cmax / step) * step
    x = lambda v: left + plot_w * v / edges[-1]  # noqa: E731
    y = lambda v: top + plot_h * (1 - v / ymax)  # noqa: E731
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='chart histogram' viewBox='0 0 {w} {h}' width='{w}' "
           f"height='{h}' role='img' aria-label='{esc(title)}'>"]
    k = 0.0
    while k <= ymax + 1e-9:
        out.append(f"<line x1='{left}' x2='{w - right}' y1='{y(k):.1f}' y2='{y(k):.1f}' stroke='#e5e5e5'/>")
        out.append(_text(left - 6, y(k) + 4, f"{k:g}", 11, "end"))
        k += step
    out.append(_text(14, top + plot_h / 2, "samples", 12, "middle", f"transform='rotate(-90 14 {top + plot_h / 2:.1f})'"))
    mark = next((i for i in range(len(counts)) if longest < edges[i + 1]), len(counts) - 1)
    for i, c in enumerate(counts):
        x0, x1 = x(edges[i]), x(edges[i + 1])
        color = "#c0392b" if i == mark else "#4c78a8"
        out.append(f"<rect class='bin' data-from='{edges[i]}' data-to='{edges[i + 1] - 1}' data-count='{c}' "
                   f"x='{x0 + 1:.1f}' y='{y(c):.2f}' width='{max(0.0, x1 - x0 - 2):.1f}' height='{y(0) - y(c):.2f}' "
                   f"fill='{color}'><title>{edges[i]:,}–{edges[i + 1] - 1:,} tokens: {c:,} samples</title></rect>")
    for i in range(0, len(edges), max(1, len(edges) // 6)):
        out.append(_text(x(edges[i]), top + plot_h + 16, f"{edges[i]:,}", 11, "middle"))
    out.append(_text(left + plot_w / 2, h - 10, title, 12, "middle"))
    lx = x((edges[mark] + edges[mark + 1]) / 2)
    out.append(_text(min(lx, w - right - 4), y(counts[mark]) - 6, f"longest: {longest:,}", 12,
                     "end" if lx > w - right - 120 else "middle", "fill='#c0392b' font-weight='600'"))
    if cut is not None and cut < edges[-1]:
        out.append(f"<line class='cut' x1='{x(cut):.1f}' x2='{x(cut):.1f}' y1='{top}' y2='{top + plot_h}' "
                   "stroke='#333' stroke-dasharray='4 3'/>")
        out.append(_text(x(cut) + 4, top + 12, f"--max-seq-len {cut:,}", 11))
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------------------------- timeline


def timeline_svg(tl: dict[str, Any], predicted_phase_peaks: dict[str, int] | None = None,
                 title: str = "") -> str:
    """Live bytes over a run's measured steps (``measured.memory.timeline``): the envelope of
    each downsampled run of events, phases shaded, the measured peak marked, and the predicted
    peak of each phase as a dashed line across every segment of that phase."""
    w, h, left, right, top, bottom = 1000, 380, 70, 20, 44 + (20 if title else 0), 56
    plot_w, plot_h = w - left - right, h - top - bottom
    n = max(1, int(tl.get("events") or 0))
    his, los = tl.get("hi") or [], tl.get("lo") or []
    pp = predicted_phase_peaks or {}
    peak = tl.get("peak") or {}
    vals = his + los + [v for k, v in pp.items() if k in PHASE_COLORS] + [peak.get("bytes", 0)]
    vmax, vmin = max(vals + [1]), min(vals + [0]) if vals else 0
    unit, uname = _byte_unit(vmax)
    # the y axis starts at 0 unless the live bytes never fall below half the top: then at a round
    # number under the lowest value (said on the axis), so the step's shape is visible
    lo_axis = 0.0
    span = vmax / unit
    if vmin > 0.5 * vmax:
        step0 = _nice_step((vmax - vmin) / unit)
        lo_axis = math.floor(vmin / unit / step0) * step0 - step0
        span = vmax / unit - lo_axis
    step = _nice_step(span)
    top_axis = lo_axis + math.ceil(span / step) * step
    x = lambda e: left + plot_w * e / n  # noqa: E731
    y = lambda v: top + plot_h * (1 - (v / unit - lo_axis) / (top_axis - lo_axis))  # noqa: E731
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='chart timeline' viewBox='0 0 {w} {h}' width='{w}' "
           f"height='{h}' role='img' aria-label='{esc(title or 'memory timeline')}' data-peak='{int(peak.get('bytes', 0))}'>"]
    if title:
        out.append(_text(left, 20, title, 14, extra="font-weight='600'"))
    steps_seen: dict[int, float] = {}
    for a, b, ph, stp in tl.get("phases") or []:
        if ph in PHASE_COLORS:
            out.append(f"<rect class='phase' data-phase='{esc(ph)}' x='{x(a):.1f}' y='{top}' width='{max(0.5, x(b) - x(a)):.1f}' "
                       f"height='{plot_h}' fill='{PHASE_COLORS[ph]}'><title>{esc(ph)}, step {stp}</title></rect>")
            steps_seen.setdefault(int(stp), x(a))
    k = lo_axis
    while k <= top_axis + 1e-9:
        yy = y(k * unit)
        out.append(f"<line x1='{left}' x2='{w - right}' y1='{yy:.1f}' y2='{yy:.1f}' stroke='#00000018'/>")
        out.append(_text(left - 6, yy + 4, f"{k:g}", 11, "end"))
        k += step
    ylab = uname + (f" (axis from {lo_axis:g})" if lo_axis else "")
    out.append(_text(14, top + plot_h / 2, ylab, 12, "middle", f"transform='rotate(-90 14 {top + plot_h / 2:.1f})'"))
    for stp, xx in sorted(steps_seen.items()):
        out.append(_text(xx + 3, top - 6, f"step {stp}", 11))
    ts = tl.get("t") or []
    bw = int(tl.get("bucket_events") or 1)
    if ts:
        upper = " ".join(f"{x(t):.1f},{y(v):.1f} {x(min(n, t + bw)):.1f},{y(v):.1f}" for t, v in zip(ts, his, strict=True))
        lower = " ".join(f"{x(min(n, t + bw)):.1f},{y(v):.1f} {x(t):.1f},{y(v):.1f}"
                         for t, v in reversed(list(zip(ts, los, strict=True))))
        out.append(f"<polygon class='envelope' points='{upper} {lower}' fill='#4c78a8' fill-opacity='0.35' stroke='none'/>")
        out.append(f"<polyline class='live' points='{upper}' fill='none' stroke='#1f4e79' stroke-width='1.2'/>")
    for a, b, ph, _stp in tl.get("phases") or []:
        if ph in pp:
            yy = y(pp[ph])
            out.append(f"<line class='predicted' data-phase='{esc(ph)}' data-bytes='{int(pp[ph])}' x1='{x(a):.1f}' "
                       f"x2='{x(b):.1f}' y1='{yy:.1f}' y2='{yy:.1f}' stroke='#d62728' stroke-width='2' "
                       f"stroke-dasharray='5 3'><title>predicted {esc(ph)} peak {int(pp[ph]):,} B</title></line>")
    if peak:
        px, py = x(peak.get("event", 0)), y(peak.get("bytes", 0))
        out.append(f"<circle class='peak' cx='{px:.1f}' cy='{py:.1f}' r='5' fill='#d62728' stroke='white'/>")
        label = f"measured peak {human_bytes(peak.get('bytes', 0))}"
        out.append(_text(px + (8 if px < left + plot_w * 0.7 else -8), py - 8, label, 12,
                         "start" if px < left + plot_w * 0.7 else "end", "font-weight='600'"))
    out.append(f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='none' stroke='#999'/>")
    out.append(_text(left + plot_w / 2, h - 26, "tensor allocations and frees in the measured steps (events, in order)",
                     12, "middle"))
    lx = left
    shown = [p for p in PHASE_COLORS if p != "generation" or any(seg[2] == p for seg in tl.get("phases") or [])]  # GRPO
    for name, sw in [(p, PHASE_COLORS[p]) for p in shown] + [("live bytes", "#4c78a8")]:
        out.append(f"<rect x='{lx}' y='{h - 14}' width='12' height='10' fill='{sw}' stroke='#bbb'/>")
        out.append(_text(lx + 16, h - 5, name, 11))
        lx += 26 + 7 * len(name)
    out.append(f"<line x1='{lx}' x2='{lx + 22}' y1='{h - 9}' y2='{h - 9}' stroke='#d62728' stroke-width='2' "
               "stroke-dasharray='5 3'/>")
    out.append(_text(lx + 27, h - 5, "predicted peak of the phase", 11))
    out.append("</svg>")
    return "".join(out)


# ----------------------------------------------------------------------------------- scatter


def _marker(shape: str, cx: float, cy: float, r: float, color: str, attrs: str) -> str:
    style = f"fill='{color}' fill-opacity='0.85' stroke='#222' stroke-width='0.6' {attrs}"
    if shape == "square":
        return f"<rect x='{cx - r:.1f}' y='{cy - r:.1f}' width='{2 * r:.1f}' height='{2 * r:.1f}' {style}"
    if shape == "triangle":
        return f"<polygon points='{cx:.1f},{cy - r * 1.2:.1f} {cx - r * 1.1:.1f},{cy + r * 0.8:.1f} " \
               f"{cx + r * 1.1:.1f},{cy + r * 0.8:.1f}' {style}"
    if shape == "diamond":
        return f"<polygon points='{cx:.1f},{cy - r * 1.3:.1f} {cx + r:.1f},{cy:.1f} {cx:.1f},{cy + r * 1.3:.1f} " \
               f"{cx - r:.1f},{cy:.1f}' {style}"
    if shape == "cross":
        q = r * 0.45
        pts = [(-q, -r), (q, -r), (q, -q), (r, -q), (r, q), (q, q), (q, r), (-q, r), (-q, q), (-r, q), (-r, -q), (-q, -q)]
        return "<polygon points='" + " ".join(f"{cx + a:.1f},{cy + b:.1f}" for a, b in pts) + f"' {style}"
    if shape == "star":
        pts = [(cx + (r * 1.3 if i % 2 == 0 else r * 0.55) * math.sin(math.pi * i / 5),
                cy - (r * 1.3 if i % 2 == 0 else r * 0.55) * math.cos(math.pi * i / 5)) for i in range(10)]
        return "<polygon points='" + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + f"' {style}"
    return f"<circle cx='{cx:.1f}' cy='{cy:.1f}' r='{r:.1f}' {style}"


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks between lo and hi (bytes) in MiB, or in GiB from 4 GiB up, thinned to at most ~8."""
    ticks = []
    unit = GiB if hi >= 4 * GiB and lo >= GiB / 2 else MiB
    for e in range(math.floor(math.log10(lo / unit)) - 1, math.ceil(math.log10(hi / unit)) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e * unit
            if lo <= v <= hi:
                ticks.append(v)
    while len(ticks) > 8:
        ticks = ticks[::2]
    return ticks


def scatter_svg(points: list[dict[str, Any]], x_label: str, y_label: str, color_title: str, marker_title: str,
                band: float = 0.05, title: str = "", names: tuple[str, str] = ("predicted", "measured")) -> str:
    """Log-log scatter of ``{"x", "y", "color", "marker", "label"}`` points (bytes), with the
    ``y = x`` line and the band where ``|x - y| / y <= band`` (an error within ``band`` of the
    measured value). Colors by the ``color`` key, marker shapes by the ``marker`` key; each point
    is a ``class='point'`` element with ``data-x`` and ``data-y`` and a tooltip."""
    w, h, left, right, top, bottom = 760, 560, 80, 190, 24 + (20 if title else 0), 60
    size = min(w - left - right, h - top - bottom)
    pts = [p for p in points if p.get("x") and p.get("y") and p["x"] > 0 and p["y"] > 0]
    vals = [p["x"] for p in pts] + [p["y"] for p in pts] or [MiB, 2 * MiB]
    lo, hi = min(vals) / 1.4, max(vals) * 1.4
    if hi / lo < 4:  # at least a factor 4 of range: a y = x line needs room
        mid = math.sqrt(lo * hi)
        lo, hi = mid / 2, mid * 2
    L0, L1 = math.log10(lo), math.log10(hi)
    x = lambda v: left + size * (math.log10(v) - L0) / (L1 - L0)  # noqa: E731
    y = lambda v: top + size * (1 - (math.log10(v) - L0) / (L1 - L0))  # noqa: E731
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='chart scatter' viewBox='0 0 {w} {h}' width='{w}' "
           f"height='{h}' role='img' aria-label='{esc(title or 'predicted vs measured')}' data-points='{len(pts)}'>"]
    if title:
        out.append(_text(left, 20, title, 14, extra="font-weight='600'"))
    out.append(f"<defs><clipPath id='plotclip'><rect x='{left}' y='{top}' width='{size}' height='{size}'/></clipPath></defs>")
    # band: measured within [x / (1 + band), x / (1 - band)]
    b_lo, b_hi = 1 / (1 + band), 1 / (1 - band)
    poly = [(lo, lo * b_lo), (hi, hi * b_lo), (hi, hi * b_hi), (lo, lo * b_hi)]
    out.append("<polygon class='band' clip-path='url(#plotclip)' points='" + " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in poly)
               + "' fill='#2ca02c' fill-opacity='0.2' stroke='none'/>")
    for k in (b_lo, b_hi):
        out.append(f"<line class='band-edge' clip-path='url(#plotclip)' x1='{x(lo):.1f}' y1='{y(lo * k):.1f}' "
                   f"x2='{x(hi):.1f}' y2='{y(hi * k):.1f}' stroke='#2ca02c' stroke-width='0.8' stroke-dasharray='4 3'/>")
    for v in _log_ticks(lo, hi):
        out.append(f"<line x1='{x(v):.1f}' x2='{x(v):.1f}' y1='{top}' y2='{top + size}' stroke='#eee'/>")
        out.append(f"<line x1='{left}' x2='{left + size}' y1='{y(v):.1f}' y2='{y(v):.1f}' stroke='#eee'/>")
        label = f"{v / GiB:g} GiB" if v >= GiB and (v / GiB) == round(v / GiB, 3) else f"{v / MiB:g} MiB"
        out.append(_text(x(v), top + size + 16, label, 11, "middle"))
        out.append(_text(left - 6, y(v) + 4, label, 11, "end"))
    out.append(f"<line class='identity' x1='{x(lo):.1f}' y1='{y(lo):.1f}' x2='{x(hi):.1f}' y2='{y(hi):.1f}' "
               "stroke='#333' stroke-width='1'/>")
    out.append(f"<rect x='{left}' y='{top}' width='{size}' height='{size}' fill='none' stroke='#999'/>")
    colors = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(dict.fromkeys(str(p["color"]) for p in pts))}
    shapes = {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(dict.fromkeys(str(p["marker"]) for p in pts))}
    for p in pts:
        err = (p["x"] - p["y"]) / p["y"]
        tip = f"{p.get('label', '')}\n{names[0]} {p['x']:,} B, {names[1]} {p['y']:,} B, error {err * 100:+.3f}%"
        attrs = f"class='point' data-x='{int(p['x'])}' data-y='{int(p['y'])}'><title>{esc(tip)}</title></"
        el = _marker(shapes[str(p["marker"])], x(p["x"]), y(p["y"]), 5.5, colors[str(p["color"])], attrs)
        tag = "circle" if el.startswith("<circle") else "rect" if el.startswith("<rect") else "polygon"
        out.append(el + f"{tag}>")
    out.append(_text(left + size / 2, top + size + 38, x_label, 12, "middle"))
    out.append(_text(18, top + size / 2, y_label, 12, "middle", f"transform='rotate(-90 18 {top + size / 2:.1f})'"))
    lx, ly = left + size + 24, top + 8
    out.append(_text(lx, ly, color_title, 12, extra="font-weight='600'"))
    for i, (k, c) in enumerate(colors.items()):
        out.append(_marker("circle", lx + 6, ly + 18 + 18 * i, 5, c, "/>"))
        out.append(_text(lx + 16, ly + 22 + 18 * i, k, 12))
    ly += 30 + 18 * len(colors)
    out.append(_text(lx, ly, marker_title, 12, extra="font-weight='600'"))
    for i, (k, s) in enumerate(shapes.items()):
        out.append(_marker(s, lx + 6, ly + 18 + 18 * i, 5, "#ffffff", "/>"))
        out.append(_text(lx + 16, ly + 22 + 18 * i, k, 12))
    ly += 30 + 18 * len(shapes)
    out.append(f"<line x1='{lx}' x2='{lx + 20}' y1='{ly}' y2='{ly}' stroke='#333'/>")
    out.append(_text(lx + 26, ly + 4, f"{names[0]} = {names[1]}", 12))
    out.append(f"<rect x='{lx}' y='{ly + 12}' width='20' height='12' fill='#2ca02c' fill-opacity='0.2'/>")
    out.append(_text(lx + 26, ly + 22, f"within ±{band * 100:g}%", 12))
    out.append("</svg>")
    return "".join(out)
