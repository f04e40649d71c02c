"""The call trampoline: `_call` runs every call into user-reachable code from a frame that holds
nothing of the executor (`_py_call` with empty builtins for Python functions, `_c_call` with the
real builtins for C code), and `_clean_await` awaits coroutines from such a frame. It imports
nothing of the package.
"""
from __future__ import annotations

import builtins
import types


# ---------------------------------------------------------------------------
# The trampoline: every call into user-reachable code starts here
# ---------------------------------------------------------------------------
#
# Library code looks at its caller's frame: pandas resolves `@name` in it, numexpr and logging
# read it, anything may call sys._getframe(1). The executor's own frames hold its globals
# (importlib, builtins, sys, every user's generator handles), so user-reachable code is never
# called from them but from a frame whose locals are only the callable and its own arguments
# and whose globals hold no names but `__builtins__`. A Python function is called from a frame
# whose builtins are empty. C code is called from one with the real builtins, because C reads
# them from the calling frame: CPython's C import (PyImport_Import, used by numpy and datetime)
# takes `__import__` there, numpy's `tofile` takes `open`. C code does not resolve names a
# request chooses in its caller's frame; Python code it calls back (a partial's function) sees
# this frame, which holds builtins and nothing of the executor.
_PY_FRAME = {"__builtins__": {}}
_C_FRAME = {"__builtins__": builtins}
exec(compile("def _py_call(f, a, k):\n    return f(*a, **k)\n", "<ksrpc-call>", "exec"), _PY_FRAME)
exec(compile("def _c_call(f, a, k):\n    return f(*a, **k)\n\n"
             "async def _clean_await(aw):\n    return await aw\n", "<ksrpc-call>", "exec"), _C_FRAME)
_py_call = _PY_FRAME.pop("_py_call")
_c_call = _C_FRAME.pop("_c_call")
_clean_await = _C_FRAME.pop("_clean_await")


def _call(f, args, kwargs):
    """`f(*args, **kwargs)` from a trampoline frame (see above)."""
    kind = type(f)
    if kind is types.FunctionType or (kind is types.MethodType and type(f.__func__) is types.FunctionType):
        return _py_call(f, args, kwargs)
    return _c_call(f, args, kwargs)


_NO_KWARGS = types.MappingProxyType({})
