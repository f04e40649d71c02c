"""Tests of ksrpc_capability and of the executor's trampoline, in process.

The shared table `tests/python/capability_table.json` runs here through
`Executor.run_native` with rules fakes (the same rules the test servers give the limited user
and the admin), so a change to the rule shows in a second; the end-to-end runs of the same
table are `tests/python/test_capability.py` (the 0.8.1 client) and
`ksrpc-server/tests/client.rs` (the native protocol). Needs numpy and pandas (the server venv).
"""
import ast
import functools
import json
import operator
import os
import pathlib
import sys
import tempfile
import types
import unittest
import uuid

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[3]
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(ROOT / "tests/python/server_modules"))
sys.path.insert(0, str(ROOT / "tests/python"))

import ksrpc_capability as cap  # noqa: E402
import ksrpc_executor as kx  # noqa: E402
from ksrpc_executor import executor as kx_executor  # noqa: E402
from ksrpc_executor import names as kx_names  # noqa: E402
from ksrpc_executor import trampoline as kx_trampoline  # noqa: E402
from ksrpc_executor import unpicklers as kx_unpicklers  # noqa: E402
from ksrpc.client import RpcCall, RpcClient, Self  # noqa: E402

import capsdk  # noqa: E402
import capsdk_foreign  # noqa: E402
import chain_text  # noqa: E402
from rules_fake import Rules  # noqa: E402

TABLE = json.loads((ROOT / "tests/python/capability_table.json").read_text())


LIMITED = Rules(("ksrpc.server.demo", True), ("bench_mod", True), ("capsdk", True), ("capsdk.secret*", False),
                ("os", False), ("builtins", False), ("*", False))
STAR = Rules(("*", True))


# ---- the table's chains as stand-in RpcCall lists --------------------------------------------------
def _value(node):
    if isinstance(node, ast.Name) and node.id == "Self":
        return Self
    if chain_text.is_chain(node):
        module, calls = _calls(node, None)
        return RpcClient(module, None, 0, calls)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def _calls(node, module):
    module, ops = chain_text.rooted(node, module)
    calls, previous = [], "attr"
    for op in ops:
        if op[0] == "attr":
            calls.append(RpcCall(op[1], None, None))
        elif op[0] == "item":
            calls.append(RpcCall("__getitem__", (_value(op[1]),), {}))
        else:
            args, kwargs = tuple(_value(a) for a in op[1]), {k.arg: _value(k.value) for k in op[2]}
            if previous == "attr":
                calls[-1] = RpcCall(calls[-1].name, args, kwargs)
            else:
                calls.append(RpcCall("__call__", args, kwargs))
        previous = op[0]
    return module, calls


class TableTest(unittest.TestCase):
    """Every row of the shared table, for the limited user and for '*', in process."""

    @classmethod
    def setUpClass(cls):
        cls.ex = kx.Executor()
        cls.dir = tempfile.TemporaryDirectory()

    @classmethod
    def tearDownClass(cls):
        cls.ex.close()
        cls.dir.cleanup()

    def test_rows(self):
        for i, row in enumerate(TABLE):
            if row["module"] == "numexpr" and "numexpr" not in sys.modules:
                try:
                    __import__("numexpr")
                except ImportError:
                    continue  # the server venv has it; a bare checkout may not
            for who, rules in (("limited", LIMITED), ("star", STAR)):
                with self.subTest(row=f"{row['module']}.{row['chain']}", user=who):
                    marker = os.path.join(self.dir.name, uuid.uuid4().hex)
                    module, calls = _calls(chain_text.parse_row(row, marker), row["module"])
                    out = self.ex.run_native(i + 1, who, rules, module, calls, 0)
                    written = [p for p in os.listdir(self.dir.name) if p.startswith(os.path.basename(marker))]
                    for p in written:
                        os.unlink(os.path.join(self.dir.name, p))
                    got = "ok" if out[0] != "err" else "refused" if out[1] == "PermissionError" else f"error:{out[1]}"
                    self.assertEqual(got, row[who], out[2] if out[0] == "err" else out)
                    if who == "limited":
                        self.assertEqual(written, [], "a refused call wrote a file")


