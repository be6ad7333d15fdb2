"""`qplan serve`'s API: the oracle is the CLI itself, run as a separate process — a body must be byte for
byte what `qplan estimate/fit --format json` prints, and a 400's error the line the CLI prints."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from qplan.cli.serve import make_server
from serve_helpers import running_server

QPLAN = [sys.executable, "-c", "import sys; from qplan.cli.main import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def base():
    with running_server() as url:
        yield url


def get(url: str, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*QPLAN, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("query,args", [
    ("model=llama-3.2-3b&r=32&gpu=t4", ["--model", "llama-3.2-3b", "--r", "32", "--gpu", "t4"]),
    ("model=qwen2.5-7b&quant=bf16&seq_len=2048&batch-size=2&grad-ckpt=false&dora=true&optimizer=adamw_8bit&gpu=a100-80gb",
     ["--model", "qwen2.5-7b", "--quant", "bf16", "--seq-len", "2048", "--batch-size", "2", "--no-grad-ckpt", "--dora",
      "--optimizer", "adamw_8bit", "--gpu", "a100-80gb"]),
    ("model=meta-llama/Llama-3.2-1B&targets=q_proj,v_proj&attn=eager&tokens=1000000&price-per-hour=2.5&gpu=l4",
     ["--model", "meta-llama/Llama-3.2-1B", "--targets", "q_proj,v_proj", "--attn", "eager", "--tokens", "1000000",
      "--price-per-hour", "2.5", "--gpu", "l4"]),
    ("model=smollm2-135m&r=8&gpu=h100-80gb&double-quant=false", ["--model", "smollm2-135m", "--r", "8", "--gpu", "h100-80gb",
                                                              "--no-double-quant"]),
    ("model=llama-3.2-1b&reentrant=true&optimizer=adamw_torch_4bit&gpu=t4",
     ["--model", "llama-3.2-1b", "--reentrant", "--optimizer", "adamw_torch_4bit", "--gpu", "t4"]),
])
def test_estimate_is_the_cli_plan_byte_for_byte(base, query, args):
    status, body = get(f"{base}/api/estimate?{query}")
    p = cli("estimate", *args, "--format", "json")
    assert p.returncode == 0, p.stderr
    assert status == 200 and body == p.stdout


def test_fit_is_the_cli_result_byte_for_byte(base):
    status, body = get(f"{base}/api/fit?model=llama-3.2-3b&gpu=t4&seq-len=1024&top=5&objective=time")
    p = cli("fit", "--model", "llama-3.2-3b", "--gpu", "t4", "--seq-len", "1024", "--top", "5", "--objective", "time",
            "--format", "json")
    assert p.returncode == 0, p.stderr
    assert status == 200 and body == p.stdout and json.loads(body)["best"]


def test_compare_is_the_cli_result_byte_for_byte(base):
    status, body = get(f"{base}/api/compare?model=llama-3.2-3b&gpu=a100-80gb&seq-len=1024&methods=full,qlora")
    p = cli("compare", "--model", "llama-3.2-3b", "--gpu", "a100-80gb", "--seq-len", "1024", "--methods", "full,qlora",
            "--format", "json")
    assert p.returncode == 0, p.stderr
    assert status == 200 and body == p.stdout and [r["method"] for r in json.loads(body)["methods"]] == ["full", "qlora"]


@pytest.mark.parametrize("path,args", [
    ("estimate?model=llama-3.2-3b&r=abc", ["estimate", "--model", "llama-3.2-3b", "--r", "abc"]),
    ("estimate?model=llama-3.2-3b&r=0", ["estimate", "--model", "llama-3.2-3b", "--r", "0"]),
    ("estimate?model=llama-3.2-3b&gpu=h900", ["estimate", "--model", "llama-3.2-3b", "--gpu", "h900"]),
    ("estimate?model=no-such-model", ["estimate", "--model", "no-such-model"]),
    ("estimate?model=llama-3.2-3b&quant=nf3", ["estimate", "--model", "llama-3.2-3b", "--quant", "nf3"]),
    ("estimate?model=llama-3.2-3b&seq-len=99999999", ["estimate", "--model", "llama-3.2-3b", "--seq-len", "99999999"]),
    ("fit?model=llama-3.2-3b&gpu=t4&objective=cost", ["fit", "--model", "llama-3.2-3b", "--gpu", "t4", "--objective", "cost"]),
    ("compare?model=llama-3.2-3b&methods=lora,boft", ["compare", "--model", "llama-3.2-3b", "--methods", "lora,boft"]),
])
def test_a_bad_parameter_is_400_with_the_cli_line(base, path, args):
    status, body = get(f"{base}/api/{path}")
    p = cli(*args)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert status == 400 and json.loads(body) == {"error": p.stderr.strip()}


@pytest.mark.parametrize("query,needle", [
    ("model=llama-3.2-3b&color=red", "unknown parameter 'color'"),
    ("model=llama-3.2-3b&output=/tmp/plan.json", "not served"),
    ("model=llama-3.2-3b&force=true", "not served"),
    ("model=llama-3.2-3b&from-config=/etc/passwd", "not served"),
    ("model=llama-3.2-3b&calibration=/etc/passwd", "not served"),
    ("model=llama-3.2-3b&method=trace", "not served"),
    ("model=llama-3.2-3b&format=table", "not served"),
    ("model=/etc", "local path"),
    ("r=8", "'model' is required"),
    ("model=llama-3.2-3b&r=8&r=16", "given twice"),
    ("model=llama-3.2-3b&dora=maybe", "expected true or false"),
])
def test_what_a_request_may_not_do_is_400(base, query, needle):
    status, body = get(f"{base}/api/estimate?{query}")
    assert status == 400, body
    line = json.loads(body)["error"]
    assert line.startswith("qplan: error") and "\n" not in line and needle in line


def test_nothing_is_written_for_a_request(base, tmp_path):
    target = tmp_path / "plan.json"
    status, _ = get(f"{base}/api/estimate?model=llama-3.2-3b&output={target}&force=true")
    assert status == 400 and not target.exists()


def test_a_foreign_host_header_is_refused(base):
    status, body = get(f"{base}/api/gpus", headers={"Host": "attacker.example:8000"})
    assert status == 403 and "127.0.0.1 only" in body
    assert get(f"{base}/api/gpus", headers={"Host": "localhost:8000"})[0] == 200


def test_the_page_and_its_lists(base):
    status, page = get(f"{base}/")
    assert status == 200 and "<svg id=\"bar\"" in page and "/api/estimate" in page
    status, models = get(f"{base}/api/models")
    names = [m["name"] for m in json.loads(models)]
    assert "llama-3.2-3b" in names and {"name": "llama-3.2-3b", "hub_id": "meta-llama/Llama-3.2-3B"} in json.loads(models)
    status, gpus = get(f"{base}/api/gpus")
    assert json.loads(gpus) == json.loads(cli("gpus", "--format", "json").stdout)
    assert get(f"{base}/nope")[0] == 404


def test_the_pages_selects_offer_every_optimizer_and_loss():
    """The page's optimizer and loss selects list the planner's vocabulary, no more, no less."""
    import re

    from qplan.planner.vocab import ADAPTER_DTYPES, LOSSES, OPTIMIZERS

    page = (Path(__file__).resolve().parents[2] / "cli" / "page.html").read_text(encoding="utf-8")

    def options(select_id: str) -> list[str]:
        body = re.search(rf'<select id="{select_id}"[^>]*>(.*?)</select>', page, re.S).group(1)
        return [v or t for v, t in re.findall(r'<option(?: value="([^"]*)")?[^>]*>([^<]*)</option>', body)]

    assert sorted(options("optimizer")) == sorted(OPTIMIZERS)
    assert sorted(options("loss")) == sorted(LOSSES)
    assert sorted(options("adapter-dtype")) == sorted(ADAPTER_DTYPES)


def test_serving_a_bundled_model_imports_no_torch():
    from test_architecture import BLOCKER

    code = BLOCKER + (
        "import threading, urllib.request\n"
        "from qplan.cli.serve import make_server\n"
        "s = make_server('127.0.0.1', 0); threading.Thread(target=s.serve_forever, daemon=True).start()\n"
        "u = f'http://127.0.0.1:{s.server_address[1]}'\n"
        "for path in ('/', '/api/models', '/api/gpus', '/api/estimate?model=llama-3.1-8b&gpu=t4',\n"
        "             '/api/fit?model=llama-3.1-8b&gpu=t4&seq-len=512'):\n"
        "    assert urllib.request.urlopen(u + path, timeout=120).status == 200, path\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')]\n"
        "assert not heavy, heavy\nprint('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_serve_refuses_a_port_in_use_in_one_line():
    server = make_server("127.0.0.1", 0)
    try:
        p = cli("serve", "--port", str(server.server_address[1]))
        assert p.returncode == 2 and p.stderr.strip().startswith("qplan: error: cannot listen on 127.0.0.1:")
        assert len(p.stderr.strip().splitlines()) == 1
    finally:
        server.server_close()


def test_a_price_file_is_never_read_from_a_request():
    """`prices` names a file: the server refuses it in one line (it reads no file a request names) and ranks by time."""
    from qplan.cli.serve import fit_text
    from qplan.planner.errors import QPlanError

    with pytest.raises(QPlanError, match="parameter 'prices' names a file.*qplan fit --prices"):
        fit_text("model=llama-3.2-1b&gpu=l4&objective=cost&prices=/etc/passwd")
    doc = json.loads(fit_text("model=llama-3.2-1b&gpu=l4,a100-80gb&objective=time&global-batch=4"))
    assert doc["recipe"]["global_batch"] == 4 and [r["gpu"] for r in doc["best"]] == ["a100-80gb", "l4"]
