"""Health: how each component's health is derived, and the reporter that publishes it.

Theory of operation
-------------------
1. Every component of the daemon (each feed, the dispatcher, the broadcast server,
   the admin socket, the metrics endpoint) has one health object here, and its
   ``check(now)`` is the one place where that component's health is derived, from
   the component's own signals: connection state, ages of the last message and of
   each book, counters. Nothing else computes health: the admin socket, the status
   events, systemd's ``STATUS=`` and ``tickwire status`` show what ``check`` says.
2. A check is ``healthy``, ``degraded`` or ``unhealthy``, with a reason for people
   and the figures it was derived from.
3. A component's criticality says what its trouble does to the daemon
   (``daemon_health``): a ``critical`` component (dispatcher, broadcast server,
   admin socket) that is unhealthy makes the daemon unhealthy; any other trouble (a
   feed, whose criticality is ``degraded``, or a critical component that is only
   degraded) makes the daemon degraded.
4. Counters tell about the past: the reporter calls ``sample(now)`` on each
   component every ``reporter.check`` seconds, and a counter that grew within the
   last ``reporter.recent`` seconds (a reconnect, a resync, a checksum mismatch)
   keeps its component degraded that long. ``check`` changes nothing: anyone may
   call it at any time.
5. The ``Reporter`` task samples and checks everything every ``reporter.check``
   seconds; for each component whose health changed it logs, keeps the change (the
   last 20) and publishes a ``HealthChange`` on the ``system`` channel; every
   ``reporter.interval`` seconds it publishes a ``Status`` on the ``status``
   channel; it sends systemd ``STATUS=`` when the summary changes and
   ``WATCHDOG=1``: when this loop stops, the pings stop and systemd restarts us.
   It never waits on the dispatcher (``send_nowait``): an event that does not fit
   is counted in ``dropped``.

A late subscriber gets the retained transitions from the dispatcher: they are one
stream, ``system:tickwire:*``, retained like every ``system`` stream
(``history.system`` events, 100 by default); subscribe to ``system`` with
``"history": 20`` for the last 20. The admin socket's ``status`` shows the
reporter's own last 20.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from daemon.config import ReporterConfig
from daemon.events import ComponentHealth, Event, HealthChange, Status
from daemon.notify import Notifier

if TYPE_CHECKING:
    from attrs import AttrsInstance
    from hdrh.histogram import HdrHistogram

    from daemon.broadcast.server import ServerStatistics
    from daemon.collectors.base import Collector, CollectorStatistics
    from daemon.collectors.fallback import Fallback
    from daemon.derived.runner import DerivedStatistics
    from daemon.dispatch import Dispatcher, DispatcherStatistics, Source
    from daemon.publish.publisher import PublisherStatistics

log = logging.getLogger(__name__)

HEALTHY = "healthy"
DEGRADED = "degraded"
UNHEALTHY = "unhealthy"
_RANK = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}

#: Criticalities: a ``critical`` component unhealthy makes the daemon unhealthy; a
#: ``degraded`` one (a feed) at worst makes it degraded.
CRITICAL = "critical"
NONCRITICAL = "degraded"

#: Transitions kept by the reporter (the admin ``status`` shows them).
TRANSITIONS_KEPT = 20
#: Seconds over which messages per second are measured.
RATE_WINDOW = 5.0
#: Seconds a book may take to sync (connect, snapshot) before it counts as trouble.
BOOK_SYNC_GRACE = 5.0
#: Dispatcher input channel fill (fraction) from which it is degraded.
FILL_WARNING = 0.8

#: Collector states in which the feed is down (``subscribed`` is up).
DOWN_STATES = ("starting", "connecting", "reconnecting", "stale", "failed")
#: State changes counted as reconnects.
RECONNECT_STATES = ("reconnecting", "stale", "failed")
#: Feed counters that, when they grow, are trouble.
ERROR_COUNTERS = ("resyncs", "gaps", "checksum_mismatch", "malformed")


@attrs.frozen
class Check:
    """One component's health at one moment, and the figures it came from."""

    name: str
    kind: str
    criticality: str
    health: str
    reason: str = ""
    figures: dict[str, Any] = attrs.field(factory=dict, eq=False)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "criticality": self.criticality,
                "health": self.health, "reason": self.reason, "figures": self.figures}


