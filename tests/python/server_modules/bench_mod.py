"""Server-side helpers for the test suite and `cargo xtask bench`.

Loaded by the server under test through `python.path`; the `limited` test
user is allowed this module.
"""
import threading
import time

_BARRIER = None
_BARRIER_LOCK = threading.Lock()
_FRAME = {}


def sleep(seconds=1.0):
    """Block the calling thread (releases the GIL, like an SDK doing I/O)."""
    time.sleep(seconds)
    return seconds


def barrier_wait(parties=3, timeout=5.0):
    """Return True once `parties` calls are waiting here at the same time.

    A server that runs calls one after another never gets there and the
    barrier breaks after `timeout` seconds (BrokenBarrierError).
    """
    global _BARRIER
    with _BARRIER_LOCK:
        if _BARRIER is None or _BARRIER.parties != parties or _BARRIER.broken:
            _BARRIER = threading.Barrier(parties, timeout=timeout)
        barrier = _BARRIER
    barrier.wait()
    return True


def cached_market_frame(rows, salt):
    """`market_frame(rows)` under a name the bench's result caches match; `salt` makes a
    fresh request (a miss) when it changes."""
    return market_frame(rows)


def market_frame(rows=1_000_000, seed=42):
    """A realistic daily market-data frame: date, 6-character code,
    open/high/low/close with 2 decimals, int64 volume. Built once per size
    and cached, so benchmarks measure transport, not generation."""
    key = (rows, seed)
    if key not in _FRAME:
        import numpy as np
        import pandas as pd

        rng = np.random.default_rng(seed)
        codes = np.array([f"{600000 + i:06d}" for i in range(2000)])
        n_codes = min(len(codes), max(1, rows // 500))
        days = -(-rows // n_codes)
        dates = pd.bdate_range("2020-01-01", periods=days)
        code_col = np.tile(codes[:n_codes], days)[:rows]
        date_col = np.repeat(dates.values, n_codes)[:rows]
        base = rng.uniform(3, 300, n_codes)
        drift = np.cumprod(1 + rng.normal(0, 0.02, (days, n_codes)), axis=0).ravel()[:rows]
        close = np.round(np.tile(base, days)[:rows] * drift, 2)
        open_ = np.round(close * (1 + rng.normal(0, 0.01, rows)), 2)
        high = np.round(np.maximum(open_, close) * (1 + rng.uniform(0, 0.02, rows)), 2)
        low = np.round(np.minimum(open_, close) * (1 - rng.uniform(0, 0.02, rows)), 2)
        volume = rng.integers(1_000, 10_000_000, rows, dtype=np.int64)
        _FRAME[key] = pd.DataFrame(
            {"date": date_col, "code": code_col, "open": open_, "high": high, "low": low, "close": close, "volume": volume}
        )
    return _FRAME[key]


def spin(seconds=30.0):
    """Busy-loop in Python bytecode (interruptible by the server's timeout)."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


CANCELLED = []


async def wait_for_cancel(seconds=30.0):
    """Sleep on the event loop; record it if the server cancels us."""
    import asyncio

    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        CANCELLED.append(seconds)
        raise
    return seconds


def cancelled_count():
    return len(CANCELLED)


def echo(value):
    """Return the argument unchanged (native-protocol round trips)."""
    return value


def frame_summary(frame):
    """Rows, column names and dtypes of a DataFrame argument (a native table
    arrives as a pandas DataFrame)."""
    return len(frame), [str(c) for c in frame.columns], [str(t) for t in frame.dtypes]


def countdown(n=3):
    """A generator of n, n-1, ..., 1."""
    yield from range(n, 0, -1)
