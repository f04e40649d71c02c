"""Stand-ins for the classes of ksrpc 0.8.1's `ksrpc.client` that travel in pickles.

Requests unpickle into these classes and replies pickle `RpcCall` instances
under the same module and names, so the real 0.8.1 client loads them as its
own classes. No networking here: the server never calls anything remotely.
"""

__all__ = ["RpcCall", "RpcClient", "Self"]


class _Self:
    """Placeholder for "the current object" of a chain: `demo.LIST.len(Self)`."""

    def __repr__(self):
        return "Self"


Self = _Self()


class RpcCall:
    """One step of a chain: attribute access when `args` is None, else a call."""

    def __init__(self, name, args, kwargs):
        self.name = name
        self.args = args
        self.kwargs = kwargs

    def __repr__(self):
        if self.args is None:
            return self.name
        args = [f"{a}" for a in self.args]
        kwargs = [f"{k}={v}" for k, v in (self.kwargs or {}).items()]
        return f"{self.name}({','.join(args + kwargs)})"


class RpcClient:
    """A lazy chain passed as an argument; only its pickled state matters here."""

    def __init__(self, module, connection=None, ref_id=0, calls=None, last_call=None,
                 lazy=False, to_sync=False):
        self._module = module
        self._connection = connection
        self._ref_id = ref_id
        self._calls = list(calls or [])
        self._last_call = last_call
        self._lazy = lazy
        self._to_sync = to_sync

    # Same state as the 0.8.1 client: a connection never travels.
    def __getstate__(self):
        return {"module": self._module, "calls": self._calls}

    def __setstate__(self, state):
        self._module = state["module"]
        self._calls = state["calls"]

    def __repr__(self):
        return f"<RpcClient[{self._module}:{self._calls}] at {id(self):#016x}>"
