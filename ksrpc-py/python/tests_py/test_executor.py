"""Tests of ksrpc_executor (the Python half of the ksrpc-py executor).

Run from the repository root:  python -m unittest discover -s ksrpc-py/python/tests_py
Tests needing dill, numpy or pandas skip when those are missing.
"""
import asyncio
import ast
import collections
import contextlib
import copyreg
import datetime
import decimal
import fnmatch
import fractions
import functools
import io
import itertools
import os
import pickle
import sys
import tempfile
import threading
import time
import types
import unittest
import uuid
from collections import OrderedDict
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ksrpc_executor as kx  # noqa: E402
from ksrpc_executor import build_budget as kx_budget  # noqa: E402
from ksrpc_executor import lanes as kx_lanes  # noqa: E402
from ksrpc_executor import names as kx_names  # noqa: E402
from ksrpc_executor import requests as kx_requests  # noqa: E402
from ksrpc_executor import sharing as kx_sharing  # noqa: E402
from ksrpc_executor import unpicklers as kx_unpicklers  # noqa: E402
from rules_fake import Rules  # noqa: E402
from ksrpc.client import RpcCall, RpcClient, Self  # noqa: E402
import ksrpc.server.demo as demo  # noqa: E402  (the package attribute `demo` is a string until then, as in 0.8.1)

try:
    import dill
except ImportError:
    dill = None
try:
    import numpy as np
except ImportError:
    np = None
try:
    import pandas as pd
except ImportError:
    pd = None

needs_dill = unittest.skipIf(dill is None, "dill is not installed")
needs_numpy = unittest.skipIf(np is None, "numpy is not installed")
needs_pandas = unittest.skipIf(pd is None, "pandas is not installed")

DEMO = "ksrpc.server.demo"
MOD = __name__  # this module doubles as a target module with test helpers


FULL = Rules(("*", True))
LIMITED = Rules((DEMO, True))  # the demo module only
DEMO_BUILTINS = Rules((DEMO, True), ("builtins", True))
HELPERS = Rules((MOD, True), (DEMO, True))


# ---- helpers the chains call --------------------------------------------------------------------
GEN_RUNS = {"n": 0}
BARRIER = threading.Barrier(3, timeout=5)


def counted_gen():
    GEN_RUNS["n"] += 1
    yield from range(3)


def yields_a_module():
    yield os


def failing_gen():
    yield 1
    raise KeyError("boom")


async def coro_add(a, b):
    await asyncio.sleep(0.01)
    return a + b


def returns_coroutine():
    return coro_add(2, 3)


async def sleepy():
    await asyncio.sleep(30)


async def coro_exit():
    raise SystemExit(4)


def raise_exit():
    raise SystemExit(3)


def raise_keyboard_interrupt():
    raise KeyboardInterrupt()


def meet_at_barrier():
    return BARRIER.wait()


GEN_ENTERED, GEN_GATE = threading.Event(), threading.Event()


def gated_gen():
    GEN_ENTERED.set()
    GEN_GATE.wait(10)
    yield 1
    yield 2


def thread_name():
    return threading.current_thread().name


LANE = f"ksrpc-lane-{MOD.partition('.')[0]}"  # the lane of this module's package
LANE_ENTERED, LANE_GATE = threading.Event(), threading.Event()
SPIN = {"interrupted": False}
ASYNC_MET = []


def block_lane():
    """Holds this package's lane until the test opens LANE_GATE."""
    LANE_ENTERED.set()
    LANE_GATE.wait(10)
    return threading.current_thread().name


def spin(seconds):
    """Pure Python work: an asynchronous exception (the lane's interrupt) reaches it."""
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            pass
    except TimeoutError:
        SPIN["interrupted"] = True
        raise
    return "finished"


async def meet_async(n):
    """Returns once n coroutines are inside it at the same time."""
    ASYNC_MET.append(1)
    for _ in range(500):
        if len(ASYNC_MET) >= n:
            return len(ASYNC_MET)
        await asyncio.sleep(0.01)
    raise TimeoutError("the other coroutines never arrived")


def thread_gen():
    yield threading.current_thread().name


def identity(x):
    return x


def kinds(*args, **kwargs):
    return [type(a).__name__ for a in args] + sorted(f"{k}={type(v).__name__}" for k, v in kwargs.items())


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable refuses to pickle")

    def __reduce_ex__(self, protocol):
        raise TypeError("Unpicklable refuses to pickle")


def unpicklable():
    return Unpicklable()


def make_lambda():
    return lambda x: x + 1


class NeedsTwoArgs(Exception):
    """Pickles, but fails to unpickle (its __init__ takes two arguments)."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


class MyValueError(ValueError):
    pass


def raise_two_args():
    raise NeedsTwoArgs(1, 2)


def raise_my_value_error():
    raise MyValueError("bad value")


def raise_with_unpicklable_arg():
    raise ValueError(Unpicklable())


def raise_stop_iteration():
    raise StopIteration()


class Plain:
    def __init__(self, v):
        self.v = v


class Reduce:
    """Pickles as whatever __reduce__ tuple it is given: a hand-made pickle fragment."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


# ---- request building ---------------------------------------------------------------------------
def call(name, *args, **kwargs):
    return RpcCall(name, args, dict(sorted(kwargs.items())))


def attr(name):
    return RpcCall(name, None, None)


def request(module, *calls, ref_id=0, use_dill=True):
    """What the 0.8.1 client sends: dill.dumps(dict(module, calls, ref_id)), protocol 4."""
    d = dict(module=module, calls=list(calls), ref_id=ref_id)
    if use_dill and dill is not None:
        return dill.dumps(d, protocol=4)
    return pickle.dumps(d, protocol=4)


def short_str(s):
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def stack_global(module, name):
    return short_str(module) + short_str(name) + b"\x93"


class ExecutorTest(unittest.TestCase):
    executor_kwargs = {}
    _ids = itertools.count(1)

    def setUp(self):
        self.ex = kx.Executor(**self.executor_kwargs)
        self.addCleanup(self.ex.close)

    def make(self, **kwargs):
        ex = kx.Executor(**kwargs)
        self.addCleanup(ex.close)
        return ex

    def send(self, payload, rules=FULL, user="alice", ex=None, call_id=None):
        result = (ex or self.ex).handle(call_id or next(self._ids), user, rules, payload)
        self.assertIsInstance(result, tuple)
        status, bad, reply, summary, cache_chain, raised = result
        self.assertTrue(cache_chain is None or (status == 200 and isinstance(cache_chain, str)))
        # `raised` names the exception of a call that raised (for the log line), and only then.
        self.assertEqual(raised is None, status == 200, (status, raised))
        self.assertTrue(raised is None or (isinstance(raised, tuple) and all(isinstance(r, str) for r in raised)))
        d = (dill.loads if dill is not None else pickle.loads)(reply)
        self.assertEqual(d["status"], status)
        self.assertEqual(set(d), {"status", "datetime", "module", "calls", "ref_id", "type", "data", "traceback"})
        self.assertIsInstance(summary, str)
        return status, bad, d, summary

    def ok(self, payload, rules=FULL, **kw):
        status, bad, d, _ = self.send(payload, rules, **kw)
        self.assertIsNone(bad)
        self.assertEqual(status, 200, d.get("traceback"))
        self.assertEqual(d["type"], type(d["data"]).__name__)
        return d["data"]

    def error(self, payload, rules=FULL, exc=Exception, contains="", **kw):
        status, bad, d, _ = self.send(payload, rules, **kw)
        self.assertIsNone(bad, "a well-formed request is not a bad request")
        self.assertEqual(status, 500)
        data = d["data"]
        self.assertIsInstance(data, exc)
        self.assertEqual(type(data).__module__, "builtins", "the client must be able to import it")
        self.assertIn(contains, str(data))
        self.assertEqual(d["type"], type(data).__name__)
        return data

    def start(self, module, name, rules=LIMITED, user="alice", ex=None):
        status, bad, d, _ = self.send(request(module, call(name)), rules, user, ex)
        self.assertEqual((status, d["data"], d["type"]), (200, None, "NoneType"))
        self.assertNotEqual(d["ref_id"], 0)
        self.assertEqual([(c.name, c.args, c.kwargs) for c in d["calls"]], [(name, None, None)])
        return d["ref_id"], d["calls"]

    def bad(self, payload, rules=FULL, contains="", **kw):
        status, bad, d, summary = self.send(payload, rules, **kw)
        self.assertEqual(status, 500)
        self.assertIsInstance(bad, str)
        self.assertNotIn("\n", bad)
        self.assertIn(contains, bad)
        self.assertIsInstance(d["data"], Exception)
        self.assertEqual(type(d["data"]).__module__, "builtins")
        return bad, summary


