"""Compatibility: every feature of the ksrpc 0.8.1 README, driven by the
unmodified 0.8.1 client over HTTP and over WebSocket (fixture ``transport``).

Server-side names used: ``ksrpc.server.demo`` (the original's demo module),
``builtins``, ``numpy``, ``copy``, ``functools``, ``asyncio``, ``json``,
``sqlite3``, ``os``, ``fakesdk`` (admin only).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp
import numpy as np
import pandas as pd
import pytest

from ksrpc.client import RpcClient, Self, rpc_iterator

from ksrpc_testlib import as_main, run, run_client_script

DEMO = "ksrpc.server.demo"
MB = 1024 * 1024


def demo_of(conn, lazy=False):
    return RpcClient(DEMO, conn, lazy=lazy)


# --------------------------------------------------------------------------
# eager calls
# --------------------------------------------------------------------------
def test_eager_call(conn):
    async def main():
        async with conn:
            demo = demo_of(conn)
            assert await demo.add(1, 2) == 3
            assert await demo.add("a", "b") == "ab"
            assert await demo.add(a=[1], b=[2]) == [1, 2]  # kwargs
            assert await demo.div(1, 4) == 0.25

    run(main())


def test_eager_dataframe(conn):
    async def main():
        async with conn:
            df = await demo_of(conn).test()
            pd.testing.assert_frame_equal(df, pd.DataFrame({"A": [1, 2, 3, 4, 5]}))

    run(main())


def test_coroutine_functions_are_awaited(conn):
    async def main():
        async with conn:
            # asyncio.sleep is a coroutine function: the server awaits it
            assert await RpcClient("asyncio", conn).sleep(0, result=5) == 5
            assert await demo_of(conn).async_say_hi("BB") == "Hello BB"  # sleeps 1..3 s

    run(main())


# --------------------------------------------------------------------------
# lazy chains
# --------------------------------------------------------------------------
def test_lazy_chain_collect(conn):
    async def main():
        async with conn:
            demo = demo_of(conn, lazy=True)
            assert await demo.add(1, 2).collect() == 3
            assert await demo.test().__len__().collect() == 5
            assert await demo.add(1, 2).__add__(10).collect() == 13
            # README / examples/demo_call.py
            assert await demo.PASSWORD.__getattr__("__str__")()[3].__add__("100").collect() == "4100"
            assert await demo.test()["A"].sum().collect() == 15

    run(main())


def test_lazy_chain_as_argument(conn):
    """A lazy RpcClient passed as an argument is resolved on the server first
    (the original 0.8.1 server crashes here: get_property() misses `rules`)."""

    async def main():
        async with conn:
            demo = demo_of(conn)
            lazy = demo_of(conn, lazy=True)
            assert await demo.add(lazy.add(1, 2), 10) == 13
            assert await RpcClient("builtins", conn).len(lazy.LIST) == 5
            # examples/demo_call.py: demo.div(demo.create_1d_array(target_mb=1), 0.01)
            arr = await lazy.div(lazy.create_1d_array(target_mb=1), 0.01).collect()
            assert isinstance(arr, np.ndarray) and arr.nbytes == 1 * MB

    run(main())


# --------------------------------------------------------------------------
# [] (__getitem__)
# --------------------------------------------------------------------------
def test_getitem(conn):
    async def main():
        async with conn:
            demo = demo_of(conn)
            assert await demo.LIST[1] == 2  # eager: [] sends at once
            lazy = demo_of(conn, lazy=True)
            assert await lazy.LIST[1].__add__(10).collect() == 12
            assert (await lazy.test()["A"].collect()).tolist() == [1, 2, 3, 4, 5]

    run(main())


# --------------------------------------------------------------------------
# Self with builtins
# --------------------------------------------------------------------------
def test_self_with_builtins(conn):
    async def main():
        async with conn:
            demo = demo_of(conn)
            assert await demo.LIST.len(Self) == 5  # eager
            assert await demo.PASSWORD.str(Self) == "123456"
            lazy = demo_of(conn, lazy=True)
            assert await lazy.LIST.len(Self).collect() == 5
            # examples/demo_call.py
            assert await lazy.PASSWORD.str(Self)[3].int(Self).__add__(100).collect() == 104
            assert await lazy.PASSWORD.str(Self).len(Self).pow(Self, Self).str(Self).collect() == str(6 ** 6)

    run(main())


# --------------------------------------------------------------------------
# attribute reads
# --------------------------------------------------------------------------
def test_module_objects_go_by_reference_and_the_demo_is_the_originals(conn):
    """A module object as a result arrives as the client's own copy of that module (the
    original pickles installed modules by reference; ours used to send the stand-in demo by
    value, which the client could not load); the demo's docstring is the original's."""
    import types

    async def main():
        async with conn:
            assert await demo_of(conn).add(1, 1) == 2  # the demo module is imported
            mod = await RpcClient("ksrpc.server", conn, lazy=True).demo.collect()
            assert isinstance(mod, types.ModuleType) and mod.__name__ == "ksrpc.server.demo", mod
            assert await demo_of(conn).__getattr__("__doc__")() == "\n演示函数\n"

    run(main())


def test_attribute_reads(conn):
    async def main():
        async with conn:
            demo = demo_of(conn)
            assert await demo.PASSWORD() == 123456
            assert await demo.LIST() == [1, 2, 3, 4, 5]
            # arguments given to a non-callable attribute are ignored (0.8.1 behaviour)
            assert await demo.PASSWORD(1, 2) == 123456
            doc = await demo.__getattr__("__doc__")()
            assert isinstance(doc, str) and doc.strip()
            path = await demo.__file__()
            assert isinstance(path, str) and path.endswith(".py")
            assert await demo.__file__.__len__() == len(path)  # README
            lazy = demo_of(conn, lazy=True)
            assert await lazy.__file__.__len__().collect() == len(path)
            assert await lazy.__file__.len(Self).collect() == len(path)
            point = await demo.point()
            assert (point.x, point.y) == (3.14159, 2.71828)

    run(main())


# --------------------------------------------------------------------------
# generators through rpc_iterator
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["async_counter", "sync_counter"])
def test_rpc_iterator(conn, name):
    async def main():
        async with conn:
            eager = demo_of(conn)
            got = [x async for x in rpc_iterator(getattr(eager, name)())]
            assert got == [1, 2, 3]
            lazy = demo_of(conn, lazy=True)
            got = [x async for x in rpc_iterator(getattr(lazy, name)())]
            assert got == [1, 2, 3]

    run(main())


def test_generator_manual_next(conn):
    """examples/demo_iterator.py: next(gen), gen.__next__(), gen.__anext__(), then the end."""

    async def main():
        async with conn:
            gen = await demo_of(conn).async_counter()
            assert isinstance(gen, RpcClient) and gen._ref_id != 0
            assert await next(gen) == 1
            assert await gen.__next__() == 2
            assert await (await gen.__anext__()) == 3
            with pytest.raises((StopAsyncIteration, StopIteration)):
                await next(gen)

            lazy_gen = await demo_of(conn, lazy=True).sync_counter().collect()
            assert await next(lazy_gen).collect() == 1
            assert await (await lazy_gen.__anext__()).collect() == 2

    run(main())


# --------------------------------------------------------------------------
# server exceptions
# --------------------------------------------------------------------------
def test_server_exception_reraised(conn, capsys):
    async def main():
        async with conn:
            demo = demo_of(conn)
            with pytest.raises(ZeroDivisionError):
                await demo.div(1, 0)
            out = capsys.readouterr().out
            assert "Server Side Traceback" in out
            assert "ZeroDivisionError" in out
            with pytest.raises(ValueError):  # json.JSONDecodeError
                await RpcClient("json", conn).loads("{")
            # a missing name: the original answers AssertionError("getattr(,name) failed")
            with pytest.raises(Exception):
                await demo.no_such_function_xyz()
            # the connection is still good after server-side errors
            assert await demo.add(2, 3) == 5

    run(main())


def test_unpicklable_result(conn):
    """A result that cannot be pickled is an error for this call only."""

    async def main():
        async with conn:
            with pytest.raises(Exception):
                await RpcClient("sqlite3", conn).connect(":memory:")
            assert await demo_of(conn).add(2, 3) == 5

    run(main())


# --------------------------------------------------------------------------
# lambda / local function / closure as arguments (client and server on the same Python minor)
# --------------------------------------------------------------------------
def test_function_arguments(conn):
    k = 10

    def distance(x):  # a closure over k
        return abs(x - k)

    def cube(x):
        return x ** 3

    async def main():
        async with conn:
            builtins = RpcClient("builtins", conn)
            assert await builtins.sorted([3, 1, 2], key=as_main(lambda x: -x)) == [3, 2, 1]
            assert await builtins.sorted([1, 20, 9, 12], key=as_main(distance)) == [9, 12, 1, 20]
            # examples/demo_callback.py: map returns a lazy iterator evaluated on the client
            assert list(await builtins.map(as_main(cube), [1, 2, 3])) == [1, 8, 27]
            functools = RpcClient("functools", conn, lazy=True)
            assert await functools.reduce(as_main(lambda x, y: x * y), [1, 2, 3, 4, 5]).collect() == 120

    run(main())


# --------------------------------------------------------------------------
# big data, both directions (>= 10 MB)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("mb", [10, 100])
def test_numpy_download(conn, mb):
    async def main():
        async with conn:
            arr = await demo_of(conn).create_1d_array(mb)
            assert isinstance(arr, np.ndarray)
            assert arr.dtype == np.float64 and arr.nbytes == mb * MB
            assert 0.0 <= float(arr.min()) and float(arr.max()) < 1.0

    run(main())


def test_numpy_upload_and_roundtrip(conn):
    arr = np.random.default_rng(1).random(12 * MB // 8)  # 12 MB, incompressible-ish

    async def main():
        async with conn:
            assert await RpcClient("builtins", conn).len(arr) == arr.size
            total = await RpcClient("numpy", conn).sum(arr)
            assert total == pytest.approx(float(arr.sum()), rel=1e-12)
            back = await demo_of(conn).add(arr, 0)
            assert isinstance(back, np.ndarray) and np.array_equal(back, arr)

    run(main())


def test_pandas_roundtrip(conn):
    n = 300_000
    rng = np.random.default_rng(2)
    df = pd.DataFrame(
        {
            "a": rng.random(n),
            "b": rng.random(n),
            "c": rng.random(n),
            "d": rng.integers(0, 1 << 40, n),
            "t": pd.date_range("2020-01-01", periods=n, freq="min"),
        }
    )
    assert df.memory_usage(deep=True).sum() >= 10 * MB

    async def main():
        async with conn:
            assert await RpcClient("builtins", conn).len(df) == n
            back = await RpcClient("copy", conn).deepcopy(df)
            pd.testing.assert_frame_equal(back, df)

    run(main())


# --------------------------------------------------------------------------
# many concurrent calls
# --------------------------------------------------------------------------
def test_gather_many(conn):
    async def main():
        async with conn:
            demo = demo_of(conn)
            got = await asyncio.gather(*[demo.add(i, 1) for i in range(50)])
            assert got == [i + 1 for i in range(50)]
            lazy = demo_of(conn, lazy=True)
            got = await asyncio.gather(*[lazy.add(i, i).collect() for i in range(20)])
            assert got == [2 * i for i in range(20)]

    run(main())


def test_concurrent_calls_into_a_thread_unsafe_sdk_do_not_mix_answers(connect, settings):
    # fakesdk keeps one "connection" as jqdatasdk-style SDKs do; by default the
    # server runs one call into a package at a time (python.parallel_modules
    # opts a package out; tests/tests/fairness.rs shows the mix-up then).
    async def main():
        conns = [connect(settings.admin_user, settings.admin_password) for _ in range(4)]
        for c in conns:
            await c.__aenter__()
        try:
            got = await asyncio.gather(*[RpcClient("fakesdk", c).query(i, 0.5) for i, c in enumerate(conns)])
        finally:
            for c in conns:
                await c.__aexit__(None, None, None)
        assert got == [0, 1, 2, 3]

    run(main())


# --------------------------------------------------------------------------
# sync mode (to_sync=True + nest_asyncio), in a subprocess: nest_asyncio
# patches asyncio for the whole process
# --------------------------------------------------------------------------
SYNC_SCRIPT = r"""
import json, os, sys
import nest_asyncio
from ksrpc.client import RpcClient, Self
from ksrpc.connections.http import HttpConnection
from ksrpc.connections.websocket import WebSocketConnection

