"""The health model, the reporter, the new events on the wire, sd_notify and the
log format: no daemon, real datagram sockets where systemd would be."""

from __future__ import annotations

import logging
import re
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
import trio.testing

from daemon.collectors.base import CollectorStatistics
from daemon.config import ReporterConfig
from daemon.dispatch import Dispatcher, DispatcherStatistics, Message, Retention
from daemon.events import ComponentHealth, HealthChange, Status
from daemon.exchanges.base import FeedCounters
from daemon.health import (
    CRITICAL,
    NONCRITICAL,
    Check,
    DispatcherHealth,
    FeedHealth,
    Reporter,
    daemon_health,
)
from daemon.logs import LogfmtFormatter
from daemon.notify import Notifier
from daemon.wire import decode_event, encode_event

CONFIG = ReporterConfig(interval=1.0, check=1.0, recent=10.0, silent_after=5.0,
                        book_silent_after=30.0)


def check(name: str, criticality: str, health: str) -> Check:
    return Check(name, "x", criticality, health)


def health_of(critical: str, feed: str) -> str:
    return daemon_health([check("a", CRITICAL, critical), check("f", NONCRITICAL, feed)])


def test_criticality_decides_what_a_component_does_to_the_daemon() -> None:
    assert health_of("healthy", "healthy") == "healthy"
    assert health_of("healthy", "unhealthy") == "degraded"  # a feed down: never unhealthy
    assert health_of("degraded", "healthy") == "degraded"  # critical, only degraded
    assert health_of("unhealthy", "degraded") == "unhealthy"  # a critical one down


# -- a feed --------------------------------------------------------------------------------


@attrs.define
class FakeBookFeed:
    synced: set[str] = attrs.field(factory=set)
    stats: FeedCounters = attrs.field(factory=FeedCounters)

    def book(self, symbol: str) -> object | None:
        return object() if symbol in self.synced else None


@attrs.define
class FakeCollector:
    """A collector as FeedHealth sees it: its ``statistics()``."""

    cfg: Any
    feed: FakeBookFeed = attrs.field(factory=FakeBookFeed)
    venue: str = "fake"
    state: str = "subscribed"
    state_counts: Counter = attrs.field(factory=Counter)
    frames: int = 0
    last_frame_age: float | None = 0.1
    last_error: str | None = None

    def statistics(self) -> CollectorStatistics:
        books = {s: s in self.feed.synced for s in self.cfg.symbols}
        return CollectorStatistics(
            exchange="kraken", mode="native", state=self.state, states=dict(self.state_counts),
            frames=self.frames, last_frame_age=self.last_frame_age, symbols={}, books=books,
            counters=self.feed.stats.freeze(), last_error=self.last_error,
            last_error_age=None if self.last_error is None else 1.0)


@attrs.define
class FakeExchangeConfig:
    symbols: list[str]
    channels: list[str]


def make_feed(fallback: Any = None) -> tuple[FakeCollector, FeedHealth]:
    collector = FakeCollector(FakeExchangeConfig(["BTC-USD", "ETH-USD"], ["book", "trades"]))
    collector.feed.synced = {"BTC-USD", "ETH-USD"}
    dispatcher = Dispatcher(8, {})
    return collector, FeedHealth("kraken", collector, fallback, dispatcher, CONFIG)


def test_a_feed_is_unhealthy_while_down_and_degraded_while_it_recovers() -> None:
    collector, health = make_feed()
    health.sample(0.0)
    assert health.check(0.0).health == "healthy"
    collector.state = "reconnecting"
    collector.state_counts["reconnecting"] += 1
    health.sample(1.0)
    result = health.check(1.0)
    assert (result.health, result.reason) == ("unhealthy", "reconnecting")
    collector.state = "subscribed"
    health.sample(2.0)
    result = health.check(2.0)
    assert result.health == "degraded" and "1 reconnect in the last 10s" in result.reason
    for t in range(3, 11):
        health.sample(float(t))
    assert health.check(10.5).health == "degraded"  # seen at t=1: within 10 s ...
    health.sample(11.5)
    assert health.check(11.5).health == "healthy"  # ... and now past the window


def test_a_down_feed_names_the_cause_of_its_last_failure() -> None:
    collector, health = make_feed()
    collector.state = "failed"
    collector.last_error = "ConnectionRefusedError: [Errno 111] Connection refused"
    result = health.check(0.0)
    assert (result.health, result.reason) == ("unhealthy", "failed")
    assert result.figures["last_error"] == collector.last_error
    assert result.figures["last_error_age"] == 1.0
    collector.state = "subscribed"  # back up: the reason clears, the figure stays
    result = health.check(1.0)
    assert (result.health, result.reason) == ("healthy", "")
    assert result.figures["last_error"] == collector.last_error


