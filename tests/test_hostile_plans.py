"""Plans that contradict themselves (issue 29): ``qplan run`` and ``qplan export`` check a plan's internal
consistency before anything starts. A hand-edited world size that is not GPUs x nodes, a batch size (or any
setting) changed without its prediction, and a ``--gpus 1 --strategy zero3`` plan that used to train as a plain
single process on the CPU (skipping the ZeRO-on-CPU refusal) are each one line, exit 2, and nothing is created.
Every plan file qplan writes is sealed (the hash of its content): an edit is caught whatever the plan was made
from — a bundled name, a config path, a device file — where re-making the prediction was possible only for
names. Real plan files from ``qplan estimate``, real ``qplan`` processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_hostile_input import qplan, refused

EDITED = "plan.json was edited: its prediction does not match its settings; re-create it with qplan estimate"
RESEALED = ("plan.json was edited after qplan wrote it (its content no longer matches its seal); re-create it with "
            "qplan estimate")


def _plan(tmp_path: Path, *options: str, edit: dict | None = None, name: str = "plan.json",
          model: str = "smollm2-135m") -> Path:
    out = tmp_path / name
    p = qplan("estimate", "--model", model, *options, "--output", str(out))
    assert p.returncode == 0, p.stderr
    plan = json.loads(out.read_text())
    for path, value in (edit or {}).items():
        *parents, last = path.split(".")
        node = plan
        for k in parents:
            node = node[k]
        node[last] = value
    out.write_text(json.dumps(plan))
    return out


def _run(plan: Path, tmp_path: Path, *extra: str):
    runs = tmp_path / "runs"
    p = qplan("run", str(plan), "--random-init", "--device", "cpu", "--steps", "4", "--out-dir", str(runs), *extra,
              timeout=300)
    return p, runs


def test_a_world_size_that_is_not_gpus_times_nodes_is_refused(tmp_path):
    plan = _plan(tmp_path, "--gpus", "2", "--strategy", "ddp", edit={"distributed.world_size": 3})
    p, runs = _run(plan, tmp_path)
    line = refused(p, "world_size 3", "gpus_per_node 2 x nodes 1")
    assert "re-create it with qplan estimate" in line
    assert not runs.exists()


@pytest.mark.parametrize("field,value", [("training.batch_size", 8), ("training.seq_len", 2048), ("lora.r", 64),
                                         ("distributed.strategy", "ddp")])
def test_a_setting_edited_without_its_prediction_is_not_run(tmp_path, field, value):
    opts = ("--gpus", "2", "--strategy", "fsdp") if field.startswith("distributed") else ()
    plan = _plan(tmp_path, *opts, edit={field: value})
    p, runs = _run(plan, tmp_path)
    assert refused(p).strip() == "qplan: error: " + RESEALED
    assert not runs.exists()
    # without its seal (removed by hand), the prediction is re-made from the settings: still refused
    plan = _plan(tmp_path, *opts, edit={field: value, "seal": None}, name="unsealed.json")
    doc = json.loads(plan.read_text())
    del doc["seal"]
    plan.write_text(json.dumps(doc))
    p, runs = _run(plan, tmp_path)
    assert refused(p).strip() == "qplan: error: " + EDITED
    assert not runs.exists()


def _device_file(tmp_path: Path) -> Path:
    """A device file (not a catalog name): a plan made with it cannot be re-made by name."""
    dev = json.loads(qplan("gpus", "--format", "json").stdout)[0]
    dev.pop("aliases", None)
    dev["name"] = "my-card"
    (tmp_path / "my-card.json").write_text(json.dumps(dev))
    return tmp_path / "my-card.json"


@pytest.mark.parametrize("made_from", ["config path", "device file"])
@pytest.mark.parametrize("command", ["run", "export"])
def test_an_edit_is_caught_in_a_plan_not_made_from_names(tmp_path, made_from, command):
    """These plans were checked for their world size only: their model or GPU does not resolve by name, so the
    prediction could not be re-made. The seal catches the edit; the unedited plan passes."""
    from conftest import FIXTURES

    opts = ["--quant", "bf16"] + (["--loss", "trl"] if command == "export" else [])  # TRL's SFTTrainer fuses the head
    if made_from == "device file":
        opts += ["--gpu", str(_device_file(tmp_path))]
    model = str(FIXTURES / "llama-tied.json") if made_from == "config path" else "smollm2-135m"
    good = _plan(tmp_path, *opts, model=model, name="good.json")
    edited = _plan(tmp_path, *opts, model=model, edit={"training.batch_size": 8})
    out = tmp_path / "out.yml"
    for plan, ok in ((edited, False), (good, True)):
        if command == "export":
            p = qplan("export", str(plan), "--to", "trl", "--output", str(out))
        else:  # stops after the check, at the model folder that does not exist
            p = qplan("run", str(plan), "--model-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "runs"))
        if ok and command == "export" and made_from == "config path":  # checked, then: no Hub id to name the model by
            assert refused(p, "has no Hub id") and "was edited" not in p.stderr
        elif ok:
            assert "was edited" not in p.stderr, p.stderr
            assert (p.returncode == 0 and out.exists()) if command == "export" else "not a directory" in p.stderr
        else:
            assert refused(p).strip() == "qplan: error: " + RESEALED
            assert not out.exists() and not (tmp_path / "runs").exists()


def test_the_seal_survives_reformatting_but_not_a_changed_number(tmp_path):
    """The seal hashes values, not text: a plan re-indented and re-ordered (a JSON tool, an editor) is still the
    plan qplan wrote; a number changed by one, or a float in its last digit, is not."""
    from qplan.planner.api import check_consistent
    from qplan.planner.errors import QPlanError

    plan = json.loads(_plan(tmp_path, "--gpu", "t4").read_text())
    again = json.loads(json.dumps(dict(reversed(list(plan.items()))), indent=7, sort_keys=True))
    check_consistent(again)
    again["prediction"]["headroom"] = (again["prediction"]["headroom"] or 0) + 1
    with pytest.raises(QPlanError, match="no longer matches its seal"):
        check_consistent(again)
    again = json.loads(json.dumps(plan))
    share = again["prediction"]["params"]["trainable_share"]
    again["prediction"]["params"]["trainable_share"] = __import__("math").nextafter(share, 1.0)
    with pytest.raises(QPlanError, match="no longer matches its seal"):
        check_consistent(again)


@pytest.mark.parametrize("tool", ["axolotl", "trl"])
def test_a_setting_edited_without_its_prediction_is_not_exported(tmp_path, tool):
    loss = ["--loss", "trl"] if tool == "trl" else []  # TRL's SFTTrainer trains through its fused LM head
    plan = _plan(tmp_path, "--quant", "bf16", *loss, edit={"training.batch_size": 8})
    out = tmp_path / "out.yml"
    p = qplan("export", str(plan), "--to", tool, "--output", str(out))
    assert refused(p).strip() == "qplan: error: " + RESEALED
    assert not out.exists()
    # the same plan, unedited, exports: the check refuses contradictions, not plans
    good = _plan(tmp_path, "--quant", "bf16", *loss, name="good.json")
    p = qplan("export", str(good), "--to", tool, "--output", str(out))
    assert p.returncode == 0, p.stderr
    assert out.exists()


def test_an_unedited_plan_passes_the_check(tmp_path):
    """A plan straight from estimate (a GPU, a k-bit quant on a GPU without bf16, two ranks) gets past the
    consistency check: it stops at the missing --model-dir, which is checked after it."""
    for i, opts in enumerate([("--gpu", "t4", "--quant", "nf4", "--r", "32"), ("--gpus", "2", "--strategy", "ddp"),
                              ("--batch-size", "4", "--seq-len", "256", "--no-grad-ckpt")]):
        plan = _plan(tmp_path, *opts, name=f"p{i}.json")
        p = qplan("run", str(plan), "--model-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "runs"))
        refused(p, "none")
        assert "was edited" not in p.stderr and "not a directory" in p.stderr


@pytest.mark.parametrize("strategy,needle", [("zero3", "cannot train on the CPU"), ("zero2", "cannot train on the CPU"),
                                             ("fsdp", "1 GPU with --strategy fsdp")])
def test_a_one_gpu_plan_with_a_strategy_does_not_run_as_a_plain_process(tmp_path, strategy, needle):
    plan = _plan(tmp_path, "--gpus", "1", "--strategy", strategy)
    p, runs = _run(plan, tmp_path)
    refused(p, needle)
    assert not runs.exists()


def test_a_calibrated_plan_is_not_taken_for_an_edited_one(tmp_path):
    """A calibration file changes the overhead (CUDA context, allocator slack) and so the peak, and it is not
    among the plan's settings: the consistency check compares the tensor terms, so such a plan still runs and
    exports, while an edited batch size in it is still caught."""
    import json

    from qplan.planner.api import check_consistent, plan_dict
    from qplan.planner.errors import QPlanError

    cal = tmp_path / "a100.json"
    cal.write_text(json.dumps({"device": "a100-80gb", "efficiency": 0.4, "runs": 1, "cuda_context_bytes": 123456789,
                               "allocator_slack_fraction": 0.2}))
    plan = plan_dict(model="smollm2-135m", gpu="a100-80gb", calibration=str(cal))
    assert plan["prediction"]["memory"]["overhead"] != plan_dict(model="smollm2-135m", gpu="a100-80gb")[
        "prediction"]["memory"]["overhead"]
    check_consistent(plan)
    plan["training"]["batch_size"] = 4
    with pytest.raises(QPlanError, match="was edited"):
        check_consistent(plan)
