"""The unmodified ksrpc 0.8.1 client's share of `cargo xtask soak`.

usage: soak_client.py URL USER PASSWORD SECONDS

Runs mixed calls over HTTP and WebSocket until SECONDS have passed: small
calls checked for the right answer, a DataFrame, a generator dropped after
its first item, and an error that must come back as ZeroDivisionError.
Prints one JSON line of counts; exits 1 at the first wrong answer.
"""
import asyncio
import json
import sys
import time

import pandas as pd
from ksrpc.client import RpcClient, rpc_iterator
from ksrpc.connections.http import HttpConnection
from ksrpc.connections.websocket import WebSocketConnection


async def one_round(conn, i, counts):
    demo = RpcClient("ksrpc.server.demo", conn)
    got = await demo.add(i, 1)
    if got != i + 1:
        raise AssertionError(f"add({i}, 1) gave {got!r}")
    counts["add"] += 1
    if i % 10 == 0:
        frame = await demo.test()
        if not isinstance(frame, pd.DataFrame) or frame.empty:
            raise AssertionError(f"demo.test() gave {type(frame)}")
        counts["frame"] += 1
    if i % 10 == 3:
        lazy = RpcClient("ksrpc.server.demo", conn, lazy=True)
        async for item in rpc_iterator(lazy.sync_counter()):
            if item != 1:
                raise AssertionError(f"sync_counter's first item was {item!r}")
            break  # dropped half-way
        counts["generator_dropped"] += 1
    if i % 10 == 6:
        try:
            await demo.div(1, 0)
        except ZeroDivisionError:
            counts["error"] += 1
        else:
            raise AssertionError("div(1, 0) did not raise ZeroDivisionError")


async def main(url, user, password, seconds):
    counts = {"add": 0, "frame": 0, "generator_dropped": 0, "error": 0}
    stop = time.monotonic() + seconds
    i = 0
    while time.monotonic() < stop:
        for cls in (HttpConnection, WebSocketConnection):
            async with cls(url, username=user, password=password) as conn:
                for _ in range(20):
                    await one_round(conn, i, counts)
                    i += 1
    return counts


if __name__ == "__main__":
    url, user, password, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    try:
        result = asyncio.run(main(url, user, password, seconds))
    except Exception as e:  # noqa: BLE001 - reported, and the run fails
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
    print(json.dumps(result))
