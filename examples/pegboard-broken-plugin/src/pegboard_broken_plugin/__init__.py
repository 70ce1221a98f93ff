"""A plugin whose import fails, to show (and test) pegboard's failure isolation."""

raise ImportError("pegboard-broken-plugin needs libfancy.so.3, which is not installed")