def test_a_silent_feed_an_unsynced_book_and_resyncs_degrade_it() -> None:
    collector, health = make_feed()
    health.sample(0.0)
    collector.last_frame_age = 6.0
    result = health.check(0.0)
    assert result.health == "degraded" and "nothing received for 6s" in result.reason
    collector.last_frame_age = 0.1
    collector.feed.synced = {"BTC-USD"}
    health.sample(1.0)
    assert health.check(1.0).health == "healthy"  # syncing: within the grace
    health.sample(7.0)
    result = health.check(7.0)
    assert result.health == "degraded" and "1 book not synced (ETH-USD)" in result.reason
    assert result.figures["books"]["ETH-USD"]["synced"] is False
    collector.feed.synced = {"BTC-USD", "ETH-USD"}
    collector.feed.stats.resyncs += 2
    collector.feed.stats.checksum_mismatch += 1
    health.sample(8.0)
    result = health.check(8.0)
    assert result.reason == "2 resyncs, 1 checksum mismatch in the last 10s"


def test_a_feed_served_by_the_polling_fallback_is_degraded_not_down() -> None:
    poller = attrs.make_class("Poller", {"state": attrs.field(default="subscribed")})()
    fallback = attrs.make_class("Fallback", {"state": attrs.field(default="open"),
                                             "poller": attrs.field(default=poller)})()
    collector, health = make_feed(fallback)
    collector.state = "reconnecting"
    result = health.check(0.0)
    assert result.health == "degraded" and "polling through ccxt" in result.reason


# -- the dispatcher --------------------------------------------------------------------


@attrs.define
class FakeDispatcher:
    stats: DispatcherStatistics

    def statistics(self) -> DispatcherStatistics:
        return self.stats


def test_the_dispatcher_is_degraded_from_80_percent_full_and_unhealthy_when_stalled() -> None:
    stats = DispatcherStatistics(events=10, rejected=0, duplicates=0, streams=1, subscribers=0,
                                 buffer_used=10, buffer_size=100, tasks_waiting_send=0)
    dispatcher = FakeDispatcher(stats)
    health = DispatcherHealth(dispatcher, CONFIG)
    health.sample(0.0)
    assert health.check(0.0).health == "healthy"
    dispatcher.stats = attrs.evolve(stats, events=20, buffer_used=85)
    health.sample(1.0)
    result = health.check(1.0)
    assert (result.health, result.reason) == ("degraded", "input channel 85% full (85/100)")
    health.sample(7.0)  # no event published since t=1 while 85 wait
    result = health.check(7.0)
    assert result.health == "unhealthy" and result.reason.startswith("stalled: 85 events waiting")


# -- the reporter ----------------------------------------------------------------------


@attrs.define
class Toggle:
    """A component whose health the test sets."""

    name: str
    health: str = "healthy"
    criticality: str = NONCRITICAL

    def sample(self, now: float) -> None:
        pass

    def check(self, now: float) -> Check:
        return Check(self.name, "feed", self.criticality, self.health,
                     "" if self.health == "healthy" else "test")


@attrs.define(eq=False)
class Recorder:
    """A dispatcher subscriber that keeps what it is given."""

    messages: list[Message] = attrs.field(factory=list)

    def deliver(self, message: Message) -> None:
        self.messages.append(message)


async def test_transitions_are_published_and_a_late_subscriber_gets_the_last_20() -> None:
    dispatcher = Dispatcher(64, {"system": Retention(100, 3600.0)})
    feed = Toggle("feed:kraken")
    server = Toggle("server", criticality=CRITICAL)
    reporter = Reporter(lambda: [server, feed], dispatcher.open_source(), Notifier({}),
                        CONFIG, 0.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dispatcher.serve)
        reporter.tick()  # the first check sets where things stand: no transition
        assert reporter.health == "healthy" and not reporter.transitions
        for n in range(25):
            feed.health = "unhealthy" if n % 2 == 0 else "healthy"
            reporter.tick()
        server.health = "unhealthy"
        reporter.tick()
        await trio.testing.wait_all_tasks_blocked()
        assert len(reporter.transitions) == 20
        last = reporter.transitions[-1]
        assert (last["component"], last["previous"], last["health"], last["daemon"]) == (
            "server", "healthy", "unhealthy", "unhealthy")

        late = Recorder()
        initial, _ = dispatcher.subscribe(late, ["system"], ["tickwire:*"], history=20)
        events = [decode_event(orjson.loads(m.payload))[0] for m in initial]
        assert len(events) == 20 and all(isinstance(e, HealthChange) for e in events)
        seqs = [m.seq for m in initial]
        assert seqs == list(range(7, 27))  # 26 transitions, the last 20, in order
        assert [e.component for e in events[-2:]] == ["feed:kraken", "server"]
        assert events[-2].daemon == "degraded" and events[-1].daemon == "unhealthy"

        reporter.tick()  # nothing changed: nothing published
        await trio.testing.wait_all_tasks_blocked()
        assert late.messages == []
        nursery.cancel_scope.cancel()