class ChainTest(ExecutorTest):
    def test_eager_call(self):
        status, bad, d, summary = self.send(request(DEMO, call("add", 1, 2)), LIMITED)
        self.assertEqual((status, bad, d["data"], d["type"], d["calls"], d["ref_id"]), (200, None, 3, "int", [], 0))
        self.assertEqual(summary, "ksrpc.server.demo.add(2 args)")
        datetime.datetime.fromisoformat(d["datetime"])

    def test_cache_chain_names_plain_results_only(self):
        """The result cache keys its ttl patterns on this: a plain result gives the dotted chain;
        an error, a generator, a generator step and a chain passed as an argument give None."""
        def chain_of(payload, rules=LIMITED):
            return self.ex.handle(next(self._ids), "alice", rules, payload)[4]
        self.assertEqual(chain_of(request(DEMO, call("add", 1, 2))), DEMO + ".add")
        self.assertEqual(chain_of(request(DEMO, attr("point"), call("__format__", "p")), FULL),
                         DEMO + ".point.__format__")
        self.assertIsNone(chain_of(request(DEMO, call("div", 1, 0))))
        self.assertIsNone(chain_of(request(DEMO, call("sync_counter"))))
        ref_id, calls = self.start(DEMO, "sync_counter")
        self.assertIsNone(chain_of(request(DEMO, *calls, call("__anext__"), ref_id=ref_id)))
        inner = RpcClient(DEMO, calls=[call("add", 1, 2)])
        self.assertIsNone(chain_of(request(DEMO, call("add", inner, 1))))
        self.assertIsNone(chain_of(request(DEMO, call("add", 1, b=inner))))
        self.assertIsNone(chain_of(request("os", attr("sep"))), "refused by the rules")

    def test_summary_has_counts_not_values(self):
        payload = request(DEMO, call("add", "secret-password", "x"))
        summary = self.send(payload, LIMITED)[3]
        self.assertNotIn("secret", summary)
        self.assertEqual(kx_requests._summarize("m", [attr("a"), call("f", 1, k=2), call("g")], 5), "m.a.f(1 arg, 1 kwarg).g() [handle]")

    def test_attribute_and_ignored_arguments(self):
        self.assertEqual(self.ok(request(DEMO, attr("PASSWORD")), LIMITED), 123456)
        self.assertEqual(self.ok(request(DEMO, call("PASSWORD", 1, 2)), LIMITED), 123456)  # as 0.8.1
        self.assertEqual(self.ok(request(DEMO, attr("LIST")), LIMITED), [1, 2, 3, 4, 5])
        self.assertEqual(self.ok(request(DEMO, attr(""), attr("PASSWORD")), LIMITED), 123456)  # empty name skipped
        with contextlib.redirect_stdout(io.StringIO()) as out:
            self.assertIsNone(self.ok(request(DEMO, attr("child_obj"), call("call_parent_method")), LIMITED))
        self.assertIn("parent's original method. Child", out.getvalue())
        self.assertEqual(self.ok(request(DEMO, attr("point"), call("__format__", "p")), FULL), "Point(3.14159, 2.71828)")

    def test_missing_name(self):
        self.error(request(DEMO, attr("no_such_thing")), LIMITED, AttributeError, "no_such_thing")

    def test_submodule_import(self):
        self.assertEqual(self.ok(request("xml", attr("dom"), attr("__name__")), Rules(("xml*", True))), "xml.dom")
        self.assertEqual(self.ok(request("ksrpc.server", attr("demo"), call("add", 1, 2)),
                                 Rules(("ksrpc.server*", True))), 3)

    def test_rules_checked_before_import(self):
        self.assertNotIn("wave", sys.modules)
        self.error(request("wave"), LIMITED, PermissionError, "wave")
        self.assertNotIn("wave", sys.modules, "a refused module must not be imported")
        had = "xml.sax" in sys.modules
        self.error(request("xml", attr("sax")), Rules(("xml", True)), PermissionError, "xml.sax")
        self.assertEqual("xml.sax" in sys.modules, had)

    def test_resolved_module_name_checked(self):
        self.error(request("os.path"), Rules(("os.path", True)), PermissionError, "posixpath")

    def test_empty_calls_return_module(self):
        if dill is None:
            self.error(request(DEMO), LIMITED, RuntimeError, "could not be pickled")
        else:
            self.assertIs(self.ok(request(DEMO), LIMITED), demo)  # a module goes by reference

    def test_builtins_with_self(self):
        self.assertEqual(self.ok(request(DEMO, attr("LIST"), call("len", Self)), DEMO_BUILTINS), 5)
        self.assertEqual(self.ok(request(DEMO, call("sorted", [3, 1, 2])), DEMO_BUILTINS), [1, 2, 3])
        self.assertEqual(self.ok(request(DEMO, attr("LIST"), call("sorted", Self, reverse=True)), DEMO_BUILTINS),
                         [5, 4, 3, 2, 1])
        self.assertEqual(self.ok(request(DEMO, attr("PASSWORD"), call("str", Self)), DEMO_BUILTINS), "123456")

    def test_builtins_refused_without_rule(self):
        self.error(request(DEMO, attr("LIST"), call("len", Self)), LIMITED, PermissionError, "builtins")
        self.error(request(DEMO, call("eval", "1+1")), LIMITED, PermissionError, "builtins")

    def test_self_misuse(self):
        self.error(request(DEMO, call("add", Self, 1)), LIMITED, TypeError, "Self")
        self.error(request(DEMO, call("add", 1, b=Self)), LIMITED, TypeError, "Self")

    def test_nested_lazy_chain_argument(self):
        inner = RpcClient(DEMO, calls=[call("add", 1, 2)])
        self.assertEqual(self.ok(request(DEMO, call("add", inner, 10)), LIMITED), 13)
        deeper = RpcClient(DEMO, calls=[call("add", inner, inner)])
        self.assertEqual(self.ok(request(DEMO, call("add", a=deeper, b=1)), LIMITED), 7)

    def test_nested_chain_uses_same_rules(self):
        inner = RpcClient("os", calls=[attr("sep")])
        self.error(request(DEMO, call("add", inner, "x")), LIMITED, PermissionError, "os")

    def test_getitem(self):
        self.assertEqual(self.ok(request(DEMO, attr("LIST"), call("__getitem__", 1)), LIMITED), 2)
        self.assertEqual(self.ok(request(DEMO, attr("LIST"), call("__getitem__", slice(1, 3))), LIMITED), [2, 3])

    def test_coroutines(self):
        with mock.patch.object(demo.random, "randint", return_value=0):
            self.assertEqual(self.ok(request(DEMO, call("async_say_hi", "bob")), LIMITED), "Hello bob")
        self.assertEqual(self.ok(request(MOD, call("coro_add", 1, 2)), HELPERS), 3)
        self.assertEqual(self.ok(request(MOD, call("returns_coroutine")), HELPERS), 5)

    def test_generate_stub(self):
        text = self.ok(request(DEMO, call("generate_stub", module=DEMO)), LIMITED)
        ast.parse(text)
        for piece in ("def add(a, b)", "async def async_say_hi(name)", "class Point:", "PASSWORD: int",
                      "class Child(Parent):", "def create_1d_array(target_mb: int = ...)"):
            self.assertIn(piece, text)
        ast.parse(kx.generate_stub(kx))

    def test_demo_optional_packages(self):
        if pd is None:
            self.error(request(DEMO, call("test")), LIMITED, ImportError, "pandas")
        else:
            self.assertEqual(self.ok(request(DEMO, call("test")), LIMITED)["A"].tolist(), [1, 2, 3, 4, 5])
        if np is None:
            self.error(request(DEMO, call("create_1d_array", 1)), LIMITED, ImportError, "numpy")
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                self.assertEqual(self.ok(request(DEMO, call("create_1d_array", 1)), LIMITED).nbytes, 1024 * 1024)

    def test_rules_that_raise_give_500(self):
        class Broken:
            def allows(self, name):
                raise RuntimeError("rules broke")
        status, _, d, _ = self.send(request(DEMO, call("add", 1, 2)), Broken())
        self.assertEqual(status, 500)


