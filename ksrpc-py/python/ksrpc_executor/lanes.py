"""Threads: where a call's code runs and what it waits with. `_guard` runs a coroutine on the
executor's asyncio loop, `_Lane` is one thread running one package's synchronous calls in order,
`_Lanes` picks the lane of a module (or the pool), and `_CallState` / `_Ctx` are one call's
cancel flag, awaited future, rules and deadline.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import sys
import threading
from fnmatch import fnmatchcase

from .trampoline import _NO_KWARGS, _call, _clean_await


# ---------------------------------------------------------------------------
# Threads: the asyncio loop, the lanes, waiting with timeout and cancel
# ---------------------------------------------------------------------------

async def _guard(awaitable):
    """Run `awaitable` on the loop, returning (ok, value-or-exception).

    asyncio re-raises SystemExit/KeyboardInterrupt out of run_forever (it would
    kill the loop thread) and StopAsyncIteration does not cross a Task cleanly,
    so every exception except cancellation travels back as a value.
    """
    try:
        return True, await _clean_await(awaitable)
    except asyncio.CancelledError:
        raise
    except BaseException as e:
        return False, e


class _Lane:
    """One daemon thread running the synchronous code of one package's calls, in order.

    SDKs that keep one connection (or a session in thread-locals) are not safe to call from
    many threads; a lane runs every call into its package one after another, always on the
    same thread. The pool thread that submitted a call waits for it (see Executor._in_lane)."""

    def __init__(self, name):
        import queue
        self.name = name
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not finished
        self._current = None  # the future whose function runs now
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, args, kwargs=_NO_KWARGS):
        """Queue `fn(*args, **kwargs)`; returns (future, busy): busy if it has to wait its turn."""
        fut = concurrent.futures.Future()
        with self._lock:
            busy = self._pending > 0
            self._pending += 1
        self._queue.put((fut, fn, args, kwargs))
        return fut, busy

    def interrupt(self, fut):
        """Raise TimeoutError in the lane's thread if it still runs `fut`'s function (its caller
        gave up), so the next call in the lane need not wait for it. Like the pool's own
        timeout, it cannot reach code blocked in C."""
        with self._lock:
            if self._current is fut and self._thread.ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread.ident),
                                                           ctypes.py_object(TimeoutError))

    def _run(self):
        while True:
            try:
                item = self._queue.get()
                if item is None:
                    return
                self._run_one(*item)
                del item
            except TimeoutError:
                continue  # an interrupt() that raced with the end of its call

    def _run_one(self, fut, fn, args, kwargs):
        try:
            if not fut.set_running_or_notify_cancel():
                return
            with self._lock:
                self._current = fut
            try:
                ok, value = True, _call(fn, args, kwargs)
            except BaseException as e:  # SystemExit in a call must not end the lane
                ok, value = False, e
            with self._lock:
                # No interrupt() can aim at this call any more; drop one that came too late.
                self._current = None
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)
            fut.set_result(value) if ok else fut.set_exception(value)
        finally:
            with self._lock:
                self._pending -= 1

    def stop(self):
        self._queue.put(None)


class _Lanes:
    """Which thread runs a call's synchronous code.

    By default every third-party top-level package has a lane of its own: its calls run one
    at a time, different packages in parallel. The pool runs the standard library, the
    `ksrpc` package (the demo) and the packages `parallel` names (fnmatch patterns on the
    top-level package or the module). `serial` (fnmatch patterns on the module, the older
    `serial_modules` setting) puts modules in one shared lane, which wins over `parallel`.
    Coroutines run on the asyncio loop: a lane runs only the call that creates them."""

    # sys.stdlib_module_names is 3.10+; on 3.9 the modules built into the interpreter stand in.
    _POOL_PACKAGES = frozenset(getattr(sys, "stdlib_module_names", sys.builtin_module_names)) | {"ksrpc"}

    def __init__(self, parallel=(), serial=()):
        self._parallel, self._serial = tuple(parallel), tuple(serial)
        self._lock = threading.Lock()
        self._lanes = {}
        self._stopped = False

    def key(self, module):
        """The lane of calls into `module` (None: the pool); a lane is made when first used."""
        if any(fnmatchcase(module, p) for p in self._serial):
            return "ksrpc-serial"
        top = module.partition(".")[0]
        if top in self._POOL_PACKAGES or any(fnmatchcase(top, p) or fnmatchcase(module, p) for p in self._parallel):
            return None
        return f"ksrpc-lane-{top}"

    def get(self, key):
        with self._lock:
            if self._stopped:
                raise RuntimeError("the executor is closed")
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = _Lane(key)
            return lane

    def stop(self):
        with self._lock:
            self._stopped = True
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.stop()


class _CallState:
    __slots__ = ("cancelled", "future")

    def __init__(self):
        self.cancelled = False
        self.future = None


class _Ctx:
    """One call: who asks, under which rules, until when."""
    __slots__ = ("user", "rules", "builtins", "state", "deadline")

    def __init__(self, user, rules, state, deadline):
        self.user, self.rules, self.state, self.deadline = user, rules, state, deadline
        self.builtins = bool(rules.allows("builtins"))
