"""A ``qplan serve`` server on 127.0.0.1 (a free port) in a thread, for the serve tests.

A module of its own rather than a conftest.py: tests elsewhere import from ``conftest`` by name, and a
second conftest module would shadow the root one."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from qplan.cli.serve import make_server


@contextmanager
def running_server() -> Iterator[str]:
    """The base URL of a server that runs until the block ends."""
    server = make_server("127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
