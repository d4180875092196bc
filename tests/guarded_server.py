"""A loopback HTTP server that serves a folder only to a request that carries credentials.

It answers HTTP basic auth `reader:SECRET1` together with `?token=SECRET2`, or the header
`Authorization: Bearer SECRET3`; anything else gets 403. The secrets tests (tests/data,
tests/e2e) put these values into shard strings and check that none leaves the machine.
"""
from __future__ import annotations

import base64
import functools
import http.server
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

SECRET1, SECRET2, SECRET3 = "pw-Secret1-a8f3c2", "tok-Secret2-77c1b9", "bearer-Secret3-e5d04a"


class GuardedHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        basic = "Basic " + base64.b64encode(f"reader:{SECRET1}".encode()).decode()
        token = parse_qs(urlsplit(self.path).query).get("token")
        if not ((auth == basic and token == [SECRET2]) or auth == f"Bearer {SECRET3}"):
            self.send_error(403)
            return
        super().do_GET()


@contextmanager
def serve_guarded(root: Path) -> Iterator[str]:
    """Serve `root` on a free loopback port; yields "127.0.0.1:PORT"."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(GuardedHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
