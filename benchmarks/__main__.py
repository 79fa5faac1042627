"""``python -m benchmarks``: the bench of :mod:`benchmarks.bench`."""

from benchmarks.bench import main

if __name__ == "__main__":
    main()
