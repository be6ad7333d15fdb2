"""`qplan serve`: the planner as a local web page and a small JSON API (standard library only).

* ``GET /api/estimate?model=llama-3.2-3b&r=32&gpu=t4`` — the query parameters are ``qplan estimate``'s
  option names (``seq-len`` or ``seq_len``; a flag is ``dora=true``, ``grad-ckpt=false``), parsed by the
  very click command the CLI runs, so the body is byte for byte what ``qplan estimate --format json``
  prints; ``GET /api/fit`` and ``GET /api/compare`` likewise for ``qplan fit`` / ``qplan compare --format json``;
* a bad parameter is HTTP 400 with ``{"error": LINE}``, LINE the one line the CLI prints;
* ``GET /`` — the page (``page.html``: plain HTML, one inline script that calls the API and draws SVG);
  ``/api/models``, ``/api/gpus`` — the lists its menus offer.

It never runs anything a request names: no files are read or written for a request (local config paths,
``--calibration``, ``--output`` and ``--from-config`` are the CLI's only; ``tokenizer`` is refused with a 400,
``data`` is a Hub dataset id in the HF cache, never a path), and ``--method trace`` is not served.
Requests are planned inside ``catalog.names_only()``: ``model`` is a bundled/user spec name or a Hub id and
every GPU a catalog name or alias — never a path, never
looked up in the working directory, and the answer does not say whether a path exists. Bound to 127.0.0.1 by default; when bound
to a loopback address, a request whose ``Host`` is not a loopback name is refused (a web page elsewhere
cannot reach it by DNS rebinding).
A bundled model is planned without importing torch, transformers or PEFT.
"""

from __future__ import annotations

import json
import os
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import click

from qplan.planner.errors import QPlanError

#: options of the CLI that a request may not set: they read or write files, or run a trace
NOT_SERVED = {"from_config", "config_format", "output", "force", "fmt", "method", "calibration"}
#: options whose value is a path: a request giving one is refused (400), not planned without it
NAMES_A_FILE = ("tokenizer", "prices")  # data: a Hub dataset id in the HF cache, resolved inside names_only()
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
MAX_QUERY = 16384
MAX_FIELDS = 100
#: connections the kernel holds while every thread is busy (socketserver's default of 5 dropped bursts)
BACKLOG = 128
WARM_UP_MODEL = "llama-3.2-1b"  # a bundled spec: the warm-up reads no file a user named


def _options(command: click.Command) -> dict[str, tuple[click.Option, str]]:
    """query name -> (option, its flag): ``seq-len`` and ``seq_len``, ``attn`` and ``attn_impl``."""
    out: dict[str, tuple[click.Option, str]] = {}
    for p in command.params:
        if isinstance(p, click.Option) and p.name not in NOT_SERVED:
            for flag in p.opts:
                if flag.startswith("--"):
                    out[flag[2:]] = (p, flag)
                    out[flag[2:].replace("-", "_")] = (p, flag)
            out.setdefault(p.name, (p, next(f for f in p.opts if f.startswith("--"))))
    return out


def query_args(command: click.Command, query: str) -> list[str]:
    """The command line of a query string (one value per name)."""
    if len(query) > MAX_QUERY:
        raise QPlanError(f"the query is over {MAX_QUERY} characters")
    known = _options(command)
    refused = {f.lstrip("-").replace("-", "_") for p in command.params if p.name in NOT_SERVED for f in p.opts} | NOT_SERVED
    args: list[str] = []
    seen: set[str] = set()
    try:
        fields = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:  # parse_qsl's "Max number of fields exceeded"
        raise QPlanError(f"the query has more than {MAX_FIELDS} parameters") from None
    for key, value in fields:
        if key.replace("-", "_") in refused or key == "format":
            raise QPlanError(f"parameter {key!r} is not served (it reads or writes files, or runs a trace): use the CLI")
        if key not in known:
            raise QPlanError(f"unknown parameter {key!r} (the options of `qplan {command.name}`, e.g. model, r, gpu)")
        opt, flag = known[key]
        if opt.name in seen:
            raise QPlanError(f"parameter {key!r} is given twice")
        seen.add(opt.name)
        if opt.is_flag:
            v = value.strip().lower()
            if v not in TRUE | FALSE:
                raise QPlanError(f"{flag}: expected true or false, got {value!r}")
            if v in TRUE:
                args.append(opt.opts[0])
            elif opt.secondary_opts:
                args.append(opt.secondary_opts[0])
        else:
            args += [flag, value]
    return args


def _context(command_name: str, query: str) -> dict[str, Any]:
    from qplan.cli.plan_commands import compare, estimate, fit

    command = {"estimate": estimate, "fit": fit, "compare": compare}[command_name]
    parent = click.Context(click.Group("qplan"), info_name="qplan")
    ctx = command.make_context(command_name, query_args(command, query), parent=parent)
    return dict(ctx.params)


