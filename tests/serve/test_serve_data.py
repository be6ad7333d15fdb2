"""`qplan serve` with a dataset (issue 27): `data` is a Hub dataset id whose snapshot is in the server's HF cache —
a name, never a path (issue 29) — and the tokenizer is the model's, from the same cache. The plan and the fit search
are what `qplan estimate --data` gives on the same snapshot. A subprocess: the HF cache location is read at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """A HF cache holding smollm2-135m's tokenizer (qplan's byte-level one, with the model's config) and a dataset."""
    import random

    from datasets import Dataset

    from qplan.backends.modelsrc import byte_tokenizer
    from qplan.planner.model.catalog import load_spec

    hub = tmp_path_factory.mktemp("hf") / "hub"
    repo = hub / "models--HuggingFaceTB--SmolLM2-135M"
    byte_tokenizer().save_pretrained(repo / "snapshots" / "abc123")
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(load_spec("smollm2-135m").config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    data = hub / "datasets--me--chat" / "snapshots" / "def456" / "data"
    data.mkdir(parents=True)
    rng = random.Random(1)
    rows = [{"text": "word " * rng.randint(5, 80)} for _ in range(50)]
    Dataset.from_list(rows).to_parquet(data / "train-00000-of-00001.parquet")
    (hub.parent / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return hub


def _run(hub, code: str) -> dict:
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)


def test_serve_plans_a_cached_hub_dataset_as_estimate_plans_its_file(hf_cache):
    served = _run(hf_cache, "from qplan.cli.serve import estimate_text; print(estimate_text("
                            "'model=smollm2-135m&data=me/chat&batch-size=2&gpu=t4&max-seq-len=300'))")
    tok = hf_cache / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc123"
    cli = _run(hf_cache, "import sys; from qplan.cli.main import main; sys.exit(main(['estimate', '--model', "
                         f"'smollm2-135m', '--data', {str(hf_cache.parent / 'd.jsonl')!r}, '--tokenizer', {str(tok)!r}, "
                         "'--batch-size', '2', '--gpu', 't4', '--max-seq-len', '300', '--format', 'json']))")
    d = served["prediction"]["data"]
    assert d["samples"] == 50 and d["source"] == "me/chat" and served["training"]["padded"] is True
    assert served["training"] == cli["training"]
    assert served["prediction"]["memory"] == cli["prediction"]["memory"]
    keys = ("trained_tokens", "padded_tokens_per_epoch", "tokens", "histogram", "longest_sample")
    assert {k: d[k] for k in keys} == {k: cli["prediction"]["data"][k] for k in keys}
    fit = _run(hf_cache, "from qplan.cli.serve import fit_text; print(fit_text("
                         "'model=smollm2-135m&data=me/chat&gpu=t4&max-seq-len=300&quant=nf4&r=16'))")
    assert fit["data"]["seq_len"] == served["training"]["seq_len"]
