"""Hostile input and raw-wire tests (issue 5, section 6).

Every request here is made by hand, over aiohttp or over raw asyncio streams
(hand-written HTTP/1.1 with ``Transfer-Encoding: chunked``), from pickles made
with ``dill`` and the real ``ksrpc.client.RpcCall``.  Each test asserts the
exact answer (status and a meaningful word of the body, or the WebSocket
close code and reason, or the pickled 500 reply) **and** that a well-behaved
client - the real ksrpc 0.8.1 client calling ``demo.add(n, 2)`` over HTTP in a
loop on another thread (the ``bystander`` fixture) - kept getting right
answers while it happened and still gets one afterwards.

What the server must answer (server limits: body 256 MiB, decoded 512 MiB,
encoded slice 4 MiB, WebSocket half-sent idle 300 s - the defaults):

* HTTP: framing / garbage / corrupt / truncated / empty body, bad pickle,
  not-a-dict, missing keys, wrong types -> 400 with a text body saying why;
  body or decoded size over the limit -> 413; unknown route -> 404 (after the
  checks), wrong method on /chunk -> 405; missing / stale / nan / inf
  X-Timestamp -> 403; no or bad auth -> 401 + ``WWW-Authenticate: Basic
  realm="Restricted Area"``.
* WebSocket: framing or size violations close the socket with 1007 (invalid)
  or 1009 (too big) and a reason; a request that decodes but is invalid gets
  a pickled 500 reply; unknown text messages are ignored.

All traffic goes to the server under test on the loopback interface; every
loop is bounded; the whole module runs in well under a minute.
"""
from __future__ import annotations

import asyncio
import base64
import re
import os
import pickle
import socket
import struct
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass

import aiohttp
import pytest
from ksrpc.client import RpcCall, RpcClient
from ksrpc.connections.http import HttpConnection

from ksrpc_testlib import (
    BORDER,
    SLICE_SIZE,
    basic_auth,
    encode_slices,
    frame_body,
    request_pickle,
    run,
    unframe_body,
    wire_headers,
    zlib_bomb,
)

MIB = 1 << 20
BORDER_TEXT = BORDER.decode("ascii")
IO_TIMEOUT = 30  # seconds for any single answer from the server
BYSTANDER_MAX_LATENCY = 15.0  # seconds; the 0.8.1 client gives up at 60


# ============================================================== fixtures


@pytest.fixture(scope="module")
def target(settings):
    """(host, port, path prefix) of the server; refuses anything but loopback."""
    url = urllib.parse.urlsplit(settings.url)
    assert url.scheme == "http", settings.url
    assert url.hostname in ("127.0.0.1", "localhost", "::1"), f"hostile tests only run against loopback: {settings.url}"
    return url.hostname, url.port or 80, url.path.rstrip("/")


def admin_headers(settings, ts=None) -> dict:
    return wire_headers(settings.admin_user, settings.admin_password, ts)


def limited_headers(settings) -> dict:
    return wire_headers(settings.limited_user, settings.limited_password)


class Bystander:
    """The real 0.8.1 client calling ``demo.add(n, 2)`` over HTTP in a loop on
    its own thread and event loop, recording every wrong answer or error."""

    def __init__(self, settings):
        self.settings = settings
        self.stop = threading.Event()
        self.ok = 0
        self.errors: list[str] = []
        self.max_latency = 0.0
        self.thread = threading.Thread(target=lambda: asyncio.run(self._loop()), name="bystander", daemon=True)

    async def _loop(self):
        s = self.settings
        async with HttpConnection(s.url, username=s.admin_user, password=s.admin_password) as conn:
            demo = RpcClient("ksrpc.server.demo", conn)
            n = 0
            while not self.stop.is_set() and len(self.errors) < 20:
                n += 1
                t0 = time.monotonic()
                try:
                    got = await asyncio.wait_for(demo.add(n, 2), 60)
                    if got == n + 2:
                        self.ok += 1
                    else:
                        self.errors.append(f"demo.add({n}, 2) returned {got!r}")
                except Exception as e:  # noqa: BLE001 - recorded and asserted by check()
                    self.errors.append(f"demo.add({n}, 2) raised {e!r}")
                self.max_latency = max(self.max_latency, time.monotonic() - t0)
                await asyncio.sleep(0.005)

    def start(self, timeout=30.0):
        self.thread.start()
        deadline = time.monotonic() + timeout
        while self.ok == 0 and not self.errors and time.monotonic() < deadline:
            time.sleep(0.005)
        assert self.ok > 0 and not self.errors, f"the well-behaved client could not start: {self.errors[:3]}"

    def check(self, timeout=20.0):
        """Call at the end of a test: no wrong answer or error so far, and a
        call started after the hostile input gets its correct answer (two more
        answers: the first may have been in flight already)."""
        want = self.ok + 2
        deadline = time.monotonic() + timeout
        while self.ok < want and not self.errors and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.005)
        assert not self.errors, f"the well-behaved client saw: {self.errors[:3]}"
        assert self.ok >= want, f"the well-behaved client got no answer within {timeout} s after the hostile input"
        assert self.max_latency < BYSTANDER_MAX_LATENCY, f"a well-behaved call took {self.max_latency:.1f} s"


