"""The capability rule: which callables a user without the `builtins` right may call.

Rules name modules. A call result is an object of some library, and its methods (pandas
`eval`/`to_csv`, numpy `tofile`, `list.append` on a module global) would otherwise run with
the server's full power for anyone allowed the module that returned it. So what a limited user
may call is decided by the module that *defines the code that runs*, never by the attribute's
name and never by a value the object can fake (an instance's or a class's `__module__`):

- a Python function: the module whose globals it runs with (`__globals__`, which must be
  that module's own `__dict__` in `sys.modules`);
- a bound method: its `__func__`; a C function of a module: that module object (`__self__`);
- a C method or slot of an object: the class in the object's MRO that defines it (read from
  the classes' own `__dict__`, so a metaclass or `__getattr__` cannot answer instead), and
  that class's module as CPython records it (`tp_name` for C types);
- a class: the code that calling it runs (`__new__`, `__init__`, the metaclass `__call__`);
- `functools.partial` and `lru_cache` wrappers: the function they wrap; any other callable
  object: its class's `__call__`.

That module must be allowed by the user's rules, or lie inside the package of a module the
chain reached (`jqdatasdk.get_price` is defined in `jqdatasdk.api`: `allow jqdatasdk` covers it),
unless a rule names the defining module (or a package between) and denies it. A function the
package merely imported from elsewhere (`from os import system`) is defined elsewhere and stays
refused. The exception is a short allow-list (`VALUE_METHODS`, `CONTAINER_METHODS`) of methods of
immutable builtin values and read-only access to builtin containers: nothing in it takes a
callable, a path, a size to allocate or a format string, and nothing in it mutates.

Users whose rules allow `builtins` can run any code anyway and are not checked here.
`check_call` is the one entry point; the executor calls it for every callable a chain calls
or passes as an argument.
"""
from __future__ import annotations

import datetime
import decimal
import fnmatch
import functools
import sys
import types

__all__ = ["check_call", "defining_module", "VALUE_METHODS", "CONTAINER_METHODS"]

# Descriptors read straight from the C types: an object cannot answer for them.
_type_module = type.__dict__["__module__"].__get__
_type_dict = type.__dict__["__dict__"].__get__
_type_mro = type.__dict__["__mro__"].__get__
_type_qualname = type.__dict__["__qualname__"].__get__
_type_name = type.__dict__["__name__"].__get__
_module_dict = types.ModuleType.__dict__["__dict__"].__get__
_func_globals = types.FunctionType.__dict__["__globals__"].__get__
_func_qualname = types.FunctionType.__dict__["__qualname__"].__get__
_method_func = types.MethodType.__dict__["__func__"].__get__
_builtin_self = types.BuiltinFunctionType.__dict__["__self__"].__get__
_builtin_name = types.BuiltinFunctionType.__dict__["__name__"].__get__
_wrapper_self = types.MethodWrapperType.__dict__["__self__"].__get__
_wrapper_name = types.MethodWrapperType.__dict__["__name__"].__get__
_partial_func = functools.partial.func.__get__

_C_DESCRIPTORS = (types.WrapperDescriptorType, types.MethodDescriptorType, types.ClassMethodDescriptorType)
_CYTHON_FUNCTIONS = ("cython_function_or_method", "fused_cython_function")
_C_MEMBERS = (types.GetSetDescriptorType, types.MemberDescriptorType)

# Immutable builtin values: these methods only read the value and return a new one of about
# its size (case mapping at most 3x, once). Left out on purpose: format/format_map/strftime/
# __format__ (format strings), translate (calls into its table), center/ljust/rjust/zfill/
# expandtabs/replace/to_bytes (a size or a repetition chosen by the caller), join (the result
# is the separator times the items: chained joins multiply), split/splitlines (a small object
# per piece: 25x the string's size), encode/decode (chained codecs grow without bound, and
# some, like punycode, take quadratic time), methods taking an iterable (frozenset.union:
# the iterable may be range(10**18)), range's searches (a C loop over the whole range, with
# the GIL held), and every dunder outside the executor's safe set.
_TEXT = frozenset({
    "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha", "isascii",
    "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric", "isprintable", "isspace",
    "istitle", "isupper", "lower", "lstrip", "partition", "removeprefix", "removesuffix",
    "rfind", "rindex", "rpartition", "rstrip", "startswith", "strip", "swapcase", "title", "upper",
})
_READ = frozenset({"__len__", "__getitem__", "__contains__", "__str__", "__repr__", "__int__",
                   "__float__", "__bool__"})
