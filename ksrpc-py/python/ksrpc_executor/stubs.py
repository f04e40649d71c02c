"""The `.pyi` stub writer: `generate_stub(module)` and the `_StubCall` a chain reaches as
`module.generate_stub` (callable by any user allowed the module), both built on `_StubWriter`,
which prints functions, classes, constants and docstrings from `inspect`.
"""
from __future__ import annotations

import inspect
import re
import sys
import types

from .names import _MISSING, _is_dunder


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
