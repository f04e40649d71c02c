"""``WebSocketConnection``: one socket (``{url}/v2/ws``) carrying any number of calls at once,
replies in the order they finish (0.8.1 ran one call at a time per socket). Takes ``ws://`` and
``wss://`` URLs, with or without the trailing ``/ws``; ``http(s)://`` is read as ``ws(s)://``."""
from __future__ import annotations

from . import BaseConnection

__all__ = ["WebSocketConnection"]


class WebSocketConnection(BaseConnection):
    """The 0.8.1 ``WebSocketConnection``'s constructor and use; see ``ksrpc_rs.connections``."""

    transport = "websocket"
