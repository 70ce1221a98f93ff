"""Benchmarks: `pegboard bench ...` (results go to docs/benchmarks.md with command, device, date)."""
