"""Hostile input (issue 16): every kind of input that broke a promise, as a test.

The promise: bad input gets one line on stderr and exit code 2, never a traceback or exit 3;
nothing the user has is overwritten or lost; a plan a user edited is checked whole before
anything runs. Each test below failed before the validation layer (``planner/validate.py``) and
the safe writes (``planner/files.py``) and passes now. ``tests/test_fuzz.py`` then throws
generated input at the same promise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES
from qplan.cli.main import main

QPLAN = [sys.executable, "-c", "import sys; from qplan.cli.main import main; sys.exit(main())"]
LLAMA = json.loads((FIXTURES / "llama-tied.json").read_text())


def qplan(*args: str, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*QPLAN, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def refused(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback; returns the line."""
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, err[-2000:])
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in err, err
    return err


def in_process(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def refused_in_process(capsys, *args: str, needles=()) -> str:
    rc, _, err = in_process(capsys, *args)
    assert rc == 2, (rc, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    for n in needles:
        assert n in err, err
    return err


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


# ------------------------------------------------------------------------- user files lost


def test_output_never_clobbers_a_file_named_like_the_old_temporary(tmp_path, capsys):
    (tmp_path / "plan.json.tmp").write_text("my notes")
    rc, _, err = in_process(capsys, "estimate", "--model", "smollm2-135m", "--output", str(tmp_path / "plan.json"))
    assert rc == 0, err
    assert (tmp_path / "plan.json.tmp").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "plan.json.tmp"]


def test_output_never_follows_a_symlink_next_to_it(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "plan.json.tmp").symlink_to(victim)
    (tmp_path / "plan.json").write_text("{}")
    rc, _, err = in_process(capsys, "estimate", "--model", "smollm2-135m", "--output", str(tmp_path / "plan.json"),
                            "--force")
    assert rc == 0, err
    assert victim.read_text() == "precious"
    assert json.loads((tmp_path / "plan.json").read_text())["schema_version"] == 1


def test_output_naming_a_folder_is_refused_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    before = tree(tmp_path)
    refused_in_process(capsys, "estimate", "--model", "smollm2-135m", "--output", str(tmp_path / "out"), "--force",
                       needles=("is a directory",))
    assert tree(tmp_path) == before


# -------------------------------------------------------------------------- silent shadowing


def test_spec_add_does_not_shadow_a_bundled_spec_without_force(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QPLAN_SPEC_DIR", str(tmp_path / "specs"))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA))
    refused_in_process(capsys, "spec", "add", str(cfg), "--name", "smollm2-135m", needles=("bundled", "--force"))
    assert not (tmp_path / "specs").exists() or not list((tmp_path / "specs").iterdir())


def test_models_marks_user_specs_and_survives_a_broken_one(tmp_path, monkeypatch):
    specs = tmp_path / "specs"
    specs.mkdir()
    good = json.loads(Path(__file__).parents[1].joinpath("model_specs", "smollm2-135m.json").read_text())
    good["name"] = "mine"
    (specs / "mine.json").write_text(json.dumps(good))
    (specs / "broken.json").write_text('{"schema_version": 1, "name": "broken"')
    env = dict(os.environ, QPLAN_SPEC_DIR=str(specs))
    p = qplan("models", env=env)
    assert p.returncode == 0, p.stderr
    assert "skipped" in p.stderr and "broken" in p.stderr and "Traceback" not in p.stderr
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith("mine "))
    assert " user " in row
    assert "bundled" in next(ln for ln in p.stdout.splitlines() if ln.startswith("llama-3.2-3b "))


def test_a_forced_shadow_is_said_in_every_plan(tmp_path, monkeypatch):
    specs = tmp_path / "specs"
    specs.mkdir()
    spec = json.loads(Path(__file__).parents[1].joinpath("model_specs", "smollm2-135m.json").read_text())
    (specs / "smollm2-135m.json").write_text(json.dumps(spec))
    p = qplan("estimate", "--model", "smollm2-135m", "--format", "json", env=dict(os.environ, QPLAN_SPEC_DIR=str(specs)))
    assert p.returncode == 0, p.stderr
    assert any("shadows the bundled one" in w for w in json.loads(p.stdout)["warnings"])


# -------------------------------------------------------------- bad input that exited 0


@pytest.mark.parametrize("args, needles", [
    (["estimate", "--model", "smollm2-135m", "--alpha", "inf"], ["--alpha"]),
    (["estimate", "--model", "smollm2-135m", "--alpha", "nan"], ["--alpha"]),
    (["estimate", "--model", "smollm2-135m", "--dropout", "nan"], ["--dropout"]),
    (["estimate", "--model", "smollm2-135m", "--gpu", ""], ["--gpu"]),
    (["estimate", "--model", "", "--gpu", "t4"], ["--model"]),
    (["estimate", "--model", "smollm2-135m", "--r", "1" + "0" * 40], ["--r"]),
    (["estimate", "--model", "smollm2-135m", "--seq-len", "-5"], ["--seq-len"]),
    (["estimate", "--model", "smollm2-135m", "--targets", ""], ["--targets"]),
    (["fit", "--model", "smollm2-135m", "--gpu", "t4", "--top", "0"], ["--top"]),
    (["fit", "--model", "smollm2-135m", "--gpu", "t4", "--top", "-5"], ["--top"]),
    (["fit", "--model", "smollm2-135m", "--gpu", "", "--top", "3"], ["GPU"]),
])
def test_bad_options_are_refused(capsys, args, needles):
    refused_in_process(capsys, *args, needles=needles)


@pytest.mark.parametrize("change, needles", [
    ({"vocab_size": 0}, ["vocab_size", ">= 1"]),
    ({"hidden_size": None}, ["hidden_size"]),
    ({"num_hidden_layers": 10_000_000}, ["num_hidden_layers", "<= 1024"]),
    ({"num_hidden_layers": True}, ["num_hidden_layers", "bool"]),
    ({"hidden_size": "64"}, ["hidden_size", "str"]),
    ({"model_type": "../../etc"}, ["model_type"]),
])
def test_configs_out_of_physical_bounds_are_refused_before_any_work(tmp_path, change, needles):
    cfg = {k: v for k, v in {**LLAMA, **change}.items() if v is not None}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    t0 = time.monotonic()
    refused(qplan("estimate", "--model", str(path)), *needles)
    assert time.monotonic() - t0 < 30  # no 10-million-layer model is built


# ------------------------------------------------------------- qplan run trusts plan.json


@pytest.mark.parametrize("edit, needles", [
    (("training", "batch_size", -1), ["training.batch_size", ">= 1"]),
    (("training", "batch_size", "abc"), ["training.batch_size", "str"]),
    (("training", "optimizer", "rm -rf /"), ["training.optimizer", "adamw_torch"]),
    (("lora", "r", 0), ["lora.r"]),
    (("lora", "target_modules", []), ["lora.target_modules"]),
    (("quant", "quant", "int3"), ["quant.quant"]),
    (("training", "batchsize", 4), ["unknown field training.batchsize"]),
    (("model", "config", {"model_type": "llama", "num_hidden_layers": 10 ** 7, "hidden_size": 8, "vocab_size": 9}),
     ["model.config", "num_hidden_layers"]),
])
def test_an_edited_plan_is_checked_whole_before_anything_runs(tmp_path, capsys, edit, needles):
    rc, out, err = in_process(capsys, "estimate", "--model", "smollm2-135m", "--quant", "bf16", "--format", "json")
    plan = json.loads(out)
    section, key, value = edit
    plan[section][key] = value
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    runs = tmp_path / "runs"
    refused_in_process(capsys, "run", str(path), "--random-init", "--out-dir", str(runs), needles=needles)
    assert not runs.exists()  # nothing was created, no model loaded


# --------------------------------------------------------- internal errors for bad input


@pytest.mark.parametrize("extra, needle", [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--epochs", "nan"], "--epochs"),
    (["--epochs", "inf"], "--epochs"), (["--steps", "1" + "0" * 12], "--steps"),
])
def test_run_numbers_are_bounded(tmp_path, capsys, extra, needle):
    _, out, _ = in_process(capsys, "estimate", "--model", "smollm2-135m", "--quant", "bf16", "--format", "json")
    (tmp_path / "plan.json").write_text(out)
    refused_in_process(capsys, "run", str(tmp_path / "plan.json"), "--random-init", *extra,
                       "--out-dir", str(tmp_path / "r"), needles=(needle,))
    assert not (tmp_path / "r").exists()


def test_files_that_are_not_utf8_are_one_line(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_bytes(b'{"model_type": "llama\xff\xfe"}')
    refused_in_process(capsys, "estimate", "--model", str(bad), needles=("not UTF-8",))
    refused_in_process(capsys, "run", str(bad), "--random-init", "--out-dir", str(tmp_path / "r"), needles=("not UTF-8",))
    _, out, _ = in_process(capsys, "estimate", "--model", "smollm2-135m", "--quant", "bf16", "--format", "json")
    plan = tmp_path / "plan.json"
    plan.write_text(out)
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"text": "caf\xe9"}\n')
    refused_in_process(capsys, "run", str(plan), "--random-init", "--data", str(data), "--out-dir", str(tmp_path / "r"),
                       needles=("not UTF-8",))


def test_deeply_nested_json_is_one_line(tmp_path, capsys):
    deep = tmp_path / "config.json"
    deep.write_text('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused_in_process(capsys, "estimate", "--model", str(deep), needles=("nests",))
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": ' + "[" * 5000 + "]" * 5000 + "}\n")
    _, out, _ = in_process(capsys, "estimate", "--model", "smollm2-135m", "--quant", "bf16", "--format", "json")
    (tmp_path / "plan.json").write_text(out)
    refused_in_process(capsys, "run", str(tmp_path / "plan.json"), "--random-init", "--data", str(data),
                       "--out-dir", str(tmp_path / "r"), needles=("nests",))


def test_over_long_names_are_one_line(tmp_path, capsys):
    long = "x" * 300
    refused_in_process(capsys, "estimate", "--model", "smollm2-135m", "--output", str(tmp_path / f"{long}.json"))
    refused_in_process(capsys, "estimate", "--model", f"./{long}/config.json")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA))
    refused_in_process(capsys, "spec", "add", str(cfg), "--name", long, "--output-dir", str(tmp_path),
                       needles=("invalid spec name",))


