"""What every collector keeps of its own state, and how it tells the world.

Native, poll and watch collectors share it: a named state (``connecting``,
``subscribed``, ``reconnecting``, ...) with a counter per state, each change
published as a ``FeedState`` on the ``system`` channel and awaitable by the
polling fallback; the age of the last event per symbol; tickers published only
when the top of book changed.
"""

from __future__ import annotations

import time
from collections import Counter

import trio

from daemon.events import Event, FeedState, Ticker


class CollectorState:
    """Mixed into a collector that has ``exchange``, ``out`` (a dispatcher source)
    and ``stats`` (``FeedStats``); ``label`` prefixes state details."""

    exchange: str
    out: trio.MemorySendChannel[Event]
    label: str = ""

    def _init_state(self) -> None:
        self.state = "starting"
        self.state_counts: Counter[str] = Counter()
        self.last_event: dict[str, float] = {}  # symbol -> trio clock of its last event
        self.last_tickers: dict[str, tuple[str, str, str, str]] = {}
        self._changed = trio.Event()

    async def wait_state_change(self) -> None:
        """Return at the next ``set_state``."""
        await self._changed.wait()

    async def set_state(self, state: str, detail: str = "") -> None:
        """Record a state change, count it, and publish it on the ``system`` channel."""
        self.state = state
        self.state_counts[state] += 1
        self._changed.set()
        self._changed = trio.Event()
        now = time.time()
        await self.out.send(FeedState(
            exchange=self.exchange, symbol="*", ts=now, recv_ts=now, state=state,
            detail=self.label + detail,
        ))

    async def publish(self, event: Event) -> None:
        """Send one event to the dispatcher (waiting while it is full)."""
        self.last_event[event.symbol] = trio.current_time()
        await self.out.send(event)

    async def publish_ticker(self, event: Ticker) -> None:
        """Publish a ticker only when its symbol's top of book changed."""
        top = (event.bid, event.bid_size, event.ask, event.ask_size)
        if self.last_tickers.get(event.symbol) == top:
            return
        self.last_tickers[event.symbol] = top
        self.stats.tickers += 1  # type: ignore[attr-defined]
        await self.publish(event)
