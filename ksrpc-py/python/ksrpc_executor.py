"""Server-side call logic of the ksrpc 0.8.1 compatible server.

The Rust server embeds CPython, imports this module and calls
`Executor.handle` from a pool of Python threads. One call: decode the request
pickle with a restricted unpickler, resolve the call chain under the user's
rules, and pickle the reply. See protocol-ksrpc-0.8.1.md for the format and
the chain rules; the comments here say why things are done the way they are.
"""
from __future__ import annotations

import asyncio
import builtins
import collections.abc
import concurrent.futures
import copyreg
import ctypes
import decimal
import fractions
import functools
import importlib
import importlib.util
import inspect
import io
import itertools
import math
import pickle
import re
import secrets
import sys
import threading
import time
import traceback
import types
from datetime import datetime
from fnmatch import fnmatchcase

import ksrpc_capability as _capability

try:  # dill is optional: plain pickles work without it.
    import dill
    import dill._dill as _dill_impl
except Exception:  # pragma: no cover - depends on the environment
    dill = _dill_impl = None

__all__ = ["Executor", "error_reply", "generate_stub", "DEFAULT_UNPICKLE_ALLOW", "SAFE_DUNDERS"]

_PY_MINOR = f"{sys.version_info[0]}.{sys.version_info[1]}"
_MISSING = object()
_ExceptionGroup = getattr(builtins, "BaseExceptionGroup", ())  # Python >= 3.11

# ---------------------------------------------------------------------------
# What a request pickle may name
# ---------------------------------------------------------------------------

_BUILTIN_VALUE_TYPES = ("int", "float", "complex", "str", "bytes", "bytearray", "list", "tuple",
                        "dict", "set", "frozenset", "slice", "range", "bool")
# Exception classes are plain data too (a pickled ValueError is an argument, not code).
_BUILTIN_EXCEPTIONS = tuple(sorted(n for n, v in vars(builtins).items()
                                   if isinstance(v, type) and issubclass(v, BaseException)))

# pandas' date offset classes (a wildcard would also hand out its cached helpers such as
# to_offset, whose shared results a BUILD could then change for every user).
_PANDAS_OFFSETS = (
    "BQuarterBegin", "BQuarterEnd", "BYearBegin", "BYearEnd", "BusinessDay", "BusinessHour",
    "BusinessMonthBegin", "BusinessMonthEnd", "CustomBusinessDay", "CustomBusinessHour",
    "CustomBusinessMonthBegin", "CustomBusinessMonthEnd", "DateOffset", "Day", "Easter", "FY5253",
    "FY5253Quarter", "Hour", "LastWeekOfMonth", "Micro", "Milli", "Minute", "MonthBegin", "MonthEnd",
    "Nano", "QuarterBegin", "QuarterEnd", "Second", "SemiMonthBegin", "SemiMonthEnd", "Week",
    "WeekOfMonth", "YearBegin", "YearEnd",
)

DEFAULT_UNPICKLE_ALLOW = (
    # the client's classes (our stand-ins, or the real package when installed)
    "ksrpc.client:RpcCall", "ksrpc.client:_Self", "ksrpc.client:RpcClient",
    *(f"builtins:{n}" for n in _BUILTIN_VALUE_TYPES),
    *(f"builtins:{n}" for n in _BUILTIN_EXCEPTIONS),
    "builtins:Ellipsis", "builtins:NotImplemented",
    "copyreg:_reconstructor", "_codecs:encode",
    "datetime:date", "datetime:time", "datetime:datetime", "datetime:timedelta", "datetime:timezone",
    "decimal:Decimal", "fractions:Fraction", "uuid:UUID",
    "collections:OrderedDict", "collections:deque", "collections:Counter", "collections:defaultdict",
    "zoneinfo:ZoneInfo",  # its pickle also needs getattr(ZoneInfo, '_unpickle'), see _Unpickler._getattr
    # numpy 2 (numpy._core) and numpy 1 (numpy.core)
    "numpy:ndarray", "numpy:dtype",
    "numpy._core.multiarray:_reconstruct", "numpy._core.multiarray:scalar",
    "numpy.core.multiarray:_reconstruct", "numpy.core.multiarray:scalar",
    "numpy._core.numeric:_frombuffer", "numpy.core.numeric:_frombuffer",
    "numpy._core._internal:_convert_to_stringdtype_kwargs",
    # pandas 2 (found by unpickling DataFrame, Series, indexes, Categorical, timestamps...)
    "pandas.core.frame:DataFrame", "pandas.core.series:Series",
    "pandas.core.internals.managers:BlockManager", "pandas.core.internals.managers:SingleBlockManager",
    "pandas._libs.internals:_unpickle_block",
    "pandas.core.indexes.base:_new_Index", "pandas.core.indexes.base:Index",
    "pandas.core.indexes.range:RangeIndex", "pandas.core.indexes.multi:MultiIndex",
    "pandas.core.indexes.datetimes:_new_DatetimeIndex", "pandas.core.indexes.datetimes:DatetimeIndex",
    "pandas.core.indexes.timedeltas:TimedeltaIndex", "pandas.core.indexes.period:PeriodIndex",
    "pandas._libs.arrays:__pyx_unpickle_NDArrayBacked",
    "pandas.core.arrays.datetimes:DatetimeArray", "pandas.core.arrays.timedeltas:TimedeltaArray",
    "pandas.core.arrays.period:PeriodArray", "pandas.core.arrays.categorical:Categorical",
    "pandas.core.dtypes.dtypes:CategoricalDtype", "pandas.core.dtypes.dtypes:DatetimeTZDtype",
    "pandas.core.dtypes.dtypes:PeriodDtype",
    "pandas._libs.tslibs.timestamps:_unpickle_timestamp", "pandas._libs.tslibs.timestamps:Timestamp",
    "pandas._libs.tslibs.timedeltas:_timedelta_unpickle", "pandas._libs.tslibs.timedeltas:Timedelta",
    "pandas._libs.tslibs.nattype:__nat_unpickle", "pandas._libs.tslibs.period:Period",
    *(f"pandas._libs.tslibs.offsets:{n}" for n in _PANDAS_OFFSETS), "pandas._libs.missing:NA",
    "pytz:_p", "pytz:_UTC",
    # dill's data helpers; each resolves to a checked stand-in (see _Unpickler), never the original
    "dill._dill:_create_array", "dill._dill:_load_type", "dill._dill:_eval_repr",
)

# Type names dill's _load_type may return without code rights (never FunctionType, CodeType...).
_PLAIN_TYPES = {n: getattr(builtins, n) for n in _BUILTIN_VALUE_TYPES + _BUILTIN_EXCEPTIONS}
_PLAIN_TYPES.update(NoneType=type(None), EllipsisType=type(...), NotImplementedType=type(NotImplemented))
_RANGE_REPR = re.compile(r"range\((-?\d{1,30}), (-?\d{1,30})(?:, (-?\d{1,30}))?\)")

# Globals that build code or reach interpreter internals (what dill emits for a lambda, a local
# function, a closure or a class defined in the client's __main__; `<module>.__dict__` is the
# globals of a function defined in an importable module).
_CODE_MODULES = ("__main__", "dill", "dill._dill")
_CODE_GLOBALS = {("__builtin__", "__main__"), ("builtins", "getattr"), ("builtins", "setattr")}
_DILL_DATA = {"_create_array", "_load_type", "_eval_repr"}

# Containers whose items the argument check looks into; types that are data when passed as
# values (dtype=float), not code to run.
_CONTAINERS = (list, tuple, dict, set, frozenset)
_PLAIN_TYPE_VALUES = (int, float, complex, bool, str, bytes, type(None))
_PLAIN_TYPE_VALUES_SET = frozenset({int, float, complex, bool, str, type(None), type(...), type(NotImplemented)})

# Dunder names any user may use in a chain; the others (__globals__, __class__, __dict__,
# __subclasses__, __reduce__...) lead to interpreter internals and need 'builtins' rights.
SAFE_DUNDERS = frozenset({
    "__getitem__", "__call__", "__next__", "__anext__", "__len__", "__doc__", "__name__",
    "__qualname__", "__file__", "__version__", "__all__", "__str__", "__repr__", "__int__",
    "__float__", "__bool__", "__contains__", "__iter__", "__aiter__",
})
# Objects that expose globals or builtins without a dunder name (gen.gi_frame.f_builtins...).
_INTERNAL_TYPES = (types.FrameType, types.CodeType, types.TracebackType, getattr(types, "CellType", ()))
_ADVANCE = ("__next__", "__anext__")
# Names whose call parses a format string that reaches attributes and items on its own.
_FORMATTERS = frozenset({"format", "format_map", "vformat"})


def _is_dunder(name):
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


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


class _Refused(PermissionError):
    """The request pickle names or builds something this user may not load."""


class _NeedsDill(ImportError):
    """The request pickle needs dill, which is not installed."""


def _parse_allow(entries):
    exact, wild = set(), set()
    for entry in entries:
        module, sep, name = str(entry).partition(":")
        if not sep or not module or not name:
            raise ValueError(f"unpickle_allow entry {entry!r} is not 'module:name' or 'module:*'")
        (wild.add(module) if name == "*" else exact.add((module, name)))
    return frozenset(exact), frozenset(wild)


class _Policy:
    """What any request may name: exact (module, name) pairs, whole modules, and code or not."""
    __slots__ = ("exact", "wild", "allow_code")

    def __init__(self, exact, wild, allow_code):
        self.exact, self.wild, self.allow_code = exact, wild, allow_code


def _lookup(module, name):
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _module_of(obj):
    mod = getattr(obj, "__module__", None)
    return mod if isinstance(mod, str) else type(obj).__module__


