"""Defined outside capsdk, and pretending to be capsdk's (`__module__ = "capsdk"`).

capsdk imports these names; a user allowed only `capsdk` must not be able to call them.
"""
import functools
import os


def read_text(path):
    with open(path) as f:
        return f.read()


read_text.__module__ = "capsdk"


class Disguised:
    __module__ = "capsdk"

    def run(self):
        return os.getcwd()

    def __call__(self):
        return os.getcwd()


disguised = Disguised()


def logged(fn):
    """A decorator from outside the package: its wrapper is the code that runs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


@logged
def decorated(code):
    return f"decorated {code}"


decorated.__module__ = "capsdk"
