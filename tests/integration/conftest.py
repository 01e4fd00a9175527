"""The session server fixture lives in tests/conftest.py (shared with tests/perf)."""

from ..conftest import MAX_ACTIVE  # noqa: F401  (tests import it from here)