# ---------------------------------------------------------------------------
# What a request pickle may build
# ---------------------------------------------------------------------------
#
# Naming only allowed globals is not enough: calling them can build far more than the request
# holds, objects other users share, or numpy/pandas objects whose C code trusts the pickled state.
#
# Size: a pickle spells its data out, except where a call makes more than its arguments hold:
# bytes(10**9), list(range(10**9)), numpy's _reconstruct with a big shape, Fraction("1e300000000"),
# or one memoized list copied by a thousand tuple() calls. The careful unpickler charges every
# call's result and every BUILD target to a budget of _BUILD_BUDGET bytes plus _BUILD_PER_BYTE per
# request byte, after the call by the object's size and before it where the size comes from an
# argument (a count, a shape, a lazy sequence), so that memory is never taken. Real pickles build
# a few times their own size at most (arrays 1x, a protocol 2 set of small ints ~10x): the budget
# only stops amplification. The C unpickler cannot charge anything, so it hands every global whose
# calls need these checks back to the careful one (`_FastUnpickler.find_class`).
_BUILD_BUDGET = 64 << 20
_BUILD_PER_BYTE = 16
# What one item of a lazy sequence (a range, a pandas RangeIndex, a str turned into a list) costs
# once a call makes it a Python object: a pointer and a small object.
_ITEM_BYTES = 64
# Fraction and Decimal pickle as str, and str(int) stops at CPython's default int_max_str_digits,
# so real pickles never hold longer numbers; beyond that, Fraction's 10**exponent and Decimal(int)
# take quadratic time while holding the GIL.
_MAX_DIGITS = 4300
_MAX_BITS = _MAX_DIGITS * 10 // 3 + 1

# numpy and pandas: their C and Cython code indexes memory with numbers from the pickled state
# (a dtype's fields and flags, Categorical codes, block placements), so objects of these libraries
# are only built the way their own pickles build them, and checked (`_check_made`).
_LIBRARIES = frozenset({"numpy", "pandas"})
# The classes a real pickle calls with arguments (any date offset: "module", "*"); the others
# come out of NEWOBJ without arguments (DataFrame, Series, pandas dtypes) and get their state by
# BUILD. Constructors such as Series(0, index=RangeIndex(10**9)) would broadcast without bound.
_LIB_CLASS_CALLS = frozenset({
    ("numpy", "dtype"), ("pandas._libs.tslibs.period", "Period"), ("pandas.core.dtypes.dtypes", "PeriodDtype"),
    ("pandas.core.arrays.string_", "StringDtype"), ("pandas.core.internals.managers", "BlockManager"),
    ("pandas._libs.tslibs.offsets", "*"),
})
_NPY_ALIGNED_STRUCT = 0x80  # numpy's dtype flag for align=True structures


def _root(module):
    return module.partition(".")[0] if isinstance(module, str) else ""


def _lib_type(cls):
    """A numpy/pandas class, or a class built on one (a user module's DataFrame subclass)."""
    return any(_root(getattr(c, "__module__", None)) in _LIBRARIES for c in cls.__mro__)


def _in_libraries(obj):
    return _lib_type(type(obj))


# Sharing: a call may return an object others hold too (pytz._UTC() is pytz.utc, numpy.dtype("f8")
# numpy's float64 descriptor, a cached pandas offset), and BUILD, SETITEM or APPEND on it would
# change it for every user. A call result nothing but the call's return refers to is new; the
# careful unpickler refuses to modify any other (`_Unpickler._construct`).
def _refs(obj):
    return sys.getrefcount(obj)


def _calibrate_refs():
    obj = object()
    return _refs(obj)


# What `_refs(x)` says for an object held by one local variable only (the interpreter's own
# temporaries differ between versions, so it is measured, with the call shape every use repeats).
_SOLE_REFS = _calibrate_refs()


def _length(value, what):
    try:
        return len(value)
    except (TypeError, OverflowError):  # an object without len, or len(range(10**20))
        raise _Refused(f"{what}: an argument of unknown or huge length") from None


# Containers whose items already exist: a copy of one is charged after the call, by its size.
_HOLDS_ITEMS = (list, tuple, dict, set, frozenset, bytes, bytearray, collections.deque)


def _items_cost(value, what):
    """What a container built from `value` may take before the call returns."""
    if value is None or isinstance(value, _HOLDS_ITEMS):
        return 0
    return _length(value, what) * _ITEM_BYTES


def _bytes_cost(args, kwargs, what):  # bytes(n) and bytearray(n) are n zero bytes
    source = args[0] if args else kwargs.get("source")
    if isinstance(source, int):
        return max(source, 0)
    if isinstance(source, str):  # encoded, at most 4 bytes a character, measured after the call
        return 0
    return _items_cost(source, what)


def _first_items_cost(args, kwargs, what):  # list(x), tuple(x), set(x), dict(x), deque(x)...
    return _items_cost(args[0] if args else None, what)


def _defaultdict_cost(args, kwargs, what):  # defaultdict(factory, x)
    return _items_cost(args[1] if len(args) > 1 else None, what)


def _group_cost(args, kwargs, what):  # ExceptionGroup(message, exceptions) copies the list
    return 8 * _length(args[1], what) if len(args) > 1 else 0


def _check_digits(value, what):
    """Refuse a number Fraction or Decimal would spend quadratic time on (see _MAX_DIGITS)."""
    if isinstance(value, int) and value.bit_length() > _MAX_BITS:
        raise _Refused(f"{what}: an integer of more than {_MAX_DIGITS} digits")
    if isinstance(value, str):  # "123/456" or "1.5e-7"; the exponent is the costly part
        exponent = re.search(r"[eE]\s*[-+]?([\d_]+)", value)
        digits = exponent.group(1).replace("_", "").lstrip("0") if exponent else ""
        if len(value) > 2 * _MAX_DIGITS + 64 or len(digits) > 6 or (digits and int(digits) > _MAX_DIGITS):
            raise _Refused(f"{what}: a number of more than {_MAX_DIGITS} digits")
    if isinstance(value, decimal.Decimal) and value.is_finite() and (
            abs(value.adjusted()) > _MAX_DIGITS or len(value.as_tuple().digits) > _MAX_DIGITS):
        raise _Refused(f"{what}: a decimal of more than {_MAX_DIGITS} digits")


def _fraction_cost(args, kwargs, what):
    for value in itertools.chain(args, kwargs.values()):
        _check_digits(value, what)
    return 0


def _decimal_cost(args, kwargs, what):
    # Decimal(int) is quadratic; Decimal(str) is linear itself, but a huge exponent makes the
    # value's int() quadratic later ("1e999999999" is 11 bytes).
    value = args[0] if args else kwargs.get("value")
    if isinstance(value, int):
        _check_digits(value, what)
    elif isinstance(value, str):  # many digits are fine (linear); an exponent is not
        exponent = re.search(r"[eE]\s*[-+]?([\d_]+)", value)
        digits = exponent.group(1).replace("_", "").lstrip("0") if exponent else ""
        if len(digits) > 6 or (digits and int(digits) > _MAX_DIGITS):
            raise _Refused(f"{what}: a decimal exponent beyond {_MAX_DIGITS}")
    elif isinstance(value, tuple) and len(value) == 3 and isinstance(value[2], int) and abs(value[2]) > _MAX_DIGITS:
        raise _Refused(f"{what}: a decimal exponent beyond {_MAX_DIGITS}")
    return 0


_TYPE_COSTS = {
    bytes: _bytes_cost, bytearray: _bytes_cost, list: _first_items_cost, tuple: _first_items_cost,
    set: _first_items_cost, frozenset: _first_items_cost, dict: _first_items_cost,
    collections.deque: _first_items_cost, collections.defaultdict: _defaultdict_cost,
    fractions.Fraction: _fraction_cost, decimal.Decimal: _decimal_cost,
}
if _ExceptionGroup:
    _TYPE_COSTS[_ExceptionGroup] = _group_cost


def _array_cost(shape, dtype, what):
    np = sys.modules["numpy"]
    dims = (shape,) if isinstance(shape, int) else shape
    if not (isinstance(dims, tuple) and len(dims) <= 64 and all(isinstance(d, int) for d in dims)):
        raise _Refused(f"{what}: a numpy shape must be a tuple of ints")
    return math.prod(max(d, 0) for d in dims) * np.dtype(dtype).itemsize


def _reconstruct_cost(args, kwargs, what):  # _reconstruct(ndarray, shape, dtype) allocates the shape
    return _array_cost(args[1], args[2], what) if len(args) == 3 else 0


def _scalar_cost(args, kwargs, what):  # scalar(dtype) without bytes allocates one zeroed item
    np = sys.modules["numpy"]
    return args[0].itemsize if args and isinstance(args[0], np.dtype) else 0


def _index_cost(args, kwargs, what):
    # _new_Index(cls, d) runs cls.__new__(cls, **d): cls must be an index (bytes(source=10**9)...)
    from pandas import Index
    if len(args) != 2 or not (isinstance(args[0], type) and issubclass(args[0], Index)) or type(args[1]) is not dict:
        raise _Refused(f"{what}: needs a pandas Index class and a dict")
    return 0


def _no_cost(args, kwargs, what):
    return 0


