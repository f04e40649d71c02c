"""The exceptions of ``ksrpc_rs``'s client.

A function that raised on the server is re-raised here as the *same builtin type*
(``ZeroDivisionError``, ``KeyError``, ``StopIteration``...) with the server's traceback in
``server_traceback`` and as a note (shown under the local traceback). The server sends an
exception class of its own modules as that class's nearest builtin base, the message starting
with ``module.Class: `` (``except LookupError`` still catches a ``KeyError`` subclass); a kind
that is no builtin here arrives as :class:`RemoteError`. What went wrong around the call has its own
type, all under :class:`KsrpcError`:

- :class:`AuthenticationError` (HTTP 401), :class:`ClockSkewError` (HTTP 403: the two clocks
  differ by more than the server's window),
- :class:`RefusedError`: the server's rules refused the call (a ``PermissionError``, so code
  catching the builtin still catches it),
- :class:`ProtocolError` and :class:`ProtocolVersionError`,
- :class:`ConnectionLostError` (a ``ConnectionError``): calls in flight fail with it and the
  next call connects again; nothing is ever sent twice,
- :class:`CallTimeoutError` (a ``TimeoutError``): the call was cancelled on the server,
- :class:`HttpStatusError`, :class:`BadUrlError`.
"""
from __future__ import annotations

import builtins
import re

__all__ = [
    "KsrpcError", "RemoteError", "AuthenticationError", "ClockSkewError", "RefusedError",
    "ProtocolError", "ProtocolVersionError", "ConnectionLostError", "CallTimeoutError",
    "HttpStatusError", "BadUrlError", "from_native",
]


class KsrpcError(Exception):
    """Base of every error the client itself raises."""


class RemoteError(KsrpcError):
    """The server raised an exception whose type is not a Python builtin.

    ``kind`` is its class (``module.Class``), ``message`` its ``str()``,
    ``server_traceback`` the server's traceback."""

    def __init__(self, kind: str, message: str, server_traceback: str = ""):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.server_traceback = server_traceback


class AuthenticationError(KsrpcError, PermissionError):
    """Wrong user or password (HTTP 401)."""


class ClockSkewError(KsrpcError, PermissionError):
    """The server refused the request's timestamp (HTTP 403); the message names both clocks."""


class RefusedError(KsrpcError, PermissionError):
    """The server's rules for this user refused the call (the message names the rule)."""

    server_traceback = ""


class ProtocolError(KsrpcError):
    """A message could not be read by the other side."""


class ProtocolVersionError(ProtocolError):
    """Client and server speak different native protocol versions."""


class ConnectionLostError(KsrpcError, ConnectionError):
    """Connecting failed or the connection dropped; the next call connects again."""


class CallTimeoutError(KsrpcError, TimeoutError):
    """No reply within the call's timeout; the call was cancelled on the server."""


class HttpStatusError(KsrpcError):
    """An HTTP status the client has no other meaning for (``status``)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class BadUrlError(KsrpcError, ValueError):
    """A URL (or proxy URL) the client cannot use."""


# The executor's refusals are PermissionErrors whose message names the user's rules.
_REFUSAL = re.compile(r"not allowed for user |the rules of user |users without the 'builtins' right|"
                      r"accepted only from users whose rules")
_VERSION = re.compile(r"protocol version", re.IGNORECASE)


def _remote(kind: str, message: str, traceback: str) -> BaseException:
    if kind == "PermissionError" and _REFUSAL.search(message):
        exc: BaseException = RefusedError(message)
    else:
        cls = getattr(builtins, kind, None) if "." not in kind else None
        exc = RemoteError(kind, message, traceback)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                exc = cls(message)
            except Exception:  # a builtin whose constructor wants more (UnicodeDecodeError)
                pass
    try:
        exc.server_traceback = traceback
        if traceback and hasattr(exc, "add_note"):
            exc.add_note("Server side traceback:\n" + traceback.rstrip())
    except AttributeError:
        pass
    return exc


def from_native(category: str, *fields) -> BaseException:
    """The exception for an error of the Rust client (called by ``_native``)."""
    if category == "remote":
        return _remote(*fields)
    message = fields[0]
    if category == "unauthorized":
        return AuthenticationError(message)
    if category == "forbidden":
        return ClockSkewError(f"the server refused the request's timestamp (HTTP 403): {message}")
    if category == "refused":
        cls = ProtocolVersionError if _VERSION.search(message) else ProtocolError
        return cls(f"the server refused the message: {message}")
    if category == "http":
        return HttpStatusError(message, fields[1])
    if category == "connection":
        return ConnectionLostError(message)
    if category == "timeout":
        return CallTimeoutError(message)
    if category == "url":
        return BadUrlError(message)
    return ProtocolError(message)
