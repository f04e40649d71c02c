"""What a request pickle may build: the cost model of the careful unpickler's budget
(`_BUILD_BUDGET`, read as `build_budget._BUILD_BUDGET`: tests patch it; the per-type and
per-function costs `_TYPE_COSTS` and `_FUNCTION_COSTS`), the digit limits of Fraction and
Decimal, and the numpy/pandas checks (`_lib_type`, `_dtype_state`, `_buildable`,
`_check_made`). Whether a built object is shared is `sharing`'s job.
"""
from __future__ import annotations

import collections
import decimal
import fractions
import functools
import itertools
import math
import re
import sys
import types

from .names import _ExceptionGroup, _Refused


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
