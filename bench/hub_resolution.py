"""Benchmark: `qplan estimate --model ORG/NAME` the first time and every time after.

The Hub is the stand-in of the tests (tests/fakehub.py) on 127.0.0.1 as ``HF_ENDPOINT``, so the
numbers are qplan's and huggingface_hub's own cost plus a loopback request, not a real network's.
Each call is a fresh process, as a user meets it:

* first call: fetch config.json, build the inventory on the meta device (torch + transformers), cache it;
* again, online: one HEAD request (does ``main`` still point at the cached commit?), then the cached spec;
* again, ``HF_HUB_OFFLINE=1``: the Hugging Face cache's ``refs/main`` and the cached spec, no huggingface_hub;
* a pinned commit (``@<sha>``): the cached spec, no network;
* a bundled model's Hub id (``meta-llama/Llama-3.2-3B``) and the bundled name, for reference.

    python bench/hub_resolution.py [--runs 7] [--out reports/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fakehub import SHA, serve  # noqa: E402


def run(args: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "qplan.cli.main", "estimate", *args, "--format", "json"],
                       capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{args}: {p.stderr.strip().splitlines()[-1]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "reports" / "benchmarks"))
    a = ap.parse_args()
    url, server = serve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "QPLAN_"))}
        base.update(HF_HOME=f"{tmp}/hf", QPLAN_CACHE_DIR=f"{tmp}/qc", HF_ENDPOINT=url, HF_HUB_DISABLE_TELEMETRY="1")
        first = run(["--model", "tiny/llama"], base)
        rows.append(("first call (fetch config.json, build the spec with torch, cache it)", [first]))
        cases = [
            ("again, online, within QPLAN_HUB_CHECK_SECONDS (cached commit and spec, no request)",
             ["--model", "tiny/llama"], base),
            ("again, online, QPLAN_HUB_CHECK_SECONDS=0 (HEAD request, cached spec)", ["--model", "tiny/llama"],
             {**base, "QPLAN_HUB_CHECK_SECONDS": "0"}),
            ("again, HF_HUB_OFFLINE=1 (Hugging Face cache + cached spec)", ["--model", "tiny/llama"],
             {**base, "HF_HUB_OFFLINE": "1"}),
            ("pinned commit tiny/llama@<sha>", ["--model", f"tiny/llama@{SHA}"], base),
            ("bundled model's Hub id meta-llama/Llama-3.2-3B", ["--model", "meta-llama/Llama-3.2-3B"], base),
            ("bundled name llama-3.2-3b (reference)", ["--model", "llama-3.2-3b"], base),
        ]
        for label, args, env in cases:
            run(args, env)  # warm the OS file cache
            rows.append((label, [run(args, env) for _ in range(a.runs)]))
    server.shutdown()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"command": f"python bench/hub_resolution.py --runs {a.runs}",
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "rows": [{"case": label, "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                     "runs": len(ts)} for label, ts in rows]}
    (out / "hub.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# `qplan estimate --model ORG/NAME`: first and later calls", "",
             f"Command: `{doc['command']}` · {doc['date']} · {doc['machine']}", "",
             "Each call is a fresh `qplan estimate ... --format json` process; the Hub is the tests' stand-in on "
             "127.0.0.1 (`HF_ENDPOINT`), so a real network adds its round trip to the online rows.", "",
             "| case | median | min | max | runs |", "|---|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['case']} | {r['median_s']:.3f} s | {r['min_s']:.3f} s | {r['max_s']:.3f} s | {r['runs']} |")
    (out / "hub.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
