"""Whether an object is held by its caller alone: the one place that reads CPython's reference
counts. The careful unpickler modifies (BUILD, SETITEM, APPEND, dill's `_create_array`) only
objects nothing else holds yet, and asks `held_only_by_caller`. The count it compares with is
measured at import (`_calibrate_refs`), never hard-coded per version, and `self_check` runs at
import: on an interpreter where the counts do not tell a sole object from a shared one (a
free-threaded build, an interpreter without CPython's counts) importing the package fails with
`ImportError` instead of letting the unpickler modify objects other users share.
"""
from __future__ import annotations

import sys
import sysconfig


# Sharing: a call may return an object others hold too (pytz._UTC() is pytz.utc, numpy.dtype("f8")
# numpy's float64 descriptor, a cached pandas offset), and BUILD, SETITEM or APPEND on it would
# change it for every user. A call result nothing but the call's return refers to is new; the
# careful unpickler refuses to modify any other (`_Unpickler._construct`).
def _refs(obj):
    return sys.getrefcount(obj)


def held_only_by_caller(obj, extra=0):
    """Whether nothing refers to `obj` but its caller: one local variable of the calling
    function (pass that variable: `held_only_by_caller(value)`), plus `extra` references the
    caller knows of and counts itself, each an entry in a container the caller owns (for the
    unpickler's BUILD target: 1 for its place on the unpickler's stack, 1 more when the memo
    holds it too). False when anything else holds it as well: a module global, a cache, a
    singleton, another container (immortal objects have huge counts: always False)."""
    return _refs(obj) == _SOLE_REFS + extra


def _probe(obj, extra=0):
    """What `held_only_by_caller` counts: `_refs` one call below the caller, the same frames."""
    return _refs(obj)


def _calibrate_refs():
    obj = object()
    return _probe(obj)


def _free_threaded():
    """A free-threaded build (PEP 703), whether its GIL is enabled at run time or not: objects
    shared between threads keep biased and deferred counts there, so a count says nothing."""
    is_gil_enabled = getattr(sys, "_is_gil_enabled", None)
    return (is_gil_enabled is not None and not is_gil_enabled()) or sysconfig.get_config_var("Py_GIL_DISABLED") == 1


def _interpreter():
    return f"Python {sys.version.split()[0]} ({sys.implementation.name}, {sys.platform})"


def _refuse_unreliable_interpreter():
    """ImportError where reference counts cannot say whether an object is shared."""
    if sys.implementation.name != "cpython" or not hasattr(sys, "getrefcount"):
        raise ImportError(f"ksrpc_executor needs CPython's reference counts (sys.getrefcount) to tell objects "
                          f"a request builds from objects others share; this is {_interpreter()}")
    if _free_threaded():
        raise ImportError(f"ksrpc_executor refuses to run on a free-threaded build ({_interpreter()}): its sharing "
                          f"checks read reference counts, which are not reliable there; run the server on a "
                          f"CPython build with the GIL")


def self_check():
    """Raise ImportError unless `held_only_by_caller`, on the running interpreter, says yes for
    a new object held by one local variable, no for the same object also stored in a list, and
    yes for it again when `extra=1` counts that list (run at import; tests call it again)."""
    _refuse_unreliable_interpreter()
    obj = object()
    if not held_only_by_caller(obj):
        raise ImportError(f"ksrpc_executor's sharing check fails on {_interpreter()}: expected a new object held "
                          f"by one local variable to be held only by its caller, but its count is {_probe(obj)} "
                          f"and the calibrated count is {_SOLE_REFS}")
    kept = [obj]
    if held_only_by_caller(obj):
        raise ImportError(f"ksrpc_executor's sharing check fails on {_interpreter()}: expected an object also "
                          f"stored in a list not to be held only by its caller, but its count is {_probe(obj)} "
                          f"and the calibrated count is {_SOLE_REFS}")
    if not held_only_by_caller(obj, extra=len(kept)):
        raise ImportError(f"ksrpc_executor's sharing check fails on {_interpreter()}: expected an object stored "
                          f"in one list to be held only by its caller with extra=1, but its count is "
                          f"{_probe(obj)} and the calibrated count is {_SOLE_REFS}")


_refuse_unreliable_interpreter()  # before reading any count
# What `_refs(x)` says for an object held by one local variable only (the interpreter's own
# temporaries differ between versions, so it is measured, with the call shape every use repeats:
# `held_only_by_caller`'s, which `_probe` copies).
_SOLE_REFS = _calibrate_refs()
self_check()