def test_folder_options_naming_a_file_are_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    _, out, _ = in_process(capsys, "estimate", "--model", "smollm2-135m", "--quant", "bf16", "--format", "json")
    (tmp_path / "plan.json").write_text(out)
    refused_in_process(capsys, "run", str(tmp_path / "plan.json"), "--random-init", "--out-dir", str(afile),
                       needles=("is a file",))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA))
    refused_in_process(capsys, "spec", "add", str(cfg), "--name", "tiny", "--output-dir", str(afile),
                       needles=("is a file",))
    assert afile.read_text() == "not a folder"


@pytest.mark.parametrize("damage, needles", [
    (lambda s: s["inventory"]["linear"][0].pop("in_features"), ["inventory.linear[0]", "in_features"]),
    (lambda s: s["inventory"]["linear"][0].update(in_features="wide"), ["inventory.linear[0].in_features"]),
    (lambda s: s["inventory"].update(presets=[1, 2]), ["inventory.presets"]),
    (lambda s: s["config"].update(hidden_size=-1), ["config", "hidden_size"]),
    (lambda s: s.update(inventory=None), ["inventory"]),
])
def test_crafted_specs_are_one_line(tmp_path, capsys, monkeypatch, damage, needles):
    spec = json.loads(Path(__file__).parents[1].joinpath("model_specs", "smollm2-135m.json").read_text())
    spec["name"] = "crafted"
    damage(spec)
    (tmp_path / "crafted.json").write_text(json.dumps(spec))
    monkeypatch.setenv("QPLAN_SPEC_DIR", str(tmp_path))
    from qplan.planner.model.catalog import _load_named_spec

    _load_named_spec.cache_clear()
    try:
        refused_in_process(capsys, "estimate", "--model", "crafted", needles=needles)
    finally:
        _load_named_spec.cache_clear()


