"""Plan every public trainer config of a corpus, as a new user would: planned, refused (one line), or a crash.

The corpora are in ``tests/fixtures/corpus/`` (PROVENANCE.md there): axolotl's 178 LoRA/QLoRA examples and
LLaMA-Factory's 29 LoRA examples, each folder laid out as its repository, so a relative ``deepspeed`` path
resolves as it does when the tool runs from its repository root. Each file is run as ``qplan estimate
--from-config FILE --model STAND_IN --format json`` from that root. Model weights cannot be downloaded here, so
the base model is mapped to a bundled stand-in of the same family (``STAND_INS``), or SmolLM2-135M where none is
bundled: what is tested is the config's settings, and the report says which stand-in each file got.

    python bench/config_corpus.py            # writes reports/corpus/{axolotl,llamafactory}.json and README.md

``tests/planner/test_config_corpus.py`` walks the same corpora and checks each file's outcome against the
committed JSON.
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
CORPORA = ROOT / "tests" / "fixtures" / "corpus"
CORPUS = CORPORA / "axolotl"
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
#: a base model id naming a checkpoint saved quantized: only its own config shows how (qplan refuses the packed
#: formats, planner/model/weights.py PACKED_METHODS), so a stand-in's plan of it says nothing of the checkpoint
PREQUANTIZED = re.compile(r"gptq|awq|aqlm|nvfp4|fp8|-bnb-|hqq|int4|int8", re.I)
#: corpus -> (what marks a LoRA file, the key naming its base model)
KINDS = {
    "axolotl": (re.compile(r"^adapter:\s*(lora|qlora)\s*$", re.M), "base_model"),
    "llamafactory": (re.compile(r"^finetuning_type:\s*lora\b", re.M), "model_name_or_path"),
}


def stand_in(base_model: str) -> str:
    """The bundled model that plans ``base_model``'s config (see ``STAND_INS``)."""
    name = (base_model or "").lower()
    return next((m for pat, m in STAND_INS if re.search(pat, name)), DEFAULT_STAND_IN)


def corpus_files(root: Path = CORPUS) -> list[Path]:
    """Every LoRA/QLoRA config under ``root`` (a corpus of ``KINDS``), sorted."""
    mark = KINDS[root.name][0]
    return sorted(p for p in root.rglob("*.y*ml") if mark.search(p.read_text(encoding="utf-8")))


def reason(message: str) -> str:
    """A refusal's kind: the key or feature its one line names (``axolotl config: KEY ...``)."""
    text = message.removeprefix("qplan: error: ").strip()
    text = re.sub(r"^(axolotl|llamafactory) config: ", "", text)
    return re.split(r"[:(]| is | needs | must | asks ", text, maxsplit=1)[0].strip()[:80]


def plan_file(path: Path, root: Path = CORPUS) -> dict:
    """One file's outcome (run from ``root``): ``planned`` / ``refused`` (exit 2, one line) / ``crash``."""
    import yaml

    from qplan.cli.main import main

    try:
        base = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(KINDS[root.name][1], "")
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
    row = {"file": str(path.relative_to(root)), "base_model": str(base), "stand_in": model,
           "prequantized": bool(PREQUANTIZED.search(str(base)))}
    if rc == 0:
        plan = json.loads(out.getvalue())
        t = plan["training"]
        row.update(outcome="planned", grad_ckpt=t["grad_ckpt"], optimizer=t["optimizer"], loss=t.get("loss", "full"),
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


def render(name: str, rows: list[dict]) -> str:
    outcomes = Counter(r["outcome"] for r in rows)
    preq = sum(1 for r in rows if r["outcome"] == "planned" and r["prequantized"])
    reasons = Counter(r["reason"] for r in rows if r["outcome"] == "refused" and not r["stand_in_artefact"])
    artefacts = sum(1 for r in rows if r["outcome"] == "refused" and r["stand_in_artefact"])
    ckpt = Counter(r["grad_ckpt"] for r in rows if r["outcome"] == "planned")
    opts = Counter(r["optimizer"] for r in rows if r["outcome"] == "planned")
    losses = Counter(r.get("loss", "full") for r in rows if r["outcome"] == "planned")
    lines = [
        f"## {name}",
        "",
        f"Corpus: `tests/fixtures/corpus/{name}`. Per file: `{name}.json`.",
        "",
        f"**{len(rows)} files: {outcomes['planned']} planned, {outcomes['refused']} refused in one line naming "
        f"the feature, {outcomes['crash']} crashes.**",
        "",
        f"Of the planned, {preq} name a checkpoint saved quantized (GPTQ, AWQ, NVFP4, ...): only the real config shows "
        "its quantization, which qplan refuses for packed formats; the stand-in's plan says nothing of it.",
        "",
        f"Of the refusals, {artefacts} name a module or parameter the stand-in lacks (the real model would be "
        "needed: not counted below); the rest name a feature of the config.",
        "",
        "Planned, by checkpointing: " + ", ".join(f"{k} {v}" for k, v in ckpt.most_common()) + "; by optimizer: "
        + ", ".join(f"{k} {v}" for k, v in opts.most_common()) + "; by loss: "
        + ", ".join(f"{k} {v}" for k, v in losses.most_common()) + ".",
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parts = []
    for name in KINDS:
        rows = walk(CORPORA / name)
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        parts.append(render(name, rows))
    head = ("# Public trainer configs, planned as a new user would\n\n"
            f"Command: `python bench/config_corpus.py` ({time.perf_counter() - t0:.0f} s). Each base model is mapped "
            "to a bundled stand-in of its family (SmolLM2-135M where none is bundled); each file is run from its "
            "corpus root, as the tool runs from its repository (PROVENANCE.md there).\n\n")
    (out / "README.md").write_text(head + "\n".join(parts), encoding="utf-8")
    print(head + "\n".join(parts))


if __name__ == "__main__":
    sys.exit(main())
