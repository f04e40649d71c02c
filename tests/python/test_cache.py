"""The result cache, driven by the unmodified 0.8.1 client over HTTP and WebSocket.

The suite's server caches `cache_probe.cached_*` (600 s) and `cache_probe.brief` (1 s); every
`cache_probe` function counts its runs on the server under a tag, so each test asks the
server how often a call really ran. Tags are fresh per test: entries never leak between tests.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import pandas as pd
import pytest

from ksrpc.client import RpcClient, rpc_iterator

from ksrpc_testlib import run

PROBE = "cache_probe"


def tag():
    return uuid.uuid4().hex


async def runs(conn, t):
    return await RpcClient(PROBE, conn).runs(t)


def test_a_hit_is_served_without_running_the_call(conn):
    async def main():
        t = tag()
        async with conn:
            probe = RpcClient(PROBE, conn)
            assert await probe.cached_square(t, 7) == 49
            assert await probe.cached_square(t, 7) == 49
            assert await probe.cached_square(t, 7) == 49
            assert await runs(conn, t) == 1
            # Other arguments are another entry; keyword arguments are part of the key.
            assert await probe.cached_square(t, 8) == 64
            assert await probe.cached_square(t, 7, delay=0.0) == 49
            assert await runs(conn, t) == 3
            # Lazy form, same request shape as eager: one more entry hit.
            lazy = RpcClient(PROBE, conn, lazy=True)
            assert await lazy.cached_square(t, 8).collect() == 64
            assert await runs(conn, t) == 3

    run(main())


def test_a_request_bigger_than_64_kib_is_cached_too(conn):
    """Its key is hashed on the blocking pool, not on the async worker."""
    async def main():
        t = tag()
        codes = [f"{600000 + i:06d}.XSHG" for i in range(10_000)]  # ~150 KiB pickled
        async with conn:
            probe = RpcClient(PROBE, conn)
            assert [await probe.cached_count(t, codes) for _ in range(3)] == [10_000] * 3
            assert await runs(conn, t) == 1
            assert await probe.cached_count(t, codes[1:]) == 9_999
            assert await runs(conn, t) == 2

    run(main())


def test_entries_expire_after_their_ttl(conn):
    async def main():
        t = tag()
        async with conn:
            probe = RpcClient(PROBE, conn)
            assert [await probe.brief(t, 1) for _ in range(3)] == [1, 1, 1]
            assert await runs(conn, t) == 1
            await asyncio.sleep(1.3)
            assert await probe.brief(t, 1) == 1
            assert await runs(conn, t) == 2

    run(main())


def test_errors_generators_and_unnamed_calls_are_never_cached(conn):
    async def main():
        t = tag()
        async with conn:
            probe = RpcClient(PROBE, conn)
            for _ in range(2):
                with pytest.raises(ValueError, match="errors are not cached"):
                    await probe.cached_fails(t)
            assert await runs(conn, t) == 2
            for _ in range(2):
                assert [x async for x in rpc_iterator(probe.cached_gen(t, 3))] == [0, 1, 2]
            assert await runs(conn, t) == 4
            assert [await probe.uncached(t, 5) for _ in range(2)] == [5, 5]
            assert await runs(conn, t) == 6
            # A chain passed as an argument: what it resolves to is not part of the request.
            inner = RpcClient(PROBE, conn, lazy=True).runs(t)
            assert await probe.cached_square(t, inner) == 36
            assert await probe.cached_square(t, inner) == 49
            assert await runs(conn, t) == 8

    run(main())


def test_concurrent_identical_calls_run_once(connect, settings):
    """Single flight: eight clients ask at once for a result that takes 0.5 s; it runs once."""
    async def main():
        t = tag()
        conns = [connect(settings.admin_user, settings.admin_password) for _ in range(8)]
        for c in conns:
            await c.__aenter__()
        try:
            got = await asyncio.gather(*(RpcClient(PROBE, c).cached_square(t, 3, delay=0.5) for c in conns))
            assert got == [9] * 8
            assert await runs(conns[0], t) == 1
        finally:
            for c in conns:
                await c.__aexit__(None, None, None)

    run(main())


def test_a_user_whose_rules_refuse_the_call_never_gets_the_cached_result(conn, limited):
    """0.8.1's cache answered any user from any other user's entry, before any rule."""
    async def main():
        t = tag()
        async with conn:
            assert await RpcClient(PROBE, conn).cached_square(t, 5) == 25
            assert await RpcClient(PROBE, conn).cached_square(t, 5) == 25
            async with limited:
                for _ in range(2):
                    with pytest.raises(PermissionError):
                        await RpcClient(PROBE, limited).cached_square(t, 5)
            assert await runs(conn, t) == 1

    run(main())


def test_a_cached_dataframe_is_the_same_frame(conn):
    async def main():
        t = tag()
        async with conn:
            probe = RpcClient(PROBE, conn)
            first = await probe.cached_frame(t, 50_000)
            second = await probe.cached_frame(t, 50_000)
            pd.testing.assert_frame_equal(first, second)
            assert len(second) == 50_000 and second.index.name == "time"
            assert await runs(conn, t) == 1

    run(main())


def test_hits_and_misses_across_transports_are_separate_requests_of_one_key(settings):
    """The key is the request, not the transport: an HTTP miss is a WebSocket hit."""
    from conftest import TRANSPORTS

    async def main():
        t = tag()
        for name in ("http", "ws"):
            async with TRANSPORTS[name](settings.url, username=settings.admin_user,
                                        password=settings.admin_password) as c:
                assert await RpcClient(PROBE, c).cached_square(t, 11) == 121
        async with TRANSPORTS["http"](settings.url, username=settings.admin_user,
                                      password=settings.admin_password) as c:
            assert await runs(c, t) == 1

    run(main())
