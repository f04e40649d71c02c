"""Tests of ksrpc_capability and of the executor's trampoline, in process.

The shared table `tests/python/capability_table.json` runs here through
`Executor.run_native` with rules fakes (the same rules the test servers give the limited user
and the admin), so a change to the rule shows in a second; the end-to-end runs of the same
table are `tests/python/test_capability.py` (the 0.8.1 client) and
`ksrpc-server/tests/client.rs` (the native protocol). Needs numpy and pandas (the server venv).
"""
import ast
import fnmatch
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

import ksrpc_capability as cap  # noqa: E402
import ksrpc_executor as kx  # noqa: E402
from ksrpc.client import RpcCall, RpcClient, Self  # noqa: E402

import capsdk  # noqa: E402
import capsdk_foreign  # noqa: E402

TABLE = json.loads((ROOT / "tests/python/capability_table.json").read_text())


class Rules:
    """Ordered (pattern, allowed) pairs, first match wins, as ksrpc_core::rules."""

    def __init__(self, *pairs):
        self.pairs = pairs

    def allows(self, name):
        rule = self.first_match(name)
        return rule is not None and rule[1]

    def first_match(self, name):
        for pattern, allowed in self.pairs:
            if fnmatch.fnmatchcase(name, pattern):
                return pattern, allowed
        return None


LIMITED = Rules(("ksrpc.server.demo", True), ("bench_mod", True), ("capsdk", True), ("capsdk.secret*", False),
                ("os", False), ("builtins", False), ("*", False))
STAR = Rules(("*", True))


# ---- the table's chains as stand-in RpcCall lists (the CLI's expression conventions) --------------
def _ops(node):
    ops = []
    while not isinstance(node, ast.Name):
        if isinstance(node, ast.Attribute):
            ops.append(("attr", node.attr))
            node = node.value
        elif isinstance(node, ast.Call):
            ops.append(("call", node.args, node.keywords))
            node = node.func
        elif isinstance(node, ast.Subscript):
            ops.append(("item", node.slice))
            node = node.value
        else:
            raise ValueError(ast.dump(node))
    return [("name", node.id)] + ops[::-1]


def _value(node):
    if isinstance(node, ast.Name) and node.id == "Self":
        return Self
    if isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        module, calls = _calls(node, None)
        return RpcClient(module, None, 0, calls)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def _calls(node, module):
    ops = _ops(node)
    if module is None:  # the dotted path without its last name is the module
        names = []
        while ops and ops[0][0] in ("name", "attr"):
            names.append(ops.pop(0)[1])
        module = ".".join(names[:-1])
        ops.insert(0, ("attr", names[-1]))
    else:
        ops.pop(0)
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
                    text = row["chain"].replace("{marker}", marker)
                    module, calls = _calls(ast.parse("_ROW_MODULE_." + text, mode="eval").body, row["module"])
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
        g, loc, b = kx._call(peek, (), {})
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
            self.assertIn("importlib", vars(kx))
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
        policy = kx._Policy(*kx._parse_allow(kx.DEFAULT_UNPICKLE_ALLOW), False)
        # a huge index costs one dict entry, not an array
        self.assertIsNone(kx._Unpickler(b"\x80\x04Nr\xff\xff\xff\x03.", policy, STAR).load())
        u = kx._Unpickler(b"\x80\x04" + b"Nq\x00" * 1000 + b".", policy, STAR)
        before = u._budget
        u.load()
        self.assertEqual(before - u._budget, 1000 * kx._MEMO_ENTRY_BYTES)


if __name__ == "__main__":
    unittest.main()
