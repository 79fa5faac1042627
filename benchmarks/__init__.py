"""revlit's benchmark harness (``make bench``): not part of the installed library.

Run from the repository root: ``python -m benchmarks --help``. See :mod:`benchmarks.bench`.
"""