nest_asyncio.apply()
C = {"http": HttpConnection, "ws": WebSocketConnection}[sys.argv[1]]
URL = os.environ["KSRPC_TEST_URL"]
USER = os.environ["KSRPC_TEST_ADMIN_USER"]
PASSWORD = os.environ["KSRPC_TEST_ADMIN_PASSWORD"]

out = []
with C(URL, username=USER, password=PASSWORD) as conn:
    demo = RpcClient("ksrpc.server.demo", conn, to_sync=True)
    out.append(demo.add(1, 2))
    out.append(demo.add(3, 4))
    out.append(demo.test()["A"].tolist())
    lazy = RpcClient("ksrpc.server.demo", conn, lazy=True, to_sync=True)
    out.append(lazy.LIST.len(Self).collect())

conn = C(URL, username=USER, password=PASSWORD)
demo = RpcClient("ksrpc.server.demo", conn, to_sync=True)
out.append(demo.add(5, 6))
out.append(demo.add(7, 8))
print("RESULT:" + json.dumps(out))
"""


def test_sync_mode(transport, settings):
    result, _ = run_client_script(SYNC_SCRIPT, args=[transport])
    assert result == [3, 7, [1, 2, 3, 4, 5], 5, 11, 15]


# --------------------------------------------------------------------------
# generate_stub
# --------------------------------------------------------------------------
def test_generate_stub(conn):
    async def main():
        async with conn:
            text = await demo_of(conn).generate_stub()
            assert isinstance(text, str)
            assert "def add" in text and "def div" in text
            text = await demo_of(conn, lazy=True).generate_stub().collect()
            assert "def add" in text

    run(main())


# --------------------------------------------------------------------------
# dynamic URL: the server's path holds a {time} placeholder (optional)
# --------------------------------------------------------------------------
def test_dynamic_url(connect, settings):
    if not settings.dynamic_url:
        pytest.skip("KSRPC_TEST_DYNAMIC_URL not set: the runner has no server with a {time} path")
    assert "{time}" in settings.dynamic_url

    async def main():
        for value in (time.strftime("%Y%m%d%H%M%S"), "20261125", uuid.uuid4().hex):
            url = settings.dynamic_url.replace("{time}", value)
            c = connect(settings.admin_user, settings.admin_password, url=url)
            async with c:
                assert await RpcClient(DEMO, c).add(1, 2) == 3

    run(main())


# --------------------------------------------------------------------------
# redirect probing (HTTP only). HTTP_ALLOW_REDIRECTS is read once, when
# ksrpc.config_client is imported, so each mode runs in its own interpreter.
# --------------------------------------------------------------------------
REDIRECT_SCRIPT = r"""
import asyncio, json, os, sys
from ksrpc.client import RpcClient
from ksrpc.connections.http import HttpConnection
import ksrpc.connections.http as http_mod

