"""ksrpc_rs: the ksrpc server (wire-compatible with the ksrpc 0.8.1 client) running inside
this Python interpreter.

Calls run in *this* interpreter, so what a notebook imported, configured or logged in
(``jqdatasdk.auth(...)`` in a cell, a module put in ``sys.modules``) is what remote calls
reach. Start it from a shell (``python -m ksrpc_rs --config ksrpc.toml``) or from Python::

    import ksrpc_rs
    srv = ksrpc_rs.serve("ksrpc.toml")        # returns at once; the kernel stays usable
    print(srv.url)
    srv.stop()

The configuration is the ``ksrpc-server`` binary's (TOML file, ``KSRPC_*`` variables,
``host``/``port``/``path`` overrides); ``python.venv`` is refused here: the packages are this
interpreter's. This package never shadows the real ``ksrpc`` package: where that is installed,
requests unpickle with its classes; elsewhere the server's own stand-ins are used.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import warnings
from typing import Any, Mapping, Optional, Union

from . import _native

__all__ = ["serve", "Server", "hash_password", "__version__"]
__version__ = _native.__version__
hash_password = _native.hash_password
# A server still running when the interpreter exits is stopped first, its calls cut: a pool
# thread must not wake up into the interpreter's finalization (see `stop_at_exit`).
atexit.register(_native.stop_at_exit)
# Likewise the client's threads stop delivering replies before the interpreter finalizes.
atexit.register(_native.client_atexit)


class Server:
    """A running server: ``url``, ``urls``, ``running``, ``stop()``, ``wait()``.

    Also a context manager: ``with ksrpc_rs.serve(...) as srv:`` stops it on exit."""

    def __init__(self, native: "_native.NativeServer"):
        self._native = native

    @property
    def url(self) -> str:
        """The base URL for the 0.8.1 client (``http://127.0.0.1:8080/api/v1``)."""
        return self._native.urls[0]

    @property
    def urls(self) -> list:
        return list(self._native.urls)

    @property
    def running(self) -> bool:
        return self._native.running

    def idle_seconds(self) -> Optional[float]:
        """Seconds since the last call ended (``None`` while one runs)."""
        return self._native.idle_seconds()

    def stop(self) -> None:
        """Stop accepting calls, let those in flight finish, and release every thread.
        Serving again in the same process works afterwards."""
        self._native.stop()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the server stops (an idle stop, or ``stop()`` from another thread) or
        ``timeout`` seconds pass; returns whether it stopped. Ctrl-C stops the server and
        raises KeyboardInterrupt."""
        try:
            if timeout is not None:
                return self._native.wait(float(timeout))
            while not self._native.wait(3600.0):
                pass
            return True
        except KeyboardInterrupt:
            self.stop()
            raise

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ksrpc_rs.Server {state} at {self.url}>"


def serve(config: Union[None, str, "os.PathLike[str]", Mapping[str, Any]] = None, *,
          host: Optional[str] = None, port: Optional[int] = None, path: Optional[str] = None,
          block: bool = False, idle_timeout: Optional[float] = None) -> Server:
    """Start the server in this interpreter.

    config: a TOML file path, or a mapping shaped like the file
        (``{"server": {"port": 0}, "users": {...}}``), or None for the defaults (loopback,
        an ``admin`` user with a random password shown once, the demo module only).
    host, port, path: override the config (``port=0`` picks a free port; see ``Server.url``).
    block: wait until the server stops (Ctrl-C stops it); False returns at once.
    idle_timeout: stop after this many seconds without a call (as 0.8.1's run_notebook).
    """
    config_path = values = None
    if isinstance(config, Mapping):
        values = json.dumps(config)
    elif config is not None:
        config_path = os.fspath(config)
    native = _native.start_server(config_path, values, host, port, path, idle_timeout)
    for text in native.warnings:
        warnings.warn(text, stacklevel=2)
    if native.announcement:
        print(native.announcement, file=sys.stderr, flush=True)
    srv = Server(native)
    if block:
        srv.wait()
    return srv