class Component(Protocol):
    """What the reporter needs of a health object."""

    name: str

    def sample(self, now: float) -> None: ...
    def check(self, now: float) -> Check: ...


# -- what the health objects read of their components: their frozen statistics -------


class Counted(Protocol):
    """The dispatcher, as its health reads it."""

    def statistics(self) -> DispatcherStatistics: ...


class Served(Protocol):
    """The broadcast server, as its health reads it: ``port`` (``None`` while it
    does not listen) and its receive-to-write ``latency`` histogram (µs)."""

    port: int | None
    latency: HdrHistogram

    def statistics(self) -> ServerStatistics: ...


class Addressed(Protocol):
    """A listener of ours (the admin socket, the metrics or publish endpoint):
    ``address`` while it listens, else ``None``."""

    @property
    def address(self) -> str | None: ...


class Listening(Addressed, Protocol):
    """A listener with frozen figures of its own."""

    def statistics(self) -> AttrsInstance: ...


class Publishing(Protocol):
    """The publisher (``daemon.publish``), as its health reads it."""

    def statistics(self) -> PublisherStatistics: ...


class Deriving(Protocol):
    """A derived stream or the depth views (``daemon.derived``)."""

    @property
    def name(self) -> str: ...
    def statistics(self) -> DerivedStatistics: ...


def daemon_health(checks: Sequence[Check]) -> str:
    """The daemon's health from its components' (rule 3 of the module docstring)."""
    worst = HEALTHY
    for check in checks:
        if check.health == HEALTHY:
            continue
        down = check.criticality == CRITICAL and check.health == UNHEALTHY
        impact = UNHEALTHY if down else DEGRADED
        if _RANK[impact] > _RANK[worst]:
            worst = impact
    return worst


def _verdict(unhealthy: list[str], degraded: list[str]) -> tuple[str, str]:
    if unhealthy:
        return UNHEALTHY, "; ".join(unhealthy + degraded)
    if degraded:
        return DEGRADED, "; ".join(degraded)
    return HEALTHY, ""


def _check(component: Any, health: str, reason: str, figures: dict[str, Any]) -> Check:
    return Check(component.name, component.kind, component.criticality, health, reason, figures)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class _Samples:
    """Counter samples ``(time, {name: value})`` kept for ``keep`` seconds."""

    def __init__(self) -> None:
        self.items: deque[tuple[float, dict[str, int]]] = deque()

    def add(self, now: float, values: dict[str, int], keep: float) -> None:
        self.items.append((now, values))
        while len(self.items) > 2 and self.items[1][0] <= now - keep:
            self.items.popleft()

    def before(self, now: float, seconds: float) -> tuple[float, dict[str, int]] | None:
        """The newest sample at least ``seconds`` old, else the oldest: the baseline of
        a rate, and of "grew within ``seconds``"."""
        found = self.items[0] if self.items else None
        for at, values in self.items:
            if at > now - seconds:
                break
            found = (at, values)
        return found

    def rate(self, now: float, key: str, current: int) -> float | None:
        base = self.before(now, RATE_WINDOW)
        if base is None or now - base[0] < 0.5:
            return None
        return round((current - base[1].get(key, 0)) / (now - base[0]), 1)

    def grown(self, now: float, seconds: float, current: dict[str, int]) -> dict[str, int]:
        """The counters that grew in the last ``seconds``, by how much."""
        if seconds <= 0:
            return {}
        base = self.before(now, seconds)
        if base is None:
            return {}
        return {k: v - base[1].get(k, 0) for k, v in current.items() if v > base[1].get(k, 0)}


# -- the components ----------------------------------------------------------------------


