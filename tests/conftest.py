"""Shared fixtures. Captures come from ``tests/captures`` (vendored, so a fresh
clone tests everything) unless ``$TICKWIRE_CAPTURES`` names another folder; a
variable that names no folder fails the whole run at once.

Skips: a test may skip only for a reason listed in ``ALLOWED_SKIPS`` (something
the machine lacks, not something the suite forgot); ``make test`` fails when more
than ``MAX_SKIPS`` tests skip (``pytest_terminal_summary`` below), so a change
that quietly turns tests off shows up red.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import NO_REDIS, RedisServer

VENDORED = Path(__file__).parent / "captures"

#: At most this many tests may skip in one run (the systemd unit checks, verify and
#: security, where ``systemd-analyze`` cannot be installed).
MAX_SKIPS = 2


def _captures_dir() -> Path:
    value = os.environ.get("TICKWIRE_CAPTURES")
    if not value:
        return VENDORED
    path = Path(value)
    if not path.is_dir():
        raise pytest.UsageError(
            f"TICKWIRE_CAPTURES={value!r} is set but is not a folder: the recorded "
            "exchange traffic is missing (unset it to use tests/captures)"
        )
    return path


@pytest.fixture(scope="session")
def captures() -> Path:
    """The folder of recorded exchange traffic (``tests/captures``)."""
    return _captures_dir()


@pytest.fixture(autouse=True)
def _own_runtime_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test's daemons (in process or subprocesses) put their default admin
    socket, ``$XDG_RUNTIME_DIR/tickwire/admin.sock``, in a folder of their own: tests,
    and test runs side by side, never find each other's daemon there."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("run")))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real ``redis-server`` for the whole run (no persistence, its own folder,
    a free 127.0.0.1 port), killed at the end; tests keep apart by key prefix
    (``[cluster] prefix``). Skips with ``NO_REDIS`` where redis-server is missing."""
    if shutil.which("redis-server") is None:
        pytest.skip(NO_REDIS)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server`` of this test's own (to stop and restart), killed at its end."""
    if shutil.which("redis-server") is None:
        pytest.skip(NO_REDIS)
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def pytest_configure(config: pytest.Config) -> None:
    _captures_dir()  # fail the whole run at once when the variable points nowhere


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail a whole-suite run in which more than ``MAX_SKIPS`` tests skipped (a run
    of a selection, ``-k`` or a path, is not judged)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or exitstatus != 0 or session.config.args != session.config.getini("testpaths"):
        return
    skipped = len(reporter.stats.get("skipped", []))
    if not os.environ.get("CI"):
        # a developer's machine without redis-server: the cluster tests skip (CI
        # installs it, and there they count)
        skipped -= sum(NO_REDIS in str(r.longrepr) for r in reporter.stats.get("skipped", []))
    if skipped > MAX_SKIPS and not session.config.option.keyword:
        reporter.write_line(
            f"tickwire: {skipped} tests skipped, more than the {MAX_SKIPS} allowed "
            "(tests/conftest.py MAX_SKIPS)", red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
