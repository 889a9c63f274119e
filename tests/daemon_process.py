"""A ``tickwire`` daemon as a real subprocess for operations tests: its log lines
are read all along (a full stderr pipe would block the daemon), and an admin
socket client."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import trio

TICKWIRE = [sys.executable, "-m", "daemon.cli"]


class Daemon:
    """A running ``tickwire`` subprocess and the lines it logged so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._new_line = trio.Event()
        self.ended = trio.Event()

    async def _read(self) -> None:
        buffer = b""
        try:
            while True:
                chunk = await self.process.stderr.receive_some()
                if not chunk:
                    break
                buffer += chunk
                *done, buffer = buffer.split(b"\n")
                self.lines += [line.decode(errors="replace") for line in done]
                self._new_line.set()
                self._new_line = trio.Event()
        finally:
            self.ended.set()
            self._new_line.set()

    async def wait_for(self, pattern: str, seconds: float = 20) -> re.Match[str]:
        """The first logged line matching ``pattern``, waiting for it."""
        regex = re.compile(pattern)
        seen = 0
        try:
            with trio.fail_after(seconds):
                while True:
                    for line in self.lines[seen:]:
                        found = regex.search(line)
                        if found:
                            return found
                    seen = len(self.lines)
                    if self.ended.is_set():
                        raise AssertionError(f"tickwire ended without {pattern!r}:\n{self.log()}")
                    await self._new_line.wait()
        except trio.TooSlowError:
            raise AssertionError(f"no line {pattern!r} within {seconds} s:\n{self.log()}") from None

    def log(self) -> str:
        return "\n".join(self.lines)


@asynccontextmanager
async def tickwire(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[Daemon]:
    """``tickwire ARGS`` running; at the end SIGTERM (then SIGKILL after 10 s)."""
    process = await trio.lowlevel.open_process(
        [*TICKWIRE, *args], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    daemon = Daemon(process)
    async with reaped(process), trio.open_nursery() as nursery:
        nursery.start_soon(daemon._read)
        yield daemon
        await stop(daemon)


@asynccontextmanager
async def reaped(process: trio.Process) -> AsyncIterator[trio.Process]:
    """``process`` for the block; at its end, SIGKILL it if it still runs, and wait
    for it (so that no test leaves a process behind)."""
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def stop(daemon: Daemon, seconds: float = 10) -> int:
    """SIGTERM and wait for the exit code."""
    if daemon.process.returncode is None:
        daemon.process.send_signal(signal.SIGTERM)
    with trio.fail_after(seconds):
        code = await daemon.process.wait()
        await daemon.ended.wait()
    return code


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def admin(path: Path | str, *requests: Any, seconds: float = 5) -> list[dict[str, Any]]:
    """Send each request (a dict, or raw bytes for a line) on one connection to the
    admin socket; the replies, in order."""
    with trio.fail_after(seconds):
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            for request in requests:
                line = request if isinstance(request, bytes) else orjson.dumps(request)
                await stream.send_all(line + b"\n")
            buffer = b""
            replies: list[dict[str, Any]] = []
            while len(replies) < len(requests):
                chunk = await stream.receive_some()
                assert chunk, f"the admin socket closed after {replies}"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                replies += [orjson.loads(line) for line in lines if line.strip()]
            return replies


async def run_cli(*args: str) -> subprocess.CompletedProcess:
    """A short ``tickwire`` command, without blocking the event loop."""
    with trio.fail_after(30):
        return await trio.run_process([*TICKWIRE, *args], capture_stdout=True,
                                      capture_stderr=True, check=False)
