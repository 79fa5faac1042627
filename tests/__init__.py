"""revlit's test suite (a package, so ``from tests.helpers import ...`` works everywhere)."""
