"""What every collector keeps of its own state, and how it tells the world.

Native, poll and watch collectors share it: a named state (``connecting``,
``subscribed``, ``reconnecting``, ...) with a counter per state, each change
published as a ``FeedState`` on the ``system`` channel and awaitable by the
polling fallback; the last error (its cause, for status); the age of the last
event per symbol; tickers published only when the top of book changed.
"""

from __future__ import annotations

import time
from collections import Counter

import trio

from daemon.dispatch import Source
from daemon.events import Event, FeedState, Ticker
from daemon.exchanges.base import FeedCounters
from daemon.supervise import Failure


class CollectorState:
    """Mixed into a collector that has ``exchange``, ``out`` (a dispatcher source)
    and ``stats`` (``FeedCounters``, for ``publish_ticker``); ``label`` prefixes state
    details."""

    exchange: str
    out: Source
    label: str = ""

    def _init_state(self) -> None:
        self.state = "starting"
        self.state_counts: Counter[str] = Counter()
        self.last_event: dict[str, float] = {}  # symbol -> trio clock of its last event
        self.last_tickers: dict[str, tuple[str, str, str, str]] = {}
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # trio clock
        self._changed = trio.Event()

    async def wait_state_change(self) -> None:
        """Return at the next ``set_state``."""
        await self._changed.wait()

    async def set_state(self, state: str, detail: str = "", error: str | None = None) -> None:
        """Record a state change, count it, and publish it on the ``system`` channel;
        ``error``, when given, is the cause of the change (``Type: message``) and
        becomes the last error."""
        self.state = state
        self.state_counts[state] += 1
        if error is not None:
            self.note_error(error)
        self._changed.set()
        self._changed = trio.Event()
        now = time.time()
        await self.out.send(FeedState(
            exchange=self.exchange, symbol="*", ts=now, recv_ts=now, state=state,
            detail=self.label + detail,
        ))

    def note_error(self, cause: str) -> None:
        """Keep ``cause`` as the last error, now."""
        self.last_error = cause
        self.last_error_at = trio.current_time()

    async def retrying(self, state: str, failure: Failure, detail: str = "") -> None:
        """The state change of a failed attempt that ``daemon.supervise.retry`` will
        try again: ``state`` with ``detail`` (default: the error) and the delay."""
        text = detail or str(failure.error)
        await self.set_state(state, f"{text}; retry in {failure.delay:.2f}s", failure.cause)

    def error_age(self, now: float) -> float | None:
        """Seconds since the last error, ``None`` before any."""
        return None if self.last_error_at is None else round(now - self.last_error_at, 3)

    def symbol_ages(self, now: float) -> dict[str, float]:
        """Seconds since each symbol's last event, by symbol."""
        return {symbol: round(now - at, 3) for symbol, at in sorted(self.last_event.items())}

    async def publish(self, event: Event) -> None:
        """Send one event to the dispatcher (waiting while it is full)."""
        self.last_event[event.symbol] = trio.current_time()
        await self.out.send(event)

    async def publish_ticker(self, event: Ticker, stats: FeedCounters) -> None:
        """Publish a ticker only when its symbol's top of book changed (counted in
        ``stats.tickers``)."""
        top = (event.bid, event.bid_size, event.ask, event.ask_size)
        if self.last_tickers.get(event.symbol) == top:
            return
        self.last_tickers[event.symbol] = top
        stats.tickers += 1
        await self.publish(event)
