"""The Python client of the native protocol (`ksrpc_rs.client`), against a real server.

The server is `python -m ksrpc_rs` in a child process (as on the data machine), serving
`pyclient_mod` (tests/python/server_modules), which records on the server how each call
ended, so a test can see a cancellation arrive there. Every test runs over HTTP and over the
multiplexed WebSocket unless it is about one of them.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import pyclient_mod  # the server's module, imported here for the expected values
from ksrpc_rs.client import RemoteGenerator, RpcClient, Self, rpc_iterator
from ksrpc_rs.connections import SmartConnection
from ksrpc_rs.connections.http import HttpConnection
from ksrpc_rs.connections.websocket import WebSocketConnection
from ksrpc_rs.errors import (AuthenticationError, BadUrlError, CallTimeoutError, ConnectionLostError,
                             RefusedError)

pytestmark = pytest.mark.timeout(180)

CONFIG = """
[server]
port = {port}
shutdown_grace = 1
[python]
parallel_modules = ["pyclient_mod"]
allow_code = true
[users.u]
password = "pw"
rules = ["allow pyclient_mod", "allow ksrpc.server.demo", "deny *"]
[users.root]
password = "rootpw"
rules = ["allow *"]
"""


def start_server(tmp_path, port=0):
    path = tmp_path / f"client-{port}.toml"
    path.write_text(CONFIG.format(port=port))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join([os.environ["KSRPC_TEST_SERVER_MODULES"],
                                          os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "ksrpc_rs", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("ksrpc-server listening on "), line
    return proc, line.split()[-1]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    proc, url = start_server(tmp_path_factory.mktemp("client"))
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def ws_url(url):
    return "ws" + url[len("http"):]


@pytest.fixture(params=["http", "ws"])
def connect(request, url):
    """Makes connections of the parametrized transport."""
    def make(user="u", password="pw", **kw):
        if request.param == "ws":
            return WebSocketConnection(ws_url(url), username=user, password=password, **kw)
        return HttpConnection(url, username=user, password=password, **kw)
    make.transport = request.param
    return make


def run(coro):
    return asyncio.run(coro)


def mod(conn, **kw):
    return RpcClient("pyclient_mod", conn, **kw)


# ---- values -------------------------------------------------------------------------------------
VALUES = [None, True, False, 0, -1, 2**63 - 1, -2**63, 2**70, -(10**30), 1.5, float("inf"), "", "ü中",
          b"", b"\x00\xff", [], [1, [2, [3]]], (), (1, "a", None), {"a": 1, 2: "b", (1, 2): None},
          {"nested": {"list": [1.0, (True,)]}}, bytearray(b"ab")]


def test_every_value_type_round_trips(connect):
    async def main():
        async with connect() as conn:
            return [await mod(conn).echo(v) for v in VALUES]
    got = run(main())
    for sent, back in zip(VALUES, got):
        want = bytes(sent) if isinstance(sent, bytearray) else sent
        assert back == want and type(back) is type(want), (sent, back)


def test_keyword_arguments_and_nan(connect):
    async def main():
        async with connect() as conn:
            return await mod(conn).echo(1, b=2, a=[3]), await mod(conn).echo(float("nan"))
    (args, kwargs), nan = run(main())
    assert args == (1,) and kwargs == {"a": [3], "b": 2}
    assert nan != nan


# ---- tables -------------------------------------------------------------------------------------
def test_a_dataframe_of_every_column_kind_arrives_whole(connect):
    async def main():
        async with connect() as conn:
            return await mod(conn).frame()
    pd.testing.assert_frame_equal(run(main()), pyclient_mod.frame())


def test_a_dataframe_argument_goes_up_as_arrow_and_comes_back_whole(connect):
    df = pyclient_mod.frame()

    async def main():
        async with connect() as conn:
            return await mod(conn).type_name(df), await mod(conn).echo(df)
    kind, back = run(main())
    assert kind == "pandas.core.frame.DataFrame"
    pd.testing.assert_frame_equal(back, df)


def test_multiindex_columns_and_rows_round_trip(connect):
    df = pyclient_mod.multi()

    async def main():
        async with connect() as conn:
            return await mod(conn).multi(), await mod(conn).echo(df)
    got, echoed = run(main())
    pd.testing.assert_frame_equal(got, df)
    pd.testing.assert_frame_equal(echoed, df)


def test_a_big_reply_shows_a_tqdm_bar_by_default(connect, capfd):
    def bars():
        return [line for line in capfd.readouterr().err.replace("\r", "\n").splitlines() if "pyclient_mod" in line]
    with connect() as conn:
        assert len(mod(conn, to_sync=True).big_bytes(16)) == 16 << 20
        shown = bars()
        assert len(mod(conn, to_sync=True, progress=False).big_bytes(16)) == 16 << 20
        assert len(mod(conn, to_sync=True).echo(b"small")) == 5
        hidden = bars()
    assert shown and all("16.8M" in line for line in shown), shown  # the reply's size, from tqdm
    assert hidden == []  # progress=False, and a small reply


def test_arrays_and_series_keep_their_kind(connect):
    async def main():
        async with connect() as conn:
            m = mod(conn)
            return (await m.array(2), await m.array(1), await m.series(True), await m.series(False),
                    await m.echo(np.arange(6, dtype="int16").reshape(2, 3)), await m.type_name(np.zeros(3)))
    a2, a1, named, unnamed, echoed, kind = run(main())
    np.testing.assert_array_equal(a2, pyclient_mod.array(2))
    assert a2.dtype == np.float64 and a2.shape == (3, 4)
    np.testing.assert_array_equal(a1, pyclient_mod.array(1))
    assert a1.dtype == np.int32
    pd.testing.assert_series_equal(named, pyclient_mod.series(True))
    pd.testing.assert_series_equal(unnamed, pyclient_mod.series(False))
    assert echoed.dtype == np.int16 and echoed.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert kind == "numpy.ndarray"


def test_tables_as_pyarrow_or_polars(connect):
    async def main():
        async with connect(tables="arrow") as conn:
            as_arrow = await mod(conn).frame()
            as_pandas = await mod(conn, tables="pandas").frame()
            try:
                as_polars = await mod(conn, lazy=True).frame().collect(tables="polars")
            except ImportError as e:
                as_polars = e
            return as_arrow, as_pandas, as_polars
    as_arrow, as_pandas, as_polars = run(main())
    assert isinstance(as_arrow, pa.Table) and as_arrow.num_rows == 4
    assert as_arrow.column("s").to_pylist() == list(pyclient_mod.frame()["s"])
    assert isinstance(as_pandas, pd.DataFrame)
    try:
        import polars  # noqa: F401
    except ImportError:
        assert isinstance(as_polars, ImportError) and "polars" in str(as_polars)
    else:
        assert as_polars.shape[0] == 4


def test_a_column_arrow_cannot_carry_is_refused_naming_it(connect):
    mixed = pd.DataFrame({"mixed": [1, "a"]})

    async def main():
        async with connect() as conn:
            await mod(conn).echo(mixed)
    with pytest.raises(pa.ArrowException, match="mixed"):
        run(main())


# ---- chains -------------------------------------------------------------------------------------
def test_the_081_chain_forms(connect):
    async def main():
        async with connect(user="root", password="rootpw") as conn:
            demo = RpcClient("ksrpc.server.demo", conn)
            lazy = RpcClient("ksrpc.server.demo", conn, lazy=True)
            return (await demo.add(1, 2), await demo.LIST[1], await lazy.LIST[1].__add__(10).collect(),
                    await demo.LIST.len(Self), await lazy.PASSWORD.str(Self)[3].int(Self).__add__(100).collect(),
                    await demo.__getattr__("__doc__")(),
                    await mod(conn).echo(RpcClient("pyclient_mod", conn, lazy=True).echo(41).__add__(1)),
                    await demo.generate_stub())
    add, item, item_lazy, length, chained, doc, chain_arg, stub = run(main())
    assert (add, item, item_lazy, length, chained) == (3, 2, 12, 5, 104)
    assert doc == "\n演示函数\n"
    assert chain_arg == 42
    assert isinstance(stub, str) and "def add(" in stub


def test_lambdas_and_local_functions_as_arguments_where_the_server_allows_code(connect):
    def local(x, y):
        return x * 10 + y

    async def main():
        async with connect(user="root", password="rootpw") as root:
            got = await mod(root).apply(lambda x: x * 2, 21), await mod(root).apply(local, 4, 2)
        async with connect() as limited:
            with pytest.raises(PermissionError, match="builtins"):
                await mod(limited).apply(lambda x: x, 1)
        return got
    assert run(main()) == (42, 42)


# ---- generators ---------------------------------------------------------------------------------
def test_generators_sync_and_async(connect):
    async def main():
        async with connect() as conn:
            m = mod(conn)
            sync_items = [x async for x in await m.counter(4)]
            async_items = [x async for x in rpc_iterator(m.acounter(3))]
            lazy_items = [x async for x in rpc_iterator(mod(conn, lazy=True).counter(2))]
            gen = await m.raises_midway(2)
            assert isinstance(gen, RemoteGenerator)
            got = [await gen.__anext__(), await gen.__anext__()]
            with pytest.raises(ValueError, match="stopped after 2"):
                await gen.__anext__()
            return sync_items, async_items, lazy_items, got
    assert run(main()) == ([0, 1, 2, 3], [0, 1, 2], [0, 1], [0, 1])


def test_a_generator_with_to_sync_is_a_plain_iterator(connect):
    with connect() as conn:
        assert list(mod(conn, to_sync=True).counter(3)) == [0, 1, 2]


# ---- errors -------------------------------------------------------------------------------------
def test_server_exceptions_are_the_same_builtin_with_the_server_traceback(connect):
    async def main():
        async with connect() as conn:
            errors = []
            for kind in ["ZeroDivisionError", "KeyError", "ValueError", "custom"]:
                try:
                    await mod(conn).fail(kind, "boom")
                except Exception as e:
                    errors.append(e)
            return errors
    zero, key, value, custom = run(main())
    assert type(zero) is ZeroDivisionError and "boom" in str(zero)
    assert "in fail" in zero.server_traceback and "pyclient_mod" in zero.server_traceback
    assert any("Server side traceback" in n for n in zero.__notes__)
    assert type(key) is KeyError and type(value) is ValueError
    # a class the client may not have arrives as its nearest builtin base, named in the message
    assert type(custom) is LookupError and str(custom) == "pyclient_mod.CustomError: boom"


def test_a_wrong_password_is_an_authentication_error(connect):
    async def main():
        async with connect(password="wrong") as conn:
            await mod(conn).echo(1)
    with pytest.raises(AuthenticationError):
        run(main())


def test_a_module_the_rules_refuse_is_a_refused_error(connect):
    async def main():
        async with connect() as conn:
            await RpcClient("os", conn).getcwd()
    with pytest.raises(RefusedError, match="rule deny") as info:
        run(main())
    assert isinstance(info.value, PermissionError)


# ---- concurrency and control --------------------------------------------------------------------
def test_gather_on_one_websocket_replies_in_completion_order(url):
    async def main():
        async with WebSocketConnection(ws_url(url), username="u", password="pw") as conn:
            m = mod(conn)
            slow = asyncio.ensure_future(m.aslow(2.0, "order-slow"))
            quick = [await m.echo(i) for i in range(3)]  # one socket, while the slow call runs
            done_first = not slow.done()
            results = await asyncio.gather(*(m.echo(i) for i in range(200)))
            return quick, done_first, results, await slow
    quick, quick_first, results, slow = run(main())
    assert quick == [0, 1, 2] and quick_first
    assert results == list(range(200)) and slow == "order-slow"


def test_small_calls_finish_while_a_100mb_reply_is_in_flight(url):
    async def main():
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        seen = []

        def progress(received, total):
            seen.append((received, total))
            if received >= 1 << 20:
                loop.call_soon_threadsafe(started.set)

        async with WebSocketConnection(ws_url(url), username="u", password="pw") as conn:
            m = mod(conn)
            await m.big_bytes(100)  # made once on the server, so the next reply is all transfer
            big = asyncio.ensure_future(mod(conn, lazy=True).big_bytes(100).collect(progress=progress))
            await asyncio.wait_for(started.wait(), 120)
            first = await m.echo("small")
            big_done_before_small = big.done()
            others = await asyncio.gather(*(m.echo(i) for i in range(200)))
            data = await big
            return first, big_done_before_small, others, len(data), seen
    first, big_done, others, size, seen = run(main())
    assert first == "small" and not big_done, "the small call waited for the big reply"
    assert others == list(range(200)) and size == 100 << 20
    # received bytes grow to about the reply's size (random bytes do not compress)
    assert seen[-1][0] >= 0.9 * size and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


def test_200_calls_gathered_over_http_wait_their_turn_in_the_client(url):
    """A request per call: past the server's per-user bound (64 in flight) it would answer 503,
    so the client keeps at most 32 on the wire and queues the rest."""
    async def main():
        async with HttpConnection(url, username="u", password="pw") as conn:
            return await asyncio.gather(*(mod(conn).echo(i) for i in range(200)))
    assert run(main()) == list(range(200))


def wait_for_state(conn, tag, want, seconds=30.0):
    """Polls the server for how call `tag` ended (bounded)."""
    deadline = time.monotonic() + seconds
    while True:
        got = mod(conn, to_sync=True).state(tag)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_cancelling_the_awaiting_task_cancels_the_call_on_the_server(connect):
    tag = f"cancel-{connect.transport}"

    async def main():
        async with connect() as conn:
            task = asyncio.ensure_future(mod(conn).aslow(60, tag))
            while mod(conn, to_sync=True).state(tag) != "running":
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await asyncio.to_thread(wait_for_state, conn, tag, "cancelled")
    assert run(main()) == "cancelled"


def test_per_call_and_per_connection_timeouts(connect):
    async def main():
        async with connect(timeout=0.5) as conn:
            with pytest.raises(CallTimeoutError):
                await mod(conn).aslow(60, f"timeout-conn-{connect.transport}")
            with pytest.raises(TimeoutError):  # CallTimeoutError is one
                await mod(conn, lazy=True).aslow(60, f"timeout-call-{connect.transport}").collect(timeout=0.3)
            assert await mod(conn, lazy=True).aslow(0.8, "t").collect(timeout=30) == "t"
            return await asyncio.to_thread(wait_for_state, conn, f"timeout-conn-{connect.transport}", "cancelled")
    assert run(main()) == "cancelled"


def test_to_sync_works_inside_a_running_event_loop(connect):
    async def notebook_cell():
        # what a Jupyter cell is: code inside a running loop, here without nest_asyncio
        conn = connect()
        return mod(conn, to_sync=True).echo(7), RpcClient("ksrpc.server.demo", conn, to_sync=True).add(2, 3)
    assert run(notebook_cell()) == (7, 5)


def test_connections_with_with_and_without_and_by_scheme(url):
    with HttpConnection(url, username="u", password="pw") as conn:
        assert mod(conn, to_sync=True).echo(1) == 1
    plain = WebSocketConnection(url, username="u", password="pw")  # http:// read as ws:// (0.8.1 did)
    assert mod(plain, to_sync=True).echo(2) == 2
    assert type(SmartConnection(ws_url(url))) is WebSocketConnection
    assert type(SmartConnection(url)) is HttpConnection
    with pytest.warns(UserWarning, match="connector"):
        HttpConnection(url, connector=object())
    proxied = WebSocketConnection(ws_url(url), username="u", password="pw", proxy="http://127.0.0.1:9")
    with pytest.raises(BadUrlError, match="proxy"):
        mod(proxied, to_sync=True).echo(1)


def test_a_progress_callback_sees_a_big_reply_arrive(connect):
    seen = []
    with connect() as conn:
        data = mod(conn, lazy=True, to_sync=True).big_bytes(8).collect(progress=lambda r, t: seen.append((r, t)))
    assert len(data) == 8 << 20
    # reports about every MiB, the last near the end (random bytes do not compress)
    assert len(seen) >= 4 and seen[-1][0] >= (8 << 20) - (2 << 20)


def test_a_blocked_progress_callback_does_not_stall_the_socket(url):
    """The callback runs on a thread of its own, not on the one reading the socket: while it
    blocks, other calls on the same WebSocket still get their replies; once it returns, the
    reports arrive in order, the last one before the result."""
    release = threading.Event()
    blocked = threading.Event()
    seen = []

    def progress(received, total):
        seen.append((received, total))
        blocked.set()
        release.wait(60)

    async def main():
        async with WebSocketConnection(ws_url(url), username="u", password="pw") as conn:
            m = mod(conn)
            big = asyncio.ensure_future(mod(conn, lazy=True).big_bytes(16).collect(progress=progress))
            assert await asyncio.to_thread(blocked.wait, 60), "no progress report"
            # the first report is still inside the callback
            small = await asyncio.wait_for(asyncio.gather(*(m.echo(i) for i in range(20))), 30)
            reports_meanwhile = len(seen)
            release.set()
            data = await big
            return small, reports_meanwhile, len(data), list(seen)
    small, meanwhile, size, reports = run(main())
    assert small == list(range(20)) and meanwhile == 1
    assert size == 16 << 20 and reports[-1][0] >= (16 << 20) - (2 << 20)
    assert all(a[0] < b[0] for a, b in zip(reports, reports[1:]))


# ---- the server going away ----------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("transport", ["http", "ws"])
def test_the_server_stopped_mid_call_fails_the_call_and_the_next_call_reconnects(tmp_path, transport):
    port = free_port()
    proc, url = start_server(tmp_path, port)
    conn = (WebSocketConnection(ws_url(url), username="u", password="pw") if transport == "ws"
            else HttpConnection(url, username="u", password="pw"))
    try:
        m = mod(conn, to_sync=True)
        assert m.echo(1) == 1

        async def in_flight():
            call = asyncio.ensure_future(mod(conn).aslow(60, "killed"))
            while await asyncio.to_thread(m.state, "killed") != "running":
                await asyncio.sleep(0.05)
            proc.kill()
            await call
        with pytest.raises(ConnectionLostError):
            run(in_flight())
        proc.wait(30)
        proc, _ = start_server(tmp_path, port)
        assert m.echo(2) == 2  # a new connection
        assert m.state("killed") is None  # the cut call was not sent again
    finally:
        proc.kill()
        proc.wait(30)


def test_exiting_with_calls_in_flight_exits_cleanly(url):
    """Replies that arrive while the interpreter exits are dropped, not delivered into its
    finalization (a thread attaching then would be ended mid-Rust-frame: a crash at exit)."""
    script = textwrap.dedent(f"""
        import sys, threading, time
        from ksrpc_rs.client import RpcClient
        from ksrpc_rs.connections.websocket import WebSocketConnection
        conn = WebSocketConnection({ws_url(url)!r}, username="u", password="pw")
        m = RpcClient("pyclient_mod", conn, to_sync=True)
        assert m.echo(1) == 1
        def calls(i):
            while True:
                m.big_bytes(8) if i % 2 else m.echo(i)
        for i in range(6):
            threading.Thread(target=calls, args=(i,), daemon=True).start()
        time.sleep(0.5)
        sys.exit(0)  # daemon threads waiting on replies, replies arriving
    """)
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]


def test_an_http_proxy_and_its_credentials_are_used(url):
    """0.8.1's `proxy` and `proxy_auth` keywords: the call goes to the proxy, with the server's
    absolute URL and the proxy's Basic credentials (this stand-in proxy answers 502 itself)."""
    import base64
    import threading

    seen = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def proxy():
        peer, _ = listener.accept()
        with peer:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = peer.recv(65536)
                if not chunk:
                    break
                head += chunk
            seen.append(head.split(b"\r\n\r\n")[0].decode("latin-1"))
            peer.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")

    thread = threading.Thread(target=proxy, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    conn = HttpConnection(url, username="u", password="pw", proxy=f"http://127.0.0.1:{port}",
                          proxy_auth=("proxyuser", "proxypw"))
    from ksrpc_rs.errors import HttpStatusError
    with pytest.raises(HttpStatusError) as info:
        mod(conn, to_sync=True).echo(1)
    thread.join(30)
    listener.close()
    assert info.value.status == 502
    request_line, *headers = seen[0].split("\r\n")
    assert request_line.startswith(f"POST {url}/v2/call "), request_line
    token = base64.b64encode(b"proxyuser:proxypw").decode()
    assert any(h.lower() == f"proxy-authorization: basic {token}".lower() for h in headers), headers


def test_each_client_side_failure_has_its_own_type():
    """The mapping `_native` applies to the Rust client's errors (the refusal of another protocol
    version itself is tested end to end in ksrpc-server/tests/client.rs)."""
    from ksrpc_rs import errors

    version = errors.from_native("refused", "unsupported native protocol version 9 (this server speaks 1)")
    assert type(version) is errors.ProtocolVersionError and isinstance(version, errors.ProtocolError)
    assert type(errors.from_native("refused", "malformed message")) is errors.ProtocolError
    assert isinstance(errors.from_native("unauthorized", "wrong"), errors.AuthenticationError)
    skew = errors.from_native("forbidden", "server clock 10:00, yours 09:00, window 300 s")
    assert isinstance(skew, errors.ClockSkewError) and "window" in str(skew)
    assert isinstance(errors.from_native("connection", "reset"), ConnectionError)
    assert isinstance(errors.from_native("timeout", "no reply", 1.0), TimeoutError)
    # a server PermissionError that is not a rule's refusal stays the builtin
    own = errors.from_native("remote", "PermissionError", "[Errno 13] Permission denied: '/x'", "tb")
    assert type(own) is PermissionError and own.server_traceback == "tb"
    odd = errors.from_native("remote", "UnicodeDecodeError", "cannot decode", "tb")
    assert isinstance(odd, errors.RemoteError) and odd.kind == "UnicodeDecodeError"