class FeedHealth:
    """One exchange feed: its collector (native, poll or watch), its polling
    fallback if any, and its books as the dispatcher holds them. Criticality
    ``degraded``. Reads only the collector's ``statistics()``. ``label``: the
    feed's name where it is not the exchange's (``coinbase/poll``: the symbols
    ``symbols_mode`` polls); ``figures["symbols_mode"]``: each symbol's mode.

    - unhealthy: the connection is not up (``connecting``, ``reconnecting``, ``stale``,
      ``failed``), unless the polling fallback serves it (then degraded); the
      figures' ``last_error`` names the cause of the last failure;
    - degraded: nothing received for ``silent_after`` seconds; a book not synced for
      ``BOOK_SYNC_GRACE`` seconds, or without update for ``book_silent_after``; a
      reconnect, resync, gap, checksum mismatch or malformed frame within ``recent``.
    """

    kind = "feed"
    criticality = NONCRITICAL

    def __init__(
        self, exchange: str, collector: Collector, fallback: Fallback | None,
        dispatcher: Dispatcher, config: ReporterConfig, label: str | None = None,
    ) -> None:
        self.exchange = exchange
        self.name = f"feed:{label or exchange}"
        self.collector = collector
        self.fallback = fallback
        self.dispatcher = dispatcher
        self.config = config
        self._samples = _Samples()
        self._unsynced_since: dict[str, float] = {}
        self._created = time.monotonic()

    def _check(self, unhealthy: list[str], degraded: list[str], figures: dict[str, Any]) -> Check:
        return _check(self, *_verdict(unhealthy, degraded), figures)

    @staticmethod
    def _troubles(stats: CollectorStatistics) -> dict[str, int]:
        troubles = {"reconnects": sum(stats.states.get(s, 0) for s in RECONNECT_STATES)}
        for key in ERROR_COUNTERS:
            troubles[key] = getattr(stats.counters, key)
        return troubles

    def sample(self, now: float) -> None:
        stats = self.collector.statistics()
        values = {"frames": stats.frames, **self._troubles(stats)}
        self._samples.add(now, values, max(self.config.recent, RATE_WINDOW) + self.config.check)
        for symbol, synced in stats.books.items():
            if synced:
                self._unsynced_since.pop(symbol, None)
            else:
                self._unsynced_since.setdefault(symbol, now)

    def check(self, now: float) -> Check:
        cfg = self.config
        stats = self.collector.statistics()
        counters = stats.counters
        troubles = self._troubles(stats)
        state = stats.state
        wall = time.time()
        books: dict[str, dict[str, Any]] = {}
        for symbol, synced in stats.books.items():
            stream = self.dispatcher.streams.get(f"book:{self.exchange}:{symbol}")
            event = stream.book_event if stream is not None else None
            books[symbol] = {
                "synced": synced,
                "age": round(wall - event.recv_ts, 3) if event is not None else None,
                "seq": stream.seq if stream is not None else 0,
            }
        fallback = self.fallback.state if self.fallback is not None else None
        figures: dict[str, Any] = {
            "exchange": self.exchange,
            "mode": stats.mode,
            "state": state,
            "running_for": round(time.monotonic() - self._created, 3),
            "fallback": fallback,
            "messages": stats.frames,
            "messages_per_second": self._samples.rate(now, "frames", stats.frames),
            "last_message_age": stats.last_frame_age,
            "reconnects": troubles["reconnects"],
            **{key: getattr(counters, key) for key in (
                "trades", "book_updates", "tickers", "snapshots", "resyncs", "gaps",
                "checksum_ok", "checksum_mismatch", "malformed")},
            "books": books,
            "symbols": dict(stats.symbols),
            "symbols_mode": {symbol: stats.mode for symbol in getattr(
                getattr(self.collector, "cfg", None), "symbols", stats.symbols)},
            "last_error": stats.last_error,
            "last_error_age": stats.last_error_age,
        }
        unhealthy: list[str] = []
        degraded: list[str] = []
        if state != "subscribed":
            poller = self.fallback.poller if self.fallback is not None and fallback == "open" else None
            if poller is not None and poller.state == "subscribed":
                degraded.append(f"native feed {state}; polling through ccxt")
            else:
                unhealthy.append(state)
            return self._check(unhealthy, degraded, figures)
        silent_after = cfg.silent_after
        if stats.period is not None:  # a poller: silent between rounds
            silent_after = max(silent_after, 3 * stats.period)
        age = stats.last_frame_age
        if age is not None and age > silent_after:
            degraded.append(f"nothing received for {age:.0f}s")
        unsynced = sorted(
            s for s, since in self._unsynced_since.items()
            if not books.get(s, {}).get("synced", True) and now - since >= BOOK_SYNC_GRACE
        )
        if unsynced:
            degraded.append(
                f"{_plural(len(unsynced), 'book')} not synced ({', '.join(unsynced[:3])})")
        if cfg.book_silent_after > 0:
            silent = sorted(s for s, b in books.items()
                            if b["age"] is not None and b["age"] > cfg.book_silent_after)
            if silent:
                degraded.append(f"{_plural(len(silent), 'book')} without update for "
                                f"{cfg.book_silent_after:g}s ({', '.join(silent[:3])})")
        grown = self._samples.grown(now, cfg.recent, troubles)
        if grown:
            names = {"reconnects": "reconnect", "resyncs": "resync", "gaps": "gap",
                     "checksum_mismatch": "checksum mismatch", "malformed": "malformed frame"}
            listed = ", ".join(_plural(n, names[k]) for k, n in grown.items())
            degraded.append(f"{listed} in the last {cfg.recent:g}s")
        return self._check(unhealthy, degraded, figures)