class HandleTest(ExecutorTest):
    def advance(self, module, calls, ref_id, name="__anext__"):
        return request(module, *calls, call(name), ref_id=ref_id)

    def drain(self, module, name, rules=LIMITED):
        ref_id, calls = self.start(module, name, rules)
        got = [self.ok(self.advance(module, calls, ref_id), rules) for _ in range(3)]
        self.error(self.advance(module, calls, ref_id), rules, StopAsyncIteration)
        return ref_id, calls, got

    def test_sync_generator(self):
        ref_id, calls, got = self.drain(DEMO, "sync_counter")
        self.assertEqual(got, [1, 2, 3])
        # the handle is freed after exhaustion: a clear error, not another StopAsyncIteration
        self.error(self.advance(DEMO, calls, ref_id), LIMITED, LookupError, "unknown")

    def test_async_generator(self):
        ref_id, calls, got = self.drain(DEMO, "async_counter")
        self.assertEqual(got, [1, 2, 3])
        self.error(self.advance(DEMO, calls, ref_id), LIMITED, LookupError)

    def test_next_is_accepted_too(self):
        ref_id, calls = self.start(DEMO, "sync_counter")
        self.assertEqual(self.ok(self.advance(DEMO, calls, ref_id, "__next__"), LIMITED), 1)

    def test_advancing_does_not_rerun_the_chain(self):
        GEN_RUNS["n"] = 0
        _, _, got = self.drain(MOD, "counted_gen", HELPERS)
        self.assertEqual((got, GEN_RUNS["n"]), ([0, 1, 2], 1))

    def test_generator_that_raises_is_freed(self):
        ref_id, calls = self.start(MOD, "failing_gen", HELPERS)
        self.assertEqual(self.ok(self.advance(MOD, calls, ref_id), HELPERS), 1)
        self.error(self.advance(MOD, calls, ref_id), HELPERS, KeyError, "boom")
        self.error(self.advance(MOD, calls, ref_id), HELPERS, LookupError)

    def test_other_users_handle(self):
        ref_id, calls = self.start(DEMO, "sync_counter", user="alice")
        self.error(self.advance(DEMO, calls, ref_id), LIMITED, LookupError, "another user", user="mallory")
        self.assertEqual(self.ok(self.advance(DEMO, calls, ref_id), LIMITED, user="alice"), 1)

    def test_unknown_handle(self):
        self.error(self.advance(DEMO, [attr("sync_counter")], 12345), LIMITED, LookupError, "12345")

    def test_expired_handle(self):
        ex = self.make(handle_ttl=0.05)
        ref_id, calls = self.start(DEMO, "sync_counter", ex=ex)
        time.sleep(0.15)
        self.error(self.advance(DEMO, calls, ref_id), LIMITED, LookupError, "expired", ex=ex)

    def test_concurrent_advance_gets_a_clear_error_and_keeps_the_handle(self):
        # A second __next__ while the first still runs the generator used to hit "generator already
        # executing", which dropped the handle under the first caller.
        GEN_ENTERED.clear()
        GEN_GATE.clear()
        ref_id, calls = self.start(MOD, "gated_gen", HELPERS)
        first = {}
        thread = threading.Thread(target=lambda: first.update(got=self.ok(self.advance(MOD, calls, ref_id), HELPERS)))
        thread.start()
        try:
            self.assertTrue(GEN_ENTERED.wait(5))
            self.error(self.advance(MOD, calls, ref_id), HELPERS, RuntimeError, "being advanced by another call")
        finally:
            GEN_GATE.set()
            thread.join(10)
        self.assertEqual(first, {"got": 1})
        self.assertEqual(self.ok(self.advance(MOD, calls, ref_id), HELPERS), 2)
        self.error(self.advance(MOD, calls, ref_id), HELPERS, StopAsyncIteration)

    def _advance_in_thread(self, calls, ref_id, ex=None):
        """Starts advancing gated_gen in a thread; returns (thread, result dict) once it is inside."""
        GEN_ENTERED.clear()
        GEN_GATE.clear()
        first = {}
        kw = {"ex": ex} if ex is not None else {}
        thread = threading.Thread(
            target=lambda: first.update(got=self.ok(self.advance(MOD, calls, ref_id), HELPERS, **kw)))
        thread.start()
        self.assertTrue(GEN_ENTERED.wait(5))
        return thread, first

    def test_closing_a_handle_being_advanced_frees_it_when_the_call_ends(self):
        # CloseHandle on a busy handle used to fail ("being advanced") and leave the generator
        # in memory until its TTL, though the client had forgotten it.
        ref_id, calls = self.start(MOD, "gated_gen", HELPERS)
        thread, first = self._advance_in_thread(calls, ref_id)
        try:
            got = self.ex.run_native(next(self._ids), "alice", HELPERS, MOD, [RpcCall("close", (), {})], ref_id)
            self.assertEqual(got, ("exhausted", None))
            self.assertIn(ref_id, self.ex._handles._items, "still held by the call advancing it")
        finally:
            GEN_GATE.set()
            thread.join(10)
        self.assertEqual(first, {"got": 1}, "the call that was advancing it finishes normally")
        self.assertNotIn(ref_id, self.ex._handles._items, "dropped when that call let go")
        self.error(self.advance(MOD, calls, ref_id), HELPERS, LookupError, "closed")

    def test_another_users_close_does_nothing(self):
        ref_id, calls = self.start(DEMO, "sync_counter", user="alice")
        self.ex.run_native(next(self._ids), "mallory", LIMITED, DEMO, [RpcCall("close", (), {})], ref_id)
        self.assertEqual(self.ok(self.advance(DEMO, calls, ref_id), LIMITED, user="alice"), 1)

    def test_the_cap_never_evicts_a_handle_being_advanced(self):
        # With every handle of the user busy, a new generator used to evict one from under the
        # call advancing it; now the new one is refused and the busy one lives on.
        ex = self.make(handle_cap=1)
        ref_id, calls = self.start(MOD, "gated_gen", HELPERS, ex=ex)
        thread, first = self._advance_in_thread(calls, ref_id, ex=ex)
        try:
            self.error(request(DEMO, call("sync_counter")), LIMITED, RuntimeError, "too many open generators", ex=ex)
        finally:
            GEN_GATE.set()
            thread.join(10)
        self.assertEqual(first, {"got": 1})
        self.assertEqual(self.ok(self.advance(MOD, calls, ref_id), HELPERS, ex=ex), 2)
        # once idle it is the least recently used one again, and a new generator evicts it
        newer, _ = self.start(DEMO, "sync_counter", ex=ex)
        self.assertNotEqual(newer, ref_id)
        self.error(self.advance(MOD, calls, ref_id), HELPERS, LookupError, ex=ex)

    def test_per_user_cap_evicts_least_recently_used(self):
        ex = self.make(handle_cap=2)
        first, calls = self.start(DEMO, "sync_counter", ex=ex)
        second, _ = self.start(DEMO, "sync_counter", ex=ex)
        self.ok(self.advance(DEMO, calls, first), LIMITED, ex=ex)  # first is now the most recent
        other, _ = self.start(DEMO, "sync_counter", user="bob", ex=ex)  # other users do not count
        third, _ = self.start(DEMO, "sync_counter", ex=ex)
        self.error(self.advance(DEMO, calls, second), LIMITED, LookupError, ex=ex)
        for ref_id in (first, third):
            self.ok(self.advance(DEMO, calls, ref_id), LIMITED, ex=ex)
        self.ok(self.advance(DEMO, calls, other), LIMITED, user="bob", ex=ex)