async def main():
    async with HttpConnection(sys.argv[1], username=os.environ["KSRPC_TEST_ADMIN_USER"],
                              password=os.environ["KSRPC_TEST_ADMIN_PASSWORD"]) as conn:
        demo = RpcClient("ksrpc.server.demo", conn)
        a = await demo.add(1, 2)
        b = await demo.add(3, 4)
        return [http_mod.HTTP_ALLOW_REDIRECTS, a, b, conn.data.get("url")]

print("RESULT:" + json.dumps(asyncio.run(main())))
"""


@pytest.mark.parametrize("status", [302, 307])
@pytest.mark.parametrize("mode", [1, 2])
def test_http_redirect_probe(settings, redirector, mode, status):
    token = uuid.uuid4().hex
    url = redirector.url(status, token)
    result, _ = run_client_script(REDIRECT_SCRIPT, args=[url], env={"HTTP_ALLOW_REDIRECTS": str(mode)})
    allow, a, b, cached = result
    assert allow == mode
    assert (a, b) == (3, 7)
    assert cached == settings.base  # calls went to the real server
    hits = redirector.hits_for(token)
    # one probe for two calls (the client caches the base URL), no call sent to the redirector
    assert hits == [("POST", f"/{status}/{token}/generate_204")]


def test_generate_204(settings):
    """The probe endpoint itself: GET and POST, with the client's headers."""
    from ksrpc.connections import make_headers

    async def main():
        auth = aiohttp.BasicAuth(settings.admin_user, settings.admin_password)
        async with aiohttp.ClientSession(auth=auth) as s:
            for method in ("GET", "POST"):
                async with s.request(method, settings.base + "/generate_204", headers=make_headers(),
                                     allow_redirects=False) as r:
                    assert r.status == 204, (method, r.status)

    run(main())


