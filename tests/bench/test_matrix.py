"""The GPU matrix (bench/gpu/): order, coverage, skip logic, resumability, wheel trimming.

Fast and CPU-only: no torch is imported, no model is built, nothing is trained (cells are run
by a fake that writes a measured.json).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "bench" / "gpu"


def _load(name: str):
    key = f"qplan_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, GPU / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


mx = _load("matrix")
rm = _load("run_matrix")
pw = _load("prepare_wheels")


@pytest.fixture(scope="module")
def matrix():
    return mx.build_matrix(mx.DEFAULT_GPU)


# ----------------------------------------------------------------------------- order


def test_matrix_has_every_combination(matrix):
    ids = [v.cell.id for v in matrix.order] + [v.cell.id for v in matrix.skipped]
    assert len(ids) == len(set(ids)) == 4 * 2 * 3 * 2 * 2 * 2
    assert {v.cell for v in matrix.order} | {v.cell for v in matrix.skipped} == set(mx.all_cells())


def test_first_24_cover_every_value_of_every_axis(matrix):
    first = [v.cell for v in matrix.order[:mx.COVER_WITHIN]]
    assert mx.COVER_WITHIN == 24
    assert mx.uncovered_values(first) == []
    for i, (name, values) in enumerate(mx.AXES):
        assert {c.values()[i] for c in first} == set(values), name


def test_first_24_cover_every_runnable_pair(matrix):
    """Stronger than asked: every pair of axis values that some runnable cell has is in the first 24."""
    def pairs(cells):
        return set().union(*(mx._combos(c.values(), 2) for c in cells))

    runnable = [v.cell for v in matrix.order]
    assert pairs(runnable[:mx.COVER_WITHIN]) == pairs(runnable)


def test_order_is_deterministic(matrix):
    again = mx.build_matrix(mx.DEFAULT_GPU)
    assert [v.cell.id for v in again.order] == [v.cell.id for v in matrix.order]
    cells = mx.all_cells()
    assert mx.order_cells(cells) == mx.order_cells(list(cells))


def test_greedy_order_covers_values_as_soon_as_possible():
    order = mx.order_cells(mx.all_cells())
    assert mx.uncovered_values(order[:4]) == []  # 4 models: nothing can do it in fewer
    assert mx.uncovered_values(order[:3])


def test_uncovered_values_names_what_is_missing():
    only_peft = [c for c in mx.all_cells() if c.backend == "peft"]
    assert mx.uncovered_values(only_peft) == ["backend=unsloth"]


# ----------------------------------------------------------------------------- skip logic


def test_skipped_exactly_when_planner_says_it_does_not_fit(matrix):
    for v in matrix.order:
        assert v.plan["prediction"]["fits"] is True
    for v in matrix.skipped:
        assert v.plan["prediction"]["fits"] is False
        assert "predicted peak" in v.reason and "h100-80gb" in v.reason
    assert len(matrix.skipped) > 0  # 4x4096 without checkpointing does not fit 3B+ on 80 GB


@pytest.mark.parametrize("pick", ["order", "skipped"])
def test_verdict_matches_qplan_estimate_cli(matrix, pick):
    """The in-process plan is what `qplan estimate ... --format json` prints for the same cell."""
    v = getattr(matrix, pick)[-1]
    out = subprocess.run([sys.executable, "-m", "qplan.cli.main", *v.cell.estimate_argv(), "--format", "json"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    cli = json.loads(out.stdout)
    assert cli["prediction"]["fits"] == v.plan["prediction"]["fits"] == (pick == "order")
    assert cli["prediction"]["memory"] == v.plan["prediction"]["memory"]
    assert cli["training"] == v.plan["training"] and cli["quant"] == v.plan["quant"]


def test_skip_logic_with_a_stub_planner():
    from qplan.planner.errors import QPlanError

    cells = mx.all_cells()[:6]

    def plan_fn(cell, gpu):
        if cell == cells[0]:
            raise QPlanError("seq_len exceeds the model's context")
        fits = cell not in (cells[1], cells[2])
        return {"prediction": {"fits": fits, "headroom": 0 if fits else -1, "memory": {"peak": 100 * 2**30},
                               "params": {"base": 10**9}},
                "gpu": {"name": gpu, "usable_bytes": 80 * 2**30},
                "training": {"batch_size": 1, "seq_len": 512, "grad_ckpt": "hf"}, "backend": "peft"}

    m = mx.build_matrix("h100-80gb", plan_fn=plan_fn, cells=cells)
    assert [v.cell for v in m.skipped] == cells[:3]
    assert m.skipped[0].reason.startswith("planner refused: seq_len")
    assert "100.0 GiB > usable 80.0 GiB" in m.skipped[1].reason
    assert {v.cell for v in m.order} == set(cells[3:])
    m2 = mx.build_matrix("h100-80gb", plan_fn=plan_fn, cells=cells, include_skipped=True)
    assert [v.cell for v in m2.order][-2:] in ([cells[1], cells[2]], [cells[2], cells[1]])
    assert [v.cell for v in m2.skipped] == [cells[0]]


# ----------------------------------------------------------------------------- resumability


def _measured(run_dir: Path, status: str) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "measured.json").write_text(json.dumps({"status": status}))
    return run_dir


def test_resume_decision(tmp_path):
    cell = tmp_path / "cell"
    assert rm.resume_decision(cell, retry_failed=False) is None
    _measured(cell / "20260101T000000Z-m-peft", "running")  # killed mid-run: not finished
    assert rm.resume_decision(cell, retry_failed=False) is None
    (cell / "cell.json").write_text(json.dumps({"status": "failed"}))
    assert rm.resume_decision(cell, retry_failed=False) == "failed before"
    assert rm.resume_decision(cell, retry_failed=True) is None
    _measured(cell / "20260101T000100Z-m-peft", "oom")
    assert rm.resume_decision(cell, retry_failed=True) == "done"
    assert [p.name for p in rm.finished_runs(cell)] == ["20260101T000100Z-m-peft"]


def _options(tmp_path, **kw):
    base = dict(out_root=tmp_path / "reports", slug="fake-gpu", gpu="h100-80gb", device="cuda",
                model_store=tmp_path / "models", budget_s=None, cell_timeout=60, steps=None, limit=3,
                only=None, backends=None, include_skipped=False, retry_failed=False, max_backend_failures=3,
                tiny=False, dry_run=False, report=False, env_check=False)
    base.update(kw)
    return rm.Options(**base)


@pytest.fixture
def fake_runs(monkeypatch, tmp_path):
    """Replace model building and `qplan run` by fakes; record which cells ran."""
    ran: list[str] = []

    def ensure(self, model, need_bytes, log):
        return self.path(model)

    def run_cell_process(cmd, cell_dir, timeout, log):
        ran.append(cell_dir.name)
        _measured(cell_dir / "20260101T000000Z-fake", "ok")
        return 0, False

    monkeypatch.setattr(rm.ModelStore, "ensure", ensure)
    monkeypatch.setattr(rm, "run_cell_process", run_cell_process)
    return ran


def test_run_skips_cells_with_a_measured_json(tmp_path, fake_runs, matrix):
    first, second, third = (v.cell.id for v in matrix.order[:3])
    root = tmp_path / "reports" / "fake-gpu"
    _measured(root / second / "20250101T000000Z-earlier", "ok")
    assert rm.run(_options(tmp_path)) == 0
    assert fake_runs == [first, third]
    status = json.loads((root / "matrix-status.json").read_text())
    by_id = {c["id"]: c for c in status["cells"]}
    assert by_id[first]["status"] == by_id[second]["status"] == by_id[third]["status"] == "ok"
    assert json.loads((root / first / "cell.json").read_text())["status"] == "ok"
    assert len(list((root / "plans").glob("*.json"))) == len(matrix.order)
    # a second call finds everything done and runs nothing
    fake_runs.clear()
    assert rm.run(_options(tmp_path)) == 0
    assert fake_runs == []


def test_run_stops_starting_cells_when_the_budget_is_spent(tmp_path, fake_runs, matrix):
    assert rm.run(_options(tmp_path, budget_s=1.0)) == 0
    assert fake_runs == []
    status = json.loads((tmp_path / "reports" / "fake-gpu" / "matrix-status.json").read_text())
    assert {c["status"] for c in status["cells"][:3]} == {"not started"}
    assert any("time budget" in n for n in status["notes"])


def test_dry_run_script_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, str(GPU / "run_matrix.py"), "--dry-run", "--out-root", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "first 24 cover every axis value: yes" in out.stdout
    root = tmp_path / "no-gpu"
    doc = json.loads((root / "matrix.json").read_text())
    assert doc["cells_total"] == 192 and doc["runnable"] + doc["skipped_count"] == 192
    assert len(list((root / "plans").glob("*.json"))) == doc["runnable"]


@pytest.mark.parametrize("name,key", [("NVIDIA H100 80GB HBM3", "h100-80gb"), ("NVIDIA H200", "h200"),
                                      ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("Tesla T4", "t4"),
                                      ("NVIDIA L4", "l4"), ("NVIDIA L40S", "l40s"), ("Something", None)])
def test_gpu_names_map_to_planner_gpus(name, key):
    assert rm.planner_gpu_for(name) == key
    assert rm.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# ----------------------------------------------------------------------------- wheels


def _fake_wheel(path: Path, files: dict[str, bytes]) -> Path:
    dist = "bitsandbytes-0.50.2.dist-info"
    rows = [f"{n},{pw.record_hash(d)},{len(d)}" for n, d in files.items()] + [f"{dist}/RECORD,,"]
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{dist}/RECORD", "\n".join(rows) + "\n")
    return path


def test_trim_bitsandbytes_keeps_only_the_asked_cuda(tmp_path):
    libs = {f"bitsandbytes/libbitsandbytes_{k}.so": k.encode() * 100
            for k in ("cuda118", "cuda128", "cuda130", "cuda132", "cpu", "rocm64", "xpu2025")}
    src = _fake_wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
                      {"bitsandbytes/__init__.py": b"x", "bitsandbytes-0.50.2.dist-info/METADATA": b"m", **libs})
    dest = tmp_path / "out"
    dest.mkdir()
    out, dropped = pw.trim_bitsandbytes(src, dest, "130")
    assert out.name == "bitsandbytes-0.50.2-1cu130-py3-none-manylinux_2_24_x86_64.whl"
    pw.verify_wheel(out)
    names = set(zipfile.ZipFile(out).namelist())
    assert "bitsandbytes/libbitsandbytes_cuda130.so" in names and "bitsandbytes/libbitsandbytes_cpu.so" in names
    assert not any(n in names for n in ("bitsandbytes/libbitsandbytes_cuda128.so", "bitsandbytes/libbitsandbytes_rocm64.so"))
    assert len(dropped) == 5
    out12, _ = pw.trim_bitsandbytes(src, dest, "12")
    assert "1cu128" in out12.name
    out13, _ = pw.trim_bitsandbytes(src, dest, "13")
    assert "1cu130cu132" in out13.name
    with pytest.raises(SystemExit):
        pw.trim_bitsandbytes(src, dest, "999")


def test_verify_wheel_catches_a_bad_record(tmp_path):
    w = _fake_wheel(tmp_path / "x-1-py3-none-any.whl", {"x/a.py": b"a"})
    pw.verify_wheel(w)
    bad = tmp_path / "y-1-py3-none-any.whl"
    with zipfile.ZipFile(w) as zin, zipfile.ZipFile(bad, "w") as zout:
        for n in zin.namelist():
            zout.writestr(n, b"changed" if n == "x/a.py" else zin.read(n))
    with pytest.raises(SystemExit):
        pw.verify_wheel(bad)


def test_build_tag_in_wheel_names():
    assert pw.with_build_tag("unsloth-2026.10.9-py3-none-any.whl", "1nostudio") == "unsloth-2026.10.9-1nostudio-py3-none-any.whl"
    assert pw.with_build_tag("a-1-2old-py3-none-any.whl", "3new") == "a-1-3new-py3-none-any.whl"
    with pytest.raises(ValueError):
        pw.with_build_tag("a-1-py3-none-any.whl", "nodigit")


def test_cell_timeout_interrupts_the_run(tmp_path):
    log = tmp_path / "cell.log"
    rc, timed_out = rm.run_cell_process([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                        tmp_path, timeout=1.0, log=log)
    assert timed_out and rc != 0
    assert "timed out" in log.read_text()
