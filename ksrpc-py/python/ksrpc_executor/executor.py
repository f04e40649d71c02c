"""The executor: `Executor`, the object the Rust server makes and calls from its pool threads
(`handle` for compat pickles, `run_native`, `load_pickle_value`, `cancel`, `close`), with chain
resolution under the user's rules (`_resolve`, `_step`, `_check_reached`), waiting for lanes and
coroutines, and the generator handles kept between calls (`_Handles`).
"""
from __future__ import annotations

import asyncio
import builtins
import collections.abc
import concurrent.futures
import importlib
import importlib.util
import inspect
import secrets
import sys
import threading
import time
import traceback
import types

import ksrpc_capability as _capability

from .lanes import _CallState, _Ctx, _guard, _Lanes
from .names import (
    _ADVANCE, _CONTAINERS, _FORMATTERS, _INTERNAL_TYPES, _MISSING, _PLAIN_TYPE_VALUES, _PLAIN_TYPE_VALUES_SET,
    DEFAULT_UNPICKLE_ALLOW, SAFE_DUNDERS, _is_dunder, _NeedsDill, _parse_allow, _Policy, _Refused,
)
from .replies import _ok_reply, _public_exception, _safe_str, error_reply
from .requests import _cache_chain, _one_line, _summarize, _validate
from .stubs import _stub_function, _StubCall
from .trampoline import _NO_KWARGS, _call
from .unpicklers import _FastUnpickler, _NeedsCareful, _Unpickler


# ---------------------------------------------------------------------------
# Generator handles
# ---------------------------------------------------------------------------

class _Handle:
    __slots__ = ("user", "gen", "lane", "last", "busy", "closing")

    def __init__(self, user, gen, lane):
        self.user, self.gen, self.lane, self.last = user, gen, lane, time.monotonic()
        self.busy = False  # a call is advancing it (a generator runs one step at a time)
        self.closing = False  # closed while busy: dropped when that call releases it


class _Handles:
    """Generators kept between calls: random ids, owned by a user, idle TTL, per-user LRU cap.

    A handle a call is advancing (`busy`) is never expired, evicted or dropped under that
    call: closing it marks it, and the advancing call drops it when it lets go."""

    def __init__(self, ttl, cap):
        self._ttl, self._cap = float(ttl), max(1, int(cap))
        self._lock = threading.Lock()
        self._items = {}  # id -> _Handle, least recently used first

    def _expire(self, now):
        old = [k for k, h in self._items.items() if now - h.last > self._ttl and not h.busy]
        return [self._items.pop(k) for k in old]

    def add(self, user, gen, lane):
        with self._lock:
            dropped = self._expire(time.monotonic())
            idle = [k for k, h in self._items.items() if h.user == user and not h.busy]
            mine = sum(1 for h in self._items.values() if h.user == user)
            while mine >= self._cap and idle:
                dropped.append(self._items.pop(idle.pop(0)))
                mine -= 1
            if mine >= self._cap:
                # every one of the user's generators is being advanced right now
                dropped.append(gen)
                gen = None
            else:
                hid = 0
                while hid == 0 or hid in self._items:
                    hid = secrets.randbits(63)
                self._items[hid] = _Handle(user, gen, lane)
        del dropped  # generators are finalized here, outside the lock
        if gen is None:
            raise RuntimeError(f"too many open generators: all {self._cap} of this user's generator "
                               f"handles are being advanced by calls; wait for one to finish or close one")
        return hid

    def take(self, user, hid):
        with self._lock:
            now = time.monotonic()
            dropped = self._expire(now)
            h = self._items.get(hid)
            if h is not None and h.user == user and not h.closing:
                if h.busy:
                    # Advancing a running generator raises, and a generator that raised is dropped:
                    # the second caller is told, the handle stays for the first.
                    raise RuntimeError(f"generator handle {hid} is being advanced by another call; "
                                       f"advance one generator one call at a time")
                h.busy = True
                h.last = now
                self._items[hid] = self._items.pop(hid)  # most recently used goes last
            else:
                h = None
        del dropped
        if h is None:
            # Not StopIteration: the client would silently end the user's iteration.
            raise LookupError(f"generator handle {hid} is unknown: it expired (idle > {self._ttl:g} s), "
                              f"was evicted (over {self._cap} per user), was exhausted or closed, "
                              f"or belongs to another user")
        return h

    def release(self, h):
        dropped = None
        with self._lock:
            h.busy = False
            h.last = time.monotonic()
            if h.closing:
                for k, v in list(self._items.items()):
                    if v is h:
                        dropped = self._items.pop(k)
        del dropped

    def close(self, user, hid):
        """The owner closes a handle: dropped now, or when the call advancing it lets go."""
        with self._lock:
            h = self._items.get(hid)
            if h is None or h.user != user:
                return
            if h.busy:
                h.closing = True
                return
            del self._items[hid]
        del h

    def drop(self, hid):
        with self._lock:
            h = self._items.pop(hid, None)
        del h

    def clear(self):
        with self._lock:
            items, self._items = self._items, {}
        del items


