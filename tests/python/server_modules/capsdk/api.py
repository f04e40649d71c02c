"""The functions capsdk re-exports (defined here, in the package)."""
import functools
import operator
import os
import sys

from capsdk_foreign import logged


def get_price(code, count=3):
    return {"code": code, "count": count}


class Client:
    def __init__(self, token="t"):
        self.token = token

    def query(self, n):
        return [n, n]

    def history(self):
        return f"history of {self.token}"


def make_frame():
    import pandas as pd
    return pd.DataFrame({"A": [1, 2, 3, 4, 5]})


def make_array():
    import numpy as np
    return np.arange(5.0)


def own_partial():
    return functools.partial(get_price, "000001")


def foreign_partial():
    return functools.partial(os.getcwd)


def attr_getter():
    return operator.attrgetter("real")


def method_caller():
    return operator.methodcaller("upper")


def list_append():
    return [].append


@functools.lru_cache(maxsize=8)
def lru_own(code):
    return f"cached {code}"


lru_foreign = functools.lru_cache(maxsize=8)(os.getcwd)


def call_it(f, *args):
    """Calls what it is given (as SDK helpers with callbacks do)."""
    return f(*args)


def caught():
    try:
        1 / 0
    except ZeroDivisionError as e:
        return e


def gen():
    yield 1


def peek_caller():
    """What the frame that called this function holds (pandas '@name' looks there)."""
    frame = sys._getframe(1)
    return {"globals": sorted(frame.f_globals), "locals": sorted(frame.f_locals),
            "builtins": sorted(frame.f_builtins)}


@logged
def logged_price(code):
    """Defined here, but wrapped by a decorator from outside the package."""
    return f"logged {code}"


class Lister:
    """A callable class of the package whose __call__ is a C function of os."""
    __call__ = staticmethod(os.listdir)


lister = Lister()


class Reader:
    """Its __call__ is a function defined outside the package."""
    __call__ = staticmethod(__import__("capsdk_foreign").read_text)


reader = Reader()


class Boot:
    """Constructing it runs os.listdir (a C function stored as __init__)."""
    __init__ = os.listdir
