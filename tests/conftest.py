"""Session-wide guards for the whole test suite."""

from __future__ import annotations

import pytest

from tests.unit.factsbuilder import GoldenUpdateInCI, golden_update_requested


def pytest_configure(config: pytest.Config) -> None:
    # Fail the whole run at once, before any test, rather than test by test.
    try:
        golden_update_requested()
    except GoldenUpdateInCI as refused:
        raise pytest.UsageError(str(refused)) from None
