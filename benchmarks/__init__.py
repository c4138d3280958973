"""Benchmarks of skd: `python -m benchmarks.kernels` (the kernel ratio table) and pytest-benchmark files.

Not collected by the default `pytest` run (pyproject's testpaths is ["tests"]); run `pytest benchmarks/`.
"""
