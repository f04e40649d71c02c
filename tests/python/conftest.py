"""Fixtures for the real-client suite.

The runner starts the server under test and sets:

  KSRPC_TEST_URL               base URL as given to the client, e.g. http://127.0.0.1:PORT/api/v1
  KSRPC_TEST_ADMIN_USER        user whose rules allow everything (code arguments allowed)
  KSRPC_TEST_ADMIN_PASSWORD
  KSRPC_TEST_LIMITED_USER      user whose rules allow only ksrpc.server.demo, bench_mod and capsdk
                               (not capsdk.secret)
  KSRPC_TEST_LIMITED_PASSWORD
  KSRPC_TEST_MARKER_DIR        directory, writable by the server, for the bypass tests' marker files
  KSRPC_TEST_DYNAMIC_URL       optional: a URL holding a literal "{time}" segment that the server's
                               configured path matches with a placeholder (same users)

A missing required variable fails the run (it is never skipped).
"""
from __future__ import annotations

import http.server
import os
import pathlib
import re
import sys
import threading
import uuid
from dataclasses import dataclass, field

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from ksrpc.connections.http import HttpConnection  # noqa: E402
from ksrpc.connections.websocket import WebSocketConnection  # noqa: E402

REQUIRED_ENV = (
    "KSRPC_TEST_URL",
    "KSRPC_TEST_ADMIN_USER",
    "KSRPC_TEST_ADMIN_PASSWORD",
    "KSRPC_TEST_LIMITED_USER",
    "KSRPC_TEST_LIMITED_PASSWORD",
    "KSRPC_TEST_MARKER_DIR",
)

TRANSPORTS = {"http": HttpConnection, "ws": WebSocketConnection}


def _missing_env():
    return [name for name in REQUIRED_ENV if not os.environ.get(name)]


def pytest_configure(config):
    if config.getoption("help", False):
        return
    missing = _missing_env()
    if missing:
        raise pytest.UsageError(
            "the ksrpc real-client suite needs these environment variables (set by `cargo xtask test`): "
            + ", ".join(missing)
        )


@dataclass(frozen=True)
class Settings:
    url: str
    admin_user: str
    admin_password: str
    limited_user: str
    limited_password: str
    marker_dir: pathlib.Path
    dynamic_url: str | None = None

    @property
    def base(self) -> str:
        """The URL as the client strips it before appending /chunk, /ws, /generate_204."""
        return self.url.rstrip("/")


@pytest.fixture(scope="session")
def settings() -> Settings:
    missing = _missing_env()
    if missing:
        pytest.fail("missing environment variables: " + ", ".join(missing), pytrace=False)
    marker_dir = pathlib.Path(os.environ["KSRPC_TEST_MARKER_DIR"])
    if not marker_dir.is_dir():
        pytest.fail(f"KSRPC_TEST_MARKER_DIR={marker_dir} is not a directory", pytrace=False)
    return Settings(
        url=os.environ["KSRPC_TEST_URL"],
        admin_user=os.environ["KSRPC_TEST_ADMIN_USER"],
        admin_password=os.environ["KSRPC_TEST_ADMIN_PASSWORD"],
        limited_user=os.environ["KSRPC_TEST_LIMITED_USER"],
        limited_password=os.environ["KSRPC_TEST_LIMITED_PASSWORD"],
        marker_dir=marker_dir,
        dynamic_url=os.environ.get("KSRPC_TEST_DYNAMIC_URL") or None,
    )


@pytest.fixture(params=list(TRANSPORTS), ids=list(TRANSPORTS))
def transport(request) -> str:
    """'http' or 'ws'."""
    return request.param


@pytest.fixture
def connect(transport, settings):
    """Factory: ``connect(user, password, url=None)`` -> a new, not yet opened
    connection of the test's transport.  Use it as ``async with conn:`` inside
    the test's coroutine so that its aiohttp session is closed on that loop."""

    def _connect(user=None, password=None, url=None):
        cls = TRANSPORTS[transport]
        return cls(url or settings.url, username=user, password=password)

    return _connect


@pytest.fixture
def conn(connect, settings):
    """A connection as the admin user (rules: allow everything)."""
    return connect(settings.admin_user, settings.admin_password)


@pytest.fixture
def limited(connect, settings):
    """A connection as the limited user (rules: ksrpc.server.demo and bench_mod only)."""
    return connect(settings.limited_user, settings.limited_password)


@pytest.fixture
def marker(settings):
    """A fresh marker-file path in KSRPC_TEST_MARKER_DIR (absent at start, removed afterwards)."""
    path = settings.marker_dir / f"ksrpc-marker-{uuid.uuid4().hex}"
    assert not path.exists()
    yield path
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------
# A small redirecting HTTP server for the HTTP_ALLOW_REDIRECTS tests.
#
#   {POST,GET} /<status>/<token>/generate_204  ->  <status>, Location: <real base>/generate_204
#   anything else                             ->  404 (recorded, so a test can see it)
# --------------------------------------------------------------------------
@dataclass
class Redirector:
    port: int
    target_base: str
    hits: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, status: int, token: str) -> str:
        return f"http://127.0.0.1:{self.port}/{status}/{token}"

    def record(self, token, method, path):
        with self.lock:
            self.hits.setdefault(token, []).append((method, path))

    def hits_for(self, token):
        with self.lock:
            return list(self.hits.get(token, []))


_REDIRECT_PATH = re.compile(r"^/(30[1-8])/([^/]+)/generate_204/?$")


def _make_handler(redirector: Redirector):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _discard_body(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)

        def _answer(self):
            self._discard_body()
            m = _REDIRECT_PATH.match(self.path)
            parts = self.path.split("/")
            token = parts[2] if len(parts) > 2 else "?"
            redirector.record(token, self.command, self.path)
            if m:
                self.send_response(int(m.group(1)))
                self.send_header("Location", redirector.target_base + "/generate_204")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                body = b"not a redirect route"
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        do_GET = _answer
        do_POST = _answer

    return Handler


@pytest.fixture(scope="session")
def redirector(settings):
    red = Redirector(port=0, target_base=settings.base)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(red))
    server.daemon_threads = True
    red.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="redirector", daemon=True)
    thread.start()
    yield red
    server.shutdown()
    server.server_close()
