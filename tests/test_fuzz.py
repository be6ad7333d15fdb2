"""Fuzzing the promise (issues 16 and 29): generated CLI options, config files, plan documents, serve query
strings (and a concurrent burst), trainer configs with generated YAML alias trees, and plans mutated
before ``qplan export``.

For every generated input: exit 0 with a valid plan (it passes the plan schema), or exit 2 with
exactly one line on stderr — never a traceback, never exit 3 ("internal error"), never a hang
(each example runs under an alarm), and no file outside the output path touched.

Hypothesis runs with a fixed seed (the same examples every run and on every checkout, no
database written), so CI is reproducible; the budget keeps the file within a minute on a 2-core
CPU. Randomized runs with ten times the examples are a good habit after a change
(`tests/test_fuzz.py` with another ``@seed``): that is how the missing-heads crash was found.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import http.client
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, event, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import FIXTURES  # noqa: E402
from qplan.cli.main import main  # noqa: E402
from qplan.planner.document import check_plan  # noqa: E402

# a fixed seed per test (not derandomize, whose hash of the test can differ between checkouts):
# the same examples on every machine and in CI
FUZZ = settings(derandomize=False, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ALARM_S = 60
MODELS = ("smollm2-135m", "llama-3.2-1b", "qwen2.5-0.5b", "gemma-2-9b", "phi-4")


@contextlib.contextmanager
def alarm(seconds: int = ALARM_S):
    """Fail, rather than hang, when one example runs longer than ``seconds``."""

    def fire(*_):
        raise TimeoutError(f"an example ran longer than {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    # the alarm cannot interrupt a long C call (an alias bomb expanded or repr()'d inside PyYAML or the
    # interpreter): then faulthandler ends the whole run with the stacks, a loud failure rather than a hang
    faulthandler.dump_traceback_later(seconds + 30, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_cli(capsys, args: list[str], seconds: int = ALARM_S) -> tuple[int, str, str]:
    with alarm(seconds):
        rc = main(args)
    cap = capsys.readouterr()
    event(f"exit {rc}")  # shown by --hypothesis-show-statistics: both outcomes are exercised
    return rc, cap.out, cap.err


def assert_promise(rc: int, out: str, err: str, fmt_json: bool) -> None:
    assert rc in (0, 2), (rc, err[-1500:])
    assert "Traceback" not in err and "internal error" not in err, err[-1500:]
    if rc == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("qplan: error"), err[-1500:]
    elif fmt_json:
        plan = json.loads(out)
        check_plan(plan)
        assert all(isinstance(v, int) for v in plan["prediction"]["memory"].values())


# ------------------------------------------------------------------------------- options

weird_int = st.one_of(st.integers(-3, 5000), st.integers(-10 ** 30, 10 ** 30), st.sampled_from([0, 1, 2 ** 31, 2 ** 63]))
weird_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1.0, 0.999999]))
weird_text = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "all-linear", "q_proj,v_proj", "nf4", "t4",
                                                              "../../etc/passwd", "-x", "\x00", "é" * 300]))
OPTIONS = {
    "--r": weird_int, "--alpha": weird_float, "--dropout": weird_float, "--targets": weird_text,
    "--bias": weird_text, "--modules-to-save": weird_text, "--quant": weird_text, "--compute-dtype": weird_text,
    "--gpu": weird_text, "--seq-len": weird_int, "--batch-size": weird_int, "--grad-accum": weird_int,
    "--optimizer": weird_text, "--attn": weird_text, "--backend": weird_text, "--model": st.sampled_from(MODELS),
}
FLAGS = ("--dora", "--rslora", "--no-grad-ckpt", "--no-double-quant", "--no-upcast", "--strict-dtype")


@seed(20261201)
@settings(FUZZ, max_examples=250)
@given(opts=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: OPTIONS[k] for k in keys})),
       flags=st.lists(st.sampled_from(FLAGS), max_size=3, unique=True), model=st.sampled_from(MODELS))
def test_estimate_options(capsys, tmp_path, opts, flags, model):
    args = ["estimate", "--model", model, "--format", "json"]
    for k, v in opts.items():
        args += [k, repr(v) if isinstance(v, float) and not math.isfinite(v) else str(v)]
    args += flags
    before = tree(tmp_path)
    rc, out, err = run_cli(capsys, args)
    assert_promise(rc, out, err, fmt_json=True)
    assert tree(tmp_path) == before


@seed(20261201)
@settings(FUZZ, max_examples=60)
@given(opts=st.fixed_dictionaries({}, optional={
    "--seq-len": weird_int, "--batch-size": weird_int, "--r": weird_int, "--top": weird_int,
    "--quant": weird_text, "--targets": weird_text, "--optimizer": weird_text}),
       gpu=st.sampled_from(["t4", "a100-80gb", "", "nope", "rtx-4090"]))
def test_fit_options(capsys, opts, gpu):
    args = ["fit", "--model", "smollm2-135m", "--gpu", gpu, "--format", "json"]
    for k, v in opts.items():
        args += [k, str(v)]
    rc, out, err = run_cli(capsys, args)
    assert rc in (0, 2) and "Traceback" not in err and "internal error" not in err, err
    if rc == 0:
        res = json.loads(out)
        assert len(res["best"]) <= int(opts.get("--top", 10)) and res["fitting"] >= len(res["best"])


# ------------------------------------------------------------------------------ configs

LLAMA = json.loads((FIXTURES / "llama-tied.json").read_text())
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 40), 2 ** 40), st.floats(allow_nan=False),
                      st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=8)
SIZE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "max_position_embeddings", "head_dim", "model_type", "tie_word_embeddings", "rope_theta")


@seed(20261201)
@settings(FUZZ, max_examples=30)
@given(changes=st.dictionaries(st.sampled_from(SIZE_KEYS), st.one_of(json_value, st.integers(-4, 70)), max_size=3),
       drop=st.lists(st.sampled_from(SIZE_KEYS), max_size=2))
def test_config_files(capsys, tmp_path, changes, drop):
    cfg = copy.deepcopy(LLAMA)
    cfg.update(changes)
    for k in drop:
        cfg.pop(k, None)
    path = tmp_path / "fuzz" / "config.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(cfg))
    before = tree(tmp_path)
    rc, out, err = run_cli(capsys, ["estimate", "--model", str(path), "--seq-len", "32", "--format", "json"])
    assert_promise(rc, out, err, fmt_json=True)
    assert tree(tmp_path) == before


# -------------------------------------------------------------------------------- plans

_BASE_PLAN: dict = {}


def base_plan(capsys) -> dict:
    if not _BASE_PLAN:
        rc = main(["estimate", "--model", "smollm2-135m", "--quant", "bf16", "--format", "json"])
        assert rc == 0
        _BASE_PLAN.update(json.loads(capsys.readouterr().out))
    return copy.deepcopy(_BASE_PLAN)


def leaf_paths(doc, prefix=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from leaf_paths(v, (*prefix, k))
    elif isinstance(doc, list) and doc:
        for i, v in enumerate(doc[:3]):
            yield from leaf_paths(v, (*prefix, i))
    else:
        yield prefix


def _maybe_sealed(plan: dict, data) -> str:
    """The mutated plan as text: half the time with its old seal (an edit the seal must catch), half re-sealed
    (``document.dumps``, as a crafted plan would be: the checks behind the seal must hold on their own)."""
    from qplan.planner.document import dumps

    try:
        return dumps(plan) if data.draw(st.booleans()) else json.dumps(plan)
    except (TypeError, ValueError):  # a value JSON cannot hold: the plain text, whatever it is
        return json.dumps(plan)


@seed(20261201)
@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_plan_documents(capsys, tmp_path, data):
    plan = base_plan(capsys)
    paths = [p for p in leaf_paths(plan) if p and p[0] in ("lora", "quant", "training", "model", "backend",
                                                             "schema_version", "prediction")]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = plan
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = data.draw(json_value)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(_maybe_sealed(plan, data))
    runs = tmp_path / "runs"
    # --model-dir that is not there: a valid plan gets past validation and stops at the model dir
    rc, out, err = run_cli(capsys, ["run", str(plan_file), "--model-dir", str(tmp_path / "no-model"),
                                    "--out-dir", str(runs)])
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and "internal error" not in err and len(err.strip().splitlines()) == 1, err
    assert not runs.exists()  # nothing runs, nothing is created, before the plan is known good
    if "--model-dir" in err:
        check_plan(plan)



# -------------------------------------------------------------------------------- serve

@pytest.fixture(scope="module")
def server_port():
    """The real server on 127.0.0.1 (port 0: a free one), in this process; offline, so a generated Hub id is
    answered from the cache or refused, never looked up on the network."""
    from qplan.cli.serve import make_server
    from qplan.planner.model.catalog import gpu_catalog

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    doc = gpu_catalog()["t4"].to_json()
    doc["name"] = SECRET
    Path(DEVICE_FILE).write_text(json.dumps(doc))
    server = make_server("127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    Path(DEVICE_FILE).unlink(missing_ok=True)
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


def http_get(port: int, path: str, timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        res = conn.getresponse()
        return res.status, res.read()
    finally:
        conn.close()


def assert_answer(status: int, body: bytes) -> None:
    """200 with a plan document, or 400 with {"error": one line}; never 500, never a traceback."""
    assert status in (200, 400), (status, body[:800])
    doc = json.loads(body)
    if status == 400:
        assert set(doc) == {"error"}, doc
        line = doc["error"]
        assert line.startswith("qplan: error") and "\n" not in line and "Traceback" not in line, line
        assert line.isprintable(), line


SERVE_KEYS = ("model", "r", "gpu", "seq-len", "seq_len", "batch-size", "quant", "dora", "grad-ckpt", "optimizer",
              "targets", "alpha", "backend", "attn", "top", "output", "from-config", "calibration", "method", "format")
DEVICE_FILE = f"/tmp/qplan-fuzz-device-{os.getpid()}.json"  # a valid device file whose name must never come back
serve_value = st.one_of(weird_text, st.integers(-10 ** 6, 10 ** 6).map(str),
                        st.sampled_from(MODELS + ("true", "off", "", DEVICE_FILE, "/dev/zero", ".")))
SECRET = "SECRET-fuzz-do-not-leak"
structured_query = st.tuples(
    st.lists(st.tuples(st.one_of(st.sampled_from(SERVE_KEYS), st.text(max_size=10)), serve_value), max_size=7),
    st.one_of(st.just(0), st.integers(0, 150)),  # filler fields: past 100, a client error
).map(lambda kv: urlencode(kv[0] + [("x", "1")] * kv[1]))
# raw text with the query's own syntax in it: broken percent-escapes, empty fields, '=' in values
raw_query = st.lists(st.sampled_from(list("model=smollm2-135m&r=%+;gpu=t4x/\\'\"é\x00 ") + ["%zz", "%ff", "%0a", "&&", "%"]),
                     max_size=60).map(lambda cs: quote("".join(cs), safe="&=%+;/"))


@seed(20261201)
@settings(FUZZ, max_examples=200)
@given(query=st.one_of(structured_query, raw_query), route=st.sampled_from(["/api/estimate"] * 4 + ["/api/fit"]))
def test_serve_query_strings(capsys, server_port, query, route):
    with alarm():
        status, body = http_get(server_port, f"{route}?{query}")
    event(f"HTTP {status}")
    assert_answer(status, body)
    assert SECRET.encode() not in body
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-1500:]


def test_serve_concurrent_burst(capsys, server_port):
    """40 simultaneous clients, good and bad queries mixed: every one is answered 200 or 400."""
    queries = ["model=smollm2-135m&gpu=t4", "model=smollm2-135m&r=-1", "model=nope", "gpu=%ff",
               "model=smollm2-135m&" + "x=1&" * 120, "model=qwen2.5-0.5b&seq-len=99999999999",
               "model=llama-3.2-1b&quant=nf4&gpu=t4", "output=/tmp/x&model=smollm2-135m"]
    answers: list = []

    def client(i: int) -> None:
        try:
            answers.append(http_get(server_port, "/api/estimate?" + queries[i % len(queries)], timeout=120))
        except Exception as exc:  # noqa: BLE001 - a dropped connection is a failure to report, not to raise in a thread
            answers.append((None, repr(exc).encode()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    with alarm(180):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(answers) == 40
    for status, body in answers:
        assert_answer(status, body)
    assert sorted({s for s, _ in answers}) == [200, 400]
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------- trainer configs

TRAINER = FIXTURES.parent / "trainer_configs"
AXOLOTL = (TRAINER / "axolotl-qlora-llama-3.1-8b.yml").read_text()
AXOLOTL_KEYS = ("base_model", "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
                "sequence_len", "micro_batch_size", "gradient_accumulation_steps", "optimizer", "bf16", "fp16",
                "load_in_4bit", "load_in_8bit", "gradient_checkpointing", "flash_attention", "deepspeed", "fsdp",
                "fsdp_config", "revision_of_model", "bnb_4bit_quant_type", "strict")
yaml_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(), st.text(max_size=12),
                        st.sampled_from(["9" * 500, "1e999", "nan", ".inf", "&a", "*a", "!!python/object:os.system", "{", "[",
                                         "zero3", "all-linear", "meta-llama/Llama-3.1-8B"]))


def alias_tree(draw) -> str:
    """A generated anchor tree: ``levels`` anchors, each a list or mapping of ``fan`` aliases of earlier ones."""
    levels, fan = draw(st.integers(1, 14)), draw(st.integers(1, 12))
    lines = ['a0: &a0 ["leaf"]']
    for i in range(1, levels):
        refs = [f"*a{draw(st.integers(max(0, i - 2), i - 1))}" for _ in range(fan)]
        if draw(st.booleans()):
            lines.append(f"a{i}: &a{i} [{', '.join(refs)}]")
        else:
            lines.append(f"a{i}: &a{i} {{{', '.join(f'k{j}: {r}' for j, r in enumerate(refs))}}}")
    return "\n".join(lines) + "\n", f"*a{levels - 1}"


@seed(20261201)
@settings(FUZZ, max_examples=150, phases=[Phase.explicit, Phase.generate])  # no shrinking: a hang fails in 10 s, not 10 s a try
@given(data=st.data())
def test_trainer_configs_with_alias_trees(capsys, tmp_path, monkeypatch, data):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    head, top = alias_tree(data.draw)
    body = AXOLOTL
    for key in data.draw(st.lists(st.sampled_from(AXOLOTL_KEYS), max_size=4, unique=True)):
        body = body.replace(f"\n{key}:", f"\n{key}_was:")
        value = data.draw(st.one_of(st.just(top), yaml_scalar.map(lambda v: json.dumps(v) if not isinstance(v, str) else v)))
        body += f"\n{key}: {value}\n"
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(head + body)
    before = tree(tmp_path)
    start = time.monotonic()
    rc, out, err = run_cli(capsys, ["estimate", "--from-config", str(cfg), "--format", "json"], seconds=10)
    assert time.monotonic() - start < 10, "a trainer config took over 10 s"
    assert rc in (0, 2), (rc, err[-1500:])
    assert "Traceback" not in err and "internal error" not in err, err[-1500:]
    if rc == 2:
        errors = [ln for ln in err.splitlines() if ln.startswith("qplan: error")]
        assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and len(errors[0]) < 1000, err[-1500:]
    else:
        check_plan(json.loads(out))
    assert tree(tmp_path) == before


# -------------------------------------------------------------------------------- export

_EXPORT_PLAN: dict = {}


def export_plan(capsys) -> dict:
    if not _EXPORT_PLAN:
        rc = main(["estimate", "--model", "llama-3.2-1b", "--quant", "bf16", "--gpu", "t4", "--format", "json"])
        assert rc == 0
        _EXPORT_PLAN.update(json.loads(capsys.readouterr().out))
    return copy.deepcopy(_EXPORT_PLAN)


export_value = st.one_of(json_value, st.sampled_from(["t4\ntrust_remote_code: true", "../../etc/passwd", "main\x1b[31m",
                                                      "zero3", 2, 0, -1, 10 ** 400, "nf4", "bf16", "", None]))


@seed(20261201)
@settings(FUZZ, max_examples=200)
@given(data=st.data(), to=st.sampled_from(["axolotl", "llamafactory", "trl"]))
def test_export_of_mutated_plans(capsys, tmp_path, data, to):
    """A plan with one to three fields replaced: exit 0 with a config, or exit 2 and no output file — never 3."""
    plan = export_plan(capsys)
    paths = [p for p in leaf_paths(plan) if p and p[0] in ("lora", "quant", "training", "model", "backend", "gpu",
                                                             "distributed", "schema_version", "prediction")]
    written = [p for p in paths if p[0] in ("lora", "quant", "training", "gpu") or p[:2] == ("model", "source")]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(written) | st.sampled_from(paths))  # half: the fields export writes
        node = plan
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = data.draw(export_value)
    where = Path(tempfile.mkdtemp(dir=tmp_path))  # one folder per example: tmp_path outlives the examples
    plan_file = where / "plan.json"
    plan_file.write_text(_maybe_sealed(plan, data))
    out_file = where / "out.yml"
    rc, out, err = run_cli(capsys, ["export", str(plan_file), "--to", to, "--output", str(out_file)])
    assert_promise(rc, out, err, fmt_json=False)
    if rc == 2:
        assert tree(where) == {"plan.json"}, tree(where)
    else:
        assert tree(where) == {"plan.json", "out.yml"}
        import yaml

        cfg = yaml.safe_load(out_file.read_text())
        # no field of a plan becomes a key of its own, and the base model is a Hub id, never a path
        assert set(cfg) <= export_keys(capsys, to), set(cfg) - export_keys(capsys, to)
        model = cfg.get("base_model") or cfg.get("model_name_or_path")
        if model is not None:
            assert re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) and ".." not in model, model


_EXPORT_KEYS: dict = {}


def export_keys(capsys, to: str) -> set:
    """Every key the exporter writes for unmutated plans of this model, across the options a plan may switch on."""
    from qplan.planner.api import plan_dict
    from qplan.planner.interop.export import export_config

    if to not in _EXPORT_KEYS:
        keys: set = set()
        for extra in ({}, {"quant": "nf4", "upcast": to == "axolotl"}, {"quant": "int8", "upcast": to == "axolotl"},
                      {"dora": True, "rslora": True}, {"grad_ckpt": False}, {"targets": "q_proj,v_proj"},
                      {"modules_to_save": "lm_head"}, {"compute_dtype": "fp16"}, {"dropout": 0.0}):
            plan = plan_dict(**{"model": "llama-3.2-1b", "quant": "bf16", "gpu": "t4", **extra})
            plan["model"]["source"]["revision"] = "main"  # a pinned revision is written too
            try:
                keys |= set(export_config(plan, to)[0])
            except Exception:  # noqa: BLE001 - a variant this tool cannot express adds no keys
                continue
        _EXPORT_KEYS[to] = keys
    return _EXPORT_KEYS[to]
