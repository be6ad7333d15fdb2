"""Plan every public trainer config of a corpus, as a new user would: planned, refused (one line), or a crash.

The corpus is ``tests/fixtures/corpus/axolotl`` (axolotl's 178 LoRA/QLoRA examples, PROVENANCE.md there).
Each file is run as ``qplan estimate --from-config FILE --model STAND_IN --format json`` from the corpus root
(where axolotl's examples expect to be run: ``deepspeed_configs/`` is there). Model weights cannot be
downloaded here, so the base model is mapped to a bundled stand-in of the same family (``STAND_INS``), or
SmolLM2-135M where none is bundled: what is tested is the config's settings, and the report says which
stand-in each file got.

    python bench/config_corpus.py            # writes reports/corpus/axolotl.json and README.md (~1 min)

``tests/planner/test_config_corpus.py`` walks the same corpus and checks each file's outcome against the
committed ``axolotl.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fixtures" / "corpus" / "axolotl"
OUT = ROOT / "reports" / "corpus"
#: (pattern in the lower-cased base model id, bundled stand-in), first match wins
STAND_INS = (
    ("mixtral", "mixtral-8x7b"),
    ("gpt-oss", "gpt-oss-20b"),
    ("deepseek", "deepseek-v2-lite"),
    (r"qwen3[\w.-]*-a\d+b", "qwen3-30b-a3b"),
    ("qwen3", "qwen3-0.6b"),
    ("qwen", "qwen2.5-0.5b"),
    ("gemma-2", "gemma-2-9b"),
    ("phi", "phi-4"),
    (r"mistral|magistral|ministral|devstral", "mistral-nemo-12b"),
    (r"llama|smollm", "llama-3.2-1b"),
)
DEFAULT_STAND_IN = "smollm2-135m"
LORA = re.compile(r"^adapter:\s*(lora|qlora)\s*$", re.M)


def stand_in(base_model: str) -> str:
    """The bundled model that plans ``base_model``'s config (see ``STAND_INS``)."""
    name = (base_model or "").lower()
    return next((m for pat, m in STAND_INS if re.search(pat, name)), DEFAULT_STAND_IN)


def corpus_files(root: Path = CORPUS) -> list[Path]:
    """Every LoRA/QLoRA config under ``root``, sorted."""
    return sorted(p for p in root.rglob("*.y*ml") if LORA.search(p.read_text(encoding="utf-8")))


def reason(message: str) -> str:
    """A refusal's kind: the key or feature its one line names (``axolotl config: KEY ...``)."""
    text = message.removeprefix("qplan: error: ").strip()
    text = re.sub(r"^axolotl config: ", "", text)
    return re.split(r"[:(]| is | needs | must | asks ", text, maxsplit=1)[0].strip()[:80]


def plan_file(path: Path, root: Path = CORPUS) -> dict:
    """One file's outcome (run from ``root``): ``planned`` / ``refused`` (exit 2, one line) / ``crash``."""
    import yaml

    from qplan.cli.main import main

    try:
        base = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("base_model", "")
    except yaml.YAMLError:
        base = ""
    model = stand_in(str(base))
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["estimate", "--from-config", str(path), "--model", model, "--format", "json"])
    except BaseException as exc:  # noqa: BLE001 - a crash is the finding
        rc, err = -1, io.StringIO(f"{type(exc).__name__}: {exc}")
    finally:
        os.chdir(cwd)
    lines = [ln.replace(str(root), ".") for ln in err.getvalue().splitlines() if ln.strip()]
    row = {"file": str(path.relative_to(root)), "base_model": str(base), "stand_in": model}
    if rc == 0:
        plan = json.loads(out.getvalue())
        t = plan["training"]
        row.update(outcome="planned", grad_ckpt=t["grad_ckpt"], optimizer=t["optimizer"],
                   strategy=(plan.get("distributed") or {}).get("strategy", "single"),
                   warnings=len(plan.get("warnings", [])))
    elif rc == 2 and len([ln for ln in lines if ln.startswith("qplan: error:")]) == 1 and "Traceback" not in err.getvalue():
        msg = next(ln for ln in lines if ln.startswith("qplan: error:"))
        # a target the stand-in lacks says nothing of the config: the real model would be needed
        row.update(outcome="refused", reason=reason(msg), message=msg, stand_in_artefact=f" of {model}" in msg)
    else:
        row.update(outcome="crash", rc=rc, message=err.getvalue()[-2000:])
    return row


def walk(root: Path = CORPUS) -> list[dict]:
    return [plan_file(p, root) for p in corpus_files(root)]


def render(rows: list[dict], seconds: float) -> str:
    outcomes = Counter(r["outcome"] for r in rows)
    reasons = Counter(r["reason"] for r in rows if r["outcome"] == "refused" and not r["stand_in_artefact"])
    artefacts = sum(1 for r in rows if r["outcome"] == "refused" and r["stand_in_artefact"])
    ckpt = Counter(r["grad_ckpt"] for r in rows if r["outcome"] == "planned")
    opts = Counter(r["optimizer"] for r in rows if r["outcome"] == "planned")
    lines = [
        "# axolotl's LoRA / QLoRA examples, planned as a new user would",
        "",
        f"Command: `python bench/config_corpus.py` ({seconds:.0f} s). Corpus: `tests/fixtures/corpus/axolotl` "
        "(axolotl 067b021c8, PROVENANCE.md there); each base model mapped to a bundled stand-in of its family "
        f"(SmolLM2-135M where none is bundled), run from the corpus root. Per file: `axolotl.json`.",
        "",
        f"**{len(rows)} files: {outcomes['planned']} planned, {outcomes['refused']} refused in one line naming "
        f"the feature, {outcomes['crash']} crashes.**",
        "",
        f"Of the refusals, {artefacts} name a module or parameter the stand-in lacks (the real model would be "
        "needed: not counted below); the rest name a feature of the config.",
        "",
        "Planned, by checkpointing: " + ", ".join(f"{k} {v}" for k, v in ckpt.most_common()) + "; by optimizer: "
        + ", ".join(f"{k} {v}" for k, v in opts.most_common()) + ".",
        "",
        "| refused for | files |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in reasons.most_common()],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    rows = walk()
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "axolotl.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    (out / "README.md").write_text(render(rows, seconds), encoding="utf-8")
    print(render(rows, seconds))


if __name__ == "__main__":
    sys.exit(main())