@pytest.fixture
def bystander(settings):
    b = Bystander(settings)
    b.start()
    try:
        yield b
    finally:
        b.stop.set()
        b.thread.join(70)
    # Each test calls check() at its end; one that stopped early still must
    # not have disturbed the well-behaved client.
    assert not b.errors, f"the well-behaved client saw: {b.errors[:3]}"


@pytest.fixture(scope="session")
def bomb_slice() -> bytes:
    """One zlib slice of 1 GiB of zeros (~1 MB), built once."""
    return zlib_bomb(1)


# ============================================================== raw HTTP/1.1


@dataclass
class RawResponse:
    status: int
    headers: dict  # lower-cased name -> list of values
    body: bytes
    chunks: list | None  # the HTTP chunk payloads of a chunked reply

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return ", ".join(values) if values else None


async def open_raw(target):
    host, port, _ = target
    return await asyncio.open_connection(host, port)


def request_head(target, hdrs: dict, path: str = "/chunk", method: str = "POST", content_length: int | None = None) -> bytes:
    host, port, prefix = target
    lines = [f"{method} {prefix}{path} HTTP/1.1", f"Host: {host}:{port}"]
    lines.append("Transfer-Encoding: chunked" if content_length is None else f"Content-Length: {content_length}")
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def http_chunk(data: bytes) -> bytes:
    assert data, "an empty HTTP chunk ends the body"
    return b"%x\r\n" % len(data) + data + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"


async def read_response(reader) -> RawResponse:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    chunks = None
    if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                break
            chunks.append(await reader.readexactly(size))
            assert await reader.readexactly(2) == b"\r\n", "HTTP chunk not followed by CRLF"
        body = b"".join(chunks)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"][0]))
    elif status == 204 or status == 304 or 100 <= status < 200:
        body = b""
    else:
        body = await reader.read()
    return RawResponse(status, headers, body, chunks)


async def raw_request(target, head: bytes, writes=(), pause: float = 0.05) -> RawResponse:
    """Send ``head``, then each of ``writes`` as its own TCP write (drain and
    ``pause`` seconds between them), then read one response."""
    reader, writer = await open_raw(target)
    try:
        writer.write(head)
        for piece in writes:
            await writer.drain()
            await asyncio.sleep(pause)
            writer.write(piece)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), IO_TIMEOUT)
    finally:
        writer.close()


def assert_chunked_reply(resp: RawResponse):
    """The reply framing the 0.8.1 client can read: 200, chunked transfer
    encoding, no Content-Length, no empty HTTP chunk, ends with a border at the
    end of an HTTP chunk."""
    assert resp.status == 200, (resp.status, resp.text[:300])
    # the original's headers, in the original's form (scripts and proxies may read them)
    assert re.fullmatch(r"\d+\.pkl\.chunked\.zip", resp.header("content-disposition") or ""), resp.headers
    assert resp.header("content-type") == "application/octet-stream", resp.headers
    assert resp.header("transfer-encoding") is not None and "chunked" in resp.header("transfer-encoding").lower()
    assert resp.header("content-length") is None, resp.headers
    assert resp.chunks, "no HTTP chunk in the reply"
    assert all(resp.chunks), "empty HTTP chunk before the last one"
    assert resp.chunks[-1].endswith(BORDER), resp.chunks[-1][-40:]


async def aiohttp_post(settings, body, path="/chunk", hdrs=None, method="POST"):
    async with aiohttp.ClientSession() as s:
        async with s.request(method, settings.url + path, data=body, headers=hdrs or admin_headers(settings)) as r:
            return r.status, (await r.read()).decode("utf-8", "replace"), r.headers


def assert_refused(status, text, want_status, word):
    assert status == want_status, f"expected {want_status}, got {status}: {text[:300]!r}"
    assert word.lower() in text.lower(), f"{word!r} not in the {status} body {text[:300]!r}"


# -------------------------------------------------------------- 1. raw wire


def test_raw_border_split_across_tcp_writes(settings, target, bystander):
    """One HTTP chunk holds the whole request; the TCP writes cut the border in two."""
    body = frame_body(request_pickle())
    chunk = http_chunk(body)
    cut = len(chunk) - 2 - 7  # inside the final border (before its last 7 bytes and the CRLF)
    resp = run(raw_request(target, request_head(target, admin_headers(settings)), [chunk[:cut], chunk[cut:] + LAST_CHUNK]))
    assert_chunked_reply(resp)
    reply = unframe_body(resp.body)
    assert reply["status"] == 200 and reply["data"] == 3, reply
    bystander.check()


def test_raw_border_split_across_http_chunks(settings, target, bystander):
    """The border straddles two HTTP chunks, each sent in its own TCP write."""
    body = frame_body(request_pickle())
    cut = len(body) - 8
    resp = run(raw_request(target, request_head(target, admin_headers(settings)), [http_chunk(body[:cut]), http_chunk(body[cut:]), LAST_CHUNK]))
    assert_chunked_reply(resp)
    assert unframe_body(resp.body)["data"] == 3
    bystander.check()