class DispatcherHealth:
    """The dispatcher, critical. Unhealthy when events wait in its input channel
    and none was published for ``silent_after`` seconds (stalled); degraded when
    the channel is ``FILL_WARNING`` full or more, or an event was rejected within
    ``recent``."""

    name = "dispatcher"
    kind = "dispatcher"
    criticality = CRITICAL

    def __init__(self, dispatcher: Counted, config: ReporterConfig) -> None:
        self.dispatcher = dispatcher
        self.config = config
        self._samples = _Samples()
        self._progress: tuple[int, float] | None = None  # (events, when they last moved)

    def _check(self, unhealthy: list[str], degraded: list[str], figures: dict[str, Any]) -> Check:
        return _check(self, *_verdict(unhealthy, degraded), figures)

    def sample(self, now: float) -> None:
        stats = self.dispatcher.statistics()
        values = {"events": stats.events, "rejected": stats.rejected}
        self._samples.add(now, values, max(self.config.recent, RATE_WINDOW) + self.config.check)
        if self._progress is None or self._progress[0] != stats.events or stats.buffer_used == 0:
            self._progress = (stats.events, now)

    def check(self, now: float) -> Check:
        stats = self.dispatcher.statistics()
        fill = stats.buffer_used / stats.buffer_size if stats.buffer_size else 0.0
        figures = {
            "events": stats.events,
            "events_per_second": self._samples.rate(now, "events", stats.events),
            "rejected": stats.rejected,
            "duplicates": stats.duplicates,
            "streams": stats.streams,
            "subscribers": stats.subscribers,
            "buffer_used": stats.buffer_used,
            "buffer_size": stats.buffer_size,
            "fill": round(fill, 3),
            "tasks_waiting_send": stats.tasks_waiting_send,
        }
        unhealthy: list[str] = []
        degraded: list[str] = []
        if (self._progress is not None and stats.buffer_used > 0
                and self._progress[0] == stats.events
                and now - self._progress[1] >= self.config.silent_after):
            unhealthy.append(f"stalled: {stats.buffer_used} events waiting, none published "
                             f"for {now - self._progress[1]:.0f}s")
        if fill >= FILL_WARNING:
            degraded.append(f"input channel {fill:.0%} full "
                            f"({stats.buffer_used}/{stats.buffer_size})")
        grown = self._samples.grown(now, self.config.recent, {"rejected": stats.rejected})
        if grown:
            degraded.append(f"{_plural(grown['rejected'], 'event')} rejected in the last "
                            f"{self.config.recent:g}s")
        return self._check(unhealthy, degraded, figures)


