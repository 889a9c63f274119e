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


@pytest.fixture(autouse=True)
def _own_runtime_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test's daemons (in process or subprocesses) put their default admin
    socket, ``$XDG_RUNTIME_DIR/tickwire/admin.sock``, in a folder of their own: tests,
    and test runs side by side, never find each other's daemon there."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("run")))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)


def pytest_configure(config: pytest.Config) -> None:
    _captures_dir()  # fail the whole run at once when the variable points nowhere
