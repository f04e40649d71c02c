#!/usr/bin/env python3
"""Regenerate ksrpc-core's golden files from CPython (run from the repo root).

- fnmatch.json: [pattern, name, expected] rows from `fnmatch.fnmatch` (POSIX).
- zlib/*.z: `zlib.compress(payload, level)` of the payloads in zlib/payloads,
  which the Rust decoder must read back byte for byte.

The files are checked in; rerun this only when adding cases.
"""
import fnmatch
import json
import os
import random
import zlib

ROOT = os.path.join(os.path.dirname(__file__), "..", "ksrpc-core", "tests", "golden")

PATTERNS = [
    "*", "?", "??", "os", "os*", "os.*", "*.path", "ksrpc.*", "ksrpc.server.demo",
    "ksrpc.server.*", "*demo*", "a*b*c", "*.*", "**", "***a", "a?c", "[abc]", "[!abc]",
    "[a-c]x", "[!a-c]x", "[]]", "[]a]", "[!]]", "[!]a]", "[", "[a", "a[", "[!", "[!a",
    "]", "a]", "[a-]", "[-a]", "[!-a]", "[a-c-e]", "[b-a]", "[b-a]x", "[!b-a]", "[z-a0]",
    "[a-b-c]", "[--/]", "[\\]", "[\\a]", "[^a]", "[[]", "[a[]", "[&]", "[~]", "[|]",
    "[a&&b]", "[.]", "*[.]*", "sys", "builtins", "bench_mod", "numpy.*", "pandas*",
    "[0-9]*", "*[0-9]", "?*?", "*?*", "a*", "*a", "A*", "[A-Z]*", "[!A-Z]*", "[é]",
    "*.[!_]*", "_*", "*._*", "[b-a!]", "[!b-ax]", "[a-]]", "[]-a]", "[!]-a]",
]

NAMES = [
    "", "a", "b", "c", "x", "ax", "bx", "dx", "ab", "abc", "aXbYc", "os", "os.path",
    "posixpath", "ksrpc", "ksrpc.server", "ksrpc.server.demo", "ksrpc.server.demox",
    "sys", "builtins", "bench_mod", "numpy", "numpy.core", "pandas", "pandas.core.frame",
    "]", "[", "-", "!", "\\", "^", "&", "~", "|", ".", "a.b", "_x", "x._y", "x.y",
    "0", "9a", "a9", "A", "Abc", "é", "e", "\n", "a\nb", "[a", "a[", "a]", "[]", "ba",
    "collections._sys", "random._os",
]


def main():
    rows = []
    rng = random.Random(20261125)
    for p in PATTERNS:
        for n in NAMES:
            rows.append([p, n, fnmatch.fnmatch(n, p)])
    # Random patterns over a small alphabet, to reach combinations by chance.
    alphabet = "ab.*?[]!-"
    for _ in range(400):
        p = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7)))
        for _ in range(5):
            n = "".join(rng.choice("ab.-]![") for _ in range(rng.randint(0, 6)))
            rows.append([p, n, fnmatch.fnmatch(n, p)])
    with open(os.path.join(ROOT, "fnmatch.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, ensure_ascii=False, indent=0)
        f.write("\n")

    zdir = os.path.join(ROOT, "zlib")
    os.makedirs(zdir, exist_ok=True)
    payloads = {
        "text": b"".join(b"%d,SH%06d,%.2f\n" % (i, i * 7 % 999999, i * 0.37) for i in range(3000)),
        "random": bytes(rng.getrandbits(8) for _ in range(20000)),
        "zeros": bytes(50000),
    }
    for name, data in payloads.items():
        with open(os.path.join(zdir, f"{name}.bin"), "wb") as f:
            f.write(data)
        for level in (0, 1, 6, 9):
            with open(os.path.join(zdir, f"{name}.{level}.z"), "wb") as f:
                f.write(zlib.compress(data, level))


if __name__ == "__main__":
    main()
