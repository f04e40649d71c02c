"""Connections of ``ksrpc_rs``'s client: the 0.8.1 client's classes over the native protocol.

``HttpConnection`` (``POST {url}/v2/call``, a request per call, calls in parallel over a
connection pool), ``WebSocketConnection`` (one socket ``{url}/v2/ws`` with any number of calls
in flight, replies in completion order) and ``SmartConnection`` (picks one by the URL's scheme)
take the URLs and keyword arguments of ``ksrpc.connections``::

    conn = WebSocketConnection("ws://host:8080/api/v1", username="u", password="p")

They connect on first use, work with ``async with``, ``with`` and without either, and reconnect
on the next call after a dropped connection (a call is never sent twice: the calls in flight
when it dropped fail with ``ConnectionLostError``).

0.8.1's ``connector`` (an aiohttp connector) has no meaning here: it is accepted and ignored,
with a warning. ``proxy`` and ``proxy_auth`` (an ``aiohttp.BasicAuth`` or a ``(user,
password)`` pair) are honoured for HTTP; the WebSocket transport refuses a proxy rather than go
around it. New keywords: ``timeout`` (seconds per call; default none: 0.8.1 cut every call at
60 s), ``connect_timeout``, ``cafile`` (a PEM file of certificates to trust for ``https``/
``wss``), ``tables`` (``"pandas"``, ``"arrow"`` or ``"polars"``: how table results arrive) and
``progress`` (``None``: a tqdm bar for big replies when tqdm is installed; ``False``: none; a
callable ``f(received_bytes, total_or_None)``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import warnings
from typing import Any, Callable, Optional, Tuple, Union
from urllib.parse import unquote

from .. import _native
from ..errors import ConnectionLostError

__all__ = ["BaseConnection", "SmartConnection"]

Progress = Union[None, bool, Callable[[int, Optional[int]], Any]]


def _settle(future: cf.Future, ok: bool, value: Any) -> None:
    """`done` of a native operation: resolves `future` (unless its waiter gave up)."""
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except cf.InvalidStateError:
        pass


def _start(operation: Callable[[Callable[[bool, Any], None]], Any]) -> cf.Future:
    """Starts a native operation; the future cancels it when cancelled itself."""
    future: cf.Future = cf.Future()
    pending = operation(lambda ok, value: _settle(future, ok, value))
    future.add_done_callback(lambda f: f.cancelled() and pending.cancel())
    return future


def _wait(future: cf.Future, cancel: bool = True) -> Any:
    """Waits for a native operation in this thread (the GIL released); Ctrl-C cancels it
    unless `cancel` is false (an operation other callers share)."""
    try:
        return future.result()
    except BaseException:
        if cancel and not future.done():
            future.cancel()
        raise


def _tqdm_installed() -> bool:
    global _TQDM
    if _TQDM is None:
        try:
            import tqdm.auto  # noqa: F401
            _TQDM = True
        except ImportError:
            _TQDM = False
    return _TQDM


_TQDM: Optional[bool] = None


class _AutoProgress:
    """The default progress: a tqdm bar once a reply passes 8 MiB, when tqdm is installed."""

    THRESHOLD = 8 << 20

    def __init__(self, label: str):
        self._label = label
        self._bar = None

    def __call__(self, received: int, total: Optional[int]) -> None:
        if self._bar is None:
            if max(received, total or 0) < self.THRESHOLD:
                return
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=self._label, leave=False)
        if self._bar:
            self._bar.update(received - self._bar.n)

    def close(self) -> None:
        if self._bar:
            self._bar.close()


class BaseConnection:
    """What both transports share: lazy connection, reconnect, and running calls."""

    transport: str = ""

    def __init__(self, url: str, username: Optional[str] = None, password: Optional[str] = None,
                 connector: Any = None, proxy: Optional[str] = None, proxy_auth: Any = None, *,
                 timeout: Optional[float] = None, connect_timeout: float = 30.0,
                 cafile: Optional[str] = None, tables: str = "pandas", progress: Progress = None):
        if connector is not None:
            warnings.warn("ksrpc_rs connections do not use aiohttp: `connector` is ignored",
                          stacklevel=3)
        if tables not in ("pandas", "arrow", "pyarrow", "polars"):
            raise ValueError(f"tables must be 'pandas', 'arrow' or 'polars', not {tables!r}")
        self._url = unquote(url)
        self._options = dict(username=username, password=password, timeout=timeout,
                             connect_timeout=connect_timeout, transport=self.transport or None,
                             proxy=proxy, proxy_auth=_pair(proxy_auth),
                             ca_pem=_read(cafile) if cafile else None)
        self.tables = tables
        self.progress = progress
        self._lock = threading.Lock()
        self._native: Any = None
        self._connecting: Optional[cf.Future] = None

    def __repr__(self) -> str:
        state = "connected" if self._native is not None else "not connected"
        return f"<{type(self).__name__} {self._url} ({state})>"

    # -- connecting ---------------------------------------------------------------------------
    def _connect(self) -> cf.Future:
        """A future of the native client: the current one, or one connection attempt shared by
        every call that needs it."""
        with self._lock:
            if self._native is not None:
                ready: cf.Future = cf.Future()
                ready.set_result(self._native)
                return ready
            if self._connecting is not None:
                return self._connecting
            future: cf.Future = cf.Future()
            self._connecting = future

        def done(ok: bool, value: Any) -> None:
            with self._lock:
                self._connecting = None
                if ok:
                    self._native = value
            _settle(future, ok, value)

        try:
            _native.connect(self._url, done, **self._options)
        except BaseException as e:
            done(False, e)
        return future

    def _lost(self, native: Any) -> None:
        """Forgets a client whose connection dropped: the next call connects again."""
        with self._lock:
            if self._native is native:
                self._native = None

    # -- calls ----------------------------------------------------------------------------------
    def _progress(self, progress: Progress, label: str):
        chosen = self.progress if progress is None else progress
        if chosen is None or chosen is True:
            # each report takes the GIL (on a thread of its own): none without a bar
            return _AutoProgress(label) if _tqdm_installed() else None
        return chosen or None

    def _start_call(self, native: Any, module: str, calls: list, timeout: Optional[float],
                    tables: Optional[str], progress: Progress) -> Tuple[cf.Future, Any]:
        bar = self._progress(progress, module)
        future = _start(lambda done: native.call(module, calls, done, timeout=timeout,
                                                 tables=tables or self.tables, progress=bar))
        return future, bar

    def _finish(self, native: Any, future: cf.Future, bar: Any) -> Any:
        if isinstance(bar, _AutoProgress):
            bar.close()
        exc = future.exception() if future.done() and not future.cancelled() else None
        if isinstance(exc, ConnectionLostError):
            self._lost(native)

    async def _call_async(self, module: str, calls: list, *, timeout=None, tables=None,
                          progress: Progress = None) -> Tuple[bool, Any]:
        # shielded: the connection attempt is shared, and one caller giving up must not end it
        native = await asyncio.shield(asyncio.wrap_future(self._connect()))
        future, bar = self._start_call(native, module, calls, timeout, tables, progress)
        try:
            return await asyncio.wrap_future(future)
        finally:
            self._finish(native, future, bar)

    def _call_sync(self, module: str, calls: list, *, timeout=None, tables=None,
                   progress: Progress = None) -> Tuple[bool, Any]:
        native = _wait(self._connect(), cancel=False)
        future, bar = self._start_call(native, module, calls, timeout, tables, progress)
        try:
            return _wait(future)
        finally:
            self._finish(native, future, bar)

    # -- closing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Closes the connection (calls in flight fail); the next call connects again."""
        with self._lock:
            self._native = None

    async def reset(self) -> None:
        """0.8.1's name for closing; kept so code that calls it keeps working."""
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


def _pair(auth: Any) -> Optional[Tuple[str, str]]:
    if auth is None:
        return None
    if isinstance(auth, (tuple, list)) and len(auth) == 2:
        return str(auth[0]), str(auth[1])
    login, password = getattr(auth, "login", None), getattr(auth, "password", None)
    if login is None:
        raise TypeError("proxy_auth must be an aiohttp.BasicAuth or a (user, password) pair")
    return str(login), str(password or "")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class SmartConnection:
    """Picks the connection by the URL's scheme: ``ws``/``wss`` a WebSocket, else HTTP."""

    def __new__(cls, url: str, username: Optional[str] = None, password: Optional[str] = None,
                connector: Any = None, proxy: Optional[str] = None, proxy_auth: Any = None,
                **options: Any):
        if url.split("://")[0].startswith("ws"):
            from .websocket import WebSocketConnection
            return WebSocketConnection(url, username, password, connector, proxy, proxy_auth, **options)
        from .http import HttpConnection
        return HttpConnection(url, username, password, connector, proxy, proxy_auth, **options)
