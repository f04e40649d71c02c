"""A stand-in for a data SDK that is not thread-safe, as jqdatasdk-style SDKs that keep one
connection are: a request is written to the shared connection and its answer read back from
it after a round trip, so two threads calling at once read each other's answers.

The server runs calls into one package one at a time by default (`python.parallel_modules`
opts a package out); the tests show both sides of that default with this module."""

import threading
import time

_connection = {"request": None}


def query(x, round_trip=0.3):
    """Asks the "connection" for `x` and returns what it answers: `x`, unless another thread
    wrote its own request meanwhile."""
    _connection["request"] = x
    end = time.monotonic() + round_trip
    while time.monotonic() < end and _connection["request"] == x:
        time.sleep(0.005)
    return _connection["request"]


def block(seconds):
    """A slow SDK call (blocked in C, as a socket read is)."""
    time.sleep(seconds)
    return threading.current_thread().name