def test_raw_multi_slice_request_with_every_border_split(settings, target, bystander):
    """A 4-slice request (demo.add of ~450 KB of bytes): every border is cut at a
    different offset into two HTTP chunks and two TCP writes; the reply is
    several slices and round-trips the bytes."""
    data = os.urandom(450_000)
    slices = encode_slices(request_pickle(calls=[RpcCall("add", (data, b""), {})]))
    assert len(slices) >= 4
    stream = b"".join(z + BORDER for z in slices)
    cuts, pos = [], 0
    for i, z in enumerate(slices):
        pos += len(z)
        cuts.append(pos + 1 + (i * 4) % 14)  # 1..14 bytes into this border
        pos += len(BORDER)
    writes, last = [], 0
    for c in cuts:
        writes.append(http_chunk(stream[last:c]))
        last = c
    writes.append(http_chunk(stream[last:]) + LAST_CHUNK)
    resp = run(raw_request(target, request_head(target, admin_headers(settings)), writes, pause=0.02))
    assert_chunked_reply(resp)
    assert resp.body.count(BORDER) >= 4, "a 450 KB reply comes as several slices"
    reply = unframe_body(resp.body)
    assert reply["status"] == 200 and reply["data"] == data
    bystander.check()


def test_raw_reply_full_of_border_bytes_is_framed_right(settings, target, bystander):
    """demo.add returns ~1 MB of incompressible bytes holding the border 1000
    times: no encoded reply slice may contain the border (the client splits
    blindly), whatever level the server picks for incompressible slices."""
    data = b"".join(os.urandom(1000) + BORDER for _ in range(1000))
    body = frame_body(request_pickle(calls=[RpcCall("add", (data, b""), {})]))
    resp = run(raw_request(target, request_head(target, admin_headers(settings)), [http_chunk(body) + LAST_CHUNK], pause=0))
    assert_chunked_reply(resp)
    reply = unframe_body(resp.body)
    assert reply["status"] == 200 and reply["data"] == data
    bystander.check()


@pytest.mark.parametrize(
    "case,value",
    [
        pytest.param(case, value, id=case)
        for case, value in [
            ("missing", None),
            ("stale", "past"),  # an hour old: outside any sane window (the test server's is 600 s)
            ("future", "future"),
            ("nan", "nan"),
            ("inf", "inf"),
            ("-inf", "-inf"),
            ("not a number", "yesterday"),
            ("empty", ""),
        ]
    ],
)
def test_raw_missing_or_bad_timestamp_is_403(settings, target, bystander, case, value):
    hdrs = admin_headers(settings)
    if value is None:
        del hdrs["X-Timestamp"]
    else:
        hdrs["X-Timestamp"] = {"past": str(time.time() - 3600), "future": str(time.time() + 3600)}.get(value, value)
    body = frame_body(request_pickle())
    resp = run(raw_request(target, request_head(target, hdrs), [http_chunk(body) + LAST_CHUNK]))
    assert_refused(resp.status, resp.text, 403, "forbidden")
    # The body says what is wrong and what to do (the original explains a skew).
    reason = {"missing": "no X-Timestamp header", "stale": "server.timestamp_window", "future": "server.timestamp_window"}
    assert reason.get(case, "not a finite number") in resp.text, resp.text[:300]
    bystander.check()


@pytest.mark.parametrize("missing,want,word", [("X-Timestamp", 403, "forbidden"), ("Authorization", 401, "unauthorized")])
def test_raw_refused_before_the_body_is_read(settings, target, bystander, missing, want, word):
    """Headers announcing a 300 MiB body, and no body at all: the checks answer
    at once (a server that read the body first would wait forever)."""
    hdrs = admin_headers(settings)
    del hdrs[missing]

    async def go():
        reader, writer = await open_raw(target)
        try:
            writer.write(request_head(target, hdrs, content_length=300 * MIB))
            await writer.drain()
            return await asyncio.wait_for(read_response(reader), 5)
        finally:
            writer.close()

    resp = run(go())
    assert_refused(resp.status, resp.text, want, word)
    bystander.check()


def test_raw_timestamp_is_checked_before_auth(settings, target, bystander):
    hdrs = {"Content-Type": "application/octet-stream"}  # neither timestamp nor auth
    resp = run(raw_request(target, request_head(target, hdrs), [LAST_CHUNK]))
    assert_refused(resp.status, resp.text, 403, "forbidden")
    bystander.check()


@pytest.mark.parametrize(
    "case",
    ["missing", "not base64", "no colon", "bearer", "lower-case basic", "wrong password", "unknown user", "empty password"],
)
def test_raw_missing_or_bad_auth_is_401(settings, target, bystander, case):
    hdrs = admin_headers(settings)
    good = basic_auth(settings.admin_user, settings.admin_password)
    auth = {
        "missing": None,
        "not base64": "Basic !!!not-base64!!!",
        "no colon": "Basic " + base64.b64encode(settings.admin_user.encode()).decode(),
        "bearer": "Bearer " + good.split()[1],
        "lower-case basic": "basic " + good.split()[1],
        "wrong password": basic_auth(settings.admin_user, settings.admin_password + "x"),
        "unknown user": basic_auth("nobody-" + settings.admin_user, settings.admin_password),
        "empty password": basic_auth(settings.admin_user, ""),
    }[case]
    if auth is None:
        del hdrs["Authorization"]
    else:
        hdrs["Authorization"] = auth
    body = frame_body(request_pickle())
    resp = run(raw_request(target, request_head(target, hdrs), [http_chunk(body) + LAST_CHUNK]))
    assert_refused(resp.status, resp.text, 401, "unauthorized")
    assert resp.header("www-authenticate") == 'Basic realm="Restricted Area"', resp.headers
    bystander.check()


