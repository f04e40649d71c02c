"""An SDK-shaped test package for the capability rule.

Its public functions live in submodules and are re-exported here, as jqdatasdk re-exports
`jqdatasdk.api.get_price`: a user allowed only `capsdk` may call them. A few names are merely
imported from elsewhere (`getcwd`, `partial`, everything of `capsdk_foreign`, which also fakes
`__module__ = "capsdk"`): calling those stays refused. `capsdk.secret` is denied by the test
servers' rules even though it is inside the package.
"""
import datetime
from functools import partial  # noqa: F401  a foreign class
from os import getcwd, listdir  # noqa: F401  foreign functions the package merely imported

from capsdk_foreign import Disguised, decorated, disguised, read_text  # noqa: F401

from .api import (  # noqa: F401
    Boot, Client, lister, reader, attr_getter, call_it, caught, gen, list_append, lru_foreign, lru_own, make_array, make_frame,
    logged_price, method_caller, foreign_partial, own_partial, get_price, peek_caller,
)
from .secret import token as secret_token  # noqa: F401

ITEMS = [1, 2, 3]
ITEMS_APPEND = ITEMS.append  # a bound method of a shared list, stored by the package
TABLE = {"a": 1, "b": 2}
SET = {1, 2}
TUPLE = (1, 2, 3)
FROZEN = frozenset({1, 2})
WHEN = datetime.datetime(2020, 1, 2, 3, 4, 5)