class DefiningModuleTest(unittest.TestCase):
    """What `defining_module` reads, and what it refuses to trust."""

    def test_functions_methods_and_classes(self):
        self.assertEqual(cap.defining_module(capsdk.get_price), "capsdk.api")
        self.assertEqual(cap.defining_module(capsdk.Client().query), "capsdk.api")
        self.assertEqual(cap.defining_module(capsdk.Client), "capsdk.api")
        self.assertEqual(cap.defining_module(os.system), "posix")
        self.assertEqual(cap.defining_module([].append), "builtins")
        self.assertEqual(cap.defining_module(functools.partial(os.getcwd)), "posix")
        self.assertEqual(cap.defining_module(operator.attrgetter("x")), "operator")
        self.assertEqual(cap.defining_module(capsdk.lru_foreign), "posix")

    def test_fake_module_attributes_are_not_trusted(self):
        self.assertEqual(capsdk_foreign.read_text.__module__, "capsdk")
        self.assertEqual(cap.defining_module(capsdk_foreign.read_text), "capsdk_foreign")
        self.assertEqual(cap.defining_module(capsdk_foreign.disguised.run), "capsdk_foreign")
        self.assertEqual(cap.defining_module(capsdk_foreign.disguised), "capsdk_foreign")

        class Meta(type):
            @property
            def __module__(cls):
                return "capsdk"

        class Sneaky(metaclass=Meta):
            def __init__(self):
                pass
        self.assertEqual(cap.defining_module(Sneaky), __name__)

    def test_a_function_with_globals_of_no_module_is_unknown(self):
        fn = types.FunctionType(capsdk.get_price.__code__, {"__name__": "capsdk"})
        self.assertIsNone(cap.defining_module(fn))
        with self.assertRaises(PermissionError) as ctx:
            cap.check_call(LIMITED, "u", fn, ["capsdk"], "fn")
        self.assertIn("cannot be proven", str(ctx.exception))

    def test_pandas_and_numpy(self):
        import numpy as np
        import pandas as pd
        df = pd.DataFrame({"A": [1]})
        self.assertTrue(cap.defining_module(df.eval).startswith("pandas."))
        self.assertTrue(cap.defining_module(pd.Timestamp("2020-01-01").isoformat).startswith("pandas."))
        self.assertTrue(cap.defining_module(np.zeros).startswith("numpy"))
        self.assertEqual(cap.defining_module(np.arange(3).tofile), "numpy")


class RuleTest(unittest.TestCase):
    def test_package_rule_and_targeted_deny(self):
        rules = Rules(("sdk", True), ("sdk.private*", False), ("*", False))
        self.assertTrue(cap._module_allowed(rules, "sdk.api", ["sdk"]))
        self.assertTrue(cap._module_allowed(rules, "sdk", ["sdk"]))
        self.assertFalse(cap._module_allowed(rules, "sdk.private.x", ["sdk"]))
        self.assertFalse(cap._module_allowed(rules, "sdkfoo", ["sdk"]))  # a prefix is not a package
        self.assertFalse(cap._module_allowed(rules, "sdk.api", ["other"]))

    def test_message_names_the_callable_and_a_rule(self):
        import pandas as pd
        with self.assertRaises(PermissionError) as ctx:
            cap.check_call(LIMITED, "bob", pd.DataFrame().to_csv, ["ksrpc.server.demo"], "'to_csv'")
        msg = str(ctx.exception)
        self.assertIn("'to_csv'", msg)
        self.assertIn("user 'bob'", msg)
        self.assertIn("'allow pandas", msg)

    def test_allow_list_is_bounded(self):
        for names in list(cap.VALUE_METHODS.values()) + list(cap.CONTAINER_METHODS.values()):
            for bad in ("format", "format_map", "strftime", "translate", "ljust", "zfill", "replace_all",
                        "append", "extend", "pop", "clear", "update", "setdefault", "add", "__setitem__",
                        "__format__", "__reduce__"):
                self.assertNotIn(bad, names)
        # container methods hold only for the exact builtin type (defaultdict's __missing__ inserts)
        import collections
        dd = collections.defaultdict(list)
        with self.assertRaises(PermissionError):
            cap.check_call(LIMITED, "u", dd.__getitem__, [], "dd[...]")
        cap.check_call(LIMITED, "u", {}.get, [], "d.get")


def peek():
    frame = sys._getframe(1)
    return sorted(frame.f_globals), sorted(frame.f_locals), sorted(frame.f_builtins)


async def apeek():
    return peek.__code__ and (sorted(sys._getframe(1).f_globals), sorted(sys._getframe(1).f_builtins))


