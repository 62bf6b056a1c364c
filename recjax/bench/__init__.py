"""Benchmarks run by `recjax bench ...`; each prints one JSON object per measurement."""
