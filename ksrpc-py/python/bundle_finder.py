"""Serves the server's bundled Python modules from memory.

The Rust side (`ksrpc_py::interp`) runs this file once in the interpreter and
calls `install(private, standins)` with the texts it was compiled with.
Nothing is written to disk: a directory of ours in a temp dir could be created
first, or changed between two starts, by another local user, who would then
run code in the server.

Two finders, two places on `sys.meta_path`:
- the server's own modules (`ksrpc_executor`, `ksrpc_capability`) are found
  *first*: no file on `sys.path` (the current directory of `python -m
  ksrpc_rs`, a script's directory) can stand in for the restricted unpickler;
- the `ksrpc` stand-in package is found *last*, so an installed package of
  that name (the real `ksrpc` 0.8.1) wins, as the client's classes must be
  the client's own when both are there.

Modules it loads have a `__file__` of the form `<ksrpc-rs bundle>/ksrpc/...py`
(the 0.8.1 README reads `demo.__file__`) that names no real file; tracebacks
and `inspect.getsource` get their lines from the finder (`get_source`).
"""
import importlib.abc
import importlib.machinery
import sys

ORIGIN = "<ksrpc-rs bundle>"


class BundleFinder(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Finder and loader of the bundled modules (`name -> (source, is_package)`)."""

    def __init__(self, sources, role):
        self._sources = dict(sources)
        self._ksrpc_bundle = role  # "private" or "standins": how `install` finds it again

    def find_spec(self, fullname, path=None, target=None):
        entry = self._sources.get(fullname)
        if entry is None:
            return None
        parent = fullname.rpartition(".")[0]
        if parent:
            # A submodule is ours only inside our own package: never graft a bundled
            # module onto an installed package that lacks it.
            spec = getattr(sys.modules.get(parent), "__spec__", None)
            if spec is None or spec.loader is not self:
                return None
        spec = importlib.machinery.ModuleSpec(fullname, self, origin=self._filename(fullname),
                                              is_package=entry[1])
        spec.has_location = True  # sets __file__ (a name, not a file on disk)
        return spec

    def _filename(self, fullname):
        tail = "/__init__.py" if self._sources[fullname][1] else ".py"
        return ORIGIN + "/" + fullname.replace(".", "/") + tail

    def is_package(self, fullname):
        if fullname not in self._sources:
            raise ImportError(f"{fullname} is not bundled", name=fullname)
        return self._sources[fullname][1]

    def get_source(self, fullname):
        if fullname not in self._sources:
            raise ImportError(f"{fullname} is not bundled", name=fullname)
        return self._sources[fullname][0]

    def get_code(self, fullname):
        return compile(self.get_source(fullname), self._filename(fullname), "exec", dont_inherit=True)


def install(private, standins):
    """Puts the private modules' finder first on `sys.meta_path` and the
    stand-ins' last (once per interpreter: a second start in the same process
    updates the finders already there, whose modules are in `sys.modules`)."""
    found = {}
    for finder in list(sys.meta_path):
        role = getattr(finder, "_ksrpc_bundle", None)
        if role in ("private", "standins"):
            found[role] = finder
    for role, sources in (("private", private), ("standins", standins)):
        finder = found.get(role)
        if finder is None:
            finder = BundleFinder(sources, role)
        else:
            finder._sources = dict(sources)
            sys.meta_path.remove(finder)
        if role == "private":
            sys.meta_path.insert(0, finder)
        else:
            sys.meta_path.append(finder)
