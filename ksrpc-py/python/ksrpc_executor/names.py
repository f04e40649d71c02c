"""What a request pickle may name: the default allow-list (`DEFAULT_UNPICKLE_ALLOW`), the plain
types and code globals the unpicklers tell apart, the dunder rules of chains (`SAFE_DUNDERS`),
the parsed policy (`_Policy`, `_parse_allow`), the refusal exceptions (`_Refused`,
`_NeedsDill`), and the interpreter facts every other module builds on: the optional `dill`
import (read as `names.dill`: tests set it to None), `BaseExceptionGroup` where there is one,
and the `_MISSING` sentinel.
"""
from __future__ import annotations

import builtins
import importlib
import re
import sys
import types

try:  # dill is optional: plain pickles work without it.
    import dill
    import dill._dill as _dill_impl
except Exception:  # pragma: no cover - depends on the environment
    dill = _dill_impl = None

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
