"""What every collector is to the rest of the daemon: the ``Collector`` protocol and
the one statistics object every kind of collector reports.

A collector (native WebSocket, ccxt REST ``poll``, ccxt.pro ``watch``) is a trio
task that turns one exchange's traffic into events on a dispatcher source. The
app supervises it (``run``, ``set_state("failed", ...)`` after a crash), the
polling fallback watches its ``state`` (``wait_state_change``), and health, the
admin socket and metrics read its ``statistics()``: a frozen
``CollectorStatistics`` whose fields are the same for every kind (fields a kind
does not have are ``None``), so no reader tells kinds apart by their attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import attrs
import trio

from daemon.config import ExchangeConfig, ReconnectConfig
from daemon.dispatch import Source
from daemon.exchanges.base import FeedStatistics


@attrs.frozen(kw_only=True)
class BridgeStatistics:
    """The ccxt.pro bridge of a ``watch`` collector: items in its channel now
    (``buffer_used``), its bound (``buffer_size``), the most it held (``peak_buffer``),
    whether the worker thread waits for room (``waiting``) and is alive."""

    buffer_used: int
    buffer_size: int
    peak_buffer: int
    waiting: bool
    thread_alive: bool


@attrs.frozen(kw_only=True)
class CollectorStatistics:
    """One collector's report at one moment (trio's ``statistics()`` habit).

    - ``exchange``, ``mode`` (``native``, ``poll``, ``watch``), ``state`` (``starting``,
      ``connecting``, ``subscribed``, ``reconnecting``, ``stale``, ``failed``) and
      ``states``: state changes counted by state;
    - ``frames``: what came in (WebSocket frames, REST answers, bridge items) and
      ``last_frame_age``: seconds since the last one (``None``: nothing yet);
    - ``symbols``: seconds since each symbol's last event;
    - ``books``: each book symbol's ``synced`` flag (empty when the collector keeps
      no books: a poller, or no ``book`` channel);
    - ``counters``: the feed's counters (``FeedStatistics``);
    - ``last_error``: the cause of the last failure (``Type: message``, the
      innermost cause) and ``last_error_age`` in seconds, ``None`` before any;
    - ``period`` and ``requests_per_round``: a poller's round (seconds, requests);
      ``failed_requests``: its requests that failed in a round that went on;
    - ``bridge``: a ``watch`` collector's bridge.
    """

    exchange: str
    mode: str
    state: str
    states: Mapping[str, int]
    frames: int
    last_frame_age: float | None
    symbols: Mapping[str, float]
    books: Mapping[str, bool]
    counters: FeedStatistics
    last_error: str | None = None
    last_error_age: float | None = None
    period: float | None = None
    requests_per_round: int | None = None
    failed_requests: int | None = None
    bridge: BridgeStatistics | None = None


class Collector(Protocol):
    """A collector, as the app, the polling fallback, health and replay use it.

    ``exchange``: the name its events carry; ``cfg``: its exchange section;
    ``reconnect``: the backoff settings; ``out``: its dispatcher source (the app
    closes it when the collector is gone); ``state``: its connection state.
    """

    exchange: str
    cfg: ExchangeConfig
    reconnect: ReconnectConfig
    out: Source
    state: str

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Stream until cancelled; ``started()`` at once. Retries network faults
        itself; anything else propagates to the supervisor."""

    def statistics(self) -> CollectorStatistics:
        """The report now."""

    async def wait_state_change(self) -> None:
        """Return at the next state change."""

    async def set_state(self, state: str, detail: str = "", error: str | None = None) -> None:
        """Record and publish a state change (``error``: its cause, the last error)."""