# ---------------------------------------------------------------------------
# The executor
# ---------------------------------------------------------------------------

def _rule_against(rules, module):
    """The rule that refuses `module`, for the refusal's message and log line."""
    rule = rules.first_match(module)
    return "no rule allows it" if rule is None else f"rule {'allow' if rule[1] else 'deny'} {rule[0]}"


def _raised(exc):
    """(type name, one-line message, at most 300 characters) of an exception, for the log."""
    return type(exc).__name__, _one_line(_safe_str(exc))[:300]


class Executor:
    """Runs ksrpc 0.8.1 calls for the Rust server; `handle` is called from many threads."""

    def __init__(self, *, unpickle_allow=(), allow_code=False, handle_ttl=600.0, handle_cap=64,
                 call_timeout=600.0, serial_modules=(), parallel_modules=(), lend=None, note=None):
        """unpickle_allow: extra "module:name" / "module:*" globals a request may name;
        allow_code: accept dill code objects from users whose rules allow builtins;
        handle_ttl (s) / handle_cap (per user): generator handles; call_timeout (s): how long a
        call may take; parallel_modules / serial_modules: see `_Lanes`; lend: called (no
        arguments) when a pool thread is about to wait for a busy lane, so the pool can add a
        thread for the other packages' calls meanwhile; note(call_id, summary, cache_chain): told
        each compat call's chain once it is known (cache_chain: the dotted chain the result
        cache matches, or None when the reply can never be cached)."""
        exact, wild = _parse_allow(DEFAULT_UNPICKLE_ALLOW + tuple(unpickle_allow))
        self._policy = _Policy(exact, wild, bool(allow_code))
        from ksrpc.client import RpcCall, RpcClient, _Self  # the stand-ins, or the real package
        self._RpcCall, self._RpcClient, self._Self = RpcCall, RpcClient, _Self
        self._call_timeout = float(call_timeout)
        self._lanes = _Lanes(parallel_modules, serial_modules)
        self._lend = lend
        self._note = note
        self._handles = _Handles(handle_ttl, handle_cap)
        self._calls = {}  # call_id -> _CallState, for cancel()
        self._lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._run_loop, name="ksrpc-asyncio", daemon=True)
        self._loop_thread.start()

    def _run_loop(self):
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    # -- public API ------------------------------------------------------------
    def handle(self, call_id: int, user: str, rules, payload: bytes, fast: bool = False
               ) -> tuple[int, str | None, bytes, str, str | None, str | None]:
        """One request -> (reply_status, bad_request, reply_bytes, summary, cache_chain, raised).
        Never raises. `cache_chain` is the dotted chain when the reply may be cached (a plain
        result: not an error, not a generator, see `_cache_chain`), else None; `raised` is
        (type name, one-line message) of the exception the call raised (None: it returned),
        for the log line.
        `fast`: the caller proved the pickle mutates only objects it builds (see
        `_FastUnpickler`), so the C unpickler may load it; it hands the request to the
        careful unpickler when a global needs that one's checks."""
        module, summary = "?", "<undecodable>"
        state = _CallState()
        try:
            with self._lock:
                self._calls[call_id] = state
            try:
                payload = bytes(payload)
                try:
                    req = (_FastUnpickler if fast else _Unpickler)(payload, self._policy, rules).load()
                except _NeedsCareful:
                    req = _Unpickler(payload, self._policy, rules).load()
            except (KeyboardInterrupt, SystemExit, TimeoutError, asyncio.CancelledError):
                raise  # injected by the server (timeout, shutdown), not the request's fault
            except BaseException as e:
                msg = _one_line(e if isinstance(e, (_Refused, _NeedsDill)) else
                                f"undecodable request pickle: {type(e).__name__}: {_safe_str(e)}")
                return 500, msg, self._bad_reply(e, msg), summary, None, _raised(e)
            try:
                module, calls, ref_id = _validate(req, (self._RpcCall, self._RpcClient))
            except Exception as e:
                msg = _one_line(f"invalid request: {_safe_str(e)}")
                return 500, msg, self._bad_reply(e, msg), "<invalid>", None, _raised(e)
            del req
            summary = _summarize(module, calls, ref_id)
            if self._note is not None:
                # The server logs the summary if the call outruns its timeout; the chain lets
                # identical requests waiting on the result cache go on when it is not cacheable.
                self._note(call_id, summary, _cache_chain(module, calls, ref_id, self._RpcClient))
            ctx = _Ctx(user, rules, state, time.monotonic() + self._call_timeout)
            cache_chain = raised = None
            try:
                status, reply, handle = self._execute(ctx, module, calls, ref_id)
                if status == 200 and not handle:
                    cache_chain = _cache_chain(module, calls, ref_id, self._RpcClient)
                elif status != 200:
                    raised = ("RuntimeError", "the result could not be pickled")  # see _ok_reply
            except BaseException as e:
                status, reply, raised = 500, error_reply(module, e, traceback.format_exc()), _raised(e)
            return status, None, reply, summary, cache_chain, raised
        except BaseException as e:  # last resort, e.g. an exception injected while replying
            return 500, None, error_reply(module, e, traceback.format_exc()), summary, None, _raised(e)
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def run_native(self, call_id: int, user: str, rules, module: str, calls: list, ref_id: int):
        """A native-protocol call: the chain arrives as values already built (the
        stand-in RpcCall/RpcClient objects, Self), so there is nothing to unpickle.
        Returns ("ok", result) | ("handle", id) | ("exhausted", None) |
        ("err", kind, message, traceback), and never raises. The result object is
        converted to a native value by the caller."""
        state = _CallState()
        try:
            with self._lock:
                self._calls[call_id] = state
            module, calls, ref_id = _validate(dict(module=module, calls=calls, ref_id=ref_id),
                                              (self._RpcCall, self._RpcClient))
            ctx = _Ctx(user, rules, state, time.monotonic() + self._call_timeout)
            if ref_id:
                if len(calls) == 1 and calls[0].name == "close" and not calls[0].args and not calls[0].kwargs:
                    # CloseHandle: the chain `<handle>.close()` frees it (only the owner's),
                    # at once or, while a call advances it, as soon as that call ends.
                    self._handles.close(ctx.user, ref_id)
                    return "exhausted", None
                try:
                    return "ok", self._advance(ctx, ref_id)
                except StopAsyncIteration:
                    return "exhausted", None
            result = self._resolve(ctx, module, calls)
            if isinstance(result, (types.GeneratorType, types.AsyncGeneratorType)):
                return "handle", self._handles.add(ctx.user, result, self._lanes.key(module))
            self._check_reached(ctx, result)
            return "ok", result
        except BaseException as e:
            public = _public_exception(e)
            return "err", type(public).__name__, _safe_str(public), traceback.format_exc()
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def load_pickle_value(self, rules, data: bytes):
        """A native `Pickle` value: accepted only from users whose rules allow
        `builtins` (they can run any code anyway; everyone else sends explicit
        values), and loaded by the careful unpickler all the same."""
        if not rules.allows("builtins"):
            raise PermissionError("pickle values are accepted only from users whose rules allow 'builtins'; "
                                  "send explicit values instead")
        return _Unpickler(bytes(data), self._policy, rules).load()

    def cancel(self, call_id: int) -> None:
        """Stop waiting for call `call_id` (its client went away); cancels its coroutine."""
        with self._lock:
            state = self._calls.get(call_id)
        if state is not None:
            state.cancelled = True
            fut = state.future
            if fut is not None:
                fut.cancel()

    def close(self) -> None:
        """Stop the calls still waiting, cancel the loop's tasks, stop the loop and the lanes, drop the
        handles."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            states = list(self._calls.values())
        for state in states:  # calls still waiting (for a lane, a coroutine) stop waiting
            state.cancelled = True
            fut = state.future
            if fut is not None:
                fut.cancel()
        self._handles.clear()  # first, so async generators are finalized while the loop still runs

        async def shutdown():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=2) if tasks else None
            await self._loop.shutdown_asyncgens()
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        except BaseException:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(5)
        if not self._loop_thread.is_alive():
            self._loop.close()
        self._lanes.stop()

    # -- one call --------------------------------------------------------------
    def _bad_reply(self, exc, msg):
        keep = (PermissionError, ImportError, TypeError, ValueError)
        cls = next((c for c in keep if isinstance(exc, c)), ValueError)
        return error_reply("?", cls(msg), "")

    def _execute(self, ctx, module, calls, ref_id):
        echo = ()
        if ref_id and any(c.name in _ADVANCE for c in calls):
            result = self._advance(ctx, ref_id)  # the chain that made the generator is not re-run
        else:
            result = self._resolve(ctx, module, calls)
        new_ref = 0
        if isinstance(result, (types.GeneratorType, types.AsyncGeneratorType)):
            new_ref = self._handles.add(ctx.user, result, self._lanes.key(module))
            result = None
            # names only: the client appends __anext__ and sends them back; big arguments stay here
            echo = [self._RpcCall(c.name, None, None) for c in calls]
        status, reply = _ok_reply(module, result, new_ref, echo)
        return status, reply, new_ref

    def _advance(self, ctx, hid):
        h = self._handles.take(ctx.user, hid)
        try:
            if isinstance(h.gen, types.AsyncGeneratorType):
                value = self._await(ctx, h.gen.__anext__())
            else:
                value = self._in_lane(ctx, h.lane, next, (h.gen,))
        except (StopIteration, StopAsyncIteration):
            self._handles.drop(hid)
            raise StopAsyncIteration() from None  # the 0.8.1 client ends iteration on it
        except BaseException:
            self._handles.drop(hid)  # a generator that raised is finished
            raise
        finally:
            self._handles.release(h)
        self._check_reached(ctx, value)
        return value

    def _await(self, ctx, awaitable):
        if self._closed:
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            raise RuntimeError("the executor is closed")
        ok, value = self._wait(ctx, asyncio.run_coroutine_threadsafe(_guard(awaitable), self._loop))
        if ok:
            return value
        raise value

    def _in_lane(self, ctx, lane, fn, args, kwargs=_NO_KWARGS):
        """`fn(*args, **kwargs)` in lane `lane` (a `_Lanes` key), or here when it is None."""
        if lane is None:
            return _call(fn, args, kwargs)
        worker = self._lanes.get(lane)
        fut, busy = worker.submit(fn, args, kwargs)
        if busy and self._lend is not None:
            self._lend()
        try:
            return self._wait(ctx, fut)
        except BaseException:
            worker.interrupt(fut)  # gave up waiting (timeout, cancel): free the lane if we can
            raise

    def _wait(self, ctx, fut):
        """Wait for `fut` until the call's deadline or cancel(); short slices let injected
        exceptions (the server's own timeout) arrive promptly."""
        ctx.state.future = fut
        try:
            if ctx.state.cancelled:
                fut.cancel()
            while True:
                if ctx.state.cancelled:
                    fut.cancel()
                    raise RuntimeError("the call was cancelled")
                remaining = ctx.deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the call took longer than {self._call_timeout:g} s")
                done, _ = concurrent.futures.wait([fut], timeout=min(remaining, 0.25))
                if done:
                    try:
                        return fut.result()
                    except concurrent.futures.CancelledError:
                        raise RuntimeError("the call was cancelled") from None
        finally:
            ctx.state.future = None
            if not fut.done():
                fut.cancel()

    # -- chain resolution --------------------------------------------------------
    def _import(self, ctx, name):
        if not ctx.rules.allows(name):
            raise PermissionError(f"import of {name!r} is not allowed for user {ctx.user!r} "
                                  f"({_rule_against(ctx.rules, name)})")
        mod = importlib.import_module(name)
        real = getattr(mod, "__name__", name)
        if not isinstance(real, str) or not ctx.rules.allows(real):  # os.path is posixpath
            raise PermissionError(f"module {name!r} is {real!r}, which is not allowed for user {ctx.user!r} "
                                  f"({_rule_against(ctx.rules, real)})")
        return mod

    def _submodule(self, ctx, mod, name):
        full = f"{getattr(mod, '__name__', '')}.{name}"
        if full not in sys.modules:
            try:  # find_spec looks without running the submodule
                if importlib.util.find_spec(full) is None:
                    return _MISSING
            except (ImportError, ValueError, AttributeError):
                return _MISSING
        return self._import(ctx, full)

    def _check_reached(self, ctx, obj):
        """Every object a chain reaches: modules need rules, interpreter internals need builtins."""
        if inspect.ismodule(obj):
            name = getattr(obj, "__name__", None)
            if not isinstance(name, str) or not ctx.rules.allows(name):
                raise PermissionError(f"module {name!r} is not allowed for user {ctx.user!r} "
                                      f"({_rule_against(ctx.rules, name)})")
        elif not ctx.builtins and (
                isinstance(obj, _INTERNAL_TYPES)
                or (isinstance(obj, types.BuiltinFunctionType) and getattr(obj, "__self__", None) is builtins)
                or (isinstance(obj, dict) and (obj is vars(builtins) or "__builtins__" in obj))):
            raise PermissionError(f"{type(obj).__name__} objects are refused: the rules of user {ctx.user!r} "
                                  f"do not allow 'builtins'")

    def _resolve(self, ctx, module, calls, as_argument=False):
        obj = self._import(ctx, module)
        lane = self._lanes.key(module)  # where the chain's attribute lookups and calls run
        reached = [module]  # the modules the chain passed through, each allowed by the rules
        for c in calls:
            if ctx.state.cancelled:
                raise RuntimeError("the call was cancelled")
            if c.name:  # an empty name is skipped, as in 0.8.1
                obj = self._step(ctx, obj, c, reached, lane)
                if inspect.ismodule(obj):
                    reached.append(obj.__name__)
        if as_argument and not ctx.builtins and callable(obj) and type(obj) is not _StubCall:
            # the function it is passed to may call it: the same capability as a call
            what = _summarize(module, calls)
            _capability.check_call(ctx.rules, ctx.user, obj, reached, f"{what} (passed as an argument)")
        return obj

    def _step(self, ctx, obj, c, reached, lane):
        name = c.name
        if _is_dunder(name) and name not in SAFE_DUNDERS and not ctx.builtins:
            raise PermissionError(f"attribute {name!r} is refused: the rules of user {ctx.user!r} do not allow "
                                  f"'builtins', and only these dunders are open: {', '.join(sorted(SAFE_DUNDERS))}")
        if name.startswith("_") and not _is_dunder(name) and not ctx.builtins:
            raise PermissionError(f"private attribute {name!r} is refused: the rules of user {ctx.user!r} do not "
                                  f"allow 'builtins'")
        if name in _FORMATTERS and not ctx.builtins:
            # str.format / format_map resolve "{0.__globals__[x]}" themselves,
            # past the dunder and module checks.
            raise PermissionError(f"{name!r} is refused: the rules of user {ctx.user!r} do not allow 'builtins'")
        is_builtin = False
        value = self._in_lane(ctx, lane, getattr, (obj, name, _MISSING))  # 1. attribute (a property runs code)
        if value is _MISSING and inspect.ismodule(obj):  # 2. submodule, or the stub of the module
            value = _stub_function(obj) if name == "generate_stub" else self._submodule(ctx, obj, name)
        if value is _MISSING:  # 3. a builtin
            value = getattr(builtins, name, _MISSING)
            if value is _MISSING:
                raise AttributeError(f"{type(obj).__name__} object has no attribute, submodule or builtin {name!r}")
            if not ctx.builtins:
                raise PermissionError(f"builtin {name!r} is refused: the rules of user {ctx.user!r} "
                                      f"do not allow 'builtins'")
            is_builtin = True
        self._check_reached(ctx, value)
        if c.args is None:
            return value
        if not ctx.builtins and not is_builtin and callable(value) and type(value) is not _StubCall:
            _capability.check_call(ctx.rules, ctx.user, value, reached, repr(name))  # before its arguments run
        args = [self._argument(ctx, a, reached) for a in c.args]
        kwargs = {k: self._argument(ctx, v, reached) for k, v in (c.kwargs or {}).items()}
        is_self = lambda a: isinstance(a, self._Self)  # noqa: E731
        if is_builtin:  # demo.LIST.len(Self) == len(demo.LIST)
            args = [obj if is_self(a) else a for a in args]
            kwargs = {k: obj if is_self(v) else v for k, v in kwargs.items()}
        elif any(map(is_self, args)) or any(map(is_self, kwargs.values())):
            raise TypeError(f"Self stands for the current object only in a builtin call such as "
                            f"demo.LIST.len(Self); {name!r} is not a builtin")
        if not (callable(value) or name.endswith("__call__")):
            return value  # arguments to a non-callable are ignored, as in 0.8.1
        result = self._in_lane(ctx, lane, value, args, kwargs)
        if isinstance(result, collections.abc.Coroutine):  # not asyncio.iscoroutine: it accepts generators
            result = self._await(ctx, result)
        self._check_reached(ctx, result)
        return result

    def _argument(self, ctx, value, reached):
        if isinstance(value, self._RpcClient):  # a lazy chain: resolve it first, same user and rules
            state = vars(value)
            return self._resolve(ctx, state["_module"], state["_calls"], as_argument=True)
        if not ctx.builtins:
            self._check_callable_values(ctx, value, reached)
        return value

    def _check_callable_values(self, ctx, value, reached):
        """The function a value is passed to may call it: a callable among the request's values
        (a pickled global, an instance with __call__, also inside lists, tuples, dicts and sets)
        needs the same capability as a call. Plain scalar types (`dtype=float`) are data."""
        stack = [value]
        while stack:
            v = stack.pop()
            kind = type(v)
            if kind in _CONTAINERS:
                stack.extend(v.items() if kind is dict else v)
            elif kind in _PLAIN_TYPE_VALUES or isinstance(v, (self._RpcClient, self._RpcCall, self._Self)):
                continue
            elif not callable(v) or (isinstance(v, type) and v in _PLAIN_TYPE_VALUES_SET):
                continue
            else:
                _capability.check_call(ctx.rules, ctx.user, v, reached, f"a {kind.__name__} passed as an argument")
