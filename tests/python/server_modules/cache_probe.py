"""Server-side functions for the result-cache tests.

Every function counts its runs under a caller-chosen tag, so a test sees on
the server whether a call ran or was served from the cache. The suite's
config caches `cache_probe.cached_*` for 600 s and `cache_probe.brief` for
1 s; `runs` and `uncached` match no pattern.
"""
import threading
import time

_LOCK = threading.Lock()
_RUNS = {}


def _count(tag):
    with _LOCK:
        _RUNS[tag] = _RUNS.get(tag, 0) + 1


def runs(tag):
    """How many times a function ran for `tag` (never cached itself)."""
    with _LOCK:
        return _RUNS.get(tag, 0)


def cached_square(tag, x, delay=0.0):
    _count(tag)
    time.sleep(delay)
    return x * x


def cached_count(tag, codes):
    """A query with a long argument (an SDK call naming thousands of codes)."""
    _count(tag)
    return len(codes)


def cached_fails(tag):
    _count(tag)
    raise ValueError("errors are not cached")


def cached_gen(tag, n):
    _count(tag)
    yield from range(n)


def cached_frame(tag, rows):
    """A DataFrame with the dtypes a data SDK returns (and a big one for the bench)."""
    import numpy as np
    import pandas as pd
    _count(tag)
    idx = pd.date_range("2026-01-01", periods=rows, freq="min", name="time")
    return pd.DataFrame({
        "code": np.array(["600000.XSHG", "000001.XSHE"])[np.arange(rows) % 2],
        "close": np.linspace(1.0, 2.0, rows),
        "volume": np.arange(rows, dtype=np.int64),
        "paused": np.arange(rows) % 3 == 0,
    }, index=idx)


def brief(tag, x):
    _count(tag)
    return x


def uncached(tag, x):
    _count(tag)
    return x
