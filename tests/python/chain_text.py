"""Chains written as the `ksrpc` CLI takes them (`test().eval('A + 1')`), parsed into steps.

Shared by the capability-table runners (the 0.8.1 client suite and the executor's in-process
tests), so every protocol reads the table the same way: a dotted path, then `.name`,
`(args)` and `[key]` steps; a call right after a call or a subscript is `__call__`; a nested
chain in an argument is a full expression whose module is its dotted path without the last name.
"""
import ast


def steps(node):
    """A postfix chain as [("name", root), ("attr", n) | ("call", args, keywords) | ("item", key)...]."""
    out = []
    while not isinstance(node, ast.Name):
        if isinstance(node, ast.Attribute):
            out.append(("attr", node.attr))
            node = node.value
        elif isinstance(node, ast.Call):
            out.append(("call", node.args, node.keywords))
            node = node.func
        elif isinstance(node, ast.Subscript):
            out.append(("item", node.slice))
            node = node.value
        else:
            raise ValueError(f"not a chain: {ast.dump(node)}")
    return [("name", node.id)] + out[::-1]


def rooted(node, module):
    """(module, steps after it): `module` None takes it from the leading dotted path."""
    ops = steps(node)
    if module is None:
        names = []
        while ops and ops[0][0] in ("name", "attr"):
            names.append(ops.pop(0)[1])
        ops.insert(0, ("attr", names[-1]))
        return ".".join(names[:-1]), ops
    return module, ops[1:]  # drop the placeholder root


def is_chain(node):
    return isinstance(node, (ast.Attribute, ast.Call, ast.Subscript))


def parse_row(row, marker):
    """The table row's chain as an AST rooted at a placeholder for its module."""
    text = row["chain"].replace("{marker}", str(marker))
    return ast.parse("_ROW_MODULE_." + text, mode="eval").body
