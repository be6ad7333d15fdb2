"""A small stand-in for the Hugging Face Hub on 127.0.0.1 (``HF_ENDPOINT``) for tests and benchmarks.

It answers ``HEAD``/``GET /{org}/{name}/resolve/{revision}/{file}`` with the headers the Hub sends
(``X-Repo-Commit``, ``ETag``, ``X-Error-Code``): a public repo, a gated one (401 unless the
``Authorization`` header carries ``TOKEN``), a repo without config.json, a malformed config, a
remote-code architecture, and 404s for anything else.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "configs"

SHA = "0123456789abcdef0123456789abcdef01234567"
CONFIG = (FIXTURES / "llama-tied.json").read_bytes()
REPOS = {"tiny/llama": CONFIG, "tiny/gated": CONFIG, "tiny/badjson": b'{"model_type": "llama", ',
         "tiny/custom": json.dumps({"model_type": "my_arch", "auto_map": {"AutoConfig": "configuration_x.MyConfig"},
                                    "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                                    "vocab_size": 100, "intermediate_size": 16}).encode()}
TOKEN = "hf_good_token"


class Hub(BaseHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _answer(self, head: bool) -> None:
        Hub.requests.append(f"{self.command} {self.path}")
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "RepoNotFound")
        repo, rev, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        if repo not in REPOS and repo != "tiny/noconfig":
            return self._error(404, "RepoNotFound")
        if repo == "tiny/gated" and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(401, "GatedRepo")
        if rev not in ("main", SHA):
            return self._error(404, "RevisionNotFound")
        if repo == "tiny/noconfig" or file != "config.json":
            return self._error(404, "EntryNotFound")
        body = REPOS[repo]
        self.send_response(200)
        self.send_header("X-Repo-Commit", SHA)
        self.send_header("ETag", f'"etag-{abs(hash(body))}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, code: int, error_code: str) -> None:
        self.send_response(code)
        self.send_header("X-Error-Code", error_code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)


def serve() -> tuple[str, ThreadingHTTPServer]:
    """Start the stand-in on a free port: (endpoint URL, server to ``shutdown()``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server