def _encode_cost(args, kwargs, what):
    # Protocol 2 pickles bytes as _codecs.encode(text, "latin1"); other codecs are not data
    # (punycode takes quadratic time).
    import codecs
    encoding = args[1] if len(args) > 1 else kwargs.get("encoding", "utf-8")
    if not isinstance(encoding, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise _Refused(f"{what}: only the latin-1 codec is accepted")
    return 0


# Functions a pickle may call whose arguments need a look first, keyed by (__module__, __qualname__).
# Every numpy or pandas function not listed here is refused: these are their pickle helpers.
_FUNCTION_COSTS = {
    ("_codecs", "encode"): _encode_cost,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_cost,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_cost,
    ("numpy._core.multiarray", "scalar"): _scalar_cost, ("numpy.core.multiarray", "scalar"): _scalar_cost,
    ("numpy._core.numeric", "_frombuffer"): _no_cost, ("numpy.core.numeric", "_frombuffer"): _no_cost,
    ("numpy._core._internal", "_convert_to_stringdtype_kwargs"): _no_cost,
    ("pandas._libs.internals", "_unpickle_block"): _no_cost,
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"): _no_cost,
    ("pandas.core.indexes.base", "_new_Index"): _index_cost,
    ("pandas.core.indexes.datetimes", "_new_DatetimeIndex"): _index_cost,
    ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp"): _no_cost,
    ("pandas._libs.tslibs.timedeltas", "_timedelta_unpickle"): _no_cost,
    ("pandas._libs.tslibs.nattype", "__nat_unpickle"): _no_cost,
}


def _lazy_cost(args, kwargs, what):
    """For a numpy/pandas call: _ITEM_BYTES per item of each lazy sequence among its arguments
    (and one level into lists, tuples and dicts), which the call may turn into an array."""
    pd = sys.modules.get("pandas")
    lazy = (range, pd.RangeIndex) if pd is not None else (range,)
    total = 0
    for arg in itertools.chain(args, kwargs.values()):
        inner = arg.values() if type(arg) is dict else arg if type(arg) in (list, tuple) else ()
        for value in itertools.chain((arg,), inner):
            if isinstance(value, lazy):
                total += _length(value, what) * _ITEM_BYTES
    return total


def _footprint(obj):
    """Bytes a newly built object holds, for the build budget."""
    try:
        if _in_libraries(obj):  # arrays and pandas objects count their data; deep sizes would be slow
            return int(obj.nbytes) if hasattr(type(obj), "nbytes") else object.__sizeof__(obj)
        return sys.getsizeof(obj, 0)
    except Exception:  # a half-built object (its state comes by a later BUILD) holds nothing yet
        return 0


def _dtype_state(target, state):
    """The state a BUILD may give the numpy dtype `target`: the one numpy writes for the dtype its
    constructor makes from `state`; a refusal when that differs from `state`.

    dtype.__setstate__ trusts its input: an object field with the object flag cleared makes numpy
    read raw pickle bytes as object pointers (a crash on the first str()); a field offset past the
    item size reads out of bounds.
    """
    np = sys.modules["numpy"]
    where = f"numpy dtype {target!r}: the pickled state is not one numpy writes"
    if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
        raise _Refused(where)
    _, endian, subarray, names, fields, elsize, _, flags = state[:8]
    extra = state[8] if len(state) == 9 else None
    try:
        metadata = extra
        if names is not None:
            entries = [fields[n] for n in names]
            made = np.dtype({"names": list(names), "formats": [e[0] for e in entries],
                             "offsets": [e[1] for e in entries], "itemsize": elsize,
                             "titles": [e[2] if len(e) == 3 else None for e in entries]},
                            align=bool(flags & _NPY_ALIGNED_STRUCT))
        elif subarray is not None:
            made = np.dtype((subarray[0], subarray[1]))
        elif target.kind in "mM":  # extra = (metadata, (unit, count, 1, 1))
            metadata, (unit, count, _, _) = extra
            unit = unit.decode("ascii") if isinstance(unit, bytes) else unit
            made = np.dtype(f"{target.char}8" + ("" if unit == "generic" else f"[{int(count)}{unit}]"))
        else:
            made = target
        if endian in ("<", ">") and made.byteorder != "|":
            made = made.newbyteorder(endian)
        if metadata is not None:
            made = np.dtype(made, metadata=metadata)
        want = made.__reduce__()[2]
        native = "<" if sys.byteorder == "little" else ">"
        same = (type(made) is type(target) and made.type is target.type
                and state[:1] + (native if endian == "=" else endian,) + state[2:] == want)
    except Exception:
        raise _Refused(where) from None
    if not same:
        raise _Refused(where)
    return want


@functools.cache
def _pandas_kinds():
    from pandas import Categorical, DataFrame, MultiIndex, Series
    from pandas._libs.arrays import NDArrayBacked
    from pandas._libs.tslibs.offsets import BaseOffset
    from pandas.core.arrays.masked import BaseMaskedArray
    from pandas.core.dtypes.base import ExtensionDtype
    from pandas.core.generic import NDFrame
    from pandas.core.internals.managers import BlockManager, SingleBlockManager
    return types.SimpleNamespace(
        backed=NDArrayBacked, categorical=Categorical, masked=BaseMaskedArray, multi_index=MultiIndex,
        block_manager=BlockManager, single_manager=SingleBlockManager, frame=DataFrame, series=Series,
        # what real pandas pickles give a state by BUILD; blocks, indexes, placements never get one
        buildable=(NDFrame, SingleBlockManager, NDArrayBacked, BaseMaskedArray, ExtensionDtype, BaseOffset))


def _buildable(obj):
    """numpy/pandas objects a BUILD may give a state: the kinds real pickles BUILD."""
    np, pd = sys.modules.get("numpy"), sys.modules.get("pandas")
    return ((np is not None and isinstance(obj, (np.dtype, np.ndarray)))
            or (pd is not None and isinstance(obj, _pandas_kinds().buildable)))


def _check_made(obj):
    """Refuse a pandas object whose pickled numbers its Cython code would use unchecked (out of
    range Categorical codes, MultiIndex codes, lengths that differ between an index and its
    values read and write out of bounds). Half-built objects (their state comes by a later
    BUILD) pass and are checked after it."""
    if "pandas" not in sys.modules or not _in_libraries(obj):
        return
    kinds = _pandas_kinds()
    bad = None
    if isinstance(obj, kinds.backed) and obj._ndarray is None:
        # Half built (pandas pickles give the state by a later BUILD, or a BUILD set None): its
        # Cython methods read _ndarray's fields without a None check (.nbytes, .copy()).
        kinds.backed.__setstate__(obj, (sys.modules["numpy"].empty(0, "int8"), None, {}))
    if isinstance(obj, kinds.categorical):
        codes = obj._ndarray
        if codes.dtype.kind not in "iu":
            bad = "Categorical codes that are not integers"
        elif codes.size and (codes.min() < -1 or codes.max() >= len(obj.dtype.categories)):
            bad = "Categorical codes outside its categories"
    elif isinstance(obj, kinds.masked):
        data, mask = obj.__dict__.get("_data"), obj.__dict__.get("_mask")
        if data is not None and not (getattr(mask, "dtype", None) == bool and mask.shape == data.shape):
            bad = "a masked array whose mask does not match its values"
    elif isinstance(obj, kinds.multi_index):
        obj._verify_integrity()
    elif isinstance(obj, kinds.single_manager):
        axes, blocks = getattr(obj, "axes", None), getattr(obj, "blocks", None)
        if axes is not None and not (len(axes) == 1 and len(blocks) == 1 and blocks[0].values.ndim == 1
                                     and len(blocks[0].values) == len(axes[0])):
            bad = "a Series block that does not match its index"
    elif isinstance(obj, kinds.block_manager):
        if getattr(obj, "axes", None) is not None:
            obj._verify_integrity()
            obj._rebuild_blknos_and_blklocs()  # refuses placements out of range or overlapping
    elif isinstance(obj, (kinds.frame, kinds.series)):
        mgr = obj.__dict__.get("_mgr")
        want = kinds.block_manager if isinstance(obj, kinds.frame) else kinds.single_manager
        if mgr is not None and not isinstance(mgr, want):
            bad = f"a {type(obj).__name__} whose data is a {type(mgr).__name__}"
    if bad:
        raise _Refused(f"the request pickle holds {bad}")


class _NeedsCareful(Exception):
    """The C unpickler met a global whose calls need the careful unpickler's checks."""


class _Unpickler(pickle._Unpickler):
    """Restricted unpickler: every global is checked by `find_class`.

    It is the pure-Python unpickler (dill's Unpickler is the C one) because it
    also has to watch the opcodes that call and modify objects: with the C one
    a pickle could `setattr` an allowed class (say pandas.DataFrame.__getitem__)
    or a cached object (pytz.utc) for every user of the server, build gigabytes
    from a few bytes, or hand numpy a dtype whose state makes it read pickle
    bytes as pointers. See "What a request pickle may build" above. dill's own
    find_class special cases are reproduced below.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, payload, policy, rules):
        super().__init__(io.BytesIO(payload))
        self._policy = policy
        self._rules = rules
        self._code_ok = None  # computed on first need (asks the rules once)
        self._handed_out = {}  # id -> object for every global returned (keeps the ids valid)
        self._shared = {}  # id -> call result something else also held (a singleton, a cache entry)
        # id -> memo key a numpy/pandas object made by a call gets if the pickle memoizes it next,
        # as pickles do (see _load_build); a plain dict: counting every memo entry costs 30%.
        self._memo_key = {}
        self._budget_total = self._budget = _BUILD_BUDGET + _BUILD_PER_BYTE * len(payload)

    # -- find_class --------------------------------------------------------
    def find_class(self, module, name):
        if module == "dill.dill":
            module = "dill._dill"
        if (module, name) == ("__builtin__", "NoneType"):  # as dill does
            return type(None)
        if self.proto < 3 and (module, name) != ("__builtin__", "__main__"):
            import _compat_pickle  # Python 2 names, as pickle's own find_class maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _CODE_GLOBALS or (module in _CODE_MODULES and name not in _DILL_DATA) or name == "__dict__":
            obj = self._code_global(module, name)  # with code rights a module is fine (dill closures use dill._dill)
        else:
            obj = self._data_global(module, name)
            if inspect.ismodule(obj):
                raise _Refused(f"global {module}.{name} is refused: it is a module")
        self._handed_out[id(obj)] = obj
        return obj

    def _code_global(self, module, name):
        if (module, name) == ("builtins", "getattr"):
            return self._getattr  # checks each use: plain zoneinfo pickles need one getattr
        self._check_code(f"{module}.{name}")
        if (module, name) == ("__builtin__", "__main__"):
            return _dill_impl._main_module.__dict__
        return pickle._Unpickler.find_class(self, module, name)

    def _data_global(self, module, name):
        if (module, name) in self._policy.exact:
            if module == "dill._dill":  # checked stand-ins; they also work without dill
                return getattr(self, name)
            return _lookup(module, name)
        where = f"global {module}.{name} is refused"
        if "." in name:  # protocol 4 resolves dotted names: random._os.system
            raise _Refused(f"{where}: dotted names are only loaded when listed in unpickle_allow")
        if _is_dunder(name) or name.startswith("_"):
            raise _Refused(f"{where}: private and dunder names are only loaded when listed in unpickle_allow")
        if module in self._policy.wild:
            obj = _lookup(module, name)
            # module:* means the module's own names, not what it imported from elsewhere
            if _module_of(obj).split(".")[0] != module.split(".")[0]:
                raise _Refused(f"{where}: it comes from {_module_of(obj)}, outside {module}")
            return obj
        if not self._rules.allows(module):
            raise _Refused(f"{where}: not in unpickle_allow and module {module!r} is not allowed for this user")
        obj = _lookup(module, name)
        if inspect.ismodule(obj):
            return obj  # refused by find_class
        if callable(obj) and not self._rules.allows("builtins"):
            try:  # the unpickler calls what it loads: the capability rule decides, as for chains
                _capability.check_call(self._rules, "this user", obj, (module,), f"global {module}.{name}")
            except PermissionError as e:
                raise _Refused(str(e)) from None
        elif not self._rules.allows(_module_of(obj)):
            raise _Refused(f"{where}: it comes from module {_module_of(obj)!r}, which is not allowed for this user")
        return obj

    def _check_code(self, what):
        if self._code_ok is None:
            self._code_ok = bool(self._policy.allow_code and self._rules.allows("builtins"))
        if not self._code_ok:
            if not self._policy.allow_code:
                raise _Refused(f"code objects are refused: python.allow_code is false (server runs Python "
                               f"{_PY_MINOR}; dill code only loads on the same minor); the request needs {what}")
            raise _Refused(f"code objects are refused: the user's rules do not allow 'builtins'; "
                           f"the request needs {what}")
        if dill is None:
            raise _NeedsDill(f"the request needs {what}, but dill is not installed on the server")

    # -- stand-ins for dill's data helpers ------------------------------------
    def _load_type(self, name):
        t = _PLAIN_TYPES.get(name)
        if t is not None:
            return t
        self._check_code(f"dill._dill._load_type({name!r})")
        return _dill_impl._load_type(name)

    def _eval_repr(self, text):
        # dill pickles range, Ellipsis and NotImplemented as eval(repr): parse those, eval nothing.
        if text in ("Ellipsis", "NotImplemented"):
            return getattr(builtins, text)
        m = _RANGE_REPR.fullmatch(str(text))
        if m:
            return range(*(int(g) for g in m.groups() if g is not None))
        self._check_code(f"dill._dill._eval_repr({str(text)[:60]!r})")
        return _dill_impl._eval_repr(text)

    def _getattr(self, obj, name, *default):
        zoneinfo = sys.modules.get("zoneinfo")
        if zoneinfo is not None and obj is zoneinfo.ZoneInfo and name == "_unpickle":
            return obj._unpickle
        self._check_code(f"builtins.getattr(..., {str(name)[:60]!r})")
        return getattr(obj, name, *default)

    def _create_array(self, f, args, state, npdict=None):
        array = self._construct(f, args)
        np = sys.modules.get("numpy")
        if np is None or not isinstance(array, np.ndarray):
            raise _Refused("dill._dill._create_array only rebuilds numpy arrays")
        if _refs(array) != _SOLE_REFS:  # as for BUILD: only an array nothing else holds yet
            raise _Refused("dill._dill._create_array got an array that is already in use")
        array.__setstate__(state)
        self._made(array)
        if npdict is not None:
            array.__dict__.update(npdict)
        return array

    # -- calls ------------------------------------------------------------------
    def _construct(self, func, args, kwargs=None, new=False):
        """`func(*args, **kwargs)`, or `func.__new__(func, ...)` for NEWOBJ, under the rules of
        "What a request pickle may build"."""
        if type(args) is not tuple or not (kwargs is None or type(kwargs) is dict):
            raise _Refused("a pickled call's arguments must be a tuple (and its keywords a dict)")
        kwargs = kwargs or {}
        if new and not isinstance(func, type):
            raise _Refused(f"NEWOBJ needs a class, not {type(func).__name__}")
        self._before_call(func, args, kwargs, new)
        value = func.__new__(func, *args, **kwargs) if new else func(*args, **kwargs)
        if _refs(value) != _SOLE_REFS:
            self._shared[id(value)] = value  # not this request's to modify
            _check_made(value)
        else:
            self._made(value)
            if _in_libraries(value):
                self._memo_key[id(value)] = len(self.memo)
        return value

    def _before_call(self, func, args, kwargs, new):
        what = getattr(func, "__qualname__", None) or type(func).__name__
        if isinstance(func, type):
            if _lib_type(func):
                if new and (args or kwargs):
                    raise _Refused(f"{what}: numpy and pandas objects are built from their pickled state, "
                                   f"not from constructor arguments")
                if not new and not {(func.__module__, func.__qualname__), (func.__module__, "*")} & _LIB_CLASS_CALLS:
                    raise _Refused(f"{what}: this numpy/pandas class is not called while loading a request")
                self._charge(_lazy_cost(args, kwargs, what), what)
            cost = next((_TYPE_COSTS[b] for b in func.__mro__ if b in _TYPE_COSTS), None)
            if cost is not None:
                self._charge(cost(args, kwargs, what), what)
        elif func is copyreg._reconstructor:  # base.__new__(cls, state), then base.__init__(obj, state)
            if len(args) == 3 and isinstance(args[0], type) and isinstance(args[1], type):
                if args[1] is not object:
                    self._before_call(args[1], args[2:], {}, False)
                self._before_call(args[0], (), {}, True)
        else:
            module = getattr(func, "__module__", None)
            cost = _FUNCTION_COSTS.get((module, getattr(func, "__qualname__", None)))
            if cost is None and _root(module) in _LIBRARIES:
                raise _Refused(f"{what}: only numpy/pandas pickle helpers are called while loading a request")
            if cost is not None:
                self._charge(cost(args, kwargs, what), what)
            if _root(module) in _LIBRARIES:
                self._charge(_lazy_cost(args, kwargs, what), what)

    def _charge(self, nbytes, what):
        self._budget -= nbytes
        if self._budget < 0:
            raise _Refused(f"the request pickle builds more than its budget of {self._budget_total:,} bytes "
                           f"({_BUILD_BUDGET:,} + {_BUILD_PER_BYTE} per request byte), at {what}")

    def _made(self, obj):
        _check_made(obj)
        self._charge(_footprint(obj), type(obj).__name__)

    def _load_reduce(self):
        stack = self.stack
        args = stack.pop()
        stack[-1] = self._construct(stack[-1], args)

    def _load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._construct(cls, args, new=True))

    def _load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._construct(cls, args, kwargs, new=True))

    def _instantiate(self, klass, args):  # OBJ and INST, as pickle._Unpickler does them
        if args or not isinstance(klass, type) or hasattr(klass, "__getinitargs__"):
            self.append(self._construct(klass, tuple(args)))
        else:
            self.append(self._construct(klass, (), new=True))

    # -- modifications ----------------------------------------------------------
    def _guard_target(self, target, kinds=None):
        if target is None or self._code_ok:  # code rights can do anything anyway (dill BUILDs functions)
            return
        if id(target) in self._shared:
            raise _Refused(f"the pickle tries to modify a {type(target).__name__} object that a call returned and "
                           f"others share (a singleton or a cached object); only objects the pickle creates itself "
                           f"may be modified")
        if id(target) in self._handed_out or isinstance(target, (type, types.ModuleType)) or inspect.isroutine(target):
            raise _Refused(f"the pickle tries to modify {type(target).__name__} {getattr(target, '__name__', '')!r}"
                           f" in place; only objects it creates itself may be modified")
        if kinds is not None and not isinstance(target, kinds):
            # Real pickles add items to the lists, dicts and sets they build; an array or a
            # pandas object takes no items after the checks its state passed.
            raise _Refused(f"the pickle adds items to a {type(target).__name__}; only lists, dicts and sets take items")

    def _load_build(self):
        stack = self.stack
        state = stack.pop()
        target = stack[-1]
        self._guard_target(target)
        if _in_libraries(target):
            # numpy/pandas C code trusts an object's state from then on: only an object nothing but
            # the stack and its memo entry holds yet may get one, as in every real pickle. Later, a
            # dtype or a Categorical's codes would change under an array or a block checked with the old.
            if not _buildable(target):
                raise _Refused(f"the pickle sets the state of a {type(target).__name__}, which pickles never do")
            memoized = self.memo.get(self._memo_key.get(id(target))) is target
            if _refs(target) != _SOLE_REFS + 1 + memoized:
                raise _Refused(f"the pickle sets the state of a {type(target).__name__} already in use")
            np = sys.modules.get("numpy")
            if np is not None and isinstance(target, np.dtype):
                state = _dtype_state(target, state)
        stack.append(state)
        pickle._Unpickler.load_build(self)
        self._made(target)


def _guarded(opcode, target, kinds):
    original = pickle._Unpickler.dispatch[opcode[0]]

    def load(self):
        try:
            obj = target(self)
        except IndexError:  # malformed stack: let the original opcode report it
            obj = None
        self._guard_target(obj, kinds)
        original(self)
    return load


def _below_mark(self):
    return self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None


_LISTS = (list, collections.deque)
for _op, _target, _kinds in ((pickle.APPEND, lambda s: s.stack[-2], _LISTS), (pickle.APPENDS, _below_mark, _LISTS),
                             (pickle.SETITEM, lambda s: s.stack[-3], dict), (pickle.SETITEMS, _below_mark, dict),
                             (pickle.ADDITEMS, _below_mark, set)):
    _Unpickler.dispatch[_op[0]] = _guarded(_op, _target, _kinds)
# A memo entry is an allocation too (the C unpickler's memo is an array indexed by the PUT
# argument; ours is a dict): each PUT is charged, whatever its index.
_MEMO_ENTRY_BYTES = 64


def _charged_put(opcode):
    original = pickle._Unpickler.dispatch[opcode[0]]

    def load(self):
        self._charge(_MEMO_ENTRY_BYTES, "memo")
        original(self)
    return load


for _op in (pickle.PUT, pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE):
    _Unpickler.dispatch[_op[0]] = _charged_put(_op)
for _op, _load in ((pickle.BUILD, _Unpickler._load_build), (pickle.REDUCE, _Unpickler._load_reduce),
                   (pickle.NEWOBJ, _Unpickler._load_newobj), (pickle.NEWOBJ_EX, _Unpickler._load_newobj_ex)):
    _Unpickler.dispatch[_op[0]] = _load

# Globals the C unpickler may resolve: calling one makes an object of a fixed size, either new or
# immutable (timezone.utc, a cached ZoneInfo; not pytz.utc), and nothing of numpy or pandas: the C
# unpickler has no budget and no checks, and its BUILD would modify a shared result. Every other
# global of the allow-list or of unpickle_allow sends the request to the careful unpickler, and so
# do user-module globals of numpy/pandas or of a class in _VARIABLE_SIZE.
_FAST_GLOBALS = frozenset({
    ("ksrpc.client", "RpcCall"), ("ksrpc.client", "_Self"), ("ksrpc.client", "RpcClient"),
    *(("builtins", n) for n in ("float", "complex", "bool", "slice", "range", "Ellipsis", "NotImplemented")),
    *(("builtins", n) for n in _BUILTIN_EXCEPTIONS
      if not (_ExceptionGroup and issubclass(getattr(builtins, n), _ExceptionGroup))),  # groups copy lists
    ("datetime", "date"), ("datetime", "time"), ("datetime", "datetime"), ("datetime", "timedelta"),
    ("datetime", "timezone"), ("uuid", "UUID"), ("zoneinfo", "ZoneInfo"),
    ("dill._dill", "_load_type"), ("dill._dill", "_eval_repr"),
})
# Classes whose calls build objects as big as their arguments say (user modules' subclasses too).
_VARIABLE_SIZE = tuple(_TYPE_COSTS) + (int, str)


class _FastUnpickler(pickle.Unpickler):
    """CPython's C unpickler with the same `find_class` allow-list as
    `_Unpickler`, but without its opcode hooks. The server uses it only for
    pickles its Rust scan (`ksrpc_core::pickle_scan`) proved to mutate nothing
    but objects they build themselves, so the modification guards have nothing
    to catch; globals whose calls need the size and numpy/pandas checks raise
    `_NeedsCareful` and the request goes to the careful unpickler. It is ~8x
    faster on a small request (2.7 us against 21 us)."""

    def __init__(self, payload, policy, rules):
        super().__init__(io.BytesIO(payload))
        self.proto = 4  # the scan admits protocol 3+ only: no Python 2 name mapping needed
        self._policy = policy
        self._rules = rules
        self._code_ok = None
        self._handed_out = {}

    def find_class(self, module, name):
        key = ("dill._dill" if module == "dill.dill" else module, name)
        if key not in _FAST_GLOBALS and (key in self._policy.exact or key[0] in self._policy.wild):
            raise _NeedsCareful(f"{module}.{name}")
        obj = _Unpickler.find_class(self, module, name)
        if key not in _FAST_GLOBALS and (_root(_module_of(obj)) in _LIBRARIES or _root(module) in _LIBRARIES or (
                isinstance(obj, type) and (issubclass(obj, _VARIABLE_SIZE) or _lib_type(obj)))):
            raise _NeedsCareful(f"{module}.{name}")
        return obj

    _code_global = _Unpickler._code_global
    _data_global = _Unpickler._data_global
    _check_code = _Unpickler._check_code
    _load_type = _Unpickler._load_type
    _eval_repr = _Unpickler._eval_repr
    _getattr = _Unpickler._getattr


# ---------------------------------------------------------------------------
# Request validation and log summary
# ---------------------------------------------------------------------------

# Lazy chains (RpcClient arguments) are resolved, nested ones first, before their call. Through
# the pickle memo one nested chain can be referenced k times at each of d levels: k**d
# resolutions from a few hundred bytes, so the calls of the whole tree are counted, each time
# they are reached, not only its depth.
_MAX_CHAIN_DEPTH = 16
_MAX_CHAIN_CALLS = 1024


def _check_calls(calls, where, classes, count=None, depth=0):
    rpc_call, rpc_client = classes
    count = [0] if count is None else count
    if depth > _MAX_CHAIN_DEPTH:
        raise ValueError(f"lazy chains are nested more than {_MAX_CHAIN_DEPTH} deep")
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"{where} must be a list of ksrpc.client.RpcCall, not {type(calls).__name__}")
    count[0] += len(calls)
    if count[0] > _MAX_CHAIN_CALLS:
        raise ValueError(f"the request has more than {_MAX_CHAIN_CALLS} calls, counting each use of "
                         f"a nested lazy chain")
    for i, c in enumerate(calls):
        here = f"{where}[{i}]"
        if not isinstance(c, rpc_call):
            raise ValueError(f"{here} must be a ksrpc.client.RpcCall, not {type(c).__name__}")
        name, args, kwargs = (getattr(c, a, _MISSING) for a in ("name", "args", "kwargs"))
        if not isinstance(name, str):
            raise ValueError(f"{here}.name must be a str")
        if args is not None and not isinstance(args, (tuple, list)):
            raise ValueError(f"{here}.args must be a tuple, a list or None")
        if kwargs is not None and (not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs)):
            raise ValueError(f"{here}.kwargs must be a dict with str keys or None")
        for v in list(args or ()) + list((kwargs or {}).values()):
            if isinstance(v, rpc_client):
                state = vars(v)  # never getattr: the real RpcClient invents attributes
                if not isinstance(state.get("_module"), str):
                    raise ValueError(f"{here} has a nested RpcClient without a str module")
                _check_calls(state.get("_calls"), f"{here} nested chain calls", classes, count, depth + 1)


def _validate(req, classes):
    if not isinstance(req, dict):
        raise ValueError(f"request must be a dict, not {type(req).__name__}")
    missing = [k for k in ("module", "calls", "ref_id") if k not in req]
    if missing:
        raise ValueError(f"request lacks {', '.join(missing)}")
    module, calls, ref_id = req["module"], req["calls"], req["ref_id"]
    if not isinstance(module, str):
        raise ValueError(f"module must be a str, not {type(module).__name__}")
    if type(ref_id) is not int or not 0 <= ref_id < 2 ** 63:
        raise ValueError("ref_id must be an int in [0, 2**63)")
    _check_calls(calls, "calls", classes)
    return module, list(calls), ref_id


def _summarize(module, calls, ref_id=0):
    """The chain for logs: argument counts only, never values (logins pass passwords)."""
    parts = [module]
    for c in calls:
        if c.args is None:
            parts.append(c.name)
            continue
        n, k = len(c.args), len(c.kwargs or {})
        counts = [f"{n} arg{'s' if n != 1 else ''}"] if n else []
        counts += [f"{k} kwarg{'s' if k != 1 else ''}"] if k else []
        parts.append(f"{c.name}({', '.join(counts)})")
    return ".".join(parts) + (" [handle]" if ref_id else "")


def _cache_chain(module, calls, ref_id, rpc_client):
    """The dotted chain (`module.attr.attr`) the result cache matches its ttl patterns on, or
    None when the request is never cached: a generator step, or a chain passed as an argument
    (what it resolves to is not part of the chain)."""
    if ref_id:
        return None
    for c in calls:
        if any(isinstance(v, rpc_client) for v in list(c.args or ()) + list((c.kwargs or {}).values())):
            return None
    return ".".join([module] + [c.name for c in calls])


def _one_line(text, limit=300):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
    """An exception the 0.8.1 client can unpickle and `raise` (pitfalls.md item 6).

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
    if dill is not None:
        try:
            return 200, dill.dumps(d, protocol=5)
        except MemoryError:
            raise
        except Exception:
            pass
    tb = "".join(traceback.format_exception(type(first), first, first.__traceback__))
    del d
    exc = RuntimeError(f"the result ({type(data).__name__}) could not be pickled: {_one_line(repr(first))}")
    return 500, error_reply(module, exc, tb)


# ---------------------------------------------------------------------------
# Threads: the asyncio loop, the lanes, waiting with timeout and cancel
# ---------------------------------------------------------------------------

async def _guard(awaitable):
    """Run `awaitable` on the loop, returning (ok, value-or-exception).

    asyncio re-raises SystemExit/KeyboardInterrupt out of run_forever (it would
    kill the loop thread) and StopAsyncIteration does not cross a Task cleanly,
    so every exception except cancellation travels back as a value.
    """
    try:
        return True, await _clean_await(awaitable)
    except asyncio.CancelledError:
        raise
    except BaseException as e:
        return False, e


class _Lane:
    """One daemon thread running the synchronous code of one package's calls, in order.

    SDKs that keep one connection (or a session in thread-locals) are not safe to call from
    many threads; a lane runs every call into its package one after another, always on the
    same thread. The pool thread that submitted a call waits for it (see Executor._in_lane)."""

    def __init__(self, name):
        import queue
        self.name = name
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not finished
        self._current = None  # the future whose function runs now
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, args, kwargs=_NO_KWARGS):
        """Queue `fn(*args, **kwargs)`; returns (future, busy): busy if it has to wait its turn."""
        fut = concurrent.futures.Future()
        with self._lock:
            busy = self._pending > 0
            self._pending += 1
        self._queue.put((fut, fn, args, kwargs))
        return fut, busy

    def interrupt(self, fut):
        """Raise TimeoutError in the lane's thread if it still runs `fut`'s function (its caller
        gave up), so the next call in the lane need not wait for it. Like the pool's own
        timeout, it cannot reach code blocked in C."""
        with self._lock:
            if self._current is fut and self._thread.ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread.ident),
                                                           ctypes.py_object(TimeoutError))

    def _run(self):
        while True:
            try:
                item = self._queue.get()
                if item is None:
                    return
                self._run_one(*item)
                del item
            except TimeoutError:
                continue  # an interrupt() that raced with the end of its call

    def _run_one(self, fut, fn, args, kwargs):
        try:
            if not fut.set_running_or_notify_cancel():
                return
            with self._lock:
                self._current = fut
            try:
                ok, value = True, _call(fn, args, kwargs)
            except BaseException as e:  # SystemExit in a call must not end the lane
                ok, value = False, e
            with self._lock:
                # No interrupt() can aim at this call any more; drop one that came too late.
                self._current = None
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)
            fut.set_result(value) if ok else fut.set_exception(value)
        finally:
            with self._lock:
                self._pending -= 1

    def stop(self):
        self._queue.put(None)


