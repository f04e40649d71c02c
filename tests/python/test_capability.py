"""The capability rule (README, "Security model"), through the unmodified 0.8.1 client.

A user without the `builtins` right may call only code defined in the modules their rules
allow (or inside the package of a module the chain reached), plus a short allow-list of
read-only methods of builtin values. Every row of `capability_table.json` (shared with the
native-protocol test in `ksrpc-server/tests/client.rs`) runs twice, over HTTP and WebSocket:

- as the limited user (rules: the demo, bench_mod and `capsdk`, not `capsdk.secret`): what the
  row expects, and no file written where the row names `{marker}`;
- as the admin (`allow *`): the same chain is not refused there, so every refusal comes from
  the rule, not from a chain that cannot work.

Chains are written as the `ksrpc` CLI takes them, after the module: `test().eval('A + 1')`.
A nested chain in an argument is a full expression whose module is its dotted path without
the last name (`capsdk.get_price` is `get_price` of module `capsdk`).
"""
from __future__ import annotations

import ast
import json
import pathlib

import pytest

from ksrpc.client import RpcClient, Self

import chain_text
from ksrpc_testlib import run

TABLE = json.loads(pathlib.Path(__file__).with_name("capability_table.json").read_text())


def _value(conn, node):
    if isinstance(node, ast.Name) and node.id == "Self":
        return Self
    if chain_text.is_chain(node):
        return _chain(conn, node, None)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(conn, e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {_value(conn, k): _value(conn, v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def _chain(conn, node, module):
    """A lazy RpcClient for `node`; `module` None means: the leading dotted path names it."""
    module, ops = chain_text.rooted(node, module)
    client, previous = RpcClient(module, conn, lazy=True), "attr"
    for op in ops:
        if op[0] == "attr":
            client = client.__getattr__(op[1])
        elif op[0] == "item":
            client = client.__getattr__("__getitem__")(_value(conn, op[1]))
        else:
            args = [_value(conn, a) for a in op[1]]
            kwargs = {k.arg: _value(conn, k.value) for k in op[2]}
            # as the CLI: a call right after a call or a subscript is __call__
            target = client if previous == "attr" else client.__getattr__("__call__")
            client = target(*args, **kwargs)
        previous = op[0]
    return client


def build(conn, row, marker):
    return _chain(conn, chain_text.parse_row(row, marker), row["module"])


def check(expect, err, row):
    where = f"{row['module']}.{row['chain']}"
    if expect == "ok":
        assert err is None, f"{where} failed: {type(err).__name__}: {err}"
    elif expect == "refused":
        assert isinstance(err, PermissionError), f"{where} was not refused: {err!r}"
    else:
        name = expect.removeprefix("error:")
        assert err is not None and type(err).__name__ == name, f"{where}: expected {name}, got {err!r}"
        assert not isinstance(err, PermissionError), f"{where} was refused: {err}"


def _row_id(i, row):
    return f"{i:03d}-{row['module'].rsplit('.', 1)[-1]}.{row['chain'][:48]}"


@pytest.mark.parametrize("who", ["limited", "star"])
@pytest.mark.parametrize("row", TABLE, ids=[_row_id(i, r) for i, r in enumerate(TABLE)])
def test_capability_table(connect, settings, marker, row, who):
    if who == "limited":
        conn = connect(settings.limited_user, settings.limited_password)
    else:
        conn = connect(settings.admin_user, settings.admin_password)

    async def main():
        async with conn:
            try:
                await build(conn, row, marker).collect()
            except Exception as e:  # noqa: BLE001 - the row says which
                return e
            return None

    err = run(main())
    written = sorted(marker.parent.glob(marker.name + "*"))
    for path in written:
        path.unlink()
    check(row[who], err, row)
    if who == "limited":
        assert not written, f"the refused call wrote {written}"


def test_table_is_big_and_covers_every_group():
    groups = {r["group"] for r in TABLE}
    assert len(TABLE) >= 100
    assert len(groups) >= 7, groups
    assert any(r["limited"] == "ok" for r in TABLE) and any(r["limited"] == "refused" for r in TABLE)


def test_called_code_sees_an_empty_caller_frame(limited):
    """User-reachable code is called through a trampoline: the caller's frame holds no globals
    but an empty `__builtins__`, and as locals only the callable and its own arguments."""

    async def main():
        async with limited:
            return await RpcClient("capsdk", limited).peek_caller()

    seen = run(main())
    assert seen["globals"] == ["__builtins__"], seen
    assert seen["builtins"] == [], seen
    assert set(seen["locals"]) <= {"f", "a", "k"}, seen


def test_refusal_names_the_callable_and_the_rule(limited):
    async def main():
        async with limited:
            try:
                await RpcClient("ksrpc.server.demo", limited, lazy=True).test().to_csv("x").collect()
            except PermissionError as e:
                return str(e)
        return None

    msg = run(main())
    assert msg is not None, "to_csv was not refused"
    assert "to_csv" in msg and "pandas" in msg and "'allow pandas" in msg, msg
