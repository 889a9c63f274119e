"""``tickwire replay``: the daemon with its collectors pointed at emulators.

Reusable from tests: ``serve_replay`` starts one emulator per exchange found in the
capture files and a whole ``App`` whose collectors use the emulators' URLs, through
their normal code path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

from daemon.app import App
from daemon.config import Config, ExchangeConfig
from daemon.replay.capture import Capture, exchange_of, read_capture
from daemon.replay.emulator import Emulator
from daemon.replay.tape import NO_FAULTS, Faults


@attrs.define
class Replay:
    """A running replay: the daemon and its emulators, by exchange."""

    app: App
    emulators: dict[str, Emulator]

    async def wait_finished(self) -> None:
        """Return once every emulator has played its whole tape (never while one
        loops without a bound on its passes)."""
        for emulator in self.emulators.values():
            await emulator.finished.wait()


def group_captures(paths: Sequence[str | Path]) -> dict[str, list[Capture]]:
    """Read capture files and group them by exchange; raises ``ValueError`` for a
    file whose URLs name no known exchange."""
    groups: dict[str, list[Capture]] = defaultdict(list)
    for path in paths:
        capture = read_capture(path)
        exchanges = {exchange_of(url) for url in capture.urls} - {None}
        if len(exchanges) != 1:
            raise ValueError(f"{path}: cannot tell which exchange recorded it")
        groups[exchanges.pop()].append(capture)
    return dict(groups)


async def serve_replay(
    paths: Sequence[str | Path],
    config: Config,
    speed: float | None = 1.0,
    faults: dict[str, Faults] | None = None,
    *,
    loop: bool = False,
    rate: float | None = None,
    passes: int | None = None,
    task_status: trio.TaskStatus[Replay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run emulators for ``paths`` and the daemon on them until cancelled.

    ``config`` gives everything but the exchanges, which come from the captures
    (their recorded symbols and channels); ``faults`` by exchange id. ``loop``
    plays every tape again and again, each pass continuing the last (``passes``:
    at most that many, for tests); ``rate`` is in exchange frames per second per
    emulator and overrides ``speed`` (see ``daemon.replay.emulator``). Raises
    ``ValueError`` when an exchange's emulator cannot loop.
    """
    faults = faults or {}
    groups = group_captures(paths)
    async with trio.open_nursery() as nursery:
        emulators: dict[str, Emulator] = {}
        exchanges: dict[str, ExchangeConfig] = {}
        for exchange, captures in groups.items():
            emulator = Emulator(
                captures, speed=speed, faults=faults.get(exchange, NO_FAULTS),
                loop=loop, passes=passes, rate=rate,
            )
            address = await nursery.start(emulator.serve)
            emulators[exchange] = emulator
            symbols, channels = emulator.venue.subscriptions(captures)
            if not symbols:
                continue  # metadata only (X.0 files alone)
            exchanges[exchange] = ExchangeConfig(
                symbols=symbols,
                channels=channels,
                depth=getattr(emulator.venue, "recorded_depth", 1000),
                rest_url=address.rest_url,
                ws_url=address.ws_url,
            )
        app = App(attrs.evolve(config, exchanges=exchanges))
        await nursery.start(app.run)
        task_status.started(Replay(app=app, emulators=emulators))