def latency_figures(histogram: HdrHistogram | None) -> dict[str, Any] | None:
    """p50/p99/p999 and count of an ``HdrHistogram`` of microseconds, or ``None``."""
    if histogram is None:
        return None
    count = histogram.get_total_count()
    return {
        "count": count,
        "p50_us": histogram.get_value_at_percentile(50.0) if count else None,
        "p99_us": histogram.get_value_at_percentile(99.0) if count else None,
        "p999_us": histogram.get_value_at_percentile(99.9) if count else None,
        "max_us": histogram.get_max_value() if count else None,
    }


class ServerHealth:
    """The broadcast server, critical: unhealthy while it does not listen; degraded
    while it refuses new clients for a limit (``max_connections``, the descriptor
    budget, ``accept`` failing for lack of descriptors)."""

    name = "server"
    kind = "server"
    criticality = CRITICAL

    def __init__(self, server: Served) -> None:
        self.server = server

    def sample(self, now: float) -> None:
        pass

    def check(self, now: float) -> Check:
        server = self.server
        stats = server.statistics()
        figures = {
            "listen": stats.listen,
            "clients": stats.clients,
            "connections": stats.connections,
            "slow_consumers": stats.slow_consumers,
            "queued": stats.queued,
            "latency": latency_figures(server.latency),
            "open": stats.open,
            "limit": stats.limit,
            "at_limit": stats.at_limit,
        }
        if server.port is None:
            return _check(self, UNHEALTHY, "not listening", figures)
        if stats.at_limit is not None:
            return _check(self, DEGRADED, _AT_LIMIT.get(stats.at_limit, stats.at_limit),
                          figures)
        return _check(self, HEALTHY, "", figures)


_AT_LIMIT = {
    "max_connections": "new clients refused (503): at server.max_connections",
    "descriptors": "new clients refused (503): at the descriptor budget (open-file limit)",
    "accept": "cannot accept clients: no descriptor left (EMFILE)",
}


class ListenerHealth:
    """A server of ours that only has to listen (the admin socket, the metrics
    endpoint): unhealthy while it does not. ``listener`` has ``address`` (``None``
    until it listens) and ``statistics()``."""

    kind = "listener"

    def __init__(self, name: str, listener: Listening, criticality: str) -> None:
        self.name = name
        self.listener = listener
        self.criticality = criticality

    def sample(self, now: float) -> None:
        pass

    def check(self, now: float) -> Check:
        figures = attrs.asdict(self.listener.statistics())
        if self.listener.address is None:
            return _check(self, UNHEALTHY, "not listening", figures)
        return _check(self, HEALTHY, "", figures)


class PublishHealth:
    """Publishing (``daemon.publish``): its counters by channel and source, and
    its HTTP listener when configured (``listener``: unhealthy while it does not
    listen). Publishers answered ``busy`` make it degraded while recent."""

    kind = "publish"
    name = "publish"

    def __init__(self, publisher: Publishing, listener: Addressed | None, criticality: str,
                 config: ReporterConfig) -> None:
        self.publisher = publisher
        self.listener = listener
        self.criticality = criticality
        self.recent = config.recent
        self._busy = 0
        self._busy_at: float | None = None

    def sample(self, now: float) -> None:
        pass

    def check(self, now: float) -> Check:
        stats = self.publisher.statistics()
        figures: dict[str, Any] = {
            "listen": self.listener.address if self.listener is not None else None,
            "busy": stats.busy,
            **{outcome: sum(getattr(f, outcome) for f in stats.figures)
               for outcome in ("accepted", "duplicate", "stale", "refused")},
            "publishers": [attrs.asdict(f) for f in stats.figures],
        }
        if stats.busy != self._busy:
            self._busy, self._busy_at = stats.busy, now
        if self.listener is not None and self.listener.address is None:
            return _check(self, UNHEALTHY, "not listening", figures)
        if self._busy_at is not None and now - self._busy_at < self.recent:
            return _check(self, DEGRADED, "publishers answered busy (dispatcher full)", figures)
        return _check(self, HEALTHY, "", figures)


