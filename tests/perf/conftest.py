import os

import pytest

from perf.perf_analyzer_slo import HarnessError, perf_analyzer_path


@pytest.fixture
def perf_analyzer():
    """The installed perf_analyzer; CI installs it, so there a missing binary is a broken harness."""
    try:
        return perf_analyzer_path()
    except HarnessError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"perf_analyzer is not installed ({exc})")
