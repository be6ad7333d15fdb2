"""Hub ids (``--model ORG/NAME[@REVISION]``) through the real ``huggingface_hub`` client.

Online: a small HTTP server on 127.0.0.1 plays the Hub (``HF_ENDPOINT``), with the headers the Hub
sends (``X-Repo-Commit``, ``ETag``, ``X-Error-Code``): a public repo, a gated one (401 unless
``HF_TOKEN`` is right), unknown repos, revisions and files, a malformed config. Offline
(``HF_HUB_OFFLINE=1``): a standard Hugging Face cache layout on disk. Every call is a fresh
``qplan`` process, since huggingface_hub reads its environment variables at import.
The oracle for the plan itself: the same config given as a local file gives the same numbers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakehub import CONFIG, SHA, TOKEN, Hub, serve
from test_architecture import BLOCKER

from conftest import FIXTURES


@pytest.fixture(scope="module")
def endpoint():
    url, server = serve()
    yield url
    server.shutdown()


#: huggingface_hub retries a refused connection 5 times with backoff (1+2+4+8+8 s = 23 s of the
#: suite); the sleeps are skipped, the requests and the error path are the real ones
NO_BACKOFF = "import time\ntime.sleep = lambda seconds: None\n"


def qplan(tmp: Path, *args: str, endpoint: str | None = None, offline: bool = False, token: str | None = None,
          block_heavy: bool = False, cache: str = "qc", check: str = "0",
          no_backoff: bool = False, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "QPLAN_"))}
    env.update(HF_HOME=str(tmp / "hf"), QPLAN_CACHE_DIR=str(tmp / cache), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5", QPLAN_HUB_CHECK_SECONDS=check)
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: any network use fails fast
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if token:
        env["HF_TOKEN"] = token
    env.update(extra_env or {})
    code = (BLOCKER if block_heavy else "") + (NO_BACKOFF if no_backoff else "") + \
        "import sys\nfrom qplan.cli.main import main\nsys.exit(main())\n"
    return subprocess.run([sys.executable, "-c", code, "estimate", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _plan(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("qplan: error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def _same_numbers(a: dict, b: dict) -> None:
    assert a["prediction"]["params"] == b["prediction"]["params"]
    assert a["prediction"]["memory"] == b["prediction"]["memory"]


def test_online_then_cached_spec_without_torch(tmp_path, endpoint):
    local = _plan(qplan(tmp_path, "--model", str(FIXTURES / "llama-tied.json"), "--format", "json"))
    Hub.requests.clear()
    first = _plan(qplan(tmp_path, "--model", "tiny/llama", "--format", "json", endpoint=endpoint))
    assert any(r.startswith("GET /tiny/llama/resolve/main/config.json") for r in Hub.requests)
    assert first["model"]["source"] == {"hub_id": "tiny/llama", "revision": SHA, "config_file": "config.json"}
    _same_numbers(first, local)
    cached = list((tmp_path / "qc" / "hub" / "tiny--llama" / SHA).glob("transformers-*.json"))
    assert len(cached) == 1
    # second call: the spec comes from qplan's cache, torch and transformers cannot even be imported;
    # the Hub is asked where main points now (QPLAN_HUB_CHECK_SECONDS=0), nothing is downloaded
    Hub.requests.clear()
    second = _plan(qplan(tmp_path, "--model", "tiny/llama", "--format", "json", endpoint=endpoint, block_heavy=True))
    assert second == first
    assert Hub.requests == ["HEAD /tiny/llama/resolve/main/config.json"]
    # within the check interval the resolved commit is reused: no request at all
    Hub.requests.clear()
    third = _plan(qplan(tmp_path, "--model", "tiny/llama", "--format", "json", endpoint=endpoint, check="600"))
    assert third == first and Hub.requests == []
    # a pinned commit, offline: no network and no huggingface_hub import needed
    pinned = _plan(qplan(tmp_path, "--model", f"tiny/llama@{SHA}", "--format", "json", offline=True, block_heavy=True))
    _same_numbers(pinned, first)


def test_offline_reads_the_standard_cache_layout(tmp_path):
    """A cache laid out as huggingface_hub lays it out (refs/main -> snapshots/<sha>/config.json)."""
    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "etag1").write_bytes(CONFIG)
    snap = repo / "snapshots" / SHA
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to(repo / "blobs" / "etag1")
    plan = _plan(qplan(tmp_path, "--model", "someorg/tiny-llama", "--format", "json", offline=True))
    local = _plan(qplan(tmp_path, "--model", str(FIXTURES / "llama-tied.json"), "--format", "json"))
    _same_numbers(plan, local)
    assert plan["model"]["source"]["revision"] == SHA
    assert "not in the Hugging Face cache" in _error(qplan(tmp_path, "--model", "someorg/other", offline=True))


def test_offline_with_an_empty_cache_says_so(tmp_path):
    line = _error(qplan(tmp_path, "--model", "Qwen/Qwen3-Next-80B-A3B", offline=True))  # not bundled
    assert "HF_HUB_OFFLINE=1" in line and "Qwen/Qwen3-Next-80B-A3B" in line


def test_unreachable_hub_and_empty_cache(tmp_path):
    line = _error(qplan(tmp_path, "--model", "someorg/model", no_backoff=True))  # HF_ENDPOINT: nothing listens
    assert "could not be reached" in line


def test_an_unreachable_hub_is_one_try_and_one_line(tmp_path):
    """Issue 29: with the real backoff sleeps, a refused Hub took 23 s and printed five "Retrying" lines;
    now one request, one line, at once."""
    start = time.monotonic()
    p = qplan(tmp_path, "--model", "someorg/model")  # HF_ENDPOINT=http://127.0.0.1:9: refused
    took = time.monotonic() - start
    line = _error(p)
    assert "could not be reached (one try" in line
    assert p.stderr.strip() == line and "Retrying" not in p.stderr, p.stderr
    assert took < 10, took


def test_a_hub_that_never_answers_times_out_in_qplan_hub_timeout(tmp_path):
    """A Hub that accepts the connection and never answers: QPLAN_HUB_TIMEOUT seconds, one try, one line."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes the handshake; nobody ever reads or answers
        start = time.monotonic()
        p = qplan(tmp_path, "--model", "someorg/model", endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}",
                  extra_env={"QPLAN_HUB_TIMEOUT": "1"})
        took = time.monotonic() - start
    line = _error(p)
    assert "could not be reached (one try, 1 s)" in line and p.stderr.strip() == line, p.stderr
    assert took < 12, took  # 1 s for the one HEAD, not five tries with backoff (and ~2 s of start-up)