class DerivedHealth:
    """A derived stream (``daemon.derived.runner``), non-critical: unhealthy while
    its task is not running (it failed and is being restarted), while its input
    is overflowed (it is behind: ``stalled``), or when its computation raised
    within ``recent``; degraded when its input is ``FILL_WARNING`` full, or it
    lost messages (no longer retained at a resync) within ``recent``."""

    kind = "derived"
    criticality = NONCRITICAL

    def __init__(self, derived: Deriving, config: ReporterConfig) -> None:
        self.derived = derived
        self.name = f"derived {derived.name}"
        self.config = config
        self._samples = _Samples()

    def sample(self, now: float) -> None:
        stats = self.derived.statistics()
        self._samples.add(now, {"errors": stats.errors, "lost": stats.lost},
                          self.config.recent + self.config.check)

    def check(self, now: float) -> Check:
        stats = self.derived.statistics()
        figures = attrs.asdict(stats)
        unhealthy: list[str] = []
        degraded: list[str] = []
        if not stats.running:
            unhealthy.append("not running" + (f" ({stats.last_error})" if stats.last_error else ""))
        if stats.stalled:
            unhealthy.append(f"stalled: its input is full ({stats.limit} messages), "
                             f"{stats.dropped} not taken")
        grown = self._samples.grown(now, self.config.recent,
                                    {"errors": stats.errors, "lost": stats.lost})
        if grown.get("errors"):
            unhealthy.append(f"{_plural(grown['errors'], 'error')} in the last "
                             f"{self.config.recent:g}s: {stats.last_error}")
        if grown.get("lost"):
            degraded.append(f"{_plural(grown['lost'], 'stream')} lost messages in the last "
                            f"{self.config.recent:g}s")
        if stats.limit and stats.queued / stats.limit >= FILL_WARNING:
            degraded.append(f"input {stats.queued}/{stats.limit} full")
        return _check(self, *_verdict(unhealthy, degraded), figures)


# -- the reporter ------------------------------------------------------------------------


def summary(health: str, checks: Sequence[Check]) -> str:
    """One line for systemd's ``STATUS=``: health, feeds up, clients, and what is
    wrong."""
    feeds = [c for c in checks if c.kind == "feed"]
    up = sum(1 for c in feeds if c.health == HEALTHY)
    clients = next((c.figures.get("clients", 0) for c in checks if c.kind == "server"), 0)
    line = f"{health}: {up}/{len(feeds)} feeds healthy, {_plural(clients, 'client')}"
    wrong = [f"{c.name} {c.health} ({c.reason})" for c in checks if c.health != HEALTHY]
    if wrong:
        line += "; " + "; ".join(wrong[:3]) + ("; ..." if len(wrong) > 3 else "")
    return line


