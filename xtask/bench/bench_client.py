"""Workloads of `cargo xtask bench`, driven by the unmodified ksrpc 0.8.1 client (or, with
KSRPC_BENCH_CLIENT=ksrpc_rs, by our Python client of the native protocol).

Usage: python bench_client.py WORKLOAD URL USER PASSWORD [OPTIONS-JSON]
Prints one JSON object on the last line of stdout. Runs against whichever
server URL points to (ours or the original), so both get the same client code.
"""
import asyncio
import contextlib
import io
import json
import os
import statistics
import sys
import time

if os.environ.get("KSRPC_BENCH_CLIENT") == "ksrpc_rs":
    # The same workloads through our Python client of the native protocol: the 0.8.1 API,
    # so the imports are the only difference.
    from ksrpc_rs.client import RpcClient
    from ksrpc_rs.connections.http import HttpConnection
    from ksrpc_rs.connections.websocket import WebSocketConnection
else:
    from ksrpc.client import RpcClient
    from ksrpc.connections.http import HttpConnection
    from ksrpc.connections.websocket import WebSocketConnection

TRANSPORTS = {"http": HttpConnection, "ws": WebSocketConnection}


@contextlib.contextmanager
def quiet():
    """The client prints progress bars to stdout/stderr; keep our output clean."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err


async def timed(coro):
    t = time.perf_counter()
    value = await coro
    return time.perf_counter() - t, value


async def download_array(conn, opts):
    demo = RpcClient("ksrpc.server.demo", conn)
    runs = []
    for i in range(opts.get("repeat", 3) + 1):  # the first run is a discarded warm-up
        dt, arr = await timed(demo.create_1d_array(opts.get("mb", 100)))
        assert arr.nbytes == opts.get("mb", 100) * 1024 * 1024
        del arr
        if i:
            runs.append(dt)
    return {"seconds": statistics.median(runs), "runs": runs}


async def download_frame(conn, opts):
    bench = RpcClient("bench_mod", conn)
    rows = opts.get("rows", 1_000_000)
    await bench.market_frame(1000)  # warm-up: imports pandas on the server
    warmup = 1 if opts.get("warmup", True) else 0  # a discarded first run
    runs = []
    for i in range(opts.get("repeat", 1) + warmup):
        dt, df = await timed(bench.market_frame(rows))
        assert len(df) == rows
        if i >= warmup:
            runs.append(dt)
    return {"seconds": statistics.median(runs), "runs": runs}


async def cached_frame(conn, opts):
    """The result cache (both servers cache `bench_mod.cached_market_frame`): `hit` asks for
    one entry again and again; a miss asks with a fresh salt each run, so the call runs and
    its reply is stored. The frame itself is built once per size on the server (as in
    `download_frame`), so a miss costs what a call costs beyond the function's own time."""
    bench = RpcClient("bench_mod", conn)
    rows = opts.get("rows", 1_000_000)
    await bench.market_frame(1000)  # warm-up: imports pandas on the server
    await bench.market_frame(rows)  # builds the frame once: not part of a miss
    salt = f"{os.getpid()}-{time.time_ns()}"
    if opts["hit"]:
        assert len(await bench.cached_market_frame(rows, salt)) == rows  # fills the entry
    runs = []
    for i in range(opts.get("repeat", 1)):
        dt, df = await timed(bench.cached_market_frame(rows, salt if opts["hit"] else f"{salt}-{i}"))
        assert len(df) == rows
        runs.append(dt)
    return {"seconds": statistics.median(runs), "runs": runs}


async def upload_array(conn, opts):
    import numpy as np

    arr = np.random.default_rng(7).random(opts.get("mb", 100) * 1024 * 1024 // 8)
    builtins = RpcClient("builtins", conn)
    await builtins.len([1])
    runs = []
    for i in range(opts.get("repeat", 1) + 1):
        dt, n = await timed(builtins.len(arr))
        assert n == len(arr)
        if i:
            runs.append(dt)
    return {"seconds": statistics.median(runs), "runs": runs}


async def small_calls(conn, opts):
    """`demo.add(1, 2)` from `concurrency` tasks sharing one client for `seconds`."""
    demo = RpcClient("ksrpc.server.demo", conn)
    await demo.add(1, 2)
    stop = time.perf_counter() + opts.get("seconds", 10)
    lat = []

    async def worker():
        while time.perf_counter() < stop:
            t = time.perf_counter()
            assert await demo.add(1, 2) == 3
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(opts.get("concurrency", 16))])
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {
        "rps": len(lat) / elapsed,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
        "calls": len(lat),
    }


async def blocking(conn, opts):
    bench = RpcClient("bench_mod", conn)
    demo = RpcClient("ksrpc.server.demo", conn)
    await bench.sleep(0)
    dt, _ = await timed(asyncio.gather(bench.sleep(1), bench.sleep(1), bench.sleep(1)))
    slow = asyncio.ensure_future(bench.sleep(2))
    await asyncio.sleep(0.5)
    add_dt, three = await timed(demo.add(1, 2))
    assert three == 3
    await slow
    return {"gather_3x1s_seconds": dt, "add_during_block_ms": add_dt * 1000}


WORKLOADS = {f.__name__: f for f in (download_array, download_frame, cached_frame, upload_array, small_calls, blocking)}


async def main():
    workload, url, user, password = sys.argv[1:5]
    opts = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    conn = TRANSPORTS[opts.get("transport", "http")](url, username=user, password=password)
    with quiet():
        async with conn:
            result = await WORKLOADS[workload](conn, opts)
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
