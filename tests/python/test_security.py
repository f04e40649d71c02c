"""Security: what the limited user (rules: ksrpc.server.demo and bench_mod only)
tries in order to escape its rules, sent through the unmodified 0.8.1 client.

Each attempt must raise on the client, must not run anything on the server
(a marker file in KSRPC_TEST_MARKER_DIR stays absent) and must leave the
server serving the same user on the same connection.

The original 0.8.1 server fails most of these (it checks rules on import only,
unpickles anything, shares generator handles between users, and stops on
SystemExit); that is expected.  ``test_system_exit_*`` stop the original
server, so they come last in this file.
"""
from __future__ import annotations

import os
import pickle
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest

from ksrpc.client import RpcCall, RpcClient, Self

from ksrpc_testlib import Reduce, as_main, dotted_global, run

DEMO = "ksrpc.server.demo"


def touch(marker) -> str:
    return f"touch {shlex.quote(str(marker))}"


def assert_not_created(marker, wait=0.5):
    # os.system runs before the reply; a spawned subprocess might lag a little
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        assert not marker.exists(), f"the server ran the command: {marker} exists"
        time.sleep(0.05)
    assert not marker.exists(), f"the server ran the command: {marker} exists"


async def assert_still_serves(c):
    assert await RpcClient(DEMO, c).add(1, 2) == 3


def is_refusal(err) -> bool:
    """The server refused by a rule: a PermissionError (calls, and request pickles over
    WebSocket, where the refusal is a pickled reply), or, for a request pickle over HTTP,
    the 400 the 0.8.1 client raises as a plain Exception ("400, bad request: ... refused").
    Never just any exception: a chain that cannot work raises too."""
    if isinstance(err, PermissionError):
        return True
    text = str(err)
    return type(err) is Exception and text.startswith("400, bad request:") and "refused" in text


def attempt(c, make_call, marker=None):
    """Run ``make_call(c)`` (an awaitable); require that nothing ran (no marker),
    that the call was refused by a rule (``is_refusal``), and that the connection
    still works afterwards. Returns the exception.

    Note for chains: names that exist on RpcClient itself (``__init__``,
    ``__class__``, ``__call__``, ``__doc__``, ...) must be written
    ``.__getattr__("__init__")`` or the client resolves them locally."""

    async def main():
        async with c:
            try:
                value = await make_call(c)
            except Exception as e:  # noqa: BLE001
                err = e
            else:
                err = None
            if marker is not None:
                assert_not_created(marker)
            assert err is not None, f"the call was not refused; it returned {value!r:.300}"
            assert is_refusal(err), f"not refused by a rule: {type(err).__name__}: {err}"
            await assert_still_serves(c)
            return err

    return run(main())


# --------------------------------------------------------------------------
# positive control: the marker mechanism works (admin may run commands)
# --------------------------------------------------------------------------
def test_marker_control_admin_can_run_commands(conn, marker):
    async def main():
        async with conn:
            assert await RpcClient("os", conn).system(touch(marker)) == 0

    run(main())
    assert marker.exists(), "the server could not create the marker: check KSRPC_TEST_MARKER_DIR"


# --------------------------------------------------------------------------
# chains that reach a forbidden module through an allowed one
# --------------------------------------------------------------------------
def _demo(c, lazy=False):
    return RpcClient(DEMO, c, lazy=lazy)


ESCAPE_CHAINS = {
    # demo imports random, random imports os as _os
    "demo.random._os.system": lambda c, cmd: _demo(c).random._os.system(cmd),
    "demo.random._os.system (lazy)": lambda c, cmd: _demo(c, True).random._os.system(cmd).collect(),
    "demo.add.__globals__[__builtins__][__import__]": lambda c, cmd: (
        _demo(c, True).add.__globals__["__builtins__"]["__import__"].__getattr__("__call__")("os").system(cmd).collect()
    ),
    "demo.__builtins__[__import__]": lambda c, cmd: (
        _demo(c, True).__builtins__["__import__"].__getattr__("__call__")("os").system(cmd).collect()
    ),
    "demo.child_obj.some_method.__globals__[random]": lambda c, cmd: (
        _demo(c, True).child_obj.some_method.__globals__["random"]._os.system(cmd).collect()
    ),
    "demo.Point.__init__.__globals__[random]": lambda c, cmd: (
        _demo(c, True).Point.__getattr__("__init__").__globals__["random"]._os.system(cmd).collect()
    ),
    # a coroutine function reached through demo.asyncio (the server awaits it)
    "demo.asyncio.create_subprocess_shell": lambda c, cmd: (
        _demo(c, True).asyncio.create_subprocess_shell(cmd).collect()
    ),
    # builtins through the Self syntax
    "demo.getattr(Self, random)...": lambda c, cmd: (
        _demo(c, True).getattr(Self, "random").getattr(Self, "_os").getattr(Self, "system")
        .__getattr__("__call__")(cmd).collect()
    ),
    "demo.eval(...)": lambda c, cmd: _demo(c).eval(f"__import__('os').system({cmd!r})"),
    "demo.exec(...)": lambda c, cmd: _demo(c).exec(f"import os; os.system({cmd!r})"),
    # a nested lazy chain argument naming a forbidden module
    "nested RpcClient('os') argument": lambda c, cmd: _demo(c).add(RpcClient("os", c, lazy=True).system(cmd), 1),
}