_DATE = frozenset({"isoformat", "isocalendar", "isoweekday", "weekday", "toordinal", "timetuple",
                   "ctime", "replace"})
_CLOCK = frozenset({"isoformat", "utcoffset", "tzname", "dst", "replace"})
VALUE_METHODS = {
    str: _READ | _TEXT,
    bytes: _READ | _TEXT | {"hex"},
    int: _READ | {"bit_length", "bit_count", "conjugate", "as_integer_ratio"},
    bool: _READ | {"bit_length", "bit_count", "conjugate", "as_integer_ratio"},
    float: _READ | {"is_integer", "hex", "conjugate", "as_integer_ratio"},
    complex: _READ | {"conjugate"},
    tuple: _READ | {"count", "index"},
    frozenset: _READ | {"copy"},
    range: frozenset({"__len__", "__getitem__", "__str__", "__repr__", "__bool__"}),
    datetime.date: _READ | _DATE,
    datetime.datetime: _READ | _DATE | _CLOCK | {"date", "time", "timetz", "timestamp", "utctimetuple",
                                                   "astimezone"},
    datetime.time: _READ | _CLOCK,
    datetime.timedelta: _READ | {"total_seconds"},
    datetime.timezone: _READ | {"utcoffset", "tzname", "dst"},
    # not __int__/as_integer_ratio: quadratic in the exponent, with the GIL held
    decimal.Decimal: (_READ - {"__int__"}) | {"adjusted", "as_tuple", "copy_abs", "copy_negate", "is_finite",
                                              "is_infinite", "is_nan", "is_signed", "is_zero", "normalize"},
}
# Read-only access to builtin containers, for objects of exactly these types (a subclass may
# run code of its own from them: defaultdict's __missing__ inserts).
CONTAINER_METHODS = {
    list: frozenset({"__getitem__", "__len__", "__contains__", "index", "count", "copy"}),
    dict: frozenset({"__getitem__", "__len__", "__contains__", "get", "keys", "values", "items", "copy"}),
    set: frozenset({"__len__", "__contains__", "copy"}),
}
# Code that only allocates the new object: calling a class runs it, and it is nobody's capability.
_NEUTRAL = frozenset({(object, "__new__"), (object, "__init__"), (type, "__call__")})
_MAX_UNWRAP = 16


class _Unknown(Exception):
    """The code a callable runs has no module we can prove."""


def _static_lookup(cls, name):
    """(owner class, raw attribute) of `name` on `cls`'s MRO, from the classes' own dicts."""
    for klass in _type_mro(cls):
        ns = _type_dict(klass)
        if name in ns:
            return klass, ns[name]
    raise _Unknown(f"{_type_qualname(cls)} has no {name!r}")


def _class_module(cls):
    name = _type_module(cls)
    if not isinstance(name, str):
        raise _Unknown(f"class {_type_qualname(cls)} has no module name")
    return name


def _globals_module(g, what):
    name = g.get("__name__") if isinstance(g, dict) else None
    module = sys.modules.get(name) if isinstance(name, str) else None
    if module is None or _module_dict(module) is not g:
        raise _Unknown(f"{what} runs with globals that are no imported module's")
    return name


def _namedtuple_new(fn):
    # collections.namedtuple compiles __new__ in a namespace of its own that holds only
    # tuple.__new__ and an empty __builtins__: its code builds a tuple, nothing else.
    g = _func_globals(fn)
    return (isinstance(g, dict) and set(g) == {"_tuple_new", "__builtins__", "__name__"}
            and g["_tuple_new"] is tuple.__new__ and g["__builtins__"] == {})


