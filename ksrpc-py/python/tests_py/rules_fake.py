"""A stand-in for the Rust `Rules` object the executor receives (ksrpc_core::rules)."""
import fnmatch


class Rules:
    """Ordered (pattern, allowed) pairs, first match wins, no match = denied."""

    def __init__(self, *pairs):
        self.pairs = pairs

    def allows(self, name):
        rule = self.first_match(name)
        return rule is not None and rule[1]

    def first_match(self, name):
        for pattern, allowed in self.pairs:
            if fnmatch.fnmatchcase(name, pattern):
                return pattern, allowed
        return None