def test_report_skips_a_bad_run_folder_and_reports_the_good_ones(tmp_path, capsys):
    from qplan.planner.api import plan_dict
    from qplan.planner.document import dumps

    good, bad = tmp_path / "good", tmp_path / "bad"
    for d in (good, bad):
        d.mkdir()
    plan = plan_dict(model="smollm2-135m", quant="bf16")
    (good / "plan.json").write_text(dumps(plan))
    (good / "measured.json").write_text(json.dumps({
        "schema_version": 1, "status": "ok", "backend": "peft",
        "measured": {"params": {"trainable": plan["prediction"]["params"]["trainable"]},
                     "memory": {"device": "cpu", "tensor_peak": 1000}}}))
    (bad / "plan.json").write_text(dumps(plan))
    (bad / "measured.json").write_text("{}")
    rc, out, err = in_process(capsys, "report", str(bad), str(good), "--output", str(tmp_path / "summary"))
    assert rc == 0, err
    assert "warning: skipped" in err and str(bad) in err and "Traceback" not in err
    assert "| good |" in out and "| bad |" not in out
    rc, _, err = in_process(capsys, "report", str(bad), "--output", str(tmp_path / "summary2"))
    assert rc == 2 and "no readable run folder" in err


def test_force_replaces_only_regular_files_and_new_files_follow_the_umask(tmp_path, capsys):
    import stat

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    refused_in_process(capsys, "estimate", "--model", "smollm2-135m", "--output", str(pipe), "--force",
                       needles=("not a regular file",))
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)
    target = tmp_path / "real.txt"
    target.write_text("keep")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    refused_in_process(capsys, "estimate", "--model", "smollm2-135m", "--output", str(link), "--force",
                       needles=("not a regular file",))
    assert target.read_text() == "keep" and link.is_symlink()
    mask = os.umask(0)
    os.umask(mask)
    rc, _, err = in_process(capsys, "estimate", "--model", "smollm2-135m", "--output", str(tmp_path / "p.json"))
    assert rc == 0, err
    assert stat.S_IMODE(os.stat(tmp_path / "p.json").st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("device, needles", [
    ({"name": "../../escaped", "total_bytes": 10, "usable_bytes": 10, "bf16": True}, ["name"]),
    ({"name": "x", "total_bytes": 10, "usable_bytes": 10, "bf16": True, "peak_bf16_tflops": "fast"}, ["peak_bf16_tflops"]),
    ({"name": "x", "total_bytes": 10, "usable_bytes": 10, "bf16": "false"}, ["bf16"]),
    ({"name": "x", "total_bytes": 10, "usable_bytes": 10, "bf16": True, "memory_bandwidth_gb_s": -1}, ["bandwidth"]),
])
def test_device_files_are_checked(tmp_path, capsys, device, needles):
    path = tmp_path / "device.json"
    path.write_text(json.dumps(device))
    refused_in_process(capsys, "estimate", "--model", "smollm2-135m", "--gpu", str(path), needles=needles)
    refused_in_process(capsys, "fit", "--model", "smollm2-135m", "--gpu", str(path), "--objective", "time",
                       needles=needles)


def test_configs_missing_a_size_are_one_line_or_use_the_built_width(tmp_path, capsys):
    """Found by the fuzz suite in CI: a config without num_attention_heads crashed the memory
    terms (exit 3). It is now refused; a missing intermediate_size takes the width transformers
    built (the down projection's input in the inventory) instead of guessing 4h."""
    cfg = {k: v for k, v in LLAMA.items() if k != "num_attention_heads"}
    (tmp_path / "a.json").write_text(json.dumps(cfg))
    refused_in_process(capsys, "estimate", "--model", str(tmp_path / "a.json"), needles=("num_attention_heads",))
    cfg = {k: v for k, v in LLAMA.items() if k != "intermediate_size"}
    (tmp_path / "b.json").write_text(json.dumps(cfg))
    rc, out, err = in_process(capsys, "estimate", "--model", str(tmp_path / "b.json"), "--seq-len", "32", "--format", "json")
    assert rc == 0, err
    from qplan.planner.memory.terms import dims
    from qplan.planner.model.catalog import load_spec

    down = next(g for g in load_spec(str(tmp_path / "b.json")).inventory.linear if g.pattern.endswith("down_proj"))
    assert dims(load_spec(str(tmp_path / "b.json"))).i == down.in_features


@pytest.mark.parametrize("python", ["/nonexistent/python", "/etc/hostname"])
def test_an_unsloth_trace_with_a_bad_interpreter_is_one_line(tmp_path, python):
    """``--backend unsloth --method trace`` starts QPLAN_UNSLOTH_PYTHON: a path that is not an
    interpreter is one line and exit 2, not an internal error."""
    p = qplan("estimate", "--model", "smollm2-135m", "--backend", "unsloth", "--method", "trace",
              env=dict(os.environ, QPLAN_UNSLOTH_PYTHON=python))
    assert p.returncode == 2, p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("qplan:")]
    assert len(err) == 1 and "QPLAN_UNSLOTH_PYTHON" in err[0] and "internal error" not in err[0], p.stderr
    assert "Traceback" not in p.stderr
