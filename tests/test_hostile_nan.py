"""NaN and infinity (issue 29): a run whose loss went NaN wrote a bare ``NaN`` token into measured.json,
which the reader refused, so the run vanished from ``qplan report`` and ``qplan calibrate``. measured.json
now holds null for a non-finite number, and a file an older qplan wrote with NaN is still read."""

from __future__ import annotations

import json
import math

import pytest
from test_hostile_input import in_process

from qplan.backends.worker import _write_json
from qplan.planner.api import plan_dict
from qplan.planner.document import dumps


def _run_folder(tmp_path, name, write):
    plan = plan_dict(model="smollm2-135m", quant="bf16", gpu="t4")
    d = tmp_path / name
    d.mkdir()
    (d / "plan.json").write_text(dumps(plan))
    doc = {"schema_version": 1, "status": "ok", "backend": "peft",
           "measured": {"params": {"trainable": plan["prediction"]["params"]["trainable"]},
                        "memory": {"device": "cuda:0", "tensor_peak": 1000},
                        "loss": [2.5, float("nan"), float("inf")],
                        "timing": {"mean_step_seconds": 0.5}}}
    write(d / "measured.json", doc)
    return d


def test_measured_json_is_written_without_a_bare_nan(tmp_path):
    d = _run_folder(tmp_path, "run", _write_json)  # the worker's own writer
    text = (d / "measured.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["measured"]["loss"] == [2.5, None, None]
    assert all(v is None or math.isfinite(v) for v in json.loads(text)["measured"]["loss"])


@pytest.mark.parametrize("writer", ["qplan", "older qplan (bare NaN)"])
def test_a_run_whose_loss_went_nan_is_reported_and_calibrated(tmp_path, capsys, writer):
    write = _write_json if writer == "qplan" else (lambda p, doc: p.write_text(json.dumps(doc)))
    d = _run_folder(tmp_path, "run", write)
    rc, out, err = in_process(capsys, "report", str(d), "--output", str(tmp_path / "summary"))
    assert rc == 0 and "skipped" not in err, err
    assert "| run |" in out
    rc, out, err = in_process(capsys, "calibrate", str(d), "--gpu", "t4", "--format", "json",
                              "--output", str(tmp_path / "t4.json"))
    assert rc == 0 and "skipped" not in err, err
    assert json.loads(out)["runs"] == 1


def test_a_run_page_says_the_loss_diverged(tmp_path):
    from qplan.backends.report import read_run, write_run_report

    d = _run_folder(tmp_path, "run", lambda p, doc: p.write_text(json.dumps(doc)))
    plan, doc = read_run(d)
    assert doc["measured"]["loss"] == [2.5, None, None]
    md = write_run_report(d, plan, doc)["md"].read_text()
    assert "NaN" in md and "diverged" in md