def _served_options(command_name: str, query: str) -> dict[str, Any]:
    """The command's options from the query, less what is never served (call inside ``names_only()``)."""
    o = _context(command_name, query)
    for k in NAMES_A_FILE:
        if o.get(k) is not None:
            flag = k.replace("_", "-")
            raise QPlanError(f"parameter '{k}' names a file: qplan serve reads no file a request names (use "
                             f"`qplan {command_name} --{flag}` on the command line)")
    for k in NOT_SERVED:
        o.pop(k, None)
    if not o.get("model"):
        raise QPlanError("parameter 'model' is required (a bundled name or a Hub id ORG/NAME)")
    return o


def estimate_text(query: str) -> str:
    """What ``qplan estimate --format json`` prints for these options."""
    from qplan.planner.api import make_plan
    from qplan.planner.document import dumps
    from qplan.planner.model.catalog import names_only

    with names_only():  # a request names models and GPUs, never a file the server would read
        return dumps(make_plan(**_served_options("estimate", query)))


def fit_text(query: str) -> str:
    """What ``qplan fit --format json`` prints for these options."""
    from qplan.planner.model.catalog import names_only
    from qplan.planner.search.fit import fit_document

    with names_only():
        doc = fit_document(_served_options("fit", query))
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def compare_text(query: str) -> str:
    """What ``qplan compare --format json`` prints for these options (``methods``: as its ``--methods``)."""
    from qplan.planner.model.catalog import names_only
    from qplan.planner.search.compare import compare_methods, parse_methods

    with names_only():
        o = _served_options("compare", query)
        doc = compare_methods(o, parse_methods(o.pop("methods")))
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def models_text() -> str:
    from qplan.planner.model.catalog import load_spec, model_names

    rows = []
    for n in model_names():
        try:
            rows.append({"name": n, "hub_id": load_spec(n).source.get("hub_id")})
        except QPlanError:  # a broken user spec: `qplan models` warns about it; the page just leaves it out
            continue
    return json.dumps(rows, indent=2) + "\n"


def gpus_text() -> str:
    from qplan.planner.model.catalog import gpu_catalog

    return json.dumps([g.to_json() for g in gpu_catalog().values()], indent=2) + "\n"


def page_bytes() -> bytes:
    return resources.files("qplan.cli").joinpath("page.html").read_bytes()


ROUTES = {"/api/estimate": estimate_text, "/api/fit": fit_text, "/api/compare": compare_text}


class Handler(BaseHTTPRequestHandler):
    server_version = "qplan"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        if os.environ.get("QPLAN_SERVE_LOG"):
            sys.stderr.write("qplan serve: " + (format % args) + "\n")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; connect-src 'self' blob:; script-src 'unsafe-inline'; "
                                                    "style-src 'unsafe-inline'; img-src 'self' data:")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json_error(self, status: int, line: str) -> None:
        self._send(status, (json.dumps({"error": line}) + "\n").encode(), "application/json")

    def _host_ok(self) -> bool:
        bound = self.server.server_address[0]
        if bound not in ("127.0.0.1", "::1", "localhost"):
            return True
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in LOOPBACK

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        from qplan.cli.common import error_line

        if not self._host_ok():
            return self._json_error(HTTPStatus.FORBIDDEN, "qplan: error: this server answers requests for 127.0.0.1 only")
        url = urlsplit(self.path)
        try:
            if url.path in ("/", "/index.html"):
                return self._send(HTTPStatus.OK, page_bytes(), "text/html; charset=utf-8")
            if url.path in ROUTES:
                text = ROUTES[url.path](url.query)
            elif url.path == "/api/models":
                text = models_text()
            elif url.path == "/api/gpus":
                text = gpus_text()
            else:
                return self._json_error(HTTPStatus.NOT_FOUND, f"qplan: error: no such page {url.path[:200]!r}")
        except (QPlanError, click.ClickException) as exc:
            return self._json_error(HTTPStatus.BAD_REQUEST, error_line(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must answer 500, not drop the connection
            msg = " ".join(str(exc).split())[:500]
            return self._json_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"qplan: internal error: {type(exc).__name__}: {msg}")
        self._send(HTTPStatus.OK, text.encode("utf-8"), "application/json")


class Server(ThreadingHTTPServer):
    """A real listen backlog, a thread per request, and quiet about clients that hang up."""

    request_queue_size = BACKLOG
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # BrokenPipe, ConnectionReset, ...: the
            return  # client went away; nothing to answer and nothing wrong here
        super().handle_error(request, client_address)


def warm_up() -> None:
    """Answer each route once in the main thread before serving, so the request threads never import a module
    for the first time side by side: CPython 3.11's import locks can crash the process (SIGSEGV in
    ``_get_module_lock``'s weakref callback) when many threads first-import the same modules at once -- seen
    with ten simultaneous /api/estimate requests on a loaded 2-core machine."""
    for route, query in (("/api/estimate", f"model={WARM_UP_MODEL}"), ("/api/fit", f"model={WARM_UP_MODEL}&gpu=t4")):
        ROUTES[route](query)
    models_text()
    gpus_text()


def make_server(host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """Bind (a taken port fails at once, in one line), then warm up before the first request is accepted."""
    try:
        server = Server((host, port), Handler)
    except OSError as exc:
        raise QPlanError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    try:
        warm_up()
    except BaseException:
        server.server_close()
        raise
    return server
