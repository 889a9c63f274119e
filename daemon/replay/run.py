"""``tickwire replay``: the daemon with its collectors pointed at emulators.

Reusable from tests: ``serve_replay`` starts one emulator per exchange found in the
capture files and a whole ``App`` whose collectors use the emulators' URLs, through
their normal code path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import trio

from daemon.app import App
from daemon.config import Config, ExchangeConfig
from daemon.errors import StartupError
from daemon.replay.capture import (
    Capture,
    CaptureError,
    capture_paths,
    exchange_of,
    read_capture,
)
from daemon.replay.emulator import Emulator
from daemon.replay.process import EmulatorProcess, run_emulator_process
from daemon.replay.tape import NO_FAULTS, Faults

#: The exchanges whose emulators serve ccxt.pro (``via="ccxt"``).
VIA_CCXT = ("binance", "binanceus", "coinbase", "kraken")


class ReplayError(StartupError, ValueError):
    """A replay that cannot be done with these captures and options (one line)."""


@attrs.define
class Replay:
    """A running replay: the daemon and its emulators, by exchange (``Emulator``
    objects, or ``EmulatorProcess`` handles with ``emulators="process"``)."""

    app: App
    emulators: dict[str, Emulator | EmulatorProcess]

    async def wait_finished(self) -> None:
        """Return once every emulator has played its whole tape (never while one
        loops without a bound on its passes)."""
        for emulator in self.emulators.values():
            await emulator.finished.wait()


async def start_when_subscribed(emulator: Emulator, collector: object) -> None:
    """Start ``emulator``'s tape once ``collector`` is first ``subscribed``: a
    ccxt.pro collector subscribes over several connections, and the recording
    started with every subscription in place.

    ccxt.pro throttles its requests (Coinbase: one a 100 ms) and counts a quiet
    watch as up after ``SETTLE`` seconds, maybe before its request went out: where
    the venue names the routing keys a collector's symbols and channels make
    (``watch_keys(symbols, channels)``), the tape also waits until the emulator's
    connections hold all of them."""
    while getattr(collector, "state", None) != "subscribed":
        await collector.wait_state_change()  # type: ignore[attr-defined]
    watch_keys = getattr(emulator.venue, "watch_keys", None)
    cfg = getattr(collector, "cfg", None)
    if watch_keys is not None and cfg is not None:
        await emulator.wait_keys(watch_keys(cfg.symbols, cfg.channels))
    emulator.started.set()


#: Per exchange: the capture-file prefix, and the REST path whose recorded answer
#: lists its markets (the ``X.0`` file): without it no symbol can be named.
_MARKETS = {
    "binance": ("BINANCE", "/api/v3/exchangeInfo"),
    "binanceus": ("BINANCEUS", "/api/v3/exchangeInfo"),
    "coinbase": ("COINBASE", "/products"),
    "kraken": ("KRAKEN", "/0/public/AssetPairs"),
}
#: Exchanges whose book starts from a REST snapshot (``X.http.*`` files), and its path.
_BOOK_SNAPSHOTS = {"binance": "/api/v3/depth", "binanceus": "/api/v3/depth"}


def group_captures(paths: Sequence[str | Path]) -> dict[str, list[Capture]]:
    """Read capture files, group them by exchange and check that each exchange's
    set can be replayed: a WebSocket recording, the recorded markets (``X.0``),
    and the REST book snapshots where the exchange's book needs them (Binance's
    ``X.http.*``). A folder in ``paths`` stands for its files, and README, LICENSE
    and Markdown files are skipped (``capture_paths``): ``tests/captures/*`` and
    ``tests/captures`` replay every capture there.

    Raises ``CaptureError`` (a ``StartupError``: one line naming the file and what
    to do) for a file that cannot be read or whose URLs name no known exchange,
    for a set that lacks one of those files, and when no capture file is given."""
    groups: dict[str, list[Capture]] = defaultdict(list)
    for path in capture_paths(paths):
        capture = read_capture(path)
        exchanges = {exchange for url in capture.urls if (exchange := exchange_of(url))}
        if len(exchanges) != 1:
            raise CaptureError(
                f"{path}: cannot tell which exchange recorded it (its URLs name "
                f"{'several' if exchanges else 'none'} of binance, binance.us, coinbase, "
                f"kraken); give one exchange's capture files")
        groups[exchanges.pop()].append(capture)
    for exchange, captures in groups.items():
        _check_set(exchange, captures)
    return dict(groups)


def _check_set(exchange: str, captures: list[Capture]) -> None:
    """Raise ``CaptureError`` when ``captures`` lack a file ``exchange``'s replay needs."""
    prefix, markets = _MARKETS.get(exchange, (exchange.upper(), ""))
    given = ", ".join(c.path.name for c in captures)
    paths = {urlsplit(r.url).path for c in captures for r in c.rest}
    connections = [conn for c in captures for conn in c.connections]
    if not connections:
        raise CaptureError(
            f"no WebSocket recording of {exchange} among {given}: add its {prefix}.ws.* "
            "file(s), which hold what the exchange streamed")
    if markets and markets not in paths:
        raise CaptureError(
            f"no {exchange} markets among {given}: add its {prefix}.0 file (the "
            f"recorded REST {markets}, which names the symbols)")
    snapshots = _BOOK_SNAPSHOTS.get(exchange)
    wants_books = any("@depth" in conn.url for conn in connections)
    if snapshots and wants_books and not any(p.startswith(snapshots) for p in paths):
        raise CaptureError(
            f"no {exchange} book snapshots among {given}: add its {prefix}.http.* "
            f"file(s) (the recorded REST {snapshots}, where each book starts)")


async def serve_replay(
    paths: Sequence[str | Path],
    config: Config,
    speed: float | None = 1.0,
    faults: dict[str, Faults] | None = None,
    *,
    loop: bool = False,
    rate: float | None = None,
    passes: int | None = None,
    via: str = "native",
    emulators: str = "inside",
    task_status: trio.TaskStatus[Replay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run emulators for ``paths`` and the daemon on them until cancelled.

    ``config`` gives everything but the exchanges, which come from the captures
    (their recorded symbols and channels), except an exchange section's
    ``symbols_mode`` and ``interval`` (symbols polled while the others stream);
    ``faults`` by exchange id. ``loop``
    plays every tape again and again, each pass continuing the last (``passes``:
    at most that many, for tests); ``rate`` is in exchange frames per second per
    emulator and overrides ``speed`` (see ``daemon.replay.emulator``). ``via``:
    ``native`` (the native collectors) or ``ccxt`` (the ``watch`` mode: ccxt.pro
    on the emulators, for the exchanges in ``VIA_CCXT``). ``emulators``:
    ``inside`` (in this process) or ``process`` (each exchange's in a child process,
    ``daemon.replay.process``: the daemon's process then does only what it does
    live; native collectors, no faults). Raises ``CaptureError`` for captures that
    cannot be read or replayed together (``group_captures``), ``ReplayError`` when
    an exchange's emulator cannot serve ccxt.pro (both ``StartupError``s),
    ``ValueError`` when one cannot loop, or for a combination that child emulators
    cannot do; ``EmulatorProcessError`` when a child fails.
    """
    if via not in ("native", "ccxt"):
        raise ValueError(f"via must be 'native' or 'ccxt', not {via!r}")
    if emulators not in ("inside", "process"):
        raise ValueError(f"emulators must be 'inside' or 'process', not {emulators!r}")
    if emulators == "process" and (via != "native" or faults or passes is not None):
        raise ValueError("emulators in child processes replay to the native collectors, "
                         "without faults or a bound on passes")
    faults = faults or {}
    groups = group_captures(paths)
    if via == "ccxt":
        unserved = sorted(set(groups) - set(VIA_CCXT))
        if unserved:
            raise ReplayError(f"the {unserved[0]} emulator cannot serve ccxt.pro yet "
                             f"(--via ccxt replays {', '.join(VIA_CCXT)})")
    async with trio.open_nursery() as nursery:
        running: dict[str, Emulator | EmulatorProcess] = {}
        exchanges: dict[str, ExchangeConfig] = {}
        for exchange, captures in groups.items():
            if emulators == "process":
                child: EmulatorProcess = await nursery.start(partial(
                    run_emulator_process, exchange, [c.path for c in captures], speed,
                    loop=loop, rate=rate))
                running[exchange] = child
                address, depth = child.address, child.depth
                symbols, channels = child.symbols, child.channels
            else:
                emulator = Emulator(
                    captures, speed=speed, faults=faults.get(exchange, NO_FAULTS),
                    loop=loop, passes=passes, rate=rate, autostart=via == "native",
                )
                address = await nursery.start(emulator.serve)
                running[exchange] = emulator
                symbols, channels = emulator.venue.subscriptions(captures)
                depth = getattr(emulator.venue, "recorded_depth", 1000)
            if not symbols:
                prefix = _MARKETS.get(exchange, (exchange.upper(), ""))[0]
                raise CaptureError(
                    f"the {exchange} WebSocket recordings subscribe to no market that "
                    f"{prefix}.0 lists: give files recorded together")
            # a section of the config for this exchange may poll some symbols
            section = config.exchanges.get(exchange)
            exchanges[exchange] = ExchangeConfig(
                symbols=symbols,
                channels=channels,
                depth=depth,
                rest_url=address.rest_url,
                ws_url=address.ws_url,
                mode="watch" if via == "ccxt" else "native",
                symbols_mode={s: m for s, m in section.symbols_mode.items() if s in symbols}
                if section is not None else {},
                interval=section.interval if section is not None else 2.0,
            )
        app = App(attrs.evolve(config, exchanges=exchanges))
        await nursery.start(app.run)
        for exchange, served in running.items():
            if isinstance(served, Emulator) and not served.autostart:
                collector = app.collectors.get(exchange)
                if collector is None:
                    served.started.set()
                else:
                    nursery.start_soon(start_when_subscribed, served, collector)
        task_status.started(Replay(app=app, emulators=running))