class BypassTest(ExecutorTest):
    """A user allowed only ksrpc.server.demo tries to get out."""

    def test_module_reached_as_attribute(self):
        self.error(request(DEMO, attr("random"), attr("_os"), call("system", "true")), LIMITED, PermissionError, "random")
        with_random = Rules((DEMO, True), ("random", True))
        self.error(request(DEMO, attr("random"), attr("_os")), with_random, PermissionError, "_os")
        self.error(request("collections", attr("_sys")), Rules(("collections", True)), PermissionError, "_sys")

    def test_dunders(self):
        self.error(request(DEMO, attr("add"), attr("__globals__")), LIMITED, PermissionError, "__globals__")
        self.error(request(DEMO, attr("point"), attr("__class__")), LIMITED, PermissionError, "__class__")
        self.assertEqual(self.ok(request(DEMO, attr("add"), attr("__name__")), LIMITED), "add")
        globals_ = self.ok(request(MOD, attr("Plain"), attr("__init__"), attr("__qualname__")), FULL)
        self.assertEqual(globals_, "Plain.__init__")

    def test_yielded_modules_are_checked(self):
        ref_id, calls = self.start(MOD, "yields_a_module", HELPERS)
        self.error(request(MOD, *calls, call("__anext__"), ref_id=ref_id), HELPERS, PermissionError, "'os'")

    def test_frames_and_builtin_dicts(self):
        chain = [call("sync_counter"), attr("gi_frame"), attr("f_builtins"), call("__getitem__", "eval")]
        self.error(request(DEMO, *chain), LIMITED, PermissionError, "frame")

    def test_reduce_calling_os_system(self):
        with tempfile.TemporaryDirectory() as tmp:
            marker = os.path.join(tmp, "MARKER")

            class Evil:
                def __reduce__(self):
                    return os.system, (f"touch {marker}",)
            payload = pickle.dumps(dict(module=DEMO, calls=[call("add", Evil(), 1)], ref_id=0), protocol=4)
            bad, summary = self.bad(payload, LIMITED, "refused")
            self.assertEqual(summary, "<undecodable>")
            self.assertFalse(os.path.exists(marker))

    def test_dotted_stack_global(self):
        with tempfile.TemporaryDirectory() as tmp:
            marker = os.path.join(tmp, "MARKER")
            payload = b"\x80\x04" + stack_global(DEMO, "random._os.system") + short_str(f"touch {marker}") + b"\x85R."
            self.bad(payload, LIMITED, "dotted")
            self.bad(payload, FULL, "dotted")  # dotted names are refused for everyone
            self.assertFalse(os.path.exists(marker))

    def test_module_valued_global(self):
        self.bad(b"\x80\x04" + stack_global(DEMO, "random") + b".", LIMITED, "module")
        self.bad(b"\x80\x04" + stack_global("builtins", "eval") + b".", LIMITED, "builtins")

    def test_global_from_allowed_module_but_foreign(self):
        # demo imports nothing foreign by name, so use a module whose attribute comes from elsewhere
        # heapq's functions are _heapq's (a C module outside the package)
        self.bad(b"\x80\x04" + stack_global("heapq", "heappush") + b".", Rules(("heapq", True)), "_heapq")
        # a class defined in a submodule of the allowed package is the package's (re-export)
        got = kx_unpicklers._Unpickler(b"\x80\x04" + stack_global("json", "JSONDecodeError") + b".", kx_names._Policy(*kx_names._parse_allow(
            kx.DEFAULT_UNPICKLE_ALLOW), False), Rules(("json", True))).load()
        self.assertIs(got, __import__("json").JSONDecodeError)

    def test_build_on_a_global_is_refused(self):
        # Point class, then BUILD with slot state {'x_evil': 1}: would be setattr(Point, 'x_evil', 1)
        payload = (b"\x80\x04" + stack_global(DEMO, "Point") + b"N}" + short_str("x_evil") + b"K\x01s\x86b.")
        self.bad(payload, LIMITED, "modify")
        self.assertFalse(hasattr(demo.Point, "x_evil"))
        payload = b"\x80\x04" + stack_global(DEMO, "point") + b"}" + short_str("x") + b"K\x07sb."  # point.x = 7
        self.bad(payload, LIMITED, "modify")
        self.assertEqual(demo.point.x, 3.14159)
        payload = b"\x80\x04" + stack_global(DEMO, "LIST") + b"K\x63a."  # APPEND 99 to demo.LIST
        self.bad(payload, LIMITED, "'builtins'")  # a list global comes from builtins: refused
        self.bad(payload, FULL, "modify")
        self.assertEqual(demo.LIST, [1, 2, 3, 4, 5])

    def test_code_needs_dill_message(self):
        payload = b"\x80\x04" + stack_global("dill._dill", "_create_function") + b"."
        ex = self.make(allow_code=True)
        with mock.patch.object(kx_names, "dill", None):
            self.bad(payload, FULL, "dill is not installed", ex=ex)

    @needs_dill
    def test_lambda_refused_without_allow_code(self):
        payload = request(DEMO, call("sorted", [3, 1, 2], key=lambda x: -x))
        minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
        bad, _ = self.bad(payload, DEMO_BUILTINS, "code objects are refused: python.allow_code is false")
        self.assertIn(f"server runs Python {minor}", bad)

    @needs_dill
    def test_closure_and_local_class_refused(self):
        x = 5

        def closure(y):
            return x + y

        class Local:
            pass
        for value in (closure, Local, Local()):
            self.bad(request(DEMO, call("add", value, 1)), FULL, "code objects are refused")

    @needs_dill
    def test_code_with_allow_code(self):
        ex = self.make(allow_code=True)
        payload = request(DEMO, call("sorted", [3, 1, 2], key=lambda x: -x))
        self.assertEqual(self.ok(payload, DEMO_BUILTINS, ex=ex), [3, 2, 1])
        self.bad(payload, LIMITED, "do not allow 'builtins'", ex=ex)
        k = 10

        def closure(y):
            return k + y

        class Local:
            def value(self):
                return 7
        self.assertEqual(self.ok(request("builtins", call("map", closure, [1, 2]), call("list", Self)), FULL, ex=ex),
                         [11, 12])
        self.assertEqual(self.ok(request(MOD, call("identity", Local())), FULL, ex=ex).value(), 7)


class DataTest(ExecutorTest):
    """Plain data arguments load for a limited user, with and without dill."""

    def values(self):
        return [1, 2.5, 1j, "s", b"b", bytearray(b"ba"), [1], (1,), {"k": 1}, {1}, frozenset({2}), slice(1, 2),
                range(3), True, None, ..., datetime.date(2020, 1, 2), datetime.datetime(2020, 1, 2, 3, 4),
                datetime.datetime(2020, 1, 2, tzinfo=datetime.timezone.utc), datetime.timedelta(days=1),
                datetime.time(1, 2), decimal.Decimal("1.5"), fractions.Fraction(1, 3), uuid.UUID(int=5),
                OrderedDict(a=1), collections.deque([1]), collections.Counter("aab"),
                collections.defaultdict(list, a=[1]), ValueError("v"), int, type(None)] + self.zoned()

    def zoned(self):
        try:
            import zoneinfo
            return [datetime.datetime(2020, 1, 2, tzinfo=zoneinfo.ZoneInfo("Asia/Shanghai"))]
        except Exception:  # Python < 3.9 or no time zone database
            return []

    def check_roundtrip(self, use_dill):
        values = self.values()
        if not use_dill:
            values.remove(type(None))  # plain pickle needs builtins.type for it
        for v in values:
            with self.subTest(value=v):
                got = self.ok(request(MOD, call("identity", v), use_dill=use_dill), Rules((MOD, True)))
                if isinstance(v, Exception):
                    self.assertEqual((type(got), got.args), (type(v), v.args))
                else:
                    self.assertEqual(got, v)

    def test_plain_pickle(self):
        self.check_roundtrip(False)

    @needs_dill
    def test_dill_pickle(self):
        self.check_roundtrip(True)

    @needs_dill
    def test_dill_eval_repr_only_parses(self):
        payload = b"\x80\x04" + stack_global("dill._dill", "_eval_repr") + short_str("__import__('os')") + b"\x85R."
        self.bad(payload, FULL, "code objects are refused")
        payload = b"\x80\x04" + stack_global("dill._dill", "_load_type") + short_str("CodeType") + b"\x85R."
        self.bad(payload, FULL, "code objects are refused")

    def test_unpickle_allow_extends_default(self):
        payload = request(MOD, call("identity", Plain(3)), use_dill=False)
        self.bad(payload, LIMITED, "refused")
        for entry in (f"{MOD}:Plain", f"{MOD}:*"):
            ex = self.make(unpickle_allow=[entry])
            status, bad, d, _ = self.send(payload, LIMITED, ex=ex)
            self.assertIsNone(bad)  # decoded; the call itself is then refused by the rules
            self.assertIsInstance(d["data"], PermissionError)

    @needs_numpy
    def test_numpy_arguments(self):
        for v in (np.arange(5), np.zeros((2, 3)), np.array(["a", "bc"]), np.float64(1.5), np.int64(3),
                  np.dtype("f8"), np.array(["2020-01-01"], dtype="datetime64[ns]")):
            with self.subTest(value=v):
                got = self.ok(request(MOD, call("identity", v)), Rules((MOD, True)))
                self.assertTrue(np.array_equal(got, v) if isinstance(v, np.ndarray) else got == v)
        self.assertEqual(self.ok(request(DEMO, call("add", np.arange(3), 1)), LIMITED).tolist(), [1, 2, 3])

    @needs_pandas
    def test_pandas_arguments(self):
        frame = pd.DataFrame({"A": [1, 2], "B": ["x", "y"], "C": pd.to_datetime(["2020-01-01", "2020-01-02"]),
                              "D": pd.Categorical(["u", "v"])})
        values = [frame, pd.Series([1.0, 2.0], name="s"), pd.Index(["a", "b"]), pd.RangeIndex(3),
                  pd.date_range("2020", periods=3), pd.date_range("2020", periods=2, tz="Asia/Shanghai"),
                  pd.Timestamp("2020-01-01"), pd.Timestamp("2020-01-01", tz="UTC"), pd.Timedelta(1, "s"),
                  pd.Categorical(["a", "b"]), pd.NaT, pd.MultiIndex.from_tuples([(1, "a")])]
        for v in values:
            with self.subTest(value=type(v).__name__):
                got = self.ok(request(MOD, call("identity", v)), Rules((MOD, True)))
                if hasattr(v, "equals"):
                    self.assertTrue(v.equals(got))
                else:
                    self.assertTrue(got == v or (got is pd.NaT and v is pd.NaT))