def _code(fn, depth=0):
    """The (module, qualname, owner class or None, name) whose code calling `fn` runs; None
    for allocation-only code (`object.__new__`). Raises _Unknown when it cannot be proven."""
    if depth > _MAX_UNWRAP:
        raise _Unknown("callable wrapped too deeply")
    kind = type(fn)
    if kind is types.FunctionType:
        return _globals_module(_func_globals(fn), _func_qualname(fn)), _func_qualname(fn), None, None
    if kind is types.MethodType:
        return _code(_method_func(fn), depth + 1)
    if kind is types.BuiltinFunctionType:
        owner = _builtin_self(fn)
        name = _builtin_name(fn)
        if isinstance(owner, types.ModuleType):
            module_name = _module_dict(owner).get("__name__")
            if not isinstance(module_name, str) or sys.modules.get(module_name) is not owner:
                raise _Unknown(f"C function {name!r} belongs to a module that is not imported")
            return module_name, name, None, None
        if owner is None:
            raise _Unknown(f"C function {name!r} has no module")
        return _c_method(owner if isinstance(owner, type) else type(owner), name, owner)
    if kind is types.MethodWrapperType:
        owner, name = _wrapper_self(fn), _wrapper_name(fn)
        if name == "__call__":  # f.__call__ runs f
            return _code(owner, depth + 1)
        return _c_method(type(owner), name, owner)
    if kind in _C_DESCRIPTORS:
        objclass = fn.__objclass__  # a C-level member of the descriptor types
        return _class_module(objclass), f"{_type_qualname(objclass)}.{fn.__name__}", objclass, fn.__name__
    if kind is functools.partial:
        return _code(_partial_func(fn), depth + 1)
    cython = _cython_globals(kind)
    if cython is not None:  # Cython functions carry their module's globals as Python ones do
        qualname = _type_dict(kind)["__qualname__"].__get__(fn)
        return _globals_module(cython.__get__(fn), qualname), qualname, None, None
    if isinstance(fn, type):
        raise _Unknown("classes are checked by check_call")
    if kind is getattr(functools, "_lru_cache_wrapper", None):
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is None:
            raise _Unknown("an lru_cache wrapper without __wrapped__")
        return _code(wrapped, depth + 1)
    owner, attr = _static_lookup(kind, "__call__")  # any other callable object: its class's __call__
    return _attribute_code(owner, "__call__", attr, depth + 1)


def _attribute_code(owner, name, attr, depth):
    """The code behind the raw class attribute `attr` (found on `owner`) when it is called:
    a C slot or method is its `__objclass__`'s; anything else (a function, a staticmethod's
    function, a C function of a module a class stored, a partial) is resolved by `_code`."""
    if type(attr) in (staticmethod, classmethod):
        return _code(attr.__func__, depth + 1)
    if type(attr) in _C_DESCRIPTORS:
        objclass = attr.__objclass__
        return _class_module(objclass), f"{_type_qualname(objclass)}.{name}", objclass, name
    return _code(attr, depth + 1)


def _cython_globals(kind):
    """The C-level `__globals__` descriptor of a Cython function type, else None. A Python
    class could borrow the names, but not a C descriptor that applies to its instances."""
    if _type_name(kind) not in _CYTHON_FUNCTIONS:
        return None
    ns = _type_dict(kind)
    getter = ns.get("__globals__")
    return getter if type(getter) in _C_MEMBERS and type(ns.get("__qualname__")) in _C_MEMBERS else None


def _c_method(cls, name, bound_to):
    """A bound C method or slot: its code is the first C descriptor of that name on the MRO
    (a Python override of the same name above it is not what runs)."""
    for klass in _type_mro(cls):
        attr = _type_dict(klass).get(name)
        if type(attr) in _C_DESCRIPTORS:
            owner = attr.__objclass__
            return _class_module(owner), f"{_type_qualname(owner)}.{name}", owner, name
    raise _Unknown(f"no C method {name!r} on {_type_qualname(cls)}")


