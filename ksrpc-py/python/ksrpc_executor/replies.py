"""Replies: the reply dict of the 0.8.1 protocol, exceptions made into ones the client can
unpickle (`_public_exception`), the 500 reply that never raises (`error_reply`), and the 200
reply pickled with modules by reference (`_ReplyPickler`), falling back to dill, then to a 500
(`_ok_reply`).
"""
from __future__ import annotations

import copyreg
import importlib
import io
import pickle
import sys
import traceback
import types
from datetime import datetime

from . import names  # `names.dill`: read through the module, tests patch it
from .names import _ExceptionGroup
from .requests import _one_line


# ---------------------------------------------------------------------------
# Replies
# ---------------------------------------------------------------------------

def _qualified(cls):
    name = getattr(cls, "__qualname__", cls.__name__)
    return name if cls.__module__ == "builtins" else f"{cls.__module__}.{name}"


def _safe_str(exc):
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _public_exception(exc):
    """An exception the 0.8.1 client can unpickle and `raise` (it raises `data` as it is).

    Builtin Exception subclasses (StopIteration and StopAsyncIteration included)
    are kept. SystemExit, KeyboardInterrupt and other BaseExceptions, exception
    groups and classes the client may not have become their nearest builtin
    Exception base with the message "module.Qualname: message".
    """
    cls = type(exc)
    if cls.__module__ == "builtins" and isinstance(exc, Exception) and not isinstance(exc, _ExceptionGroup):
        return exc
    msg = f"{_qualified(cls)}: {_safe_str(exc)}"
    for base in cls.__mro__:
        if base.__module__ == "builtins" and issubclass(base, Exception) and not issubclass(base, _ExceptionGroup):
            try:
                new = base(msg)
                pickle.loads(pickle.dumps(new))  # UnicodeError-like bases need more arguments
                return new
            except Exception:
                continue
    return RuntimeError(msg)


def _reply_dict(module, status, data, ref_id=0, calls=(), tb=None):
    return dict(status=status, datetime=datetime.now().isoformat(), module=module, calls=list(calls),
                ref_id=ref_id, type=type(data).__name__, data=data, traceback=tb)


def error_reply(module: str, exc: BaseException, tb: str = "") -> bytes:
    """A pickled 500 reply for `exc`; never raises."""
    module = module if isinstance(module, str) else "?"
    data = _public_exception(exc)
    try:
        return pickle.dumps(_reply_dict(module, 500, data, tb=tb or ""), protocol=5)
    except Exception as e:  # an argument of a builtin exception does not pickle
        try:
            text = repr(exc)
        except Exception:
            text = f"<unprintable {type(exc).__name__}>"
        data = RuntimeError(f"{text} (the exception did not pickle: {_one_line(repr(e))})")
        return pickle.dumps(_reply_dict(module, 500, data, tb=tb or ""), protocol=5)


def _reduce_module(m):
    """A module object goes by reference: the client imports its own copy, as the
    original's pickles do for installed modules, wherever the server loaded it from (dill
    would send a module outside site-packages by value, its whole __dict__, which the
    client cannot rebuild). A module not in sys.modules under its name goes to dill."""
    name = getattr(m, "__name__", None)
    if isinstance(name, str) and sys.modules.get(name) is m:
        return importlib.import_module, (name,)
    raise TypeError(f"cannot pickle module {name!r} by reference")


class _ReplyPickler(pickle.Pickler):
    """pickle.Pickler with modules by reference (a dispatch-table entry: looked up by
    exact type in C, so other objects cost nothing extra)."""

    dispatch_table = {**copyreg.dispatch_table, types.ModuleType: _reduce_module}


def _pickle_reply(d) -> bytes:
    buf = io.BytesIO()
    _ReplyPickler(buf, protocol=5).dump(d)
    return buf.getvalue()


def _ok_reply(module, data, ref_id=0, calls=()):
    """Pickle a 200 reply: pickle, then dill, else a 500 saying why."""
    d = _reply_dict(module, 200, data, ref_id, calls)
    try:
        return 200, _pickle_reply(d)
    except MemoryError:
        raise
    except Exception as e:
        first = e
    if names.dill is not None:
        try:
            return 200, names.dill.dumps(d, protocol=5)
        except MemoryError:
            raise
        except Exception:
            pass
    tb = "".join(traceback.format_exception(type(first), first, first.__traceback__))
    del d
    exc = RuntimeError(f"the result ({type(data).__name__}) could not be pickled: {_one_line(repr(first))}")
    return 500, error_reply(module, exc, tb)