def test_a_bad_qplan_hub_timeout_is_one_line(tmp_path):
    line = _error(qplan(tmp_path, "--model", "someorg/model", extra_env={"QPLAN_HUB_TIMEOUT": "soon"}))
    assert "QPLAN_HUB_TIMEOUT" in line


def test_cached_config_is_used_when_the_hub_goes_away(tmp_path, endpoint):
    first = _plan(qplan(tmp_path, "--model", "tiny/llama", "--format", "json", endpoint=endpoint))
    start = time.monotonic()
    again = _plan(qplan(tmp_path, "--model", "tiny/llama", "--format", "json"))  # the Hub refuses now; check=0
    assert time.monotonic() - start < 10
    _same_numbers(again, first)


def test_gated_repo_needs_the_token(tmp_path, endpoint):
    line = _error(qplan(tmp_path, "--model", "tiny/gated", endpoint=endpoint))
    assert "gated" in line and "HF_TOKEN" in line
    plan = _plan(qplan(tmp_path, "--model", "tiny/gated", "--format", "json", endpoint=endpoint, token=TOKEN))
    assert plan["model"]["source"]["hub_id"] == "tiny/gated"


@pytest.mark.parametrize("model,needle", [
    ("nobody/nothing", "no Hub repo nobody/nothing"),
    ("tiny/llama@v9", "has no revision 'v9'"),
    ("tiny/noconfig", "has no config.json"),
    ("tiny/badjson", "config.json of tiny/badjson"),
    ("tiny/custom", "model_type 'my_arch'"),
])
def test_hub_errors_are_one_line(tmp_path, endpoint, model, needle):
    assert needle in _error(qplan(tmp_path, "--model", model, endpoint=endpoint))


def test_bundled_hub_id_resolves_offline_without_network_or_torch(tmp_path):
    plan = _plan(qplan(tmp_path, "--model", "meta-llama/Llama-3.2-3B", "--format", "json", block_heavy=True))
    bundled = _plan(qplan(tmp_path, "--model", "llama-3.2-3b", "--format", "json", block_heavy=True))
    assert plan == bundled


def test_building_a_spec_without_transformers_names_the_extra(tmp_path, endpoint):
    line = _error(qplan(tmp_path, "--model", "tiny/llama", endpoint=endpoint, block_heavy=True, cache="empty"))
    assert "pip install 'qplan[train]'" in line


def test_a_path_that_exists_wins_over_a_hub_id(tmp_path, monkeypatch):
    from qplan.planner.model.catalog import load_spec

    d = tmp_path / "tiny" / "llama"
    d.mkdir(parents=True)
    (d / "config.json").write_bytes(CONFIG)
    monkeypatch.chdir(tmp_path)
    assert load_spec("tiny/llama").source == {"path": str(d.resolve())}


def test_spec_add_from_a_hub_id(tmp_path, endpoint):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "QPLAN_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint, QPLAN_SPEC_DIR=str(tmp_path / "specs"))
    p = subprocess.run([sys.executable, "-m", "qplan.cli.main", "spec", "add", "tiny/llama", "--format", "json"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    spec = json.loads((tmp_path / "specs" / "llama.json").read_text())
    assert spec["source"] == {"hub_id": "tiny/llama", "revision": SHA, "config_file": "config.json"}
    assert spec["config"] == json.loads(CONFIG)


def test_serve_answers_an_unreachable_hub_at_once(tmp_path):
    """The same bound under `qplan serve` (a real server process, a real client on 127.0.0.1): a Hub id whose
    Hub refuses is a 400 with one line within seconds, not a thread tied up for 23 s."""
    import urllib.error
    import urllib.request

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "QPLAN_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), QPLAN_CACHE_DIR=str(tmp_path / "qc"), HF_ENDPOINT="http://127.0.0.1:9",
               HF_HUB_DISABLE_TELEMETRY="1")
    server = subprocess.Popen([sys.executable, "-c", "import sys\nfrom qplan.cli.main import main\nsys.exit(main())\n",
                               "serve", "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = server.stderr.readline().split()[2]  # "qplan serve: http://127.0.0.1:PORT/ (Ctrl-C stops it)"
        start = time.monotonic()
        try:
            urllib.request.urlopen(f"{url}api/estimate?model=someorg/model", timeout=60)
            status, body = 200, ""
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read().decode()
        took = time.monotonic() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert status == 400, body
    line = json.loads(body)["error"]
    assert "could not be reached (one try" in line and "\n" not in line
    assert took < 10, took
