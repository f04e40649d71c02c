"""``HttpConnection``: a request per call (``POST {url}/v2/call``), calls in parallel over a
connection pool. Takes ``http://`` and ``https://`` URLs (``ws://`` is read as ``http://``)."""
from __future__ import annotations

from . import BaseConnection

__all__ = ["HttpConnection"]


class HttpConnection(BaseConnection):
    """The 0.8.1 ``HttpConnection``'s constructor and use; see ``ksrpc_rs.connections``."""

    transport = "http"
