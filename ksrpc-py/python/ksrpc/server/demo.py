"""
演示函数
"""
# The docstring above is the original's, to the byte (clients read `demo.__doc__`).
# Same names and behaviour as ksrpc 0.8.1's `ksrpc.server.demo`; numpy and pandas are
# imported inside the functions that need them, so the module imports on a server
# without them.
import asyncio
import importlib
import random
import time


def __require(package):  # private: chains and find_class refuse "_" names for users without builtins
    """Import an optional package or say clearly that the server lacks it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"{package} is not installed on the server (ksrpc.server.demo needs it)",
                          name=package) from e


def sync_say_hi(name):
    """Sleep 1 to 3 s, then greet."""
    time.sleep(random.randint(1, 3))
    return f'Hello {name}'


async def async_say_hi(name):
    """Sleep 1 to 3 s without blocking the loop, then greet."""
    await asyncio.sleep(random.randint(1, 3))
    return f'Hello {name}'


def div(a, b):
    return a / b


def add(a, b):
    return a + b


def test():
    """A small DataFrame (needs pandas)."""
    pd = __require("pandas")
    return pd.DataFrame({'A': [1, 2, 3, 4, 5]})


def create_1d_array(target_mb: int = 100):
    """A random float64 array of about `target_mb` MiB (needs numpy)."""
    np = __require("numpy")
    num_elements = target_mb * 1024 * 1024 // np.dtype(np.float64).itemsize
    arr = np.random.rand(num_elements).astype(np.float64)
    print(f"created: {arr.nbytes / (1024 * 1024):.2f} MiB 1-d array, dtype {arr.dtype}, {arr.size:,} elements")
    return arr


class Point:
    """A point whose format spec picks the style: '', 'c', 'p' or 'r'."""

    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __format__(self, format_spec):
        if format_spec == "p":
            return f"Point({self.x}, {self.y})"
        if format_spec == "r":
            return f"({round(self.x, 2)}, {round(self.y, 2)})"
        return f"({self.x}, {self.y})"


point = Point(3.14159, 2.71828)

PASSWORD = 123456
LIST = [1, 2, 3, 4, 5]


def sync_counter():
    """Yield 1, 2, 3."""
    n = 1
    while n <= 3:
        yield n
        n += 1


async def async_counter():
    """Yield 1, 2, 3 asynchronously."""
    n = 1
    while n <= 3:
        yield n
        n += 1


class Parent:

    def __init__(self):
        self.name = "Parent"

    def some_method(self):
        print("the parent's original method.", self.name)


class Child(Parent):

    def __init__(self):
        self.name = "Child"

    def some_method(self):
        """Overrides the parent's method."""
        print("the child's overriding method.", self.name)

    def call_parent_method(self):
        """A way to reach the overridden parent method."""
        super().some_method()


child_obj = Child()