class ErrorTest(ExecutorTest):
    def test_system_exit_is_a_500_and_the_next_call_works(self):
        data = self.error(request(MOD, call("raise_exit")), HELPERS, RuntimeError, "SystemExit: 3")
        self.assertNotIsInstance(data, SystemExit)
        self.error(request(MOD, call("raise_keyboard_interrupt")), HELPERS, RuntimeError, "KeyboardInterrupt")
        self.error(request(MOD, call("coro_exit")), HELPERS, RuntimeError, "SystemExit: 4")
        self.assertEqual(self.ok(request(MOD, call("coro_add", 1, 1)), HELPERS), 2)  # the loop survived
        self.assertEqual(self.ok(request(DEMO, call("add", 1, 1)), LIMITED), 2)

    def test_plain_exceptions_kept(self):
        self.error(request(DEMO, call("div", 1, 0)), LIMITED, ZeroDivisionError, "division")
        data = self.error(request(MOD, call("raise_stop_iteration")), HELPERS, StopIteration)
        self.assertIs(type(data), StopIteration)

    def test_exception_classes_mapped_to_builtins(self):
        data = self.error(request(MOD, call("raise_two_args")), HELPERS, Exception, f"{MOD}.NeedsTwoArgs: 1/2")
        self.assertIs(type(data), Exception)
        data = self.error(request(MOD, call("raise_my_value_error")), HELPERS, ValueError, "MyValueError: bad value")
        self.assertIs(type(data), ValueError)
        self.error(request(MOD, call("raise_with_unpicklable_arg")), HELPERS, RuntimeError, "did not pickle")

    def test_unpicklable_result(self):
        status, _, d, _ = self.send(request(MOD, call("unpicklable")), HELPERS)
        self.assertEqual(status, 500)
        self.assertIsInstance(d["data"], RuntimeError)
        self.assertIn("could not be pickled", str(d["data"]))
        self.assertIn("Unpicklable refuses", d["traceback"])

    @needs_dill
    def test_dill_fallback_for_results(self):
        self.assertEqual(self.ok(request(MOD, call("make_lambda")), HELPERS)(1), 2)

    def test_error_reply_function(self):
        d = pickle.loads(kx.error_reply("m", SystemExit(2), "tb"))
        self.assertEqual((d["status"], d["module"], d["type"], d["traceback"]), (500, "m", "RuntimeError", "tb"))
        self.assertIsInstance(d["data"], RuntimeError)


class MalformedTest(ExecutorTest):
    def test_garbage_and_shapes(self):
        cases = [
            (b"", "undecodable"),
            (b"definitely not a pickle", "undecodable"),
            (pickle.dumps([1, 2]), "must be a dict"),
            (pickle.dumps(dict(module=DEMO)), "lacks calls, ref_id"),
            (pickle.dumps(dict(module=5, calls=[], ref_id=0)), "module must be a str"),
            (pickle.dumps(dict(module=DEMO, calls="add", ref_id=0)), "list of ksrpc.client.RpcCall"),
            (pickle.dumps(dict(module=DEMO, calls=["add"], ref_id=0)), "calls[0] must be a ksrpc.client.RpcCall"),
            (pickle.dumps(dict(module=DEMO, calls=[], ref_id="1")), "ref_id"),
            (pickle.dumps(dict(module=DEMO, calls=[], ref_id=-1)), "ref_id"),
            (pickle.dumps(dict(module=DEMO, calls=[RpcCall(5, None, None)], ref_id=0)), "name must be a str"),
            (pickle.dumps(dict(module=DEMO, calls=[RpcCall("add", "ab", None)], ref_id=0)), "args"),
            (pickle.dumps(dict(module=DEMO, calls=[RpcCall("add", (), {1: 2})], ref_id=0)), "kwargs"),
            (pickle.dumps(dict(module=DEMO, calls=[call("add", RpcClient(5), 1)], ref_id=0)), "nested"),
        ]
        for payload, contains in cases:
            with self.subTest(contains=contains):
                self.bad(payload, LIMITED, contains)


