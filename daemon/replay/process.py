"""Emulators in processes of their own: ``tickwire emulate``, and how ``tickwire
replay --emulators process`` starts and watches one per exchange.

A replay's emulators normally share the daemon's process (and its one core). In a
process of its own an emulator costs the daemon nothing, as a real exchange does:
the daemon's CPU is then what it spends live (collectors, dispatcher, clients).

The child speaks one JSON object per line on its stdout (its log goes to stderr):

- ``{"exchange", "rest_url", "ws_url", "symbols", "channels", "depth"}`` once its
  emulator listens: where to connect, and what the capture subscribed to;
- ``{"exchange", "finished": true}`` once the emulator played its whole tape.

It serves until SIGINT or SIGTERM, or, started with ``--parent-pipe``, until its
stdin closes: the parent holds the other end, so a child never outlives its
daemon, even one killed with SIGKILL.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import attrs
import orjson
import trio

from daemon.errors import StartupError
from daemon.replay.capture import Capture
from daemon.replay.emulator import Emulator, EmulatorAddress

log = logging.getLogger(__name__)

#: Seconds a child has to announce its emulator (it reads and indexes the captures).
READY_TIMEOUT = 120.0


def _line(obj: dict[str, Any], out: TextIO) -> None:
    out.write(orjson.dumps(obj).decode() + "\n")
    out.flush()


async def serve_emulators(groups: dict[str, list[Capture]], speed: float | None, *,
                          loop: bool = False, rate: float | None = None,
                          out: TextIO = sys.stdout, parent_pipe: bool = False,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve one emulator per exchange of ``groups`` (as ``serve_replay`` would) and
    report on ``out`` as the module docstring says; runs until cancelled, or with
    ``parent_pipe`` until stdin reaches its end. Raises ``ValueError`` when an
    exchange's emulator cannot loop."""
    async with trio.open_nursery() as nursery:
        for exchange, captures in groups.items():
            emulator = Emulator(captures, speed=speed, loop=loop, rate=rate)
            address = await nursery.start(emulator.serve)
            symbols, channels = emulator.venue.subscriptions(captures)
            _line({"exchange": exchange, "rest_url": address.rest_url,
                   "ws_url": address.ws_url, "symbols": symbols, "channels": channels,
                   "depth": getattr(emulator.venue, "recorded_depth", 1000)}, out)
            nursery.start_soon(_report_finished, emulator, out)
        if parent_pipe:
            nursery.start_soon(_until_stdin_closes, nursery.cancel_scope)
        task_status.started()


async def _until_stdin_closes(scope: trio.CancelScope) -> None:
    """Cancel ``scope`` once stdin reaches its end (``serve_emulators`` returns)."""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while await stdin.receive_some():
            pass
    log.info("emulator: stdin closed (the parent process is gone): stopping")
    scope.cancel()


async def _report_finished(emulator: Emulator, out: TextIO) -> None:
    await emulator.finished.wait()
    _line({"exchange": emulator.exchange, "finished": True}, out)


@attrs.define(eq=False)
class EmulatorProcess:
    """An emulator serving in a child process (``tickwire emulate``): where it
    listens, what its capture subscribed to, and ``finished`` once its tape ended."""

    exchange: str
    address: EmulatorAddress
    symbols: list[str]
    channels: list[str]
    depth: int
    pid: int
    finished: trio.Event = attrs.field(factory=trio.Event)


class EmulatorProcessError(StartupError, RuntimeError):
    """The child emulator could not start, or stopped while the replay ran (one
    line; the child said why on the shared stderr)."""


async def run_emulator_process(
    exchange: str, paths: Sequence[str | Path], speed: float | None, *,
    loop: bool = False, rate: float | None = None,
    task_status: trio.TaskStatus[EmulatorProcess] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``tickwire emulate`` on ``paths`` (one exchange's files) in a child
    process; ``started`` with its ``EmulatorProcess`` once it listens. Cancelling
    this terminates the child. Raises ``EmulatorProcessError`` if the child exits
    before it listens (its error is on the shared stderr) or while still needed."""
    command = [sys.executable, "-m", "daemon.cli", "emulate", *map(str, paths),
               "--speed", "max" if speed is None else repr(speed), "--parent-pipe"]
    if loop:
        command.append("--loop")
    if rate is not None:
        command += ["--rate", repr(rate)]
    async with trio.open_nursery() as nursery:
        # stdin: a pipe this process holds open; the child ends when it closes
        process: trio.Process = await nursery.start(partial(
            trio.run_process, command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            check=False))
        assert process.stdout is not None
        lines = JsonLines(process.stdout)
        ready = None
        with trio.move_on_after(READY_TIMEOUT):
            ready = await lines.next()
        if ready is None or "ws_url" not in ready:
            process.terminate()
            raise EmulatorProcessError(f"the {exchange} emulator process did not start "
                                       f"(exit status {process.poll()})")
        emulator = EmulatorProcess(
            exchange=exchange,
            address=EmulatorAddress(exchange, ready["rest_url"], ready["ws_url"]),
            symbols=ready["symbols"], channels=ready["channels"], depth=ready["depth"],
            pid=process.pid,
        )
        task_status.started(emulator)
        while (message := await lines.next()) is not None:
            if message.get("finished"):
                emulator.finished.set()
        raise EmulatorProcessError(f"the {exchange} emulator process stopped "
                                   f"(exit status {await process.wait()})")


class JsonLines:
    """JSON objects, one a line, read from ``stream`` (a child's stdout)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> dict[str, Any] | None:
        """The next line's object; ``None`` once the child's stdout is closed."""
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some()
            if not data:
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return orjson.loads(line) if line.strip() else await self.next()