class Reporter:
    """Checks every component and publishes health (rule 5 of the module docstring).

    ``components()`` returns the current health objects (feeds change on reload);
    ``out`` is a dispatcher source channel; ``started`` the ``time.monotonic()`` of
    the daemon's start (uptime).
    """

    def __init__(
        self,
        components: Callable[[], Sequence[Component]],
        out: Source,
        notifier: Notifier,
        config: ReporterConfig,
        started: float,
    ) -> None:
        self.components = components
        self.out = out
        self.notifier = notifier
        self.config = config
        self.started = started
        self.transitions: deque[dict[str, Any]] = deque(maxlen=TRANSITIONS_KEPT)
        self.health = ""  # until the first tick
        self.checks: list[Check] = []
        self.published = 0
        self.dropped = 0
        self._last: dict[str, str] = {}
        self._broken: set[str] = set()

    def uptime(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def report(self) -> tuple[str, list[Check]]:
        """The daemon's health and every component's check, now."""
        now = trio.current_time()
        checks = [self._check(component, now) for component in self.components()]
        return daemon_health(checks), checks

    def _check(self, component: Component, now: float, sample: bool = False) -> Check:
        """``component``'s check; one that raises (a bug, a component whose figures
        changed shape) is unhealthy, logged once, and never stops the reporter."""
        try:
            if sample:
                component.sample(now)
            check = component.check(now)
        except Exception as exc:
            if component.name not in self._broken:
                self._broken.add(component.name)
                log.exception("health: checking %s failed", component.name)
            return Check(component.name, getattr(component, "kind", "?"),
                         getattr(component, "criticality", CRITICAL), UNHEALTHY,
                         f"health check failed: {type(exc).__name__}: {exc}")
        self._broken.discard(component.name)
        return check

    def tick(self, *, notify: bool = True) -> None:
        """Sample and check every component; publish what changed; send systemd the
        summary when ``notify`` (the caller may send it with ``READY=1``)."""
        now = trio.current_time()
        checks = [self._check(component, now, sample=True) for component in self.components()]
        health = daemon_health(checks)
        for check in checks:
            previous = self._last.get(check.name)
            if previous is not None and previous != check.health:
                self._transition(check, previous, health)
        self._last = {check.name: check.health for check in checks}
        if health != self.health:
            level = logging.INFO if health == HEALTHY else logging.WARNING
            was = f" (was {self.health})" if self.health else ""
            log.log(level, "health: tickwire is %s%s", health, was)
        self.health, self.checks = health, checks
        if notify:
            self.notifier.status(summary(health, checks))

    def _transition(self, check: Check, previous: str, daemon: str) -> None:
        worse = _RANK[check.health] > _RANK[previous]
        log.log(logging.WARNING if worse else logging.INFO,
                "health: %s %s -> %s%s", check.name, previous, check.health,
                f" ({check.reason})" if check.reason else "")
        now = time.time()
        event = HealthChange(
            exchange="tickwire", symbol="*", ts=now, recv_ts=now, component=check.name,
            criticality=check.criticality, health=check.health, previous=previous,
            daemon=daemon, reason=check.reason,
        )
        self.transitions.append({
            "ts": now, "component": check.name, "previous": previous, "health": check.health,
            "daemon": daemon, "reason": check.reason,
        })
        self._publish(event)

    def status_event(self) -> Status:
        now = time.time()
        return Status(
            exchange="tickwire", symbol="*", ts=now, recv_ts=now, health=self.health,
            uptime=self.uptime(),
            components=tuple(
                ComponentHealth(name=c.name, criticality=c.criticality, health=c.health,
                                reason=c.reason)
                for c in self.checks
            ),
        )

    def _publish(self, event: Event) -> None:
        try:
            self.out.send_nowait(event)
            self.published += 1
        except trio.WouldBlock:
            self.dropped += 1
            log.warning("health: the dispatcher is full; a %s event was not published", event.TYPE)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.dropped += 1  # shutting down: the reporter or the dispatcher is gone

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check, publish and ping systemd's watchdog until cancelled."""
        async with self.out:
            if not self.checks:
                self.tick()
            task_status.started()
            watchdog = self.notifier.watchdog_interval
            now = trio.current_time()
            next_check = now + self.config.check
            next_status = now
            next_ping = now if watchdog else float("inf")
            while True:
                now = trio.current_time()
                if now >= next_check:
                    self.tick()
                    next_check = now + self.config.check
                if now >= next_status:
                    self._publish(self.status_event())
                    next_status += self.config.interval
                    if next_status <= now:  # fell behind: no burst to catch up
                        next_status = now + self.config.interval
                if watchdog and now >= next_ping:
                    self.notifier.watchdog()
                    next_ping = now + watchdog
                await trio.sleep_until(min(next_check, next_status, next_ping))
