"""Server-side helpers for the Python native client's tests (ksrpc-pyext/tests/test_client.py).

Calls record what happened to them in `STATE`, which the tests read back with `state(tag)`:
that is how a test sees, on the server, that a call was cancelled.
"""
import asyncio
import builtins
import os
import time

STATE = {}
_BIG = {}


class CustomError(LookupError):
    """Not a builtin: the server sends it as its nearest builtin base, naming it."""


def echo(*args, **kwargs):
    """Its arguments back: (args, kwargs), or the only positional argument alone."""
    if len(args) == 1 and not kwargs:
        return args[0]
    return args, kwargs


def apply(func, *args):
    """func(*args): a function the client sent."""
    return func(*args)


def type_name(x):
    """The type the server received, as module.name."""
    return f"{type(x).__module__}.{type(x).__name__}"


def frame():
    """A DataFrame of every column kind the client must carry through Arrow."""
    import numpy as np
    import pandas as pd

    idx = pd.Index([10, 20, 30, 40], name="key")
    return pd.DataFrame({
        "i": np.array([1, -2, 3, 2**40], dtype="int64"),
        "i32": np.array([1, 2, 3, 4], dtype="int32"),
        "f": [1.5, float("nan"), -0.0, 1e300],
        "b": [True, False, True, False],
        "s": ["a", "ü", "", "long " * 10],
        "s_none": ["x", None, "z", None],
        "cat": pd.Categorical(["lo", "hi", "lo", "mid"], categories=["lo", "mid", "hi"], ordered=True),
        "dt": pd.to_datetime(["2024-01-01 00:00:00", "2024-06-30 12:34:56", None, "1999-12-31 23:59:59"]),
        "dt_tz": pd.to_datetime(["2024-01-01 09:30", "2024-01-02 15:00", "2024-03-10 02:30", None])
        .tz_localize("Asia/Shanghai"),
        "td": pd.to_timedelta([1, 2, None, 4], unit="s"),
        "f_none": [None, 2.0, None, 4.0],
    }, index=idx)


def multi():
    """MultiIndex columns and a MultiIndex row index (pandas' metadata in Arrow keeps both)."""
    import pandas as pd

    columns = pd.MultiIndex.from_tuples([("px", "open"), ("px", "close"), ("vol", "")], names=["field", "kind"])
    index = pd.MultiIndex.from_tuples([("000001", 1), ("000001", 2), ("600000", 1)], names=["code", "day"])
    return pd.DataFrame([[1.0, 2.0, 3], [4.0, 5.0, 6], [7.0, 8.0, 9]], index=index, columns=columns)


def array(ndim=2):
    import numpy as np
    return np.arange(12, dtype="float64").reshape(3, 4) if ndim == 2 else np.arange(5, dtype="int32")


def series(named=True):
    import pandas as pd
    return pd.Series([1.0, 2.5, None], index=pd.Index(["a", "b", "c"], name="k"), name="px" if named else None)


def big_bytes(mb):
    """`mb` MiB of random bytes (zstd cannot shrink them), made once per size."""
    if mb not in _BIG:
        _BIG[mb] = os.urandom(mb << 20)
    return _BIG[mb]


def fail(kind, message="boom"):
    if kind == "custom":
        raise CustomError(message)
    raise getattr(builtins, kind)(message)


def counter(n):
    yield from range(n)


async def acounter(n):
    for i in range(n):
        await asyncio.sleep(0)
        yield i


def raises_midway(n):
    for i in range(n):
        yield i
    raise ValueError(f"stopped after {n}")


async def aslow(seconds, tag):
    """Sleeps on the server's event loop; records how it ended."""
    STATE[tag] = "running"
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        STATE[tag] = "cancelled"
        raise
    STATE[tag] = "finished"
    return tag


def slow(seconds, tag):
    """Blocks a thread in short sleeps (an asynchronous exception can land between them)."""
    STATE[tag] = "running"
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.02)
    except BaseException as e:
        STATE[tag] = f"interrupted:{type(e).__name__}"
        raise
    STATE[tag] = "finished"
    return tag


def state(tag):
    return STATE.get(tag)
