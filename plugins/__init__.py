"""pegboard.plugins — the built-in plugins, registered through entry points like any other."""
