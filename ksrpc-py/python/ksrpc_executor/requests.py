"""Request validation and log summary: the shape checks of a decoded request (`_validate`,
`_check_calls`, with the caps on nested lazy chains), the chain as logged (`_summarize`, no
argument values), the dotted chain the result cache matches (`_cache_chain`), and `_one_line`
for messages.
"""
from __future__ import annotations

from .names import _MISSING


# ---------------------------------------------------------------------------
# Request validation and log summary
# ---------------------------------------------------------------------------

# Lazy chains (RpcClient arguments) are resolved, nested ones first, before their call. Through
# the pickle memo one nested chain can be referenced k times at each of d levels: k**d
# resolutions from a few hundred bytes, so the calls of the whole tree are counted, each time
# they are reached, not only its depth.
_MAX_CHAIN_DEPTH = 16
_MAX_CHAIN_CALLS = 1024


def _check_calls(calls, where, classes, count=None, depth=0):
    rpc_call, rpc_client = classes
    count = [0] if count is None else count
    if depth > _MAX_CHAIN_DEPTH:
        raise ValueError(f"lazy chains are nested more than {_MAX_CHAIN_DEPTH} deep")
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"{where} must be a list of ksrpc.client.RpcCall, not {type(calls).__name__}")
    count[0] += len(calls)
    if count[0] > _MAX_CHAIN_CALLS:
        raise ValueError(f"the request has more than {_MAX_CHAIN_CALLS} calls, counting each use of "
                         f"a nested lazy chain")
    for i, c in enumerate(calls):
        here = f"{where}[{i}]"
        if not isinstance(c, rpc_call):
            raise ValueError(f"{here} must be a ksrpc.client.RpcCall, not {type(c).__name__}")
        name, args, kwargs = (getattr(c, a, _MISSING) for a in ("name", "args", "kwargs"))
        if not isinstance(name, str):
            raise ValueError(f"{here}.name must be a str")
        if args is not None and not isinstance(args, (tuple, list)):
            raise ValueError(f"{here}.args must be a tuple, a list or None")
        if kwargs is not None and (not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs)):
            raise ValueError(f"{here}.kwargs must be a dict with str keys or None")
        for v in list(args or ()) + list((kwargs or {}).values()):
            if isinstance(v, rpc_client):
                state = vars(v)  # never getattr: the real RpcClient invents attributes
                if not isinstance(state.get("_module"), str):
                    raise ValueError(f"{here} has a nested RpcClient without a str module")
                _check_calls(state.get("_calls"), f"{here} nested chain calls", classes, count, depth + 1)


def _validate(req, classes):
    if not isinstance(req, dict):
        raise ValueError(f"request must be a dict, not {type(req).__name__}")
    missing = [k for k in ("module", "calls", "ref_id") if k not in req]
    if missing:
        raise ValueError(f"request lacks {', '.join(missing)}")
    module, calls, ref_id = req["module"], req["calls"], req["ref_id"]
    if not isinstance(module, str):
        raise ValueError(f"module must be a str, not {type(module).__name__}")
    if type(ref_id) is not int or not 0 <= ref_id < 2 ** 63:
        raise ValueError("ref_id must be an int in [0, 2**63)")
    _check_calls(calls, "calls", classes)
    return module, list(calls), ref_id


def _summarize(module, calls, ref_id=0):
    """The chain for logs: argument counts only, never values (logins pass passwords)."""
    parts = [module]
    for c in calls:
        if c.args is None:
            parts.append(c.name)
            continue
        n, k = len(c.args), len(c.kwargs or {})
        counts = [f"{n} arg{'s' if n != 1 else ''}"] if n else []
        counts += [f"{k} kwarg{'s' if k != 1 else ''}"] if k else []
        parts.append(f"{c.name}({', '.join(counts)})")
    return ".".join(parts) + (" [handle]" if ref_id else "")


def _cache_chain(module, calls, ref_id, rpc_client):
    """The dotted chain (`module.attr.attr`) the result cache matches its ttl patterns on, or
    None when the request is never cached: a generator step, or a chain passed as an argument
    (what it resolves to is not part of the chain)."""
    if ref_id:
        return None
    for c in calls:
        if any(isinstance(v, rpc_client) for v in list(c.args or ()) + list((c.kwargs or {}).values())):
            return None
    return ".".join([module] + [c.name for c in calls])


def _one_line(text, limit=300):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
