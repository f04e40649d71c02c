"""Helpers for the real-client suite (imported by conftest.py and the test modules).

Nothing here changes the ksrpc 0.8.1 client: the tests drive the client exactly
as a user script would.  Two helpers only shape the *arguments* a test sends:

* ``as_main(f)`` re-homes a lambda / local function into ``__main__`` so dill
  pickles it the way it does in a user's script (globals by reference to
  ``__main__``, "__builtin__ __main__").  A function defined in a test module
  would otherwise be pickled with a reference to that module's ``__dict__``,
  which no server can import.
* ``Reduce`` / ``dotted_global`` build hostile argument objects whose pickle
  runs a chosen callable when it is *loaded* (the classic ``__reduce__``
  attack), including protocol-4 dotted names such as
  ``ksrpc.server.demo`` + ``random._os.system``.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import types

DEFAULT_CALL_TIMEOUT = 75  # seconds; pytest-timeout (pytest.ini) is the outer limit
RESULT_PREFIX = "RESULT:"


def run(coro, timeout: float = DEFAULT_CALL_TIMEOUT):
    """Run one coroutine on a fresh event loop (each test owns its loop)."""

    async def _main():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(_main())


def as_main(f):
    """Return a copy of function ``f`` whose globals are ``__main__``'s.

    dill pickles such a function by value with its globals as a reference to
    the receiver's ``__main__`` (what happens in every user script), so the
    server needs nothing from the test modules.  Closures are kept.
    """
    main_globals = sys.modules["__main__"].__dict__
    g = types.FunctionType(f.__code__, main_globals, f.__name__, f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__
    g.__kwdefaults__ = f.__kwdefaults__
    return g


class Reduce:
    """An argument whose pickle calls ``func(*args)`` when it is loaded.

    ``func`` and the elements of ``args`` may be other ``Reduce`` objects, so
    gadget chains (getattr -> getattr -> ... -> eval) can be built.
    """

    def __init__(self, func, *args):
        self.func = func
        self.args = args

    def __call__(self, *a, **k):  # pickle requires the reduce callable to be callable
        raise RuntimeError("Reduce placeholder called locally")

    def __reduce__(self):
        return (self.func, self.args)


class _GlobalRef:
    """Pickles as a reference to the global ``<module>.<qualname>``."""

    def __init__(self, qualname: str):
        self._qualname = qualname

    def __call__(self, *a, **k):
        raise RuntimeError("global placeholder called locally")

    def __reduce__(self):
        return self._qualname


def dotted_global(module: str, qualname: str):
    """Return ``(ref, fake_module)``: ``ref`` pickles (protocol >= 4) as
    ``STACK_GLOBAL(module, qualname)`` with a dotted ``qualname``.

    Pickle checks that the name resolves to the same object on the sending
    side, so while pickling, ``sys.modules[module]`` must be ``fake_module``
    (use ``monkeypatch.setitem(sys.modules, module, fake_module)``).
    """
    cls = type("_DottedGlobal", (_GlobalRef,), {"__module__": module})
    ref = cls(qualname)
    fake = types.ModuleType(module)
    parts = qualname.split(".")
    obj = ref
    for p in reversed(parts[1:]):
        obj = types.SimpleNamespace(**{p: obj})
    setattr(fake, parts[0], obj)
    return ref, fake


def run_client_script(code: str, args=(), env=None, timeout: float = 120):
    """Run ``code`` as ``__main__`` of a fresh interpreter of this venv.

    Used where the 0.8.1 client reads its settings at import time
    (``HTTP_ALLOW_REDIRECTS``) or where a test must not patch this process
    (``nest_asyncio.apply()``).  The script prints one line
    ``RESULT:<json>``; that value is returned.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    proc = subprocess.run(
        [sys.executable, "-X", "utf8", "-c", textwrap.dedent(code), *map(str, args)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"client script failed (rc={proc.returncode})\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return json.loads(lines[-1][len(RESULT_PREFIX):]), proc


# --------------------------------------------------------------------------
# The 0.8.1 wire format, for hand-made requests (test_hostile.py).
# --------------------------------------------------------------------------
import base64  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

BORDER = b"\r\r\r ChUnKeD \n\n\n"  # 15 bytes: CR CR CR, space, ChUnKeD, space, LF LF LF
SLICE_SIZE = 128 * 1024


def encode_slices(payload: bytes, level: int = 6, slice_size: int = SLICE_SIZE) -> list:
    """zlib(slice) for each ``slice_size`` slice of ``payload`` (what the client sends)."""
    return [zlib.compress(payload[i:i + slice_size], level) for i in range(0, len(payload), slice_size)]


def frame_body(payload: bytes, level: int = 6) -> bytes:
    """The HTTP body: ``z(s1) BORDER z(s2) BORDER ... z(sN) BORDER``."""
    return b"".join(z + BORDER for z in encode_slices(payload, level))


def unframe_body(body: bytes):
    """Split an HTTP reply body on the border, inflate each slice and load the pickle
    as the client does (``dill.loads``)."""
    import dill

    assert body.endswith(BORDER), f"reply does not end with the border: {body[-40:]!r}"
    pieces = body.split(BORDER)[:-1]
    assert all(pieces), "reply holds an empty slice"
    return dill.loads(b"".join(zlib.decompress(p) for p in pieces))


def request_pickle(module: str = "ksrpc.server.demo", calls=None, ref_id: int = 0) -> bytes:
    """The request payload exactly as the 0.8.1 client pickles it:
    ``dill.dumps(dict(module=..., calls=[RpcCall, ...], ref_id=...))``."""
    import dill
    from ksrpc.client import RpcCall

    if calls is None:
        calls = [RpcCall("add", (1, 2), {})]
    return dill.dumps(dict(module=module, calls=calls, ref_id=ref_id))


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def wire_headers(user: str, password: str, ts=None) -> dict:
    """Headers of a client request: X-Timestamp, Authorization, Content-Type."""
    return {
        "X-Timestamp": repr(time.time()) if ts is None else str(ts),
        "Authorization": basic_auth(user, password),
        "Content-Type": "application/octet-stream",
    }


def zlib_bomb(gib: int = 1) -> bytes:
    """A valid zlib stream (one slice) of ``gib`` GiB of zeros, about 1 MB per GiB.

    Built in well under a second: with a full flush every MiB, each MiB of
    zeros compresses to the same bytes, so one block is repeated; the adler32
    trailer is computed over the real data.
    """
    mib = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    c.compress(mib)
    c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    n = gib * 1024
    adler = 1
    for _ in range(n):
        adler = zlib.adler32(mib, adler)
    return b"\x78\xda" + block * n + c.flush() + adler.to_bytes(4, "big")