class _Lanes:
    """Which thread runs a call's synchronous code.

    By default every third-party top-level package has a lane of its own: its calls run one
    at a time, different packages in parallel. The pool runs the standard library, the
    `ksrpc` package (the demo) and the packages `parallel` names (fnmatch patterns on the
    top-level package or the module). `serial` (fnmatch patterns on the module, the older
    `serial_modules` setting) puts modules in one shared lane, which wins over `parallel`.
    Coroutines run on the asyncio loop: a lane runs only the call that creates them."""

    # sys.stdlib_module_names is 3.10+; on 3.9 the modules built into the interpreter stand in.
    _POOL_PACKAGES = frozenset(getattr(sys, "stdlib_module_names", sys.builtin_module_names)) | {"ksrpc"}

    def __init__(self, parallel=(), serial=()):
        self._parallel, self._serial = tuple(parallel), tuple(serial)
        self._lock = threading.Lock()
        self._lanes = {}
        self._stopped = False

    def key(self, module):
        """The lane of calls into `module` (None: the pool); a lane is made when first used."""
        if any(fnmatchcase(module, p) for p in self._serial):
            return "ksrpc-serial"
        top = module.partition(".")[0]
        if top in self._POOL_PACKAGES or any(fnmatchcase(top, p) or fnmatchcase(module, p) for p in self._parallel):
            return None
        return f"ksrpc-lane-{top}"

    def get(self, key):
        with self._lock:
            if self._stopped:
                raise RuntimeError("the executor is closed")
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = _Lane(key)
            return lane

    def stop(self):
        with self._lock:
            self._stopped = True
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.stop()