@pytest.mark.parametrize("name", list(ESCAPE_CHAINS))
def test_escape_chain_refused(limited, marker, name):
    make = ESCAPE_CHAINS[name]
    attempt(limited, lambda c: make(c, touch(marker)), marker)


READ_CHAINS = {
    "demo.random (a module value)": lambda c: _demo(c).random(),
    "demo.random._os.getcwd": lambda c: _demo(c).random._os.getcwd(),
    "demo.add.__globals__": lambda c: _demo(c).add.__globals__(),
    "demo.add.__globals__[__builtins__]": lambda c: _demo(c, True).add.__globals__["__builtins__"].collect(),
    "demo.LIST.__class__.__base__.__subclasses__()": lambda c: (
        _demo(c, True).LIST.__getattr__("__class__").__base__.__subclasses__().collect()
    ),
    # both demos (ours, and the real 0.8.1 one the wheel suite serves) import time at module
    # level; the limited user may not reach it
    "demo.time.__name__ (time not allowed)": lambda c: _demo(c, True).time.__name__.collect(),
}


@pytest.mark.parametrize("name", list(READ_CHAINS))
def test_forbidden_read_refused(limited, name):
    attempt(limited, READ_CHAINS[name])


# --------------------------------------------------------------------------
# builtins are refused for the limited user (its rules do not allow builtins)
# --------------------------------------------------------------------------
BUILTIN_CALLS = {
    "demo.LIST.len(Self)": lambda c: _demo(c).LIST.len(Self),
    "demo.PASSWORD.str(Self)": lambda c: _demo(c).PASSWORD.str(Self),
    "demo.sorted([3, 1, 2])": lambda c: _demo(c).sorted([3, 1, 2]),
    "demo.open(__file__)": lambda c: _demo(c, True).open(_demo(c, True).__file__).read().collect(),
    "demo.__file__.open(Self).read()": lambda c: _demo(c, True).__file__.open(Self, "r").read().collect(),
}


@pytest.mark.parametrize("name", list(BUILTIN_CALLS))
def test_builtins_refused(limited, name):
    attempt(limited, BUILTIN_CALLS[name])


# --------------------------------------------------------------------------
# hostile pickles in the arguments: the server must not run them while decoding
# --------------------------------------------------------------------------
def _getattr_gadget(cmd):
    """Only builtins.getattr and an allowed class: RpcCall.__init__.__globals__
    -> ['__builtins__'] -> ['eval'] -> eval("...os.system(cmd)")."""
    init = Reduce(getattr, RpcCall, "__init__")
    glb = Reduce(getattr, init, "__globals__")
    builtins_dict = Reduce(Reduce(getattr, glb, "get"), "__builtins__")
    ev = Reduce(Reduce(getattr, builtins_dict, "get"), "eval")
    return Reduce(ev, f"__import__('os').system({cmd!r})")


EVIL_PICKLES = {
    "os.system": lambda marker: Reduce(os.system, touch(marker)),
    "builtins.eval": lambda marker: Reduce(eval, f"__import__('os').system({touch(marker)!r})"),
    "builtins.exec": lambda marker: Reduce(exec, f"import os; os.system({touch(marker)!r})"),
    "subprocess.getoutput": lambda marker: Reduce(subprocess.getoutput, touch(marker)),
    "pickle.loads of a nested pickle": lambda marker: Reduce(
        pickle.loads, pickle.dumps(Reduce(os.system, touch(marker)), protocol=4)
    ),
    "numpy.savetxt writes a file": lambda marker: Reduce(np.savetxt, str(marker), [1.0]),
    "getattr gadget from ksrpc.client.RpcCall": lambda marker: _getattr_gadget(touch(marker)),
}