class TrampolineTest(unittest.TestCase):
    def test_python_callees_see_an_empty_frame(self):
        g, loc, b = kx_trampoline._call(peek, (), {})
        self.assertEqual(g, ["__builtins__"])
        self.assertEqual(b, [])
        self.assertLessEqual(set(loc), {"f", "a", "k"})

    def test_through_the_executor_and_pandas(self):
        import pandas as pd
        ex = kx.Executor()
        try:
            out = ex.run_native(1, "admin", STAR, __name__, [RpcCall("peek", (), {})], 0)
            self.assertEqual(out[0], "ok")
            self.assertEqual(out[1][0], ["__builtins__"])
            # pandas resolves @name in the caller's frame: the executor's imports are not there
            self.assertIn("importlib", vars(kx_executor))
            out = ex.run_native(2, "admin", STAR, "ksrpc.server.demo",
                                [RpcCall("test", (), {}), RpcCall("eval", ("@importlib",), {})], 0)
            self.assertEqual(out[:2], ("err", "NameError"), out)
            self.assertTrue(isinstance(pd.DataFrame({"A": [1]}).eval("A + 1"), pd.Series))
        finally:
            ex.close()

    def test_coroutines_are_awaited_from_a_clean_frame(self):
        ex = kx.Executor()
        try:
            out = ex.run_native(1, "admin", STAR, __name__, [RpcCall("apeek", (), {})], 0)
            self.assertEqual(out[0], "ok", out)
            self.assertEqual(out[1][0], ["__builtins__"])
        finally:
            ex.close()


class MemoTest(unittest.TestCase):
    def test_careful_unpickler_charges_memo_puts(self):
        policy = kx_names._Policy(*kx_names._parse_allow(kx.DEFAULT_UNPICKLE_ALLOW), False)
        # a huge index costs one dict entry, not an array
        self.assertIsNone(kx_unpicklers._Unpickler(b"\x80\x04Nr\xff\xff\xff\x03.", policy, STAR).load())
        u = kx_unpicklers._Unpickler(b"\x80\x04" + b"Nq\x00" * 1000 + b".", policy, STAR)
        before = u._budget
        u.load()
        self.assertEqual(before - u._budget, 1000 * kx_unpicklers._MEMO_ENTRY_BYTES)


if __name__ == "__main__":
    unittest.main()


class CompatPathTest(unittest.TestCase):
    """Request pickles (the 0.8.1 client's path): values the pickle itself carries."""

    @classmethod
    def setUpClass(cls):
        cls.ex = kx.Executor()

    @classmethod
    def tearDownClass(cls):
        cls.ex.close()

    def run_request(self, module, calls, rules=LIMITED):
        """(status, bad_request, data) on both unpickler paths; both must agree."""
        payload = __import__("pickle").dumps(dict(module=module, calls=calls, ref_id=0), protocol=4)
        seen = []
        for fast in (False, True):
            status, bad, reply, _, _, _ = self.ex.handle(1, "u", rules, payload, fast)
            seen.append((status, bad, __import__("pickle").loads(reply)["data"]))
        self.assertEqual([type(d) for _, _, d in seen], [type(seen[0][2])] * 2, seen)
        return seen[0]

    def assert_refused(self, module, calls):
        status, bad, data = self.run_request(module, calls)
        self.assertEqual(status, 500)
        self.assertIsInstance(data, PermissionError, (bad, data))
        return data

    def test_range_searches_are_refused(self):
        # range(10**18).count('a') is a C loop of centuries with the GIL held
        self.assert_refused("ksrpc.server.demo", [RpcCall("Point", (range(10**18), 0), {}), RpcCall("x", None, None),
                                                 RpcCall("count", ("a",), {})])
        self.assert_refused("capsdk", [RpcCall("FROZEN", None, None), RpcCall("isdisjoint", (range(10**18),), {})])

    def test_a_decimal_with_a_huge_exponent_is_refused_while_loading(self):
        import decimal
        status, bad, data = self.run_request("ksrpc.server.demo", [RpcCall("add", (decimal.Decimal("1e999999999"), 0), {})])
        self.assertIsNotNone(bad)
        self.assertIn("exponent beyond 4300", bad)

    def test_callables_in_the_pickle_need_the_capability(self):
        # a foreign class with a fake __module__, handed to allowed code that calls it
        data = self.assert_refused("capsdk", [RpcCall("call_it", (capsdk_foreign.Disguised,), {})])
        self.assertIn("capsdk_foreign", str(data))
        # an allow-listed constructor as a value: tuple(range(2 * 10**7)) outside the build budget
        self.assert_refused("capsdk", [RpcCall("call_it", (tuple, range(2 * 10**7)), {})])
        # inside containers too
        self.assert_refused("capsdk", [RpcCall("call_it", (float, [{"k": (tuple,)}]), {})])
        # numpy/pandas pickle helpers (the pandas integrity checks run only while loading)
        import numpy as np
        self.assert_refused("capsdk", [RpcCall("call_it", (np.frombuffer, b"x"), {})])
        # plain scalar types are data, and allowed code may get them
        status, bad, data = self.run_request("capsdk", [RpcCall("call_it", (float, "3.5"), {})])
        self.assertEqual((status, data), (200, 3.5), (bad, data))

    def test_plain_values_still_work(self):
        status, bad, data = self.run_request("capsdk", [RpcCall("get_price", ("000001",), {"count": 5})])
        self.assertEqual((status, data), (200, {"code": "000001", "count": 5}), (bad, data))