class _CallState:
    __slots__ = ("cancelled", "future")

    def __init__(self):
        self.cancelled = False
        self.future = None


class _Ctx:
    """One call: who asks, under which rules, until when."""
    __slots__ = ("user", "rules", "builtins", "state", "deadline")

    def __init__(self, user, rules, state, deadline):
        self.user, self.rules, self.state, self.deadline = user, rules, state, deadline
        self.builtins = bool(rules.allows("builtins"))


# ---------------------------------------------------------------------------
# Generator handles
# ---------------------------------------------------------------------------

class _Handle:
    __slots__ = ("user", "gen", "lane", "last", "busy", "closing")

    def __init__(self, user, gen, lane):
        self.user, self.gen, self.lane, self.last = user, gen, lane, time.monotonic()
        self.busy = False  # a call is advancing it (a generator runs one step at a time)
        self.closing = False  # closed while busy: dropped when that call releases it


class _Handles:
    """Generators kept between calls: random ids, owned by a user, idle TTL, per-user LRU cap.

    A handle a call is advancing (`busy`) is never expired, evicted or dropped under that
    call: closing it marks it, and the advancing call drops it when it lets go."""

    def __init__(self, ttl, cap):
        self._ttl, self._cap = float(ttl), max(1, int(cap))
        self._lock = threading.Lock()
        self._items = {}  # id -> _Handle, least recently used first

    def _expire(self, now):
        old = [k for k, h in self._items.items() if now - h.last > self._ttl and not h.busy]
        return [self._items.pop(k) for k in old]

    def add(self, user, gen, lane):
        with self._lock:
            dropped = self._expire(time.monotonic())
            idle = [k for k, h in self._items.items() if h.user == user and not h.busy]
            mine = sum(1 for h in self._items.values() if h.user == user)
            while mine >= self._cap and idle:
                dropped.append(self._items.pop(idle.pop(0)))
                mine -= 1
            if mine >= self._cap:
                # every one of the user's generators is being advanced right now
                dropped.append(gen)
                gen = None
            else:
                hid = 0
                while hid == 0 or hid in self._items:
                    hid = secrets.randbits(63)
                self._items[hid] = _Handle(user, gen, lane)
        del dropped  # generators are finalized here, outside the lock
        if gen is None:
            raise RuntimeError(f"too many open generators: all {self._cap} of this user's generator "
                               f"handles are being advanced by calls; wait for one to finish or close one")
        return hid

    def take(self, user, hid):
        with self._lock:
            now = time.monotonic()
            dropped = self._expire(now)
            h = self._items.get(hid)
            if h is not None and h.user == user and not h.closing:
                if h.busy:
                    # Advancing a running generator raises, and a generator that raised is dropped:
                    # the second caller is told, the handle stays for the first.
                    raise RuntimeError(f"generator handle {hid} is being advanced by another call; "
                                       f"advance one generator one call at a time")
                h.busy = True
                h.last = now
                self._items[hid] = self._items.pop(hid)  # most recently used goes last
            else:
                h = None
        del dropped
        if h is None:
            # Not StopIteration: the client would silently end the user's iteration.
            raise LookupError(f"generator handle {hid} is unknown: it expired (idle > {self._ttl:g} s), "
                              f"was evicted (over {self._cap} per user), was exhausted or closed, "
                              f"or belongs to another user")
        return h

    def release(self, h):
        dropped = None
        with self._lock:
            h.busy = False
            h.last = time.monotonic()
            if h.closing:
                for k, v in list(self._items.items()):
                    if v is h:
                        dropped = self._items.pop(k)
        del dropped

    def close(self, user, hid):
        """The owner closes a handle: dropped now, or when the call advancing it lets go."""
        with self._lock:
            h = self._items.get(hid)
            if h is None or h.user != user:
                return
            if h.busy:
                h.closing = True
                return
            del self._items[hid]
        del h

    def drop(self, hid):
        with self._lock:
            h = self._items.pop(hid, None)
        del h

    def clear(self):
        with self._lock:
            items, self._items = self._items, {}
        del items


