"""Shared fixtures. Captures come from ``$TICKWIRE_CAPTURES`` (``.ci/run`` sets it):
set and missing fails loudly; unset skips the tests that need them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _captures_dir() -> Path | None:
    value = os.environ.get("TICKWIRE_CAPTURES")
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        raise pytest.UsageError(
            f"TICKWIRE_CAPTURES={value!r} is set but is not a folder: the recorded "
            "exchange traffic is missing"
        )
    return path


@pytest.fixture(scope="session")
def captures() -> Path:
    """The folder of recorded exchange traffic (``shared/captures``)."""
    path = _captures_dir()
    if path is None:
        pytest.skip("TICKWIRE_CAPTURES is not set: these tests need the recorded captures")
    return path


def pytest_configure(config: pytest.Config) -> None:
    _captures_dir()  # fail the whole run at once when the variable points nowhere
