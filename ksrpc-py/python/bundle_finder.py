"""Serves the server's bundled Python modules from memory.

The Rust side (`ksrpc_py::interp`) runs this file once in the interpreter and
calls `install(sources)` with the texts it was compiled with. Nothing is
written to disk: a directory of ours in a temp dir could be created first, or
changed between two starts, by another local user, who would then run code in
the server. The finder sits at the *end* of `sys.meta_path`, so an installed
package of the same name (the real `ksrpc` 0.8.1) is found first, as a
directory appended to `sys.path` was before.

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

    _ksrpc_bundle = True  # how `install` recognises a finder from an earlier start

    def __init__(self, sources):
        self._sources = dict(sources)

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


def install(sources):
    """Puts one `BundleFinder` last on `sys.meta_path` (once per interpreter:
    a second start in the same process updates the one already there, whose
    modules are the ones in `sys.modules`)."""
    for finder in sys.meta_path:
        if getattr(finder, "_ksrpc_bundle", False):
            finder._sources = dict(sources)
            return finder
    finder = BundleFinder(sources)
    sys.meta_path.append(finder)
    return finder