# ---------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------

def _rule_against(rules, module):
    """The rule that refuses `module`, for the refusal's message and log line."""
    rule = rules.first_match(module)
    return "no rule allows it" if rule is None else f"rule {'allow' if rule[1] else 'deny'} {rule[0]}"


def _raised(exc):
    """(type name, one-line message, at most 300 characters) of an exception, for the log."""
    return type(exc).__name__, _one_line(_safe_str(exc))[:300]


class Executor:
    """Runs ksrpc 0.8.1 calls for the Rust server; `handle` is called from many threads."""

    def __init__(self, *, unpickle_allow=(), allow_code=False, handle_ttl=600.0, handle_cap=64,
                 call_timeout=600.0, serial_modules=(), parallel_modules=(), lend=None, note=None):
        """unpickle_allow: extra "module:name" / "module:*" globals a request may name;
        allow_code: accept dill code objects from users whose rules allow builtins;
        handle_ttl (s) / handle_cap (per user): generator handles; call_timeout (s): how long a
        call may take; parallel_modules / serial_modules: see `_Lanes`; lend: called (no
        arguments) when a pool thread is about to wait for a busy lane, so the pool can add a
        thread for the other packages' calls meanwhile; note(call_id, summary): told each
        compat call's chain once it is known."""
        exact, wild = _parse_allow(DEFAULT_UNPICKLE_ALLOW + tuple(unpickle_allow))
        self._policy = _Policy(exact, wild, bool(allow_code))
        from ksrpc.client import RpcCall, RpcClient, _Self  # the stand-ins, or the real package
        self._RpcCall, self._RpcClient, self._Self = RpcCall, RpcClient, _Self
        self._call_timeout = float(call_timeout)
        self._lanes = _Lanes(parallel_modules, serial_modules)
        self._lend = lend
        self._note = note
        self._handles = _Handles(handle_ttl, handle_cap)
        self._calls = {}  # call_id -> _CallState, for cancel()
        self._lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._run_loop, name="ksrpc-asyncio", daemon=True)
        self._loop_thread.start()

    def _run_loop(self):
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    # -- public API ------------------------------------------------------------
    def handle(self, call_id: int, user: str, rules, payload: bytes, fast: bool = False
               ) -> tuple[int, str | None, bytes, str, str | None, str | None]:
        """One request -> (reply_status, bad_request, reply_bytes, summary, cache_chain, raised).
        Never raises. `cache_chain` is the dotted chain when the reply may be cached (a plain
        result: not an error, not a generator, see `_cache_chain`), else None; `raised` is
        (type name, one-line message) of the exception the call raised (None: it returned),
        for the log line.
        `fast`: the caller proved the pickle mutates only objects it builds (see
        `_FastUnpickler`), so the C unpickler may load it; it hands the request to the
        careful unpickler when a global needs that one's checks."""
        module, summary = "?", "<undecodable>"
        state = _CallState()
        try:
            with self._lock:
                self._calls[call_id] = state
            try:
                payload = bytes(payload)
                try:
                    req = (_FastUnpickler if fast else _Unpickler)(payload, self._policy, rules).load()
                except _NeedsCareful:
                    req = _Unpickler(payload, self._policy, rules).load()
            except (KeyboardInterrupt, SystemExit, TimeoutError, asyncio.CancelledError):
                raise  # injected by the server (timeout, shutdown), not the request's fault
            except BaseException as e:
                msg = _one_line(e if isinstance(e, (_Refused, _NeedsDill)) else
                                f"undecodable request pickle: {type(e).__name__}: {_safe_str(e)}")
                return 500, msg, self._bad_reply(e, msg), summary, None, _raised(e)
            try:
                module, calls, ref_id = _validate(req, (self._RpcCall, self._RpcClient))
            except Exception as e:
                msg = _one_line(f"invalid request: {_safe_str(e)}")
                return 500, msg, self._bad_reply(e, msg), "<invalid>", None, _raised(e)
            del req
            summary = _summarize(module, calls, ref_id)
            if self._note is not None:
                # The server logs the summary if the call outruns its timeout; the chain lets
                # identical requests waiting on the result cache go on when it is not cacheable.
                self._note(call_id, summary, _cache_chain(module, calls, ref_id, self._RpcClient))
            ctx = _Ctx(user, rules, state, time.monotonic() + self._call_timeout)
            cache_chain = raised = None
            try:
                status, reply, handle = self._execute(ctx, module, calls, ref_id)
                if status == 200 and not handle:
                    cache_chain = _cache_chain(module, calls, ref_id, self._RpcClient)
                elif status != 200:
                    raised = ("RuntimeError", "the result could not be pickled")  # see _ok_reply
            except BaseException as e:
                status, reply, raised = 500, error_reply(module, e, traceback.format_exc()), _raised(e)
            return status, None, reply, summary, cache_chain, raised
        except BaseException as e:  # last resort, e.g. an exception injected while replying
            return 500, None, error_reply(module, e, traceback.format_exc()), summary, None, _raised(e)
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def run_native(self, call_id: int, user: str, rules, module: str, calls: list, ref_id: int):
        """A native-protocol call: the chain arrives as values already built (the
        stand-in RpcCall/RpcClient objects, Self), so there is nothing to unpickle.
        Returns ("ok", result) | ("handle", id) | ("exhausted", None) |
        ("err", kind, message, traceback), and never raises. The result object is
        converted to a native value by the caller."""
        state = _CallState()
        try:
            with self._lock:
                self._calls[call_id] = state
            module, calls, ref_id = _validate(dict(module=module, calls=calls, ref_id=ref_id),
                                              (self._RpcCall, self._RpcClient))
            ctx = _Ctx(user, rules, state, time.monotonic() + self._call_timeout)
            if ref_id:
                if len(calls) == 1 and calls[0].name == "close" and not calls[0].args and not calls[0].kwargs:
                    # CloseHandle: the chain `<handle>.close()` frees it (only the owner's),
                    # at once or, while a call advances it, as soon as that call ends.
                    self._handles.close(ctx.user, ref_id)
                    return "exhausted", None
                try:
                    return "ok", self._advance(ctx, ref_id)
                except StopAsyncIteration:
                    return "exhausted", None
            result = self._resolve(ctx, module, calls)
            if isinstance(result, (types.GeneratorType, types.AsyncGeneratorType)):
                return "handle", self._handles.add(ctx.user, result, self._lanes.key(module))
            self._check_reached(ctx, result)
            return "ok", result
        except BaseException as e:
            public = _public_exception(e)
            return "err", type(public).__name__, _safe_str(public), traceback.format_exc()
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def load_pickle_value(self, rules, data: bytes):
        """A native `Pickle` value: accepted only from users whose rules allow
        `builtins` (they can run any code anyway; everyone else sends explicit
        values), and loaded by the careful unpickler all the same."""
        if not rules.allows("builtins"):
            raise PermissionError("pickle values are accepted only from users whose rules allow 'builtins'; "
                                  "send explicit values instead")
        return _Unpickler(bytes(data), self._policy, rules).load()

    def cancel(self, call_id: int) -> None:
        """Stop waiting for call `call_id` (its client went away); cancels its coroutine."""
        with self._lock:
            state = self._calls.get(call_id)
        if state is not None:
            state.cancelled = True
            fut = state.future
            if fut is not None:
                fut.cancel()

    def close(self) -> None:
        """Stop the calls still waiting, cancel the loop's tasks, stop the loop and the lanes, drop the
        handles."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            states = list(self._calls.values())
        for state in states:  # calls still waiting (for a lane, a coroutine) stop waiting
            state.cancelled = True
            fut = state.future
            if fut is not None:
                fut.cancel()
        self._handles.clear()  # first, so async generators are finalized while the loop still runs

        async def shutdown():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=2) if tasks else None
            await self._loop.shutdown_asyncgens()
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        except BaseException:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(5)
        if not self._loop_thread.is_alive():
            self._loop.close()
        self._lanes.stop()

    # -- one call --------------------------------------------------------------
    def _bad_reply(self, exc, msg):
        keep = (PermissionError, ImportError, TypeError, ValueError)
        cls = next((c for c in keep if isinstance(exc, c)), ValueError)
        return error_reply("?", cls(msg), "")

    def _execute(self, ctx, module, calls, ref_id):
        echo = ()
        if ref_id and any(c.name in _ADVANCE for c in calls):
            result = self._advance(ctx, ref_id)  # the chain that made the generator is not re-run
        else:
            result = self._resolve(ctx, module, calls)
        new_ref = 0
        if isinstance(result, (types.GeneratorType, types.AsyncGeneratorType)):
            new_ref = self._handles.add(ctx.user, result, self._lanes.key(module))
            result = None
            # names only: the client appends __anext__ and sends them back; big arguments stay here
            echo = [self._RpcCall(c.name, None, None) for c in calls]
        status, reply = _ok_reply(module, result, new_ref, echo)
        return status, reply, new_ref

    def _advance(self, ctx, hid):
        h = self._handles.take(ctx.user, hid)
        try:
            if isinstance(h.gen, types.AsyncGeneratorType):
                value = self._await(ctx, h.gen.__anext__())
            else:
                value = self._in_lane(ctx, h.lane, next, (h.gen,))
        except (StopIteration, StopAsyncIteration):
            self._handles.drop(hid)
            raise StopAsyncIteration() from None  # the 0.8.1 client ends iteration on it
        except BaseException:
            self._handles.drop(hid)  # a generator that raised is finished
            raise
        finally:
            self._handles.release(h)
        self._check_reached(ctx, value)
        return value

    def _await(self, ctx, awaitable):
        if self._closed:
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            raise RuntimeError("the executor is closed")
        ok, value = self._wait(ctx, asyncio.run_coroutine_threadsafe(_guard(awaitable), self._loop))
        if ok:
            return value
        raise value

    def _in_lane(self, ctx, lane, fn, args, kwargs=_NO_KWARGS):
        """`fn(*args, **kwargs)` in lane `lane` (a `_Lanes` key), or here when it is None."""
        if lane is None:
            return _call(fn, args, kwargs)
        worker = self._lanes.get(lane)
        fut, busy = worker.submit(fn, args, kwargs)
        if busy and self._lend is not None:
            self._lend()
        try:
            return self._wait(ctx, fut)
        except BaseException:
            worker.interrupt(fut)  # gave up waiting (timeout, cancel): free the lane if we can
            raise

    def _wait(self, ctx, fut):
        """Wait for `fut` until the call's deadline or cancel(); short slices let injected
        exceptions (the server's own timeout) arrive promptly."""
        ctx.state.future = fut
        try:
            if ctx.state.cancelled:
                fut.cancel()
            while True:
                if ctx.state.cancelled:
                    fut.cancel()
                    raise RuntimeError("the call was cancelled")
                remaining = ctx.deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the call took longer than {self._call_timeout:g} s")
                done, _ = concurrent.futures.wait([fut], timeout=min(remaining, 0.25))
                if done:
                    try:
                        return fut.result()
                    except concurrent.futures.CancelledError:
                        raise RuntimeError("the call was cancelled") from None
        finally:
            ctx.state.future = None
            if not fut.done():
                fut.cancel()

    # -- chain resolution --------------------------------------------------------
    def _import(self, ctx, name):
        if not ctx.rules.allows(name):
            raise PermissionError(f"import of {name!r} is not allowed for user {ctx.user!r} "
                                  f"({_rule_against(ctx.rules, name)})")
        mod = importlib.import_module(name)
        real = getattr(mod, "__name__", name)
        if not isinstance(real, str) or not ctx.rules.allows(real):  # os.path is posixpath
            raise PermissionError(f"module {name!r} is {real!r}, which is not allowed for user {ctx.user!r} "
                                  f"({_rule_against(ctx.rules, real)})")
        return mod

    def _submodule(self, ctx, mod, name):
        full = f"{getattr(mod, '__name__', '')}.{name}"
        if full not in sys.modules:
            try:  # find_spec looks without running the submodule
                if importlib.util.find_spec(full) is None:
                    return _MISSING
            except (ImportError, ValueError, AttributeError):
                return _MISSING
        return self._import(ctx, full)

    def _check_reached(self, ctx, obj):
        """Every object a chain reaches: modules need rules, interpreter internals need builtins."""
        if inspect.ismodule(obj):
            name = getattr(obj, "__name__", None)
            if not isinstance(name, str) or not ctx.rules.allows(name):
                raise PermissionError(f"module {name!r} is not allowed for user {ctx.user!r} "
                                      f"({_rule_against(ctx.rules, name)})")
        elif not ctx.builtins and (
                isinstance(obj, _INTERNAL_TYPES)
                or (isinstance(obj, types.BuiltinFunctionType) and getattr(obj, "__self__", None) is builtins)
                or (isinstance(obj, dict) and (obj is vars(builtins) or "__builtins__" in obj))):
            raise PermissionError(f"{type(obj).__name__} objects are refused: the rules of user {ctx.user!r} "
                                  f"do not allow 'builtins'")

    def _resolve(self, ctx, module, calls, as_argument=False):
        obj = self._import(ctx, module)
        lane = self._lanes.key(module)  # where the chain's attribute lookups and calls run
        reached = [module]  # the modules the chain passed through, each allowed by the rules
        for c in calls:
            if ctx.state.cancelled:
                raise RuntimeError("the call was cancelled")
            if c.name:  # an empty name is skipped, as in 0.8.1
                obj = self._step(ctx, obj, c, reached, lane)
                if inspect.ismodule(obj):
                    reached.append(obj.__name__)
        if as_argument and not ctx.builtins and callable(obj) and type(obj) is not _StubCall:
            # the function it is passed to may call it: the same capability as a call
            what = _summarize(module, calls)
            _capability.check_call(ctx.rules, ctx.user, obj, reached, f"{what} (passed as an argument)")
        return obj

    def _step(self, ctx, obj, c, reached, lane):
        name = c.name
        if _is_dunder(name) and name not in SAFE_DUNDERS and not ctx.builtins:
            raise PermissionError(f"attribute {name!r} is refused: the rules of user {ctx.user!r} do not allow "
                                  f"'builtins', and only these dunders are open: {', '.join(sorted(SAFE_DUNDERS))}")
        if name.startswith("_") and not _is_dunder(name) and not ctx.builtins:
            raise PermissionError(f"private attribute {name!r} is refused: the rules of user {ctx.user!r} do not "
                                  f"allow 'builtins'")
        if name in _FORMATTERS and not ctx.builtins:
            # str.format / format_map resolve "{0.__globals__[x]}" themselves,
            # past the dunder and module checks.
            raise PermissionError(f"{name!r} is refused: the rules of user {ctx.user!r} do not allow 'builtins'")
        is_builtin = False
        value = self._in_lane(ctx, lane, getattr, (obj, name, _MISSING))  # 1. attribute (a property runs code)
        if value is _MISSING and inspect.ismodule(obj):  # 2. submodule, or the stub of the module
            value = _stub_function(obj) if name == "generate_stub" else self._submodule(ctx, obj, name)
        if value is _MISSING:  # 3. a builtin
            value = getattr(builtins, name, _MISSING)
            if value is _MISSING:
                raise AttributeError(f"{type(obj).__name__} object has no attribute, submodule or builtin {name!r}")
            if not ctx.builtins:
                raise PermissionError(f"builtin {name!r} is refused: the rules of user {ctx.user!r} "
                                      f"do not allow 'builtins'")
            is_builtin = True
        self._check_reached(ctx, value)
        if c.args is None:
            return value
        if not ctx.builtins and not is_builtin and callable(value) and type(value) is not _StubCall:
            _capability.check_call(ctx.rules, ctx.user, value, reached, repr(name))  # before its arguments run
        args = [self._argument(ctx, a, reached) for a in c.args]
        kwargs = {k: self._argument(ctx, v, reached) for k, v in (c.kwargs or {}).items()}
        is_self = lambda a: isinstance(a, self._Self)  # noqa: E731
        if is_builtin:  # demo.LIST.len(Self) == len(demo.LIST)
            args = [obj if is_self(a) else a for a in args]
            kwargs = {k: obj if is_self(v) else v for k, v in kwargs.items()}
        elif any(map(is_self, args)) or any(map(is_self, kwargs.values())):
            raise TypeError(f"Self stands for the current object only in a builtin call such as "
                            f"demo.LIST.len(Self); {name!r} is not a builtin")
        if not (callable(value) or name.endswith("__call__")):
            return value  # arguments to a non-callable are ignored, as in 0.8.1
        result = self._in_lane(ctx, lane, value, args, kwargs)
        if isinstance(result, collections.abc.Coroutine):  # not asyncio.iscoroutine: it accepts generators
            result = self._await(ctx, result)
        self._check_reached(ctx, result)
        return result

    def _argument(self, ctx, value, reached):
        if isinstance(value, self._RpcClient):  # a lazy chain: resolve it first, same user and rules
            state = vars(value)
            return self._resolve(ctx, state["_module"], state["_calls"], as_argument=True)
        if not ctx.builtins:
            self._check_callable_values(ctx, value, reached)
        return value

    def _check_callable_values(self, ctx, value, reached):
        """The function a value is passed to may call it: a callable among the request's values
        (a pickled global, an instance with __call__, also inside lists, tuples, dicts and sets)
        needs the same capability as a call. Plain scalar types (`dtype=float`) are data."""
        stack = [value]
        while stack:
            v = stack.pop()
            kind = type(v)
            if kind in _CONTAINERS:
                stack.extend(v.items() if kind is dict else v)
            elif kind in _PLAIN_TYPE_VALUES or isinstance(v, (self._RpcClient, self._RpcCall, self._Self)):
                continue
            elif not callable(v) or (isinstance(v, type) and v in _PLAIN_TYPE_VALUES_SET):
                continue
            else:
                _capability.check_call(ctx.rules, ctx.user, v, reached, f"a {kind.__name__} passed as an argument")


# ---------------------------------------------------------------------------
# generate_stub: a .pyi text from inspect (0.8.1 used mypy's stubgen)
# ---------------------------------------------------------------------------

class _StubCall:
    """`module.generate_stub()`: the server's own stub writer, callable by any user allowed the
    module (the capability check knows this type)."""
    __slots__ = ("module",)

    def __init__(self, module):
        self.module = module

    def __call__(self, *_args, **_kwargs):  # the client sends module=<name>; the chain already has it
        return _StubWriter(self.module).text()


def _stub_function(module):
    return _StubCall(module)


def generate_stub(module: types.ModuleType) -> str:
    """The text of a .pyi stub for `module`: functions, classes, constants, docstrings."""
    return _StubWriter(module).text()


class _Text:
    """A default or annotation printed as given."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


_DOTTED = re.compile(r"\b([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)")
_CLASS_NOISE = {"__dict__", "__weakref__", "__module__", "__doc__", "__qualname__", "__annotations__",
                "__slots__", "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__"}


class _StubWriter:
    def __init__(self, module):
        self.module = module
        self.imports = set()

    def text(self):
        mod = self.module
        body = []
        names = getattr(mod, "__all__", None)
        explicit = isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names)
        if not explicit:
            names = [n for n in vars(mod) if not n.startswith("_")]
        for name in names:
            obj = getattr(mod, name, _MISSING)
            if obj is _MISSING or inspect.ismodule(obj):
                continue
            own = explicit or getattr(obj, "__module__", None) == mod.__name__
            if inspect.isclass(obj):
                body += ["", *self.klass(name, obj, ""), ""] if own else []
            elif inspect.isroutine(obj):
                body += self.function(name, obj, "") if own else []
            else:
                body.append(f"{name}: {self.type_of(obj)}")
        head = [self.docstring(mod, "")] if mod.__doc__ else []
        head += ["from typing import Any"] + [f"import {m}" for m in sorted(self.imports)]
        text = "\n".join(head + [""] + body).strip("\n") + "\n"
        return re.sub(r"\n{3,}", "\n\n", text)

    def docstring(self, obj, indent):
        doc = inspect.cleandoc(obj.__doc__) if isinstance(getattr(obj, "__doc__", None), str) else ""
        if not doc:
            return ""
        doc = doc.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
        return "\n".join(f"{indent}{line}" if line else "" for line in f'"""{doc}"""'.split("\n"))

    def annotation(self, a):
        if isinstance(a, str):
            return a
        if a is None or a is type(None):
            return "None"
        if isinstance(a, type) and not getattr(a, "__args__", None):
            if a.__module__ in ("builtins", self.module.__name__):
                return a.__qualname__
            text = f"{a.__module__}.{a.__qualname__}"
        else:
            text = repr(a)
        for dotted in _DOTTED.findall(text):  # import the modules the annotation names
            mod = dotted.rsplit(".", 1)[0]
            while mod and mod not in sys.modules:
                mod = mod.rpartition(".")[0]
            if mod and mod != "builtins":
                self.imports.add(mod)
        try:
            compile(text, "<annotation>", "eval")
        except SyntaxError:
            return "Any"
        return text

    def type_of(self, obj):
        return self.annotation(type(obj))

    def signature(self, fn):
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return "(*args, **kwargs)"
        params = []
        for p in sig.parameters.values():
            p = p.replace(default=_Text("...") if p.default is not p.empty else p.empty,
                          annotation=_Text(self.annotation(p.annotation)) if p.annotation is not p.empty else p.empty)
            params.append(p)
        ret = sig.return_annotation
        ret = _Text(self.annotation(ret)) if ret is not sig.empty else sig.empty
        try:
            return str(sig.replace(parameters=params, return_annotation=ret))
        except ValueError:
            return "(*args, **kwargs)"

    def function(self, name, fn, indent, decorator=None):
        fn_core = getattr(fn, "__func__", fn)
        prefix = "async def" if inspect.iscoroutinefunction(fn_core) else "def"
        lines = [f"{indent}@{decorator}"] if decorator else []
        head = f"{indent}{prefix} {name}{self.signature(fn_core)}:"
        doc = self.docstring(fn_core, indent + "    ")
        return lines + ([head, doc, f"{indent}    ..."] if doc else [f"{head} ..."])

    def klass(self, name, cls, indent, depth=0):
        bases = [self.annotation(b) for b in cls.__bases__ if b is not object]
        lines = [f"{indent}class {name}{'(' + ', '.join(bases) + ')' if bases else ''}:"]
        inner = indent + "    "
        doc = self.docstring(cls, inner)
        members = [doc] if doc else []
        for key, value in vars(cls).items():
            if key in _CLASS_NOISE or (key.startswith("_") and not _is_dunder(key)):
                continue
            if isinstance(value, staticmethod):
                members += self.function(key, value.__func__, inner, "staticmethod")
            elif isinstance(value, classmethod):
                members += self.function(key, value.__func__, inner, "classmethod")
            elif isinstance(value, property):
                ret = "Any"
                if value.fget is not None:
                    try:
                        ann = inspect.signature(value.fget).return_annotation
                        ret = self.annotation(ann) if ann is not inspect.Signature.empty else "Any"
                    except (TypeError, ValueError):
                        pass
                members += [f"{inner}@property", f"{inner}def {key}(self) -> {ret}: ..."]
            elif inspect.isclass(value) and depth < 3:
                members += self.klass(key, value, inner, depth + 1)
            elif inspect.isroutine(value):
                members += self.function(key, value, inner)
            elif not _is_dunder(key):
                members.append(f"{inner}{key}: {self.type_of(value)}")
        return lines + (members or [f"{inner}..."])
