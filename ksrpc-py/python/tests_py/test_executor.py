"""Tests of ksrpc_executor (the Python half of the ksrpc-py executor).

Run from the repository root:  python -m unittest discover -s ksrpc-py/python/tests_py
Tests needing dill, numpy or pandas skip when those are missing.
"""
import asyncio
import ast
import collections
import contextlib
import datetime
import decimal
import fnmatch
import fractions
import io
import itertools
import os
import pickle
import sys
import tempfile
import threading
import time
import unittest
import uuid
from collections import OrderedDict
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ksrpc_executor as kx  # noqa: E402
from ksrpc.client import RpcCall, RpcClient, Self  # noqa: E402
from ksrpc.server import demo  # noqa: E402

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


class Rules:
    """The rules fake: ordered (pattern, allowed), first match wins, no match = denied."""

    def __init__(self, *pairs):
        self.pairs = pairs

    def allows(self, name):
        for pattern, allowed in self.pairs:
            if fnmatch.fnmatchcase(name, pattern):
                return allowed
        return False


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


def thread_name():
    return threading.current_thread().name


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
        status, bad, reply, summary = result
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

    def test_summary_has_counts_not_values(self):
        payload = request(DEMO, call("add", "secret-password", "x"))
        summary = self.send(payload, LIMITED)[3]
        self.assertNotIn("secret", summary)
        self.assertEqual(kx._summarize("m", [attr("a"), call("f", 1, k=2), call("g")], 5), "m.a.f(1 arg, 1 kwarg).g() [handle]")

    def test_attribute_and_ignored_arguments(self):
        self.assertEqual(self.ok(request(DEMO, attr("PASSWORD")), LIMITED), 123456)
        self.assertEqual(self.ok(request(DEMO, call("PASSWORD", 1, 2)), LIMITED), 123456)  # as 0.8.1
        self.assertEqual(self.ok(request(DEMO, attr("LIST")), LIMITED), [1, 2, 3, 4, 5])
        self.assertEqual(self.ok(request(DEMO, attr(""), attr("demo")), LIMITED), "654321")  # empty name skipped
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
            self.assertIs(self.ok(request(DEMO), LIMITED), demo)  # dill pickles a module by name

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
        self.bad(b"\x80\x04" + stack_global("json", "JSONDecodeError") + b".", Rules(("json", True)), "json.decoder")

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
        with mock.patch.object(kx, "dill", None):
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
        BARRIER.reset()
        results = self.run_in_threads(
            lambda i: self.ex.handle(1000 + i, "alice", HELPERS, request(MOD, call("meet_at_barrier"))), 3)
        for status, bad, reply, _ in results:
            self.assertEqual((status, bad), (200, None), pickle.loads(reply).get("traceback"))
        self.assertEqual(sorted(pickle.loads(r[2])["data"] for r in results), [0, 1, 2])

    def test_serial_modules_run_on_one_thread(self):
        ex = self.make(serial_modules=[MOD])
        names = self.run_in_threads(lambda i: pickle.loads(ex.handle(
            2000 + i, "alice", HELPERS, request(MOD, call("thread_name")))[2])["data"], 3)
        self.assertEqual(set(names), {"ksrpc-serial"})
        self.assertNotEqual(self.ok(request(MOD, call("thread_name")), HELPERS), "ksrpc-serial")

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


if __name__ == "__main__":
    unittest.main()


class FastPathTest(ExecutorTest):
    """`handle(..., fast=True)`: the C unpickler, used only for pickles the
    server's Rust scan cleared; the find_class allow-list must hold there too."""

    def fast(self, payload, rules=FULL):
        status, bad, reply, summary = self.ex.handle(next(self._ids), "alice", rules, payload, True)
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