# -------------------------------------------------------------- 2. hostile HTTP bodies

_REQ = None


def _req() -> bytes:
    global _REQ
    if _REQ is None:
        _REQ = request_pickle()
    return _REQ


def _flip(z: bytes, at: int = 12) -> bytes:
    return z[:at] + bytes([z[at] ^ 0xFF]) + z[at + 1:]


def _deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def _zlib(data: bytes) -> bytes:
    return zlib.compress(data)


def _call(*calls, module="ksrpc.server.demo", ref_id=0):
    return dict(module=module, calls=list(calls), ref_id=ref_id)


HOSTILE_BODIES = {
    # name: (body builder, status, word in the body)
    "garbage bytes": (lambda: b"\x00garbage\xff" * 10, 400, "slice"),
    "random bytes": (lambda: os.urandom(100_000), 400, "slice"),
    "no border in 5 MiB": (lambda: b"x" * (5 * MIB), 400, "border"),
    "no border, short": (lambda: b"x" * 1000, 400, "slice"),
    "truncated zlib slice": (lambda: _zlib(_req())[:-6] + BORDER, 400, "truncated"),
    "zlib slice cut in half": (lambda: (lambda z: z[: len(z) // 2])(_zlib(_req())) + BORDER, 400, "truncated"),
    "corrupt zlib slice": (lambda: b"\x78\x9c" + bytes(range(200)) + BORDER, 400, "corrupt"),
    "bit-flipped zlib slice": (lambda: _flip(_zlib(_req())) + BORDER, 400, "corrupt"),
    "raw deflate slice": (lambda: _deflate_raw(_req()) + BORDER, 400, "corrupt"),
    "gzip slice": (lambda: _gzip(_req()) + BORDER, 400, "corrupt"),
    "body not ending in a border": (lambda: frame_body(_req())[:-3], 400, "slice"),
    "data after the last border": (lambda: frame_body(_req()) + b"tail", 400, "slice"),
    # A stored (level 0) slice carrying the border bytes: cannot be repaired.
    "stored slice holding the border": (
        lambda: zlib.compress(request_pickle(calls=[RpcCall("add", (b"a" + BORDER + b"b", b""), {})]), 0) + BORDER,
        400,
        "slice",
    ),
    "empty body": (lambda: b"", 400, "empty"),
    "empty slice": (lambda: BORDER, 400, "empty"),
    "empty slice between slices": (lambda: _zlib(_req()) + BORDER + BORDER, 400, "empty"),
    "pickle that fails to load": (lambda: frame_body(b"\x80\x04not a pickle"), 400, "pickle"),
    "truncated pickle": (lambda: frame_body(_req()[:-10]), 400, "pickle"),
    "not a pickle at all": (lambda: frame_body(b"hello world"), 400, "pickle"),
    "pickle of a list": (lambda: frame_body(pickle.dumps([1, 2, 3])), 400, "dict"),
    "pickle of None": (lambda: frame_body(pickle.dumps(None)), 400, "dict"),
    "empty dict": (lambda: frame_body(pickle.dumps({})), 400, "lacks"),
    "dict lacking calls and ref_id": (lambda: frame_body(pickle.dumps({"module": "ksrpc.server.demo"})), 400, "calls"),
    "dict lacking module": (lambda: frame_body(pickle.dumps({"calls": [], "ref_id": 0})), 400, "module"),
    "call name an int": (lambda: frame_body(pickle.dumps(_call(RpcCall(5, (1, 2), {})))), 400, "name"),
    "call args a str": (lambda: frame_body(pickle.dumps(_call(RpcCall("add", "12", {})))), 400, "args"),
    "call name int, args str": (lambda: frame_body(pickle.dumps(_call(RpcCall(5, "x", 3)))), 400, "name"),
    "call kwargs a list": (lambda: frame_body(pickle.dumps(_call(RpcCall("add", (1,), [2])))), 400, "kwargs"),
    "calls a str": (lambda: frame_body(pickle.dumps(_call() | {"calls": "add"})), 400, "calls"),
    "calls holding dicts": (lambda: frame_body(pickle.dumps(_call({"name": "add", "args": (1, 2)}))), 400, "RpcCall"),
    "module an int": (lambda: frame_body(pickle.dumps(_call(module=5))), 400, "module"),
    "ref_id a str": (lambda: frame_body(pickle.dumps(_call(ref_id="x"))), 400, "ref_id"),
    "ref_id negative": (lambda: frame_body(pickle.dumps(_call(ref_id=-1))), 400, "ref_id"),
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_http_hostile_body_gets_a_clear_4xx(settings, bystander, name):
    build, want, word = HOSTILE_BODIES[name]
    status, text, _ = run(aiohttp_post(settings, build()))
    assert_refused(status, text, want, word)
    bystander.check()


def test_http_a_call_that_raises_is_a_200_with_a_500_reply(settings, target, bystander):
    body = frame_body(request_pickle(calls=[RpcCall("div", (1, 0), {})]))
    resp = run(raw_request(target, request_head(target, admin_headers(settings)), [http_chunk(body) + LAST_CHUNK]))
    assert_chunked_reply(resp)
    reply = unframe_body(resp.body)
    assert reply["status"] == 500 and isinstance(reply["data"], ZeroDivisionError), reply
    assert "division" in reply["traceback"]
    bystander.check()


def test_http_decompression_bomb_is_413(settings, bystander, bomb_slice):
    """One ~1 MB slice that inflates to 1 GiB (> the 8 MiB bound of one slice)."""
    t0 = time.monotonic()
    status, text, _ = run(aiohttp_post(settings, bomb_slice + BORDER))
    assert_refused(status, text, 413, "limit")
    assert "decode" in text.lower(), text
    assert time.monotonic() - t0 < 20
    bystander.check()


def test_http_many_small_slices_over_the_decoded_limit_is_413(settings, bystander):
    """~800 KB of well-formed slices, each 128 KiB of zeros: 600 MiB decoded."""
    one = zlib.compress(bytes(SLICE_SIZE), 9) + BORDER
    status, text, _ = run(aiohttp_post(settings, one * (600 * MIB // SLICE_SIZE)))
    assert_refused(status, text, 413, "limit")
    bystander.check()


async def upload_over_limit(target, hdrs, total: int, content_length: bool):
    """Stream a well-framed body of ``total`` bytes (stored slices of random
    bytes) while reading the answer; the server may answer and close before
    the upload ends, so the sender stops at the first error or when the
    answer is complete."""
    piece = (zlib.compress(os.urandom(SLICE_SIZE), 0) + BORDER) * 8  # ~1 MiB, 8 valid slices
    n = total // len(piece) + 1
    reader, writer = await open_raw(target)
    sent = 0

    async def send():
        nonlocal sent
        writer.write(request_head(target, hdrs, content_length=n * len(piece) if content_length else None))
        for _ in range(n):
            writer.write(piece if content_length else http_chunk(piece))
            await writer.drain()
            sent += len(piece)
        if not content_length:
            writer.write(LAST_CHUNK)
        await writer.drain()

    sender = asyncio.create_task(send())
    try:
        resp = await asyncio.wait_for(read_response(reader), 60)
    finally:
        sender.cancel()
        try:
            await sender
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        writer.close()
    return resp, sent


@pytest.mark.parametrize("content_length", [False, True], ids=["chunked", "content-length"])
def test_http_body_over_the_limit_is_413(settings, target, bystander, content_length):
    resp, sent = run(upload_over_limit(target, admin_headers(settings), 300 * MIB, content_length))
    assert_refused(resp.status, resp.text, 413, "limit")
    assert sent <= 300 * MIB + 2 * MIB
    bystander.check()


def _evil_placeholder(*args):  # pickled by reference, then renamed in the stream
    raise RuntimeError("placeholder")


class _Evil:
    """An argument whose pickle calls ``func(*args)`` when it is loaded."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _evil_request(evil: str, marker) -> bytes:
    """The request ``demo.add(<evil>, 1)`` where <evil> unpickles by running
    ``touch MARKER`` through the global ``evil``."""
    import builtins
    import subprocess

    touch = f"touch {marker}"
    if evil == "posix.system":  # os.system pickles as posix.system
        return request_pickle(calls=[RpcCall("add", (_Evil(os.system, touch), 1), {})])
    if evil == "subprocess.getoutput":
        return request_pickle(calls=[RpcCall("add", (_Evil(subprocess.getoutput, touch), 1), {})])
    if evil == "builtins.exec":
        code = f"open({str(marker)!r}, 'w').close()"
        return request_pickle(calls=[RpcCall("add", (_Evil(builtins.exec, code), 1), {})])
    if evil == "os.system":  # protocol 2: GLOBAL is plain text, so the name can be swapped
        payload = pickle.dumps(
            dict(module="ksrpc.server.demo", calls=[RpcCall("add", (_Evil(_evil_placeholder, touch), 1), {})], ref_id=0),
            protocol=2,
        )
        placeholder = f"c{__name__}\n_evil_placeholder\n".encode()
        assert payload.count(placeholder) == 1
        return payload.replace(placeholder, b"cos\nsystem\n")
    raise AssertionError(evil)


@pytest.mark.parametrize("evil", ["os.system", "posix.system", "builtins.exec", "subprocess.getoutput"])
def test_http_pickle_referencing_a_dangerous_global_is_refused(settings, bystander, marker, evil):
    """The limited user (rules: demo and bench_mod only) sends a request whose
    argument unpickles by running ``touch MARKER``: refused with a 400 naming
    the global, before anything runs.  (The admin user's rules allow every
    module, so for it such a global is no more than a call it may make anyway.)"""
    payload = _evil_request(evil, marker)
    status, text, _ = run(aiohttp_post(settings, frame_body(payload), hdrs=limited_headers(settings)))
    assert_refused(status, text, 400, "refused")
    assert f"global {evil} is refused" in text, text
    time.sleep(0.2)
    assert not marker.exists(), f"the pickle ran {evil}"
    bystander.check()


@pytest.mark.parametrize(
    "method,path,want",
    [
        ("GET", "/chunk", 405),
        ("PUT", "/chunk", 405),
        ("DELETE", "/chunk", 405),
        ("PATCH", "/chunk", 405),
        ("POST", "/ws", 405),
        ("GET", "/nowhere", 404),
        ("POST", "/nowhere", 404),
        ("POST", "/chunk/extra", 404),
        ("GET", "", 404),
        ("POST", "/%2e%2e/%2e%2e/etc/passwd", 404),
    ],
)
def test_http_unknown_routes_and_methods(settings, bystander, method, path, want):
    status, text, _ = run(aiohttp_post(settings, b"", path=path, method=method))
    assert status == want, (status, text[:300])
    bystander.check()


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_http_no_request_smuggling_after_an_early_400(settings, target, bystander, framing):
    """A 5 MiB body without a border is refused (400) after 4 MiB; its last
    MiB is made of ``GET .../generate_204`` requests, and a valid request is
    pipelined after it.  The server must either skip the rest of the body and
    answer the pipelined request (200, data 3) or close the connection: it
    must never answer the requests hidden in the body (204)."""
    inner = f"GET {target[2]}/generate_204 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    hidden = (inner * (MIB // len(inner) + 1))[:MIB]
    refused_body = b"x" * (4 * MIB) + hidden
    if framing == "chunked":
        first = request_head(target, admin_headers(settings)) + http_chunk(refused_body) + LAST_CHUNK
    else:
        first = request_head(target, admin_headers(settings), content_length=len(refused_body)) + refused_body
    good = request_head(target, admin_headers(settings)) + http_chunk(frame_body(request_pickle())) + LAST_CHUNK

    async def go():
        reader, writer = await open_raw(target)
        writer.write(first + good)
        sender = asyncio.create_task(writer.drain())
        answers = []
        try:
            for i in range(3):  # two requests sent: a third answer would be a smuggled one
                try:
                    answers.append(await asyncio.wait_for(read_response(reader), 10 if i < 2 else 1))
                except (asyncio.IncompleteReadError, ConnectionError):
                    break  # the server closed the connection
                except asyncio.TimeoutError:
                    if i < 2:
                        raise
                    break  # nothing more: right
        finally:
            sender.cancel()
            writer.close()
        return answers

    answers = run(go())
    assert answers, "no answer to the first request"
    assert_refused(answers[0].status, answers[0].text, 400, "border")
    assert len(answers) <= 2, f"more answers than requests: {[a.status for a in answers]}"
    if len(answers) == 2:  # the server skipped the refused body and served the pipelined request
        assert_chunked_reply(answers[1])
        assert unframe_body(answers[1].body)["data"] == 3
    bystander.check()


@pytest.mark.parametrize("missing,want", [("X-Timestamp", 403), ("Authorization", 401)])
def test_http_unknown_route_checks_come_first(settings, bystander, missing, want):
    hdrs = admin_headers(settings)
    del hdrs[missing]
    status, text, headers = run(aiohttp_post(settings, b"", path="/nowhere", method="GET", hdrs=hdrs))
    assert status == want, (status, text[:300])
    if want == 401:
        assert headers.get("WWW-Authenticate") == 'Basic realm="Restricted Area"'
    bystander.check()


# -------------------------------------------------------------- 3. hostile WebSocket


async def ws_open(session, settings, hdrs=None):
    return await session.ws_connect(
        settings.url + "/ws", headers=hdrs or admin_headers(settings), max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5)
    )


async def ws_send_request(ws, payload: bytes):
    """The 0.8.1 sequence: per slice BINARY z(slice) + TEXT border, then TEXT EOF."""
    for z in encode_slices(payload):
        await ws.send_bytes(z)
        await ws.send_str(BORDER_TEXT)
    await ws.send_str("EOF")


@dataclass
class WsOutcome:
    reply: dict | None = None  # the unpickled reply
    close_code: int | None = None  # or how the server closed the socket
    close_reason: str | None = None

    def __repr__(self):
        if self.reply is not None:
            return f"reply(status={self.reply.get('status')}, data={self.reply.get('data')!r})"
        return f"closed({self.close_code}, {self.close_reason!r})"


async def ws_read(ws, timeout: float = IO_TIMEOUT) -> WsOutcome:
    """Read one reply (binary slices, text borders, text EOF; other text is
    ignored as the client does) or the server's close."""
    import dill

    buf, out = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.receive(), max(0.1, deadline - time.monotonic()))
        if msg.type == aiohttp.WSMsgType.BINARY:
            buf.extend(msg.data)
        elif msg.type == aiohttp.WSMsgType.TEXT:
            if msg.data == BORDER_TEXT:
                out.extend(zlib.decompress(bytes(buf)))
                buf.clear()
            elif msg.data == "EOF":
                assert not buf, "binary data after the last border of the reply"
                return WsOutcome(reply=dill.loads(bytes(out)))
        elif msg.type == aiohttp.WSMsgType.CLOSE:
            return WsOutcome(close_code=msg.data, close_reason=msg.extra)
        else:  # CLOSING / CLOSED / ERROR
            return WsOutcome(close_code=ws.close_code, close_reason=repr(msg))


async def ws_call(ws, payload: bytes | None = None, timeout: float = IO_TIMEOUT) -> WsOutcome:
    await ws_send_request(ws, payload if payload is not None else request_pickle())
    return await ws_read(ws, timeout)


def ws_case(settings, body, hdrs=None):
    """Open a socket, run ``await body(ws)``, close everything."""

    async def go():
        async with aiohttp.ClientSession() as s:
            ws = await ws_open(s, settings, hdrs)
            try:
                return await body(ws)
            finally:
                await ws.close()

    return run(go())


def assert_ws_reply(outcome: WsOutcome, data):
    assert outcome.reply is not None, f"expected a reply, got {outcome}"
    assert outcome.reply["status"] == 200 and outcome.reply["data"] == data, outcome.reply


@pytest.mark.parametrize("missing,want", [("X-Timestamp", 403), ("Authorization", 401)])
def test_ws_upgrade_without_timestamp_or_auth_is_refused(settings, bystander, missing, want):
    hdrs = admin_headers(settings)
    del hdrs[missing]

    async def go():
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await ws_open(s, settings, hdrs)
            return e.value.status

    assert run(go()) == want
    bystander.check()


def test_ws_text_garbage_is_ignored_and_the_socket_still_serves(settings, bystander):
    async def body(ws):
        for text in ["hello?", "\x00garbage\x7f", "eof", "EOF ", BORDER_TEXT[:-1], "{\"json\": true}", "x" * 100_000]:
            await ws.send_str(text)
        first = await ws_call(ws)
        second = await ws_call(ws, request_pickle(calls=[RpcCall("add", (40, 2), {})]))
        return first, second

    first, second = ws_case(settings, body)
    assert_ws_reply(first, 3)
    assert_ws_reply(second, 42)
    bystander.check()


@pytest.mark.parametrize(
    "case,want_code,word",
    [
        pytest.param(case, code, word, id=case)
        for case, code, word in [
            ("binary without a border, then EOF", 1007, "slice"),
            ("EOF alone", 1007, "empty"),
            ("border alone", 1007, "empty"),
            ("corrupt slice", 1007, "corrupt"),
            ("truncated slice", 1007, "truncated"),
            ("binary frame of 5 MiB", 1009, ""),
            # One BINARY message is one encoded slice; the limit is 4 MiB.
            ("binary frame of 4 MiB + 1 byte", 1009, ""),
            ("two 3 MiB binary frames before a border", 1009, ""),
            ("decompression bomb slice", 1009, "limit"),
        ]
    ],
)
def test_ws_framing_and_size_violations_close_the_socket(settings, bystander, bomb_slice, case, want_code, word):
    """Read what the server does: it closes with the code and a reason (not a 500 reply)."""

    async def body(ws):
        if case == "binary without a border, then EOF":
            await ws.send_bytes(zlib.compress(request_pickle()))
            await ws.send_str("EOF")
        elif case == "EOF alone":
            await ws.send_str("EOF")
        elif case == "border alone":
            await ws.send_str(BORDER_TEXT)
            await ws.send_str("EOF")
        elif case == "corrupt slice":
            await ws.send_bytes(b"\x78\x9cnot zlib at all")
            await ws.send_str(BORDER_TEXT)
            await ws.send_str("EOF")
        elif case == "truncated slice":
            await ws.send_bytes(zlib.compress(request_pickle())[:-6])
            await ws.send_str(BORDER_TEXT)
            await ws.send_str("EOF")
        elif case == "binary frame of 5 MiB":
            await ws.send_bytes(os.urandom(5 * MIB))
        elif case == "binary frame of 4 MiB + 1 byte":
            await ws.send_bytes(os.urandom(4 * MIB + 1))
        elif case == "two 3 MiB binary frames before a border":
            await ws.send_bytes(os.urandom(3 * MIB))
            await ws.send_bytes(os.urandom(3 * MIB))
            await ws.send_str(BORDER_TEXT)
            await ws.send_str("EOF")
        elif case == "decompression bomb slice":
            await ws.send_bytes(bomb_slice)
            await ws.send_str(BORDER_TEXT)
            await ws.send_str("EOF")
        return await ws_read(ws)

    outcome = ws_case(settings, body)
    assert outcome.reply is None, f"expected a close {want_code}, got {outcome}"
    assert outcome.close_code == want_code, f"expected close {want_code}, got {outcome}"
    assert outcome.close_reason, "the close carries no reason"
    assert word in outcome.close_reason.lower(), outcome
    bystander.check()


@pytest.mark.parametrize(
    "case,word",
    [
        ("pickle that fails to load", "pickle"),
        ("pickle of a list", "dict"),
        ("dict lacking keys", "calls"),
        ("call name an int", "name"),
    ],
)
def test_ws_invalid_request_gets_a_pickled_500_reply(settings, bystander, case, word):
    payload = {
        "pickle that fails to load": b"\x80\x04not a pickle",
        "pickle of a list": pickle.dumps([1, 2]),
        "dict lacking keys": pickle.dumps({"module": "ksrpc.server.demo"}),
        "call name an int": pickle.dumps(_call(RpcCall(5, (1, 2), {}))),
    }[case]

    async def body(ws):
        return await ws_call(ws, payload), await ws_call(ws)

    bad, good = ws_case(settings, body)
    assert bad.reply is not None, f"expected a 500 reply, got {bad}"
    assert bad.reply["status"] == 500, bad.reply
    assert {"status", "ref_id", "data"} <= set(bad.reply), bad.reply  # what the 0.8.1 client reads
    assert isinstance(bad.reply["data"], Exception), bad.reply
    assert word in str(bad.reply["data"]).lower(), bad.reply
    assert_ws_reply(good, 3)  # the socket still serves
    bystander.check()


def test_ws_pickle_referencing_os_system_gets_a_500_reply(settings, bystander, marker):
    async def body(ws):
        return await ws_call(ws, _evil_request("os.system", marker)), await ws_call(ws)

    bad, good = ws_case(settings, body, hdrs=limited_headers(settings))
    assert bad.reply is not None and bad.reply["status"] == 500, bad
    assert "refused" in str(bad.reply["data"]), bad.reply
    assert_ws_reply(good, 3)
    time.sleep(0.2)
    assert not marker.exists()
    bystander.check()


def test_ws_request_that_never_sends_eof_does_not_hold_the_server(settings, target, bystander):
    """Socket A sends a slice and a border, never EOF, and closes after a
    second; meanwhile socket B and raw HTTP are served promptly."""

    async def go():
        async with aiohttp.ClientSession() as s:
            a = await ws_open(s, settings)
            b = await ws_open(s, settings)
            try:
                await a.send_bytes(zlib.compress(request_pickle()))
                await a.send_str(BORDER_TEXT)
                t0 = time.monotonic()
                during = await ws_call(b, request_pickle(calls=[RpcCall("add", (5, 5), {})]), timeout=10)
                body = frame_body(request_pickle())
                http = await raw_request(target, request_head(target, admin_headers(settings)), [http_chunk(body) + LAST_CHUNK], pause=0)
                elapsed = time.monotonic() - t0
                await asyncio.sleep(max(0.0, 1.0 - elapsed))
                a_open = not a.closed
                await a.close()
                after = await ws_call(b, timeout=10)
                return during, http, elapsed, a_open, after
            finally:
                await a.close()
                await b.close()

    during, http, elapsed, a_open, after = run(go())
    assert_ws_reply(during, 10)
    assert_chunked_reply(http)
    assert unframe_body(http.body)["data"] == 3
    assert elapsed < 5, f"other clients waited {elapsed:.1f} s behind a half-sent WebSocket request"
    assert a_open, "the server closed the half-sent socket within a second (its idle limit is minutes)"
    assert_ws_reply(after, 3)
    bystander.check()


# -------------------------------------------------------------- 4. connection floods


def _abort(writer):
    """Close with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


def test_200_connections_dropped_mid_request(settings, target, bystander):
    """200 HTTP connections, in 4 batches of 50, send the headers and half a
    (3-slice) body in four shapes, then vanish (FIN or RST); afterwards a
    well-behaved call - raw and through the real client - is answered quickly."""
    body = frame_body(request_pickle(calls=[RpcCall("add", (os.urandom(300_000), b""), {})]))
    half = len(body) // 2
    head = request_head(target, admin_headers(settings))

    async def drop_one(i):
        reader, writer = await open_raw(target)
        shape = i % 4
        if shape == 0:  # headers only
            writer.write(head)
        elif shape == 1:  # inside an HTTP chunk
            writer.write(head + b"%x\r\n" % len(body) + body[:half])
        elif shape == 2:  # whole HTTP chunks, half the slices
            writer.write(head + http_chunk(body[:half]))
        else:  # inside a chunk-size line
            writer.write(head + http_chunk(body[:half]) + b"1")
        await writer.drain()
        await asyncio.sleep(0.05)
        if i % 2:
            _abort(writer)
        else:
            writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass

    async def go():
        for batch in range(4):
            await asyncio.gather(*(drop_one(batch * 50 + i) for i in range(50)))
        t0 = time.monotonic()
        raw = await raw_request(target, head, [http_chunk(frame_body(request_pickle())) + LAST_CHUNK], pause=0)
        raw_s = time.monotonic() - t0
        t0 = time.monotonic()
        async with HttpConnection(settings.url, username=settings.admin_user, password=settings.admin_password) as conn:
            got = await RpcClient("ksrpc.server.demo", conn).add(20, 22)
        client_s = time.monotonic() - t0
        # 20 concurrent well-behaved raw calls: no worker or socket was leaked.
        t0 = time.monotonic()
        many = await asyncio.gather(
            *(raw_request(target, request_head(target, admin_headers(settings)), [http_chunk(frame_body(request_pickle())) + LAST_CHUNK], pause=0) for _ in range(20))
        )
        many_s = time.monotonic() - t0
        return raw, raw_s, got, client_s, many, many_s

    raw, raw_s, got, client_s, many, many_s = run(go())
    assert_chunked_reply(raw)
    assert unframe_body(raw.body)["data"] == 3
    assert got == 42
    for r in many:
        assert_chunked_reply(r)
        assert unframe_body(r.body)["data"] == 3
    assert raw_s < 5 and client_s < 5 and many_s < 10, (raw_s, client_s, many_s)
    bystander.check()


def test_websockets_dropped_mid_request(settings, bystander):
    """40 WebSockets send a slice and a border and vanish without a close frame."""

    async def go():
        async def one(i):
            async with aiohttp.ClientSession() as s:
                ws = await ws_open(s, settings)
                await ws.send_bytes(zlib.compress(request_pickle()))
                if i % 2:
                    await ws.send_str(BORDER_TEXT)
                # leave without a close frame: drop the TCP connection
                ws._response.connection.transport.abort()  # noqa: SLF001

        await asyncio.gather(*(one(i) for i in range(40)))
        async with aiohttp.ClientSession() as s:
            ws = await ws_open(s, settings)
            t0 = time.monotonic()
            out = await ws_call(ws, timeout=10)
            await ws.close()
            return out, time.monotonic() - t0

    out, elapsed = run(go())
    assert_ws_reply(out, 3)
    assert elapsed < 5
    bystander.check()