# --------------------------------------------------------------------------
# authentication and rules
# --------------------------------------------------------------------------
@pytest.mark.parametrize("who", ["wrong_password", "unknown_user", "no_credentials"])
def test_wrong_credentials(connect, settings, transport, who):
    user, password = {
        "wrong_password": (settings.admin_user, settings.admin_password + "x"),
        "unknown_user": ("nobody-" + uuid.uuid4().hex[:8], "whatever"),
        "no_credentials": (None, None),
    }[who]
    c = connect(user, password)

    async def main():
        async with c:
            with pytest.raises(Exception) as ei:
                await RpcClient(DEMO, c).add(1, 2)
            return ei.value

    err = run(main())
    if transport == "http":
        # the 0.8.1 client: Exception(f"{status}, {body}, {url}")
        assert type(err) is Exception
        assert str(err).startswith("401, "), str(err)
    else:
        assert isinstance(err, aiohttp.WSServerHandshakeError), repr(err)
        assert err.status == 401


def test_forbidden_import_for_limited_user(limited):
    async def main():
        async with limited:
            # the limited user may use the demo module ...
            assert await RpcClient(DEMO, limited).add(1, 2) == 3
            # ... and nothing else
            with pytest.raises(Exception):
                await RpcClient("os", limited).getcwd()
            with pytest.raises(Exception):
                await RpcClient("os.path", limited).join("a", "b")
            with pytest.raises(Exception):
                await RpcClient("builtins", limited).len([1, 2])
            with pytest.raises(Exception):
                await RpcClient("ksrpc.server", limited).demo.add(1, 2)
            assert await RpcClient(DEMO, limited).add(2, 3) == 5

    run(main())


def test_admin_may_import_anything(conn):
    async def main():
        async with conn:
            assert await RpcClient("os.path", conn).join("a", "b") == "a/b"
            assert await RpcClient("math", conn).factorial(5) == 120
            assert await RpcClient("json", conn).dumps({"a": 1}) == json.dumps({"a": 1})

    run(main())
