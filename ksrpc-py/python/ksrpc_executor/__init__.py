"""Server-side call logic of the ksrpc 0.8.1 compatible server.

The Rust server embeds CPython, imports this package and calls
`Executor.handle` from a pool of Python threads. One call: decode the request
pickle with a restricted unpickler, resolve the call chain under the user's
rules, and pickle the reply. `docs/protocol.md` describes the native protocol
(`Executor.run_native`, `Executor.load_pickle_value`) and its chains; the
comments here say why things are done the way they are.

The package, one module per job (each imports only the ones above it):
- `names`: what a request pickle may name (allow-lists, dunder rules, the policy, the optional dill import)
- `trampoline`: the clean frames every call into user-reachable code starts from (`_call`, `_clean_await`)
- `sharing`: whether an object is held by its caller alone (`held_only_by_caller`), checked at import
- `build_budget`: what a request pickle may build (the budget's cost model, numpy/pandas state checks)
- `unpicklers`: the careful `_Unpickler` and the fast C-based `_FastUnpickler` (`_NeedsCareful`)
- `requests`: request validation and log summary (`_validate`, `_summarize`, `_cache_chain`)
- `replies`: reply pickles (`error_reply`, `_ok_reply`, `_ReplyPickler`, `_public_exception`)
- `lanes`: threads, the asyncio guard, the lanes and one call's state (`_Lanes`, `_Ctx`)
- `stubs`: the `.pyi` stub writer (`generate_stub`, `_StubCall`)
- `executor`: `Executor` (what the Rust side calls), chain resolution and generator handles
"""
from __future__ import annotations

from .executor import Executor
from .names import DEFAULT_UNPICKLE_ALLOW, SAFE_DUNDERS
from .replies import error_reply
from .stubs import generate_stub

__all__ = ["Executor", "error_reply", "generate_stub", "DEFAULT_UNPICKLE_ALLOW", "SAFE_DUNDERS"]