class ThreadTest(ExecutorTest):
    def run_in_threads(self, fn, n):
        results = [None] * n

        def target(i):
            results[i] = fn(i)
        threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return results

    def test_blocking_calls_run_concurrently(self):
        ex = self.make(parallel_modules=[MOD])  # opted into the pool
        BARRIER.reset()
        results = self.run_in_threads(
            lambda i: ex.handle(1000 + i, "alice", HELPERS, request(MOD, call("meet_at_barrier"))), 3)
        for status, bad, reply, _, _, _ in results:
            self.assertEqual((status, bad), (200, None), pickle.loads(reply).get("traceback"))
        self.assertEqual(sorted(pickle.loads(r[2])["data"] for r in results), [0, 1, 2])

    def test_a_package_runs_one_call_at_a_time_on_its_lane(self):
        BARRIER.reset()
        results = self.run_in_threads(
            lambda i: self.ex.handle(1100 + i, "alice", HELPERS, request(MOD, call("meet_at_barrier"))), 3)
        for status, _, reply, _, _, raised in results:  # one at a time, so no two ever meet
            self.assertEqual(status, 500)
            self.assertIn("BrokenBarrierError", str(pickle.loads(reply)["data"]))
            self.assertEqual(raised[0], "BrokenBarrierError")
        names = self.run_in_threads(lambda i: pickle.loads(self.ex.handle(
            1200 + i, "alice", HELPERS, request(MOD, call("thread_name")))[2])["data"], 3)
        self.assertEqual(set(names), {LANE})
        # The standard library and the demo run on the calling (pool) thread.
        here = self.ok(request("threading", call("current_thread"), call("name")))
        self.assertEqual(here, threading.current_thread().name)
        self.assertEqual(self.ok(request(DEMO, call("add", 1, 2)), LIMITED), 3)

    def test_parallel_and_serial_patterns_choose_the_thread(self):
        lanes = kx_lanes._Lanes(parallel=["numpy", "bench_*"], serial=["jqdatasdk.finance"])
        self.assertIsNone(lanes.key("numpy.linalg"))
        self.assertIsNone(lanes.key("bench_mod"))
        self.assertIsNone(lanes.key("os.path"))
        self.assertIsNone(lanes.key("ksrpc.server.demo"))
        self.assertEqual(lanes.key("jqdatasdk"), "ksrpc-lane-jqdatasdk")
        self.assertEqual(lanes.key("jqdatasdk.alpha101"), "ksrpc-lane-jqdatasdk")
        self.assertEqual(lanes.key("jqdatasdk.finance"), "ksrpc-serial")
        self.assertEqual(kx_lanes._Lanes(parallel=["jq*"], serial=["jq*"]).key("jqdatasdk"), "ksrpc-serial")

    def test_a_busy_lane_holds_neither_other_packages_nor_coroutines(self):
        other = types.ModuleType("lanes_other_pkg")
        other.thread_name = thread_name
        sys.modules["lanes_other_pkg"] = other
        self.addCleanup(sys.modules.pop, "lanes_other_pkg", None)
        LANE_ENTERED.clear()
        LANE_GATE.clear()
        self.addCleanup(LANE_GATE.set)
        blocked = threading.Thread(target=lambda: self.ok(request(MOD, call("block_lane"))))
        blocked.start()
        self.assertTrue(LANE_ENTERED.wait(10))
        self.assertEqual(self.ok(request("lanes_other_pkg", call("thread_name"))), "ksrpc-lane-lanes_other_pkg")
        ASYNC_MET.clear()
        met = self.run_in_threads(lambda i: self.ok(request(MOD, call("meet_async", 2))), 2)
        self.assertEqual(sorted(met), [2, 2])  # both coroutines ran at once, the lane still held
        LANE_GATE.set()
        blocked.join(10)

    def test_waiting_for_a_busy_lane_asks_the_pool_for_a_thread(self):
        lends = []
        ex = self.make(lend=lambda: lends.append(threading.current_thread().name))
        self.assertEqual(self.ok(request(MOD, call("thread_name")), ex=ex), LANE)
        self.assertEqual(lends, [], "an idle lane needs no extra thread")
        LANE_ENTERED.clear()
        LANE_GATE.clear()
        self.addCleanup(LANE_GATE.set)
        blocked = threading.Thread(target=lambda: self.ok(request(MOD, call("block_lane")), ex=ex))
        blocked.start()
        self.assertTrue(LANE_ENTERED.wait(10))
        waiter = threading.Thread(target=lambda: self.ok(request(MOD, call("thread_name")), ex=ex), name="waiter")
        waiter.start()
        for _ in range(1000):
            if lends:
                break
            time.sleep(0.01)
        self.assertEqual(lends, ["waiter"])
        LANE_GATE.set()
        blocked.join(10)
        waiter.join(10)

    def test_a_call_over_its_timeout_is_interrupted_and_frees_the_lane(self):
        ex = self.make(call_timeout=0.5)
        SPIN["interrupted"] = False
        self.error(request(MOD, call("spin", 60)), HELPERS, TimeoutError, "0.5", ex=ex)
        self.assertEqual(self.ok(request(MOD, call("thread_name")), ex=ex), LANE)
        self.assertTrue(SPIN["interrupted"], "the lane's thread was interrupted, not left spinning")

    def test_generators_of_a_laned_package_advance_on_its_lane(self):
        status, _, d, _ = self.send(request(MOD, call("thread_gen")), HELPERS)
        self.assertEqual(status, 200)
        self.assertEqual(self.ok(request(MOD, *d["calls"], call("__anext__"), ref_id=d["ref_id"]), HELPERS), LANE)

    def test_serial_modules_run_on_one_thread(self):
        ex = self.make(serial_modules=[MOD], parallel_modules=[MOD])  # serial wins
        names = self.run_in_threads(lambda i: pickle.loads(ex.handle(
            2000 + i, "alice", HELPERS, request(MOD, call("thread_name")))[2])["data"], 3)
        self.assertEqual(set(names), {"ksrpc-serial"})
        self.assertEqual(self.ok(request(MOD, call("thread_name")), HELPERS), LANE)

    def test_serial_generator_and_exit(self):
        ex = self.make(serial_modules=[MOD])
        status, _, d, _ = self.send(request(MOD, call("counted_gen")), HELPERS, ex=ex)
        self.assertEqual(self.ok(request(MOD, *d["calls"], call("__anext__"), ref_id=d["ref_id"]), HELPERS, ex=ex), 0)
        self.error(request(MOD, call("raise_exit")), HELPERS, RuntimeError, "SystemExit", ex=ex)
        self.assertEqual(self.ok(request(MOD, call("thread_name")), HELPERS, ex=ex), "ksrpc-serial")

    def test_cancel(self):
        started = time.monotonic()
        timer = threading.Timer(0.3, self.ex.cancel, args=(4242,))
        timer.start()
        self.error(request(MOD, call("sleepy")), HELPERS, RuntimeError, "cancelled", call_id=4242)
        self.assertLess(time.monotonic() - started, 10)
        self.ex.cancel(999999)  # unknown ids are ignored

    def test_timeout(self):
        ex = self.make(call_timeout=0.3)
        self.error(request(MOD, call("sleepy")), HELPERS, TimeoutError, "0.3", ex=ex)
        self.assertEqual(self.ok(request(MOD, call("coro_add", 2, 2)), HELPERS, ex=ex), 4)

    def test_closed_executor_refuses_coroutines(self):
        ex = kx.Executor()
        ex.close()
        ex.close()  # idempotent
        self.error(request(MOD, call("coro_add", 1, 2)), HELPERS, RuntimeError, "closed", ex=ex)
        self.assertEqual(self.ok(request(DEMO, call("add", 1, 2)), LIMITED, ex=ex), 3)


def frag(obj):
    """The opcodes that push `obj` (no PROTO, FRAME or STOP), to splice into a hand-made pickle;
    only for objects without repeated parts (a repeat would be a memo GET with its own numbering)."""
    p = pickle.dumps(obj, protocol=4)[2:-1]
    return p[9:] if p[:1] == b"\x95" else p


def reduce_request(value):
    return request(MOD, call("identity", value), use_dill=False)


