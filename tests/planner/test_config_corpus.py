"""Every public axolotl and LLaMA-Factory LoRA example (issue 24's corpus, ``tests/fixtures/corpus/``) ends one of
two ways: planned, or refused in one line naming what qplan does not plan — no crash, no traceback — and each file's
outcome (and refusal's kind) is the one committed in ``reports/corpus/<tool>.json``, so a change that plans, refuses
or breaks a real config shows in review (regenerate with ``python bench/config_corpus.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import config_corpus as C  # noqa: E402

REPORT = ROOT / "reports" / "corpus" / "axolotl.json"
SIZES = {"axolotl": 178, "llamafactory": 29}


def _key(row: dict) -> tuple:
    return row["file"], row["stand_in"], row["outcome"], row.get("reason"), row.get("grad_ckpt"), row.get("optimizer")


@pytest.mark.parametrize("tool", sorted(SIZES))
def test_every_corpus_config_is_planned_or_refused_in_one_line_as_committed(tool):
    rows = C.walk(C.CORPORA / tool)
    assert len(rows) == SIZES[tool]
    crashes = [r for r in rows if r["outcome"] == "crash"]
    assert not crashes, crashes[:3]
    committed = json.loads((REPORT.parent / f"{tool}.json").read_text(encoding="utf-8"))
    assert [_key(r) for r in rows] == [_key(r) for r in committed]


def test_no_corpus_config_is_planned_past_what_the_plan_models():
    """The features that change a step's memory and are not planned yet are refused by name in every file that
    turns them on, never planned as the plain stack (issue 24's silent mis-plans: Liger kernels, experts quantized
    on load); Cut Cross Entropy, on by default once its plugin is loaded, is planned as ``loss: cce``, Liger's fused
    linear cross-entropy as ``loss: liger``; Liger's kernels the plan models are checked in ``test_liger.py``."""
    import yaml

    for r in json.loads(REPORT.read_text(encoding="utf-8")):
        if r["outcome"] != "planned":
            continue
        cfg = yaml.safe_load((C.CORPUS / r["file"]).read_text(encoding="utf-8"))
        plugins = cfg.get("plugins") or []
        # Cut Cross Entropy is on by default once its plugin is loaded: planned as such, never as the full logits
        cce = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin" in plugins and cfg.get(
            "cut_cross_entropy", True) not in (False, None)
        liger = "axolotl.integrations.liger.LigerPlugin" in plugins and bool(cfg.get("liger_fused_linear_cross_entropy"))
        assert r["loss"] == ("cce" if cce else "liger" if liger else "full"), r["file"]
        assert not any(v for k, v in cfg.items() if k in ("liger_cross_entropy", "liger_rms_norm_gated",
                                                           "liger_use_token_scaling")), r["file"]
        assert not cfg.get("quantize_moe_experts"), r["file"]
        assert not cfg.get("activation_offloading") and cfg.get("gradient_checkpointing") in (None, True, False), r["file"]
