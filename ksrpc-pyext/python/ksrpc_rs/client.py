"""``ksrpc_rs.client``: the ksrpc 0.8.1 client's ``RpcClient`` over the native protocol.

Migrating a script is a change of imports (``ksrpc.`` -> ``ksrpc_rs.``)::

    from ksrpc_rs.client import RpcClient
    from ksrpc_rs.connections.websocket import WebSocketConnection

    async with WebSocketConnection(URL, username=USER, password=PASSWORD) as conn:
        demo = RpcClient("ksrpc.server.demo", conn)
        print(await demo.add(1, 2))

What changes underneath: values cross as explicit values, DataFrames and arrays as Arrow
(no pickle of pandas' internals, so the two sides' pandas versions need not match), one
WebSocket carries many calls at once, and Rust does the sockets and decompression without the
GIL. ``to_sync=True`` needs no ``nest_asyncio``, also inside Jupyter's running loop.

As in 0.8.1: ``lazy=False`` runs at each ``()``; ``lazy=True`` builds the chain until
``.collect()``; ``[]`` subscripts; ``Self`` in a builtin's arguments stands for the object the
chain reached (``RpcClient("builtins", conn).len(Self)`` after ``demo.get_list()``... see the
README); a lazy ``RpcClient`` passed as an argument is resolved on the server first; a generator
result is iterated with ``async for`` (or ``for`` when ``to_sync``) or ``rpc_iterator``.
Functions and lambdas as arguments are pickled with dill (as 0.8.1 did; ``pip install dill``)
and run only for users allowed ``builtins`` on a server with ``python.allow_code = true``.
Not carried over: ``ref_id`` (generators are objects of their own here).
"""
from __future__ import annotations

import asyncio
import inspect
from typing import Any, List, Optional, Tuple

from .connections import BaseConnection, _start, _wait
from .errors import ConnectionLostError

__all__ = ["RpcClient", "RemoteGenerator", "rpc_iterator", "Self"]


class _Self:
    """The ``Self`` marker: in a builtin's arguments, the object the chain reached."""

    _ksrpc_native_ = "self"

    def __repr__(self) -> str:
        return "Self"


Self = _Self()

# Names looked up by tools (IPython's display, numpy, os.fspath) rather than by the user:
# answering them with a remote chain would run calls nobody asked for.
_LOCAL_ONLY_PREFIXES = ("_repr_", "_ipython_", "__array", "_ksrpc_")
_LOCAL_ONLY = {"__length_hint__", "__fspath__", "__await__", "__aiter__", "__iter__",
               "__getstate__", "__setstate__", "__reduce__", "__reduce_ex__", "__deepcopy__",
               "__copy__", "_fields", "__wrapped__"}

_Call = Tuple[str, Optional[tuple], Optional[dict]]