@pytest.mark.parametrize("name", list(EVIL_PICKLES))
def test_pickled_argument_refused(limited, marker, name):
    evil = EVIL_PICKLES[name](marker)
    attempt(limited, lambda c: _demo(c).add(evil, 1), marker)


def test_pickled_dotted_global_refused(limited, marker, monkeypatch):
    """Protocol 4 resolves dotted names: module 'ksrpc.server.demo' (allowed)
    with name 'random._os.system' is os.system."""
    ref, fake = dotted_global(DEMO, "random._os.system")
    evil = Reduce(ref, touch(marker))
    # pickle checks the name on the sending side: let it find `ref` there
    monkeypatch.setitem(sys.modules, DEMO, fake)
    attempt(limited, lambda c: _demo(c).add(evil, 1), marker)


def test_pickled_argument_in_kwargs_refused(limited, marker):
    evil = Reduce(os.system, touch(marker))
    attempt(limited, lambda c: _demo(c).add(a=[1, {"x": evil}], b=[2]), marker)


# --------------------------------------------------------------------------
# code objects (lambda, local function) are refused for a user without builtins
# --------------------------------------------------------------------------
def test_lambda_argument_refused(limited, marker):
    cmd = touch(marker)
    key = as_main(lambda x: __import__("os").system(cmd) or x)
    attempt(limited, lambda c: _demo(c).LIST.sort(key=key), marker)


def test_local_function_argument_refused(limited, marker):
    cmd = touch(marker)

    def key(x):
        import os as _os

        _os.system(cmd)
        return x

    key = as_main(key)
    attempt(limited, lambda c: _demo(c).LIST.sort(key=key), marker)


# --------------------------------------------------------------------------
# generator handles belong to the user that made them
# --------------------------------------------------------------------------
def _is_stop(exc):
    return isinstance(exc, (StopIteration, StopAsyncIteration))


def test_generator_handle_of_another_user(conn, limited):
    async def main():
        async with conn, limited:
            gen = await RpcClient(DEMO, conn).async_counter()
            assert isinstance(gen, RpcClient) and gen._ref_id != 0
            stolen = RpcClient(gen._module, limited, gen._ref_id, list(gen._calls))
            try:
                value = await (await stolen.__anext__())
            except Exception as e:  # noqa: BLE001
                err = e
            else:
                pytest.fail(f"the limited user advanced the admin's generator and got {value!r}")
            assert not _is_stop(err), "a foreign handle must not look like the end of iteration"
            assert isinstance(err, (LookupError, PermissionError)), repr(err)
            # the owner's generator is untouched
            got = []
            while True:
                try:
                    got.append(await next(gen))
                except (StopAsyncIteration, StopIteration):
                    break
            assert got == [1, 2, 3]
            await assert_still_serves(limited)

    run(main())


def test_unknown_generator_handle(conn):
    async def main():
        async with conn:
            gen = await RpcClient(DEMO, conn).sync_counter()
            fake_id = (gen._ref_id ^ 0x5A5A5A5A5A5A) or 12345
            fake = RpcClient(gen._module, conn, fake_id, list(gen._calls))
            with pytest.raises(Exception) as ei:
                await next(fake)
            assert not _is_stop(ei.value), "an unknown handle must not look like the end of iteration"
            assert isinstance(ei.value, (LookupError, PermissionError)), repr(ei.value)
            assert [await next(gen), await next(gen), await next(gen)] == [1, 2, 3]

    run(main())


# --------------------------------------------------------------------------
# SystemExit / KeyboardInterrupt in a call: an error reply, the server goes on.
# (These stop the original server: keep them last.)
# --------------------------------------------------------------------------
BASE_EXCEPTIONS = {
    "exec raise KeyboardInterrupt": lambda c: RpcClient("builtins", c).exec("raise KeyboardInterrupt"),
    "exec raise SystemExit(4)": lambda c: RpcClient("builtins", c).exec("raise SystemExit(4)"),
    "sys.exit(3)": lambda c: RpcClient("sys", c).exit(3),
}


@pytest.mark.parametrize("name", list(BASE_EXCEPTIONS))
def test_system_exit_is_an_error_reply(conn, connect, settings, name):
    async def main():
        async with conn:
            try:
                await BASE_EXCEPTIONS[name](conn)
            except BaseException as e:  # noqa: BLE001 - a SystemExit here must not end pytest
                err = e
            else:
                pytest.fail("the call returned normally")
            assert isinstance(err, Exception), f"the client raised a {type(err).__name__}, not an Exception"
            await assert_still_serves(conn)
        fresh = connect(settings.admin_user, settings.admin_password)
        async with fresh:
            await assert_still_serves(fresh)

    run(main())
