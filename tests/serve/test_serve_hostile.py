"""`qplan serve` against hostile requests (issue 29): a request names models and GPUs, never a file the
server reads — no device file, no config path, no same-named folder in the server's working directory —
and the answer never says whether a path exists. Real sockets against the real server on 127.0.0.1;
the oracle for the bodies is the CLI run as a separate process in a clean folder."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from qplan.cli.serve import make_server
from serve_helpers import running_server

QPLAN = [sys.executable, "-c", "import sys; from qplan.cli.main import main; sys.exit(main())"]
FIXTURES = Path(__file__).parents[1] / "fixtures" / "configs"
SECRET = "SECRET-do-not-leak"


@pytest.fixture(scope="module")
def base():
    with running_server() as url:
        yield url


def get(url: str, timeout: float = 60) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def error_400(status: int, body: str) -> str:
    assert status == 400, (status, body[:500])
    line = json.loads(body)["error"]
    assert line.startswith("qplan: error") and "\n" not in line and SECRET not in line, line
    return line


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*QPLAN, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def _device_file(path: Path) -> Path:
    """A valid device file (the catalog's fields) whose name is a secret the answer must not hold."""
    from qplan.planner.model.catalog import gpu_catalog

    doc = gpu_catalog()["t4"].to_json()
    doc["name"] = SECRET
    path.write_text(json.dumps(doc))
    return path


def test_a_gpu_device_file_is_never_read_and_its_existence_never_told(base, tmp_path):
    leak = _device_file(tmp_path / "leak.json")
    missing = tmp_path / "missing.json"
    lines = {}
    for p in (leak, missing):
        lines[p] = error_400(*get(f"{base}/api/estimate?model=smollm2-135m&gpu={quote(str(p))}"))
        assert "catalog GPU" in lines[p]
    assert lines[leak].replace(str(leak), "P") == lines[missing].replace(str(missing), "P")


def test_a_fifo_or_dev_zero_named_as_gpu_answers_at_once(base, tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    for p in (fifo, zero):
        error_400(*get(f"{base}/api/estimate?model=smollm2-135m&gpu={quote(str(p))}", timeout=10))


def test_fit_price_names_are_catalog_gpus_only(base, tmp_path):
    leak = _device_file(tmp_path / "leak.json")
    line = error_400(*get(f"{base}/api/fit?model=smollm2-135m&gpu=t4&price-per-hour={quote(str(leak))}=1"))
    assert "catalog GPU" in line
    line = error_400(*get(f"{base}/api/fit?model=smollm2-135m&gpu={quote(str(leak))}"))
    assert "catalog GPU" in line


@pytest.mark.parametrize("param,needle", [("data", "a Hub dataset id (ORG/NAME) in the HF cache here, never a path"),
                                           ("tokenizer", "reads no file a request names")])
def test_a_data_file_or_tokenizer_folder_is_never_read(base, tmp_path, monkeypatch, param, needle):
    """--data and --tokenizer can name files: a request naming a path is refused in one line, the same whether the path
    exists (a FIFO that would hang a reader included; a same-named folder of data in the server's folder) or not."""
    fifo = tmp_path / "d.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "me" / "mine").mkdir(parents=True)
    (tmp_path / "me" / "mine" / "train.jsonl").write_text('{"text": "secret"}\n')
    monkeypatch.chdir(tmp_path)
    def line(p) -> str:
        got = error_400(*get(f"{base}/api/estimate?model=smollm2-135m&{param}={quote(str(p))}", timeout=10))
        return re.sub(r"'[^']*'", "'P'", got, count=1)

    lines = [line(p) for p in (fifo, tmp_path / "absent.jsonl", "me/mine")]
    assert needle in lines[0]
    assert lines[0] == lines[1] == lines[2]


@pytest.mark.parametrize("name", ["config.json", "", "model.json"])
def test_a_model_path_is_refused_whether_it_exists_or_not(base, tmp_path, name):
    real = tmp_path / "real"
    real.mkdir()
    cfg = json.loads((FIXTURES / "llama-tied.json").read_text())
    cfg["model_type"] = "llama"
    cfg["_note"] = SECRET
    (real / "config.json").write_text(json.dumps(cfg))
    (real / "model.json").write_text(json.dumps(cfg))
    there, absent = real / name, tmp_path / "absent" / name
    a = error_400(*get(f"{base}/api/estimate?model={quote(str(there))}"))
    b = error_400(*get(f"{base}/api/estimate?model={quote(str(absent))}"))
    assert "never a local path" in a
    assert a.replace(str(there), "P") == b.replace(str(absent), "P")


@pytest.mark.parametrize("model", ["smollm2-135m", "meta-llama/Llama-3.2-1B"])
def test_a_same_named_folder_in_the_servers_folder_is_never_read(base, tmp_path, monkeypatch, model):
    """A bundled name (or the Hub id of one) is the bundled spec, even with a folder of that name, holding
    another model's config.json, in the server's working directory."""
    clean = tmp_path / "clean"
    clean.mkdir()
    oracle = cli("estimate", "--model", model, "--gpu", "t4", "--format", "json", cwd=clean)
    assert oracle.returncode == 0, oracle.stderr
    trap = tmp_path / "served" / model
    trap.mkdir(parents=True)
    cfg = json.loads((FIXTURES / "llama-tied.json").read_text())
    cfg["num_hidden_layers"] = 3
    (trap / "config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path / "served")
    status, body = get(f"{base}/api/estimate?model={quote(model)}&gpu=t4")
    assert status == 200 and body == oracle.stdout


# ------------------------------------------------------------------------------ HTTP handling


def test_over_100_query_fields_is_400_not_500(base):
    query = "model=smollm2-135m&" + "&".join(f"r={i}" for i in range(150))
    line = error_400(*get(f"{base}/api/estimate?{query}"))
    assert "more than 100 parameters" in line


def test_a_burst_of_100_connections_is_held_until_answered():
    """100 clients connect while the server is not accepting yet (every thread busy): the kernel holds them
    all in the listen backlog (socketserver's default of 5 dropped the rest), then each is answered."""
    server = make_server("127.0.0.1", 0)
    port = server.server_address[1]
    socks, started = [], False
    try:
        for _ in range(100):
            s = socket.socket()
            s.settimeout(3)
            s.connect(("127.0.0.1", port))  # a full backlog drops the SYN: connect times out
            socks.append(s)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started = True
        for s in socks:
            s.sendall(b"GET /api/gpus HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        for s in socks:
            s.settimeout(60)
            assert s.makefile("rb").readline().startswith(b"HTTP/1.0 200")
    finally:
        for s in socks:
            s.close()
        if started:
            server.shutdown()
        server.server_close()


def test_clients_that_hang_up_leave_no_traceback(tmp_path):
    proc = subprocess.Popen([*QPLAN, "serve", "--port", "0"], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        first = proc.stderr.readline()
        port = int(re.search(r":(\d+)/", first).group(1))
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
            s.sendall(b"GET /api/estimate?model=llama-3.2-3b&gpu=t4 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            s.close()
        time.sleep(2)  # the handlers write their answers into the reset connections
        try:
            status = get(f"http://127.0.0.1:{port}/api/gpus")[0]
        except OSError as exc:
            status = exc
        alive = proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    # Still serving. (A crash here was a SIGSEGV in CPython 3.11's import locks, ten threads first-importing the
    # planner at once on a loaded machine; qplan serve now imports it before serving -- cli/serve.warm_up.)
    assert alive and status == 200, f"{status}; the server exited {proc.returncode}: {err[-3000:]}"
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