def _class_code(cls):
    """Every piece of code calling the class `cls` runs, except allocation-only code."""
    pieces = []
    for target, name in ((type(cls), "__call__"), (cls, "__new__"), (cls, "__init__")):
        owner, attr = _static_lookup(target, name)
        if (owner, name) in _NEUTRAL:
            continue
        if type(attr) is staticmethod:
            attr = attr.__func__
        if type(attr) is types.FunctionType and name == "__new__" and _namedtuple_new(attr):
            continue
        if type(attr) is types.BuiltinFunctionType and _builtin_self(attr) is owner:
            # tp_new of a C type (`__new__` is a builtin bound to the type): the type's code
            if owner is not cls and _class_module(owner) == "builtins":
                continue  # a builtin base allocates a subclass's instance
            pieces.append((_class_module(owner), f"{_type_qualname(owner)}.{name}", owner, name))
            continue
        piece = _attribute_code(owner, name, attr, 1)
        if piece[2] is not None and piece[2] is not cls and piece[0] == "builtins":
            continue  # a builtin base's slot initializes a subclass's instance
        pieces.append(piece)
    return pieces


def _class_origin(cls):
    """The module a class that runs no code of its own when called comes from: that of its
    own Python functions when it has any (its `__module__` can be set to anything), else the
    module CPython records."""
    modules = {_code(v)[0] for v in _type_dict(cls).values() if type(v) is types.FunctionType}
    if len(modules) > 1:
        raise _Unknown(f"class {_type_qualname(cls)} holds functions of several modules: {sorted(modules)}")
    return modules.pop() if modules else _class_module(cls)


def defining_module(fn):
    """The module whose code calling `fn` runs (for messages and tests); None when unknown."""
    try:
        if isinstance(fn, type):
            pieces = _class_code(fn)
            return pieces[0][0] if pieces else _class_origin(fn)
        return _code(fn)[0]
    except _Unknown:
        return None


def _inside(module, package):
    return module == package or module.startswith(package + ".")


def _module_allowed(rules, module, reached):
    """Allowed by a rule, or defined inside the package of a module the chain reached and
    not singled out by a deny rule that the reached module escapes."""
    if rules.allows(module):
        return True
    for package in reached:
        if _inside(module, package):
            rule = rules.first_match(module)
            if rule is None or fnmatch.fnmatchcase(package, rule[0]):
                return True
    return False


def _allow_listed(owner, name, bound_to):
    if owner is None or name is None:
        return False
    for value_type, names in VALUE_METHODS.items():
        if owner is value_type and name in names:
            return True
    names = CONTAINER_METHODS.get(owner)
    return names is not None and name in names and type(bound_to) is owner


def _refuse(user, what, module, detail=None):
    root = module.partition(".")[0] if module else None
    hint = (f"; a rule 'allow {module}'" + (f" (or 'allow {root}*')" if root != module else "")
            + " would allow it") if module else ""
    why = detail or f"it is defined in module {module!r}, which the rules of user {user!r} do not allow"
    raise PermissionError(f"calling {what} is refused: {why}{hint} (users without the 'builtins' right "
                          f"may call only code defined in the modules their rules allow)")


def check_call(rules, user, fn, reached, what):
    """Raise PermissionError unless a user with `rules` may call `fn`.

    `reached`: the names of the modules the chain passed through (each already allowed);
    `what`: how the chain named the callable, for the message."""
    try:
        if isinstance(fn, type):
            pieces = _class_code(fn)
            if not pieces:  # only allocation: the class itself must come from an allowed module
                pieces = [(_class_origin(fn), _type_qualname(fn), None, None)]
        else:
            pieces = [_code(fn)]
    except _Unknown as e:
        _refuse(user, what, None, f"the module that defines it cannot be proven ({e})")
    bound_to = getattr(fn, "__self__", None) if type(fn) in (types.BuiltinFunctionType,
                                                             types.MethodWrapperType) else None
    for module, qualname, owner, name in pieces:
        if _allow_listed(owner, name, bound_to):
            continue
        if not _module_allowed(rules, module, reached):
            _refuse(user, f"{what} ({module}.{qualname})", module)