class BuildRulesTest(ExecutorTest):
    """What a request pickle may build beyond the globals it names (see "What a request pickle may
    build" in ksrpc_executor): numpy/pandas state checks, call results it does not own, a size
    budget. Every case runs on the careful and the fast unpickler (the fast one hands requests
    needing these checks to the careful one)."""

    def both(self, payload, rules):
        out = []
        for fast in (False, True):
            status, bad, reply, _, _, _ = self.ex.handle(next(self._ids), "alice", rules, payload, fast)
            out.append((fast, status, bad, (dill.loads if dill is not None else pickle.loads)(reply)["data"]))
        return out

    def refused(self, payload, contains, rules=HELPERS):
        for fast, status, bad, data in self.both(payload, rules):
            with self.subTest(fast=fast):
                self.assertEqual(status, 500, data)
                self.assertIsInstance(bad, str, data)
                self.assertIn(contains, bad)

    def same_back(self, value, rules=Rules((MOD, True))):
        for use_dill in (False, True) if dill is not None else (False,):
            for proto in (2, 3, 4, 5):
                payload = (dill if use_dill else pickle).dumps(
                    dict(module=MOD, calls=[call("identity", value)], ref_id=0), protocol=proto)
                for fast in (False, True) if proto >= 3 else (False,):  # the Rust scan sends protocol 3+ only
                    status, bad, reply, _, _, _ = self.ex.handle(next(self._ids), "alice", rules, payload, fast)
                    got = (dill.loads if dill is not None else pickle.loads)(reply)["data"]
                    self.assertEqual((status, bad), (200, None), f"dill={use_dill} protocol={proto} fast={fast}: {got}")
                    yield got

    # -- numpy dtypes and arrays ----------------------------------------------------------------
    @needs_numpy
    def test_dtype_state_numpy_would_not_write_is_refused(self):
        reconstruct = np.arange(1).__reduce__()[0]
        # The review's 330-byte crash: a void dtype whose state names an object field but clears
        # the object flag; numpy then read the array's raw bytes 'AAAAAAAA' as an object pointer.
        hidden = Reduce(np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))
        array = Reduce(reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), hidden, False, b"A" * 8))
        self.refused(request(DEMO, call("sync_say_hi", array), use_dill=False), "not one numpy writes", LIMITED)
        past_the_end = Reduce(np.dtype, ("V8", False, True),
                              (3, "|", None, ("a",), {"a": (np.dtype("i8"), 100)}, 8, 1, 0))
        self.refused(reduce_request(past_the_end), "not one numpy writes")
        not_a_state = Reduce(np.dtype, ("f8", False, True), "junk")
        self.refused(reduce_request(not_a_state), "not one numpy writes")

    @needs_numpy
    def test_dtype_or_array_in_use_keeps_its_state(self):
        reconstruct, frombuffer = np.arange(1).__reduce__()[0], np.arange(3).__reduce_ex__(5)[0]
        dtype_v8 = stack_global("numpy", "dtype") + short_str("V8") + b"\x89\x88\x87R\x94"  # memo 0
        array = (stack_global(reconstruct.__module__, "_reconstruct") + stack_global("numpy", "ndarray")
                 + b"K\x00\x85C\x01b\x87R\x94" + b"(K\x01K\x01\x85h\x00\x89C\x08AAAAAAAAtb")  # memo 1
        v8_state = frag((3, "|", None, None, None, 8, 1, 0))
        # a dtype gets its state while nothing uses it yet (what every numpy pickle does)...
        status, bad, _, _ = self.send(b"\x80\x04" + dtype_v8 + b"0h\x00" + v8_state + b"b.", HELPERS)
        self.assertIn("request must be a dict", bad)  # loaded; only the request shape is wrong
        # ...but not once an array uses it: a new state would change what the array's bytes mean
        self.refused(b"\x80\x04" + dtype_v8 + b"0" + array + b"0h\x00" + v8_state + b"b.", "already in use")
        # an array whose memory a view uses: a new state would free that memory under the view
        view = stack_global(frombuffer.__module__, "_frombuffer") + b"(h\x01" + stack_global("numpy", "dtype") \
            + short_str("u1") + b"\x85RK\x08\x85" + short_str("C") + b"tR"
        self.refused(b"\x80\x04" + dtype_v8 + b"0" + array + b"0" + view + b"h\x01(K\x01K\x01\x85h\x00\x89C\x08"
                     + b"BBBBBBBBtb.", "already in use")

    @needs_numpy
    def test_shared_dtype_is_not_modified(self):
        singleton = Reduce(np.dtype, ("f8",), (3, ">", None, None, None, -1, -1, 0))  # np.dtype("f8") is shared
        self.refused(reduce_request(singleton), "others share")
        self.assertEqual(np.dtype("f8").byteorder, "=")

    @needs_numpy
    def test_items_go_only_into_lists_dicts_and_sets(self):
        reconstruct = np.arange(1).__reduce__()[0]
        array = (stack_global(reconstruct.__module__, "_reconstruct") + stack_global("numpy", "ndarray")
                 + b"K\x00\x85C\x01b\x87R" + frag((1, (1,), np.dtype("i8"), False, bytes(8))) + b"b")
        self.refused(b"\x80\x04" + array + b"K\x00K\x07s.", "only lists, dicts and sets")  # array[0] = 7

    @needs_numpy
    def test_numpy_values_still_load(self):
        values = [np.arange(5), np.zeros((2, 3), order="F"), np.array(3.5), np.array(["a", "bc"]), np.array([b"x"]),
                  np.array([1, "x", None], dtype=object), np.array([1, 2], dtype=">i4"), np.array([1 + 2j]),
                  np.array(["2020-01-01"], dtype="datetime64[ns]"), np.array([1, 2], dtype="m8[25s]"),
                  np.zeros(2, dtype=[("a", "i4"), ("b", "O")]),
                  np.zeros(2, dtype=np.dtype([("a", "i4"), ("b", "f8")], align=True)),
                  np.zeros(2, dtype=np.dtype({"names": ["a"], "formats": ["i4"], "offsets": [4], "itemsize": 12})),
                  np.zeros(2, dtype=[(("title", "a"), "i4")]), np.zeros(2, dtype=("i4", (2, 3))),
                  np.zeros(2, dtype=[("a", ">i4", (2,)), ("n", [("x", "f4")])]),
                  np.array([1.0], dtype=np.dtype("f8", metadata={"k": 1})), np.dtype("f8"), np.dtype("U5"),
                  np.float64(1.5), np.int64(3), np.datetime64("2020-01-01"), np.zeros(1, dtype=[("a", "i4")])[0]]
        if hasattr(np, "dtypes") and hasattr(np.dtypes, "StringDType"):
            values.append(np.array(["x", "yz"], dtype=np.dtypes.StringDType()))
        for v in values:
            with self.subTest(value=repr(v)[:60]):
                for got in self.same_back(v):
                    if isinstance(v, np.ndarray):
                        # protocols before 5 give a byte-swapped array in native order, as pickle.loads does
                        self.assertEqual(*((a.dtype.kind, a.dtype.itemsize, a.shape, repr(a.dtype.fields), repr(a.tolist()))
                                           for a in (got, v)))
                    else:
                        self.assertEqual(got, v)

    # -- pandas ----------------------------------------------------------------------------------
    @needs_pandas
    def test_pandas_values_still_load(self):
        import pytz
        frame = pd.DataFrame({"A": [1, 2], "B": ["x", None], "C": pd.to_datetime(["2020-01-01", "2020-01-02"]),
                              "D": pd.Categorical(["u", "v"]),
                              "E": pd.date_range("2020", periods=2, tz="Asia/Shanghai"),
                              "F": [1.5, float("nan")], "G": pd.period_range("2020", periods=2, freq="M"),
                              "H": pd.to_timedelta([1, 2], unit="s"), "I": [True, False],
                              "J": pd.date_range("2020", periods=2, tz=pytz.timezone("America/New_York"))})
        values = [frame, frame.set_index(["A", "B"]), pd.Series(pd.Categorical(["a", "b"], ordered=True), name="s"),
                  pd.Index(["a", "b"]), pd.RangeIndex(3), pd.MultiIndex.from_tuples([(1, "a"), (2, "b")]),
                  pd.date_range("2020", periods=3, freq="D"), pd.period_range("2020", periods=2, freq="D"),
                  pd.timedelta_range(0, periods=2), pd.Timestamp("2020-01-01", tz=pytz.utc), pd.Period("2020-01", "M"),
                  pd.offsets.Day(3), pd.offsets.MonthEnd(2), pd.offsets.CustomBusinessDay(holidays=["2020-01-01"]),
                  pd.Categorical(["a", "b", None])]
        for v in values:
            with self.subTest(value=type(v).__name__):
                for got in self.same_back(v):
                    self.assertTrue(v.equals(got) if hasattr(v, "equals") else got == v, got)

    @needs_pandas
    def test_pandas_state_cython_would_trust_is_refused(self):
        # Categorical codes past its categories: str() read out of bounds (a crash).
        cat = pd.Categorical(["a", "b"]).__reduce_ex__(4)
        bad_codes = Reduce(cat[0], cat[1], (cat[2][0], np.array([0, 120], dtype="i1"), {}))
        self.refused(reduce_request(bad_codes), "Categorical codes outside its categories")
        # MultiIndex codes past a level (pandas' own pickle skips its integrity check).
        mi = pd.MultiIndex.from_tuples([(1, "a"), (2, "b")]).__reduce__()
        levels = dict(mi[1][1], codes=[np.array([0, 120], dtype="i1"), np.array([0, 1], dtype="i1")])
        self.refused(reduce_request(Reduce(mi[0], (mi[1][0], levels))), "code max")
        # A Series whose index is longer than its values: alignment read past the values.
        series = pd.Series([1.0, 2.0]).__reduce_ex__(4)
        long_index = pd.RangeIndex(1000)
        manager = Reduce(copyreg._reconstructor, (pd.Series([1.0])._mgr.__class__, object, None),
                         ([long_index], [np.array([1.0, 2.0])], [long_index],
                          {"0.14.1": {"axes": [long_index],
                                      "blocks": [{"values": np.array([1.0, 2.0]), "mgr_locs": slice(0, 2)}]}}))
        self.refused(reduce_request(Reduce(copyreg._reconstructor, (pd.Series, object, None), dict(series[2], _mgr=manager))),
                     "does not match its index", Rules((MOD, True), ("builtins", True)))  # builtins.object

    @needs_pandas
    def test_half_built_pandas_array_is_harmless(self):
        # pandas' helper makes an empty shell its pickle fills by BUILD; a pickle that never does
        # used to leave Cython reading an array's fields from None (garbage from .nbytes).
        shell = Reduce(*pd.date_range("2020", periods=1).array.__reduce_ex__(4)[:2])
        got = self.ok(reduce_request(shell), Rules((MOD, True)))
        self.assertEqual(len(got), 0)

    # -- call results the pickle does not own ---------------------------------------------------
    def test_build_on_shared_call_results_is_refused(self):
        try:
            import pytz
        except ImportError:
            self.skipTest("pytz is not installed")
        utc = b"\x80\x04" + stack_global("pytz", "_UTC") + b")R}" + short_str("zone") + short_str("Mars/Olympus") + b"sb."
        self.refused(utc, "others share", LIMITED)
        shanghai = (b"\x80\x04" + stack_global("pytz", "_p") + short_str("Asia/Shanghai") + b"\x85R}"
                    + short_str("zone") + short_str("Evil/Zone") + b"sb.")
        self.refused(shanghai, "others share", LIMITED)
        self.assertEqual((pytz.utc.zone, pytz.timezone("Asia/Shanghai").zone), ("UTC", "Asia/Shanghai"))

    def test_wildcard_entries_are_narrowed(self):
        self.assertFalse([e for e in kx.DEFAULT_UNPICKLE_ALLOW if e.endswith(":*")])
        for module, name in (("pandas._libs.tslibs.offsets", "to_offset"), ("numpy.dtypes", "Float64DType")):
            self.refused(b"\x80\x04" + stack_global(module, name) + b".", "not in unpickle_allow", LIMITED)

    # -- size ----------------------------------------------------------------------------------
    def test_tiny_requests_cannot_build_big_objects(self):
        big = b"J" + (2 * 10 ** 9).to_bytes(4, "little")
        builtin = functools.partial(stack_global, "builtins")
        a_range = builtin("range") + big + b"\x85R"
        shared = list(range(100000))  # one memoized list, copied by many tuple() calls
        cases = [("bytearray(2e9)", b"\x80\x04" + builtin("bytearray") + big + b"\x85R.", "budget"),
                 ("bytes(2e9)", b"\x80\x04" + builtin("bytes") + big + b"\x85R.", "budget"),
                 ("list(range)", b"\x80\x04" + builtin("list") + a_range + b"\x85R.", "budget"),
                 ("NEWOBJ tuple(range)", b"\x80\x04" + builtin("tuple") + a_range + b"\x85\x81.", "budget"),
                 ("OBJ frozenset(range)", b"\x80\x04(" + builtin("frozenset") + a_range + b"o.", "budget"),
                 ("copyreg list(range)", b"\x80\x04" + stack_global("copyreg", "_reconstructor") + builtin("list")
                  + builtin("list") + a_range + b"\x87R.", "budget"),
                 ("many copies", reduce_request([Reduce(tuple, (shared,)) for _ in range(200)]), "budget")]
        if np is not None:
            reconstruct, scalar = np.arange(1).__reduce__()[0], np.float64(1).__reduce__()[0]
            cases += [("_reconstruct big", reduce_request(Reduce(reconstruct, (np.ndarray, (10 ** 9,), b"O"))), "budget"),
                      ("ndarray(shape)", reduce_request(Reduce(np.ndarray, ((10 ** 9,),))), "not called while loading"),
                      ("scalar big", reduce_request(Reduce(scalar, (np.dtype("V2000000000"),))), "budget")]
        if pd is not None:
            from pandas.core.indexes.base import _new_Index
            cases += [("Series(0, index)", reduce_request(Reduce(pd.Series, (0, pd.RangeIndex(10 ** 9)))),
                       "not called while loading"),
                      ("_new_Index(range)", reduce_request(Reduce(_new_Index, (pd.Index, {"data": range(10 ** 9)}))),
                       "budget"),
                      ("_new_Index(bytes)", reduce_request(Reduce(_new_Index, (bytes, {"source": 10 ** 9}))),
                       "needs a pandas Index class")]
        for name, payload, contains in cases:
            with self.subTest(name):
                started = time.monotonic()
                self.refused(payload, contains)
                self.assertLess(time.monotonic() - started, 5)

    def test_number_parsers_are_capped(self):
        import _codecs
        cases = [Reduce(fractions.Fraction, ("1e300000000",)), Reduce(fractions.Fraction, (decimal.Decimal("1e999999"),)),
                 Reduce(decimal.Decimal, (1 << 200000,)),  # Decimal(int) is quadratic
                 Reduce(_codecs.encode, ("\u00e4" * 10, "punycode"))]  # so is punycode
        # (the Decimal inside the second Fraction is refused first: its exponent)
        for value, contains in zip(cases, ("Fraction", "Decimal", "Decimal", "latin-1")):
            with self.subTest(contains):
                started = time.monotonic()
                self.refused(reduce_request(value), contains)
                self.assertLess(time.monotonic() - started, 5)
        for value in (fractions.Fraction(1, 3), fractions.Fraction("1e-4000"), decimal.Decimal("1" * 10000),
                      b"\xff"):  # protocol 2 pickles bytes as _codecs.encode(text, "latin1")
            self.assertEqual(set(self.same_back(value)), {value})

    def test_budget_grows_with_the_request(self):
        # 1 MiB spelled out in the request loads under a 64 KiB base budget; 2 MiB from an int does not.
        with mock.patch.object(kx_budget, "_BUILD_BUDGET", 1 << 16):
            self.assertEqual(len(self.ok(reduce_request(bytearray(1 << 20)), Rules((MOD, True)))), 1 << 20)
            payload = b"\x80\x04" + stack_global("builtins", "bytearray") + b"J" + (2 << 20).to_bytes(4, "little") \
                + b"\x85R."
            self.refused(payload, f"budget of {(1 << 16) + 16 * len(payload):,} bytes")

    # -- nested lazy chains --------------------------------------------------------------------
    def test_reused_nested_chains_are_capped(self):
        def chain(depth, k):
            c = RpcClient(DEMO, calls=[attr("PASSWORD")])
            for _ in range(depth):  # each level uses the level below k times (one memoized object)
                c = RpcClient(DEMO, calls=[attr("LIST"), call("__len__", *(c,) * k)])
            return request(DEMO, call("add", c, 1), use_dill=False)
        started = time.monotonic()
        self.refused(chain(6, 10), "more than 1024 calls", LIMITED)  # 10**6 resolutions before the cap
        self.assertLess(time.monotonic() - started, 5)
        self.error(chain(2, 3), LIMITED, TypeError, "argument")  # under the cap it runs: LIST.__len__(c, c, c)