async def test_a_check_that_raises_is_unhealthy_and_the_reporter_goes_on() -> None:
    @attrs.define
    class Broken(Toggle):
        def check(self, now: float) -> Check:
            raise KeyError("frames")

    dispatcher = Dispatcher(64, {})
    feed = Toggle("feed:kraken")
    reporter = Reporter(lambda: [feed, Broken("server", criticality=CRITICAL)],
                        dispatcher.open_source(), Notifier({}), CONFIG, 0.0)
    reporter.tick()
    reporter.tick()
    server = reporter.checks[1]
    assert server.health == "unhealthy"
    assert server.reason == "health check failed: KeyError: 'frames'"
    assert reporter.health == "unhealthy" and reporter.report()[0] == "unhealthy"


def test_status_and_health_change_events_round_trip_on_the_wire() -> None:
    status = Status(
        exchange="tickwire", symbol="*", ts=1.5, recv_ts=1.5, health="degraded", uptime=12.25,
        components=(ComponentHealth(name="feed:kraken", criticality="degraded",
                                    health="unhealthy", reason="reconnecting"),
                    ComponentHealth(name="server", criticality="critical", health="healthy")),
    )
    change = HealthChange(exchange="tickwire", symbol="*", ts=2.0, recv_ts=2.0,
                          component="feed:kraken", criticality="degraded", health="healthy",
                          previous="unhealthy", daemon="healthy", reason="")
    for event in (status, change):
        wire = orjson.loads(encode_event(event, 3))
        assert wire["type"] == event.TYPE and wire["seq"] == 3
        assert decode_event(wire) == (event, 3)
        hash(event)  # events stay hashable
    assert orjson.loads(encode_event(status, 1))["components"][0] == {
        "name": "feed:kraken", "criticality": "degraded", "health": "unhealthy",
        "reason": "reconnecting"}


# -- sd_notify and logs ----------------------------------------------------------------


def test_the_notifier_reaches_an_abstract_socket_and_sends_status_only_when_it_changes() -> None:
    name = f"tickwire-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(b"\0" + name.encode())
        systemd.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "3000000"})
        assert notifier.watchdog_interval == 1.5
        notifier.ready("healthy: 1/1 feeds healthy")
        notifier.status("healthy: 1/1 feeds healthy")  # unchanged: not sent
        notifier.status("degraded:\n feed down")
        notifier.reloading()
        assert systemd.recv(4096) == b"READY=1\nSTATUS=healthy: 1/1 feeds healthy"
        assert systemd.recv(4096) == b"STATUS=degraded: feed down"
        reloading = systemd.recv(4096).decode().split("\n")
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert Notifier({}).enabled is False
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_a_log_record_is_one_logfmt_line_even_with_a_traceback() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.LogRecord("daemon.x", logging.ERROR, __file__, 1, 'said "%s"',
                                   ("hi there",), sys.exc_info())
    line = LogfmtFormatter().format(record)
    assert "\n" not in line
    assert line.startswith("ts=")
    assert ' level=error logger=daemon.x msg="said \\"hi there\\""' in line
    assert 'exc="Traceback' in line and "ValueError: bad\\nvalue" in line
    journal = LogfmtFormatter(journal=True).format(
        logging.LogRecord("daemon.x", logging.WARNING, __file__, 1, "up", (), None))
    assert journal == "<4>level=warning logger=daemon.x msg=up"


def test_no_print_in_the_daemon() -> None:
    root = Path(__file__).parent.parent / "daemon"
    bare = re.compile(r"(?<![\w.])print\(")
    offenders = [str(p) for p in root.rglob("*.py") if bare.search(p.read_text())]
    assert offenders == []