class RpcClient:
    """A chain of attribute reads, calls and subscripts on a module of the server.

    ``RpcClient(module, connection, lazy=False, to_sync=False)`` as in 0.8.1; keywords of this
    client: ``timeout`` (seconds, this chain's calls), ``tables`` (``"pandas"``, ``"arrow"``,
    ``"polars"``) and ``progress`` (see ``ksrpc_rs.connections``); ``collect()`` takes the
    same three for one call."""

    _ksrpc_native_ = "chain"

    def __init__(self, module: str, connection: BaseConnection, ref_id: int = 0,
                 calls: Optional[List[_Call]] = None, last_call: Any = None, lazy: bool = False,
                 to_sync: bool = False, *, timeout: Optional[float] = None,
                 tables: Optional[str] = None, progress: Any = None):
        if not isinstance(connection, BaseConnection):
            raise TypeError("connection must be a ksrpc_rs connection (ksrpc_rs.connections...), "
                            f"not {type(connection).__name__}")
        self._module = module
        self._connection = connection
        self._calls: List[_Call] = list(calls or [])
        self._lazy = lazy
        self._to_sync = to_sync
        self._options = dict(timeout=timeout, tables=tables, progress=progress)

    def _derive(self, calls: List[_Call]) -> "RpcClient":
        c = RpcClient.__new__(RpcClient)
        c.__dict__.update(self.__dict__)
        c._calls = calls
        return c

    def __getattr__(self, name: str) -> "RpcClient":
        if name.startswith(_LOCAL_ONLY_PREFIXES) or name in _LOCAL_ONLY:
            raise AttributeError(name)
        return self._derive(self._calls + [(name, None, None)])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._calls:
            raise TypeError(f"{self!r} is a module; call one of its attributes (demo.add(1, 2))")
        kwargs = dict(sorted(kwargs.items()))
        name, done_args, _ = self._calls[-1]
        if done_args is None:
            chain = self._derive(self._calls[:-1] + [(name, args, kwargs)])
        else:  # calling what a call returned: f(1)(2)
            chain = self._derive(self._calls + [("__call__", args, kwargs)])
        return chain if self._lazy else chain.collect()

    def __getitem__(self, item: Any) -> Any:
        return self.__getattr__("__getitem__")(item)

    def collect(self, *, timeout: Optional[float] = None, tables: Optional[str] = None,
                progress: Any = None) -> Any:
        """Runs the chain: the result (``to_sync``) or a coroutine of it."""
        options = {k: v for k, v in self._options.items() if v is not None}
        options.update({k: v for k, v in dict(timeout=timeout, tables=tables, progress=progress).items()
                        if v is not None})
        if self._to_sync:
            return self._wrap(*self._connection._call_sync(self._module, self._calls, **options))
        return self._collect_async(options)

    async def _collect_async(self, options: dict) -> Any:
        return self._wrap(*await self._connection._call_async(self._module, self._calls, **options))

    def _wrap(self, generator: bool, value: Any) -> Any:
        return RemoteGenerator(value, self._connection, repr(self)) if generator else value

    def generate_stub(self) -> Any:
        """The module's ``.pyi`` stub, written by the server."""
        return self.__getattr__("generate_stub")(module=self._module)

    def _ksrpc_chain_(self) -> Tuple[str, List[_Call]]:
        """The chain as the native converter reads it (a lazy chain as an argument)."""
        return self._module, self._calls

    def __repr__(self) -> str:
        parts = []
        for name, args, kwargs in self._calls:
            if args is None:
                parts.append(name)
            else:
                shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in (kwargs or {}).items()]
                parts.append(f"{name}({', '.join(shown)})")
        return f"<RpcClient[{self._module}:{'.'.join(parts)}]>"


def _pickle_function(func: Any) -> bytes:
    """A function or lambda argument, pickled by value with dill (called by ``_native``)."""
    try:
        import dill
    except ImportError:
        raise TypeError("a function as an argument is sent as code, pickled with dill: pip install dill "
                        "(the server runs it only for users allowed 'builtins', with python.allow_code = "
                        "true)") from None
    return dill.dumps(func, recurse=True)


class RemoteGenerator:
    """A generator (sync or async) on the server: ``async for``, ``for``, ``next()``.

    Its items are fetched one at a time; ``close()`` (or dropping it) frees it on the server."""

    def __init__(self, stream: Any, connection: BaseConnection, label: str):
        self._stream = stream
        self._connection = connection
        self._label = label

    def __repr__(self) -> str:
        return f"<RemoteGenerator of {self._label}>"

    def _next_future(self):
        return _start(lambda done: self._stream.next(done))

    def _item(self, ok: bool, item: Any, stop: type) -> Any:
        if not ok:
            raise stop
        return item

    def __aiter__(self) -> "RemoteGenerator":
        return self

    async def __anext__(self) -> Any:
        try:
            ok, item = await asyncio.wrap_future(self._next_future())
        except ConnectionLostError:
            self._connection.close()
            raise
        return self._item(ok, item, StopAsyncIteration)

    def __iter__(self) -> "RemoteGenerator":
        return self

    def __next__(self) -> Any:
        try:
            ok, item = _wait(self._next_future())
        except ConnectionLostError:
            self._connection.close()
            raise
        return self._item(ok, item, StopIteration)

    def close(self) -> None:
        """Frees the generator on the server."""
        self._stream.close()


async def rpc_iterator(generator: Any):
    """0.8.1's way to iterate a remote generator, sync or async, with ``async for``::

        async for item in rpc_iterator(demo.async_counter()):
            print(item)

    Takes a lazy ``RpcClient``, the coroutine of an eager call, or a ``RemoteGenerator``."""
    if isinstance(generator, RpcClient):
        generator = generator.collect()
    if inspect.isawaitable(generator):
        generator = await generator
    if not isinstance(generator, RemoteGenerator):
        raise TypeError(f"rpc_iterator needs a remote generator, got {type(generator).__name__}")
    async for item in generator:
        yield item