if __name__ == "__main__":
    unittest.main()


class FastPathTest(ExecutorTest):
    """`handle(..., fast=True)`: the C unpickler, used only for pickles the
    server's Rust scan cleared; the find_class allow-list must hold there too."""

    def fast(self, payload, rules=FULL):
        status, bad, reply, summary, _, _ = self.ex.handle(next(self._ids), "alice", rules, payload, True)
        return status, bad, (dill.loads if dill is not None else pickle.loads)(reply), summary

    def test_a_plain_call_gives_the_same_reply(self):
        status, bad, d, summary = self.fast(request("ksrpc.server.demo", call("add", 1, 2)))
        self.assertEqual((status, bad, d["data"], summary), (200, None, 3, "ksrpc.server.demo.add(2 args)"))

    def test_refused_globals_stay_refused(self):
        marker = os.path.join(tempfile.gettempdir(), f"ksrpc-fast-{os.getpid()}")

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        payload = pickle.dumps(dict(module="ksrpc.server.demo", calls=[call("add", Evil(), 1)], ref_id=0), protocol=4)
        status, bad, d, _ = self.fast(payload, LIMITED)
        self.assertEqual(status, 500)
        self.assertIn("refused", bad)
        self.assertFalse(os.path.exists(marker))
        dotted = b"\x80\x04" + stack_global("ksrpc.server.demo", "random._os.system") + b"."
        status, bad, _, _ = self.fast(dotted, LIMITED)
        self.assertIn("dotted", bad)


class SharingTest(unittest.TestCase):
    """`sharing.held_only_by_caller`, the one reader of reference counts, and its import-time self-check."""

    def test_a_new_object_held_by_one_local_is_held_only_by_its_caller(self):
        obj = object()
        self.assertTrue(kx_sharing.held_only_by_caller(obj))
        items = [1, 2, 3]
        self.assertTrue(kx_sharing.held_only_by_caller(items))

    def test_an_object_also_stored_elsewhere_is_not(self):
        obj = object()
        kept = [obj]
        self.assertFalse(kx_sharing.held_only_by_caller(obj))
        self.assertTrue(kx_sharing.held_only_by_caller(obj, extra=1))  # the caller counts its list
        self.assertFalse(kx_sharing.held_only_by_caller(obj, extra=2))
        kept.clear()
        self.assertTrue(kx_sharing.held_only_by_caller(obj))
        utc = datetime.timezone.utc  # a module's singleton
        self.assertFalse(kx_sharing.held_only_by_caller(utc))

    def test_free_threaded_builds_are_refused(self):
        kx_sharing.self_check()  # this interpreter passes
        version = sys.version.split()[0]
        with mock.patch.object(sys, "_is_gil_enabled", lambda: False, create=True):
            with self.assertRaisesRegex(ImportError, f"free-threaded build \\(Python {version}"):
                kx_sharing.self_check()
        real = kx_sharing.sysconfig.get_config_var
        with mock.patch.object(kx_sharing.sysconfig, "get_config_var",
                               lambda name: 1 if name == "Py_GIL_DISABLED" else real(name)):
            with self.assertRaisesRegex(ImportError, "free-threaded"):
                kx_sharing.self_check()

    def test_a_broken_count_fails_the_self_check(self):
        version = sys.version.split()[0]
        with mock.patch.object(kx_sharing, "_refs", lambda obj: kx_sharing._SOLE_REFS + 5):
            with self.assertRaisesRegex(ImportError, f"Python {version}.*expected a new object held by one local"):
                kx_sharing.self_check()
        # every count the same: the sole object passes, the one also in a list must not
        with mock.patch.object(kx_sharing, "_refs", lambda obj: 3), mock.patch.object(kx_sharing, "_SOLE_REFS", 3):
            with self.assertRaisesRegex(ImportError, "expected an object also stored in a list not to be"):
                kx_sharing.self_check()
        kx_sharing.self_check()

    def test_the_package_does_not_import_where_the_check_fails(self):
        import subprocess
        code = "import sys; sys._is_gil_enabled = lambda: False; import ksrpc_executor"
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=60)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("ImportError: ksrpc_executor refuses to run on a free-threaded build", out.stderr)
