"""Metrics: one Prometheus registry, read at scrape time, served over HTTP.

Nothing is counted on the hot path for metrics: every figure already exists as a
component's counter or ``statistics()``, and ``TickwireCollector.collect`` reads
them when Prometheus scrapes (or the admin socket asks). Health and the derived
figures (messages per second, book ages) come from the reporter's checks
(``daemon.health``), so a metric and ``tickwire status`` never disagree.

The HTTP endpoint is the one HTTP server (``daemon.http``) with a handler:
``GET /metrics`` answers the text exposition of ``registry``, generated in the
trio thread, so components are never read from another thread. It is off unless
``metrics.listen`` is set, and HTTPS when the server's TLS is on
(``[server.tls]``).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs
import trio
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from daemon import __version__
from daemon.health import RATE_WINDOW, Check
from daemon.http import HttpServer, Request, Response
from daemon.listen import ListenError

if TYPE_CHECKING:
    from daemon.app import App

log = logging.getLogger(__name__)

#: Health as a number: ``tickwire_health`` and ``tickwire_component_health``.
HEALTH_VALUES = {"healthy": 0, "degraded": 1, "unhealthy": 2}
#: Feed counters exported as ``tickwire_feed_<name>_total``.
FEED_COUNTERS = {
    "messages": "Messages (frames or REST answers) received from the exchange.",
    "trades": "Trades produced.",
    "book_updates": "Book updates produced.",
    "tickers": "Tickers produced.",
    "snapshots": "Book snapshots produced.",
    "resyncs": "Books found broken and rebuilt.",
    "gaps": "Sequence or trade id gaps detected.",
    "malformed": "Frames skipped as unusable.",
    "reconnects": "Reconnections (reconnecting, stale, failed).",
}
#: Seconds a scrape connection may take to send its request.
REQUEST_TIMEOUT = 10.0


class MetricsError(ListenError):
    """The metrics endpoint cannot listen (one line, for people)."""


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


class TickwireCollector:
    """A prometheus_client custom collector over a running ``App``."""

    def __init__(self, app: App) -> None:
        self.app = app

    def describe(self) -> list[Metric]:
        return []  # dynamic: families depend on the running feeds and clients

    def collect(self) -> Iterator[Metric]:
        app = self.app
        health, checks = app.reporter.report()
        yield from self._daemon(app, health, checks)
        yield from self._feeds([c for c in checks if c.kind == "feed"])
        yield from self._dispatcher(app)
        yield from self._server(app)
        yield from self._publish(app)
        yield from self._derived(app)
        if getattr(app, "cluster", None) is not None:
            yield from self._cluster(app.cluster)

    def _cluster(self, node: Any) -> Iterator[Metric]:
        """Roles collector and edge (docs/cluster.md): Redis, leases, the lag."""
        status = node.status()
        role = _gauge("tickwire_cluster_role", "This node's role (1 for its role).", ["role", "node"])
        role.add_metric([node.role, node.name], 1)
        yield role
        yield GaugeMetricFamily("tickwire_cluster_redis_connected",
                                "1 while the node reads or writes Redis.",
                                value=1 if status.get("connected") else 0)
        leases = _gauge("tickwire_cluster_lease_owned", "1 while this node owns the feed's lease.",
                        ["exchange"])
        for lease in status["leases"]:
            leases.add_metric([lease["feed"]], 1 if lease["owned"] else 0)
        yield leases
        if "writer" in status:
            writer = status["writer"]
            written = _counter("tickwire_cluster_events_written", "Events Redis accepted from this node.")
            written.add_metric([], writer["written"])
            yield written
            yield GaugeMetricFamily("tickwire_cluster_write_queue", "Events waiting for Redis.",
                                    value=writer["queued"])
            yield GaugeMetricFamily("tickwire_cluster_write_lag_seconds",
                                    "Seconds the oldest queued event has waited for Redis.",
                                    value=writer["lag"])
        if "streams" in status:
            read = _counter("tickwire_cluster_entries_read", "Stream entries this edge read from Redis.")
            read.add_metric([], status["mirror"]["entries"])
            yield read
            lag = _gauge("tickwire_cluster_stream_delay_seconds",
                         "Seconds from Redis to this edge for the stream's last entry.", ["stream"])
            for stream in status["streams"]:
                lag.add_metric([stream["stream"]], stream["delay"])
            yield lag

    def _daemon(self, app: Any, health: str, checks: list[Check]) -> Iterator[Metric]:
        info = _gauge("tickwire_info", "The daemon's version and epoch.", ["version", "epoch"])
        info.add_metric([__version__, app.epoch], 1)
        yield info
        yield GaugeMetricFamily("tickwire_uptime_seconds", "Seconds since start.",
                                value=app.reporter.uptime())
        yield GaugeMetricFamily("tickwire_health",
                                "The daemon's health: 0 healthy, 1 degraded, 2 unhealthy.",
                                value=HEALTH_VALUES[health])
        component = _gauge("tickwire_component_health",
                           "A component's health: 0 healthy, 1 degraded, 2 unhealthy.",
                           ["component", "criticality"])
        for check in checks:
            component.add_metric([check.name, check.criticality], HEALTH_VALUES[check.health])
        yield component
        dropped = _counter("tickwire_reporter_events_dropped",
                           "Status and health events not published: the dispatcher was full.")
        dropped.add_metric([], app.reporter.dropped)
        yield dropped

    def _feeds(self, checks: list[Check]) -> Iterator[Metric]:
        label = ["exchange"]
        counters = {key: _counter(f"tickwire_feed_{key}", doc, label)
                    for key, doc in FEED_COUNTERS.items()}
        checksums = _counter("tickwire_feed_checksums", "Book checksums verified, by result.",
                             ["exchange", "result"])
        rate = _gauge("tickwire_feed_messages_per_second",
                      f"Messages per second over the last {RATE_WINDOW:g}s.", label)
        age = _gauge("tickwire_feed_last_message_age_seconds",
                     "Seconds since the last message from the exchange.", label)
        up = _gauge("tickwire_feed_up", "1 while the feed's connection is up.", label)
        book_age = _gauge("tickwire_book_last_update_age_seconds",
                          "Seconds since the book's last snapshot or update.",
                          ["exchange", "symbol"])
        book_synced = _gauge("tickwire_book_synced", "1 while the book is synced.",
                             ["exchange", "symbol"])
        for check in checks:
            f = check.figures
            exchange = f["exchange"]
            for key, family in counters.items():
                family.add_metric([exchange], f.get(key) or 0)
            checksums.add_metric([exchange, "ok"], f.get("checksum_ok") or 0)
            checksums.add_metric([exchange, "mismatch"], f.get("checksum_mismatch") or 0)
            if f.get("messages_per_second") is not None:
                rate.add_metric([exchange], f["messages_per_second"])
            if f.get("last_message_age") is not None:
                age.add_metric([exchange], f["last_message_age"])
            up.add_metric([exchange], 1 if f["state"] == "subscribed" else 0)
            for symbol, book in f.get("books", {}).items():
                book_synced.add_metric([exchange, symbol], 1 if book["synced"] else 0)
                if book["age"] is not None:
                    book_age.add_metric([exchange, symbol], book["age"])
        yield from counters.values()
        yield from (checksums, rate, age, up, book_age, book_synced)

    def _dispatcher(self, app: Any) -> Iterator[Metric]:
        stats = app.dispatcher.statistics()
        for name, doc, value in (
            ("events", "Events numbered and fanned out.", stats.events),
            ("rejected", "Events rejected (a source's bug).", stats.rejected),
            ("duplicates", "Trades dropped: their id was already delivered.", stats.duplicates),
        ):
            yield CounterMetricFamily(f"tickwire_dispatcher_{name}", doc, value=value)
        for name, doc, value in (
            ("streams", "Streams known.", stats.streams),
            ("subscribers", "Subscribers.", stats.subscribers),
            ("buffer_used", "Events waiting in the input channel.", stats.buffer_used),
            ("buffer_size", "Bound of the input channel.", stats.buffer_size),
            ("buffer_fill_ratio", "Input channel fill, 0 to 1 (degraded from 0.8).",
             stats.buffer_used / stats.buffer_size if stats.buffer_size else 0),
            ("tasks_waiting_send", "Sources waiting to send (backpressure).",
             stats.tasks_waiting_send),
        ):
            yield GaugeMetricFamily(f"tickwire_dispatcher_{name}", doc, value=value)
        seq = _counter("tickwire_stream_events", "Events numbered on a stream: its last seq.",
                       ["channel", "exchange", "symbol"])
        for stream in list(app.dispatcher.streams.values()):
            seq.add_metric([stream.channel, stream.exchange, stream.symbol], stream.seq)
        yield seq

    def _server(self, app: Any) -> Iterator[Metric]:
        """The broadcast server's figures, summed over its clients: one series
        each, not one per connection (a label per client would make a series per
        connection, a new one at each reconnect)."""
        server = app.server
        stats = server.statistics()
        yield GaugeMetricFamily("tickwire_clients", "Connected clients.", value=stats.clients)
        yield GaugeMetricFamily("tickwire_connections_open",
                                "Client connections counted against the limits now "
                                "(handshakes included).", value=stats.open)
        yield GaugeMetricFamily("tickwire_connections_limit",
                                "Client connections admitted at most: server.max_connections "
                                "or the descriptor budget, the lower.", value=stats.limit)
        for name, doc, value in (
            ("tickwire_connections", "Client connections accepted.", stats.connections),
            ("tickwire_slow_consumers", "Clients closed by the slow-consumer policy (4008).",
             stats.slow_consumers),
            ("tickwire_conflations", "Backlogs replaced by the latest state.",
             stats.conflations),
            ("tickwire_ping_timeouts", "Clients closed for not answering pings (4001).",
             stats.ping_timeouts),
            ("tickwire_broadcast_writes",
             "Writes of queued events to the clients they reached (one per coalescing "
             "window under load).", stats.writes),
            ("tickwire_broadcast_shared_batches",
             "Batched frames written as built for another client in the same write.",
             stats.shared_batches),
            ("tickwire_client_messages_sent",
             "Messages written to clients, every client since the start.", stats.messages),
            ("tickwire_client_frames_sent",
             "WebSocket frames written to clients, every client since the start.",
             stats.frames),
            ("tickwire_client_bytes_sent",
             "Bytes written to clients, every client since the start.", stats.bytes),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        rejected = _counter("tickwire_connections_rejected",
                            "Client upgrades refused, by HTTP status.", ["status"])
        for status, count in sorted(stats.rejected.items()):
            rejected.add_metric([str(status)], count)
        yield rejected
        drops = _counter("tickwire_client_dropped",
                         "Messages clients did not get as such, by policy: conflate (a "
                         "backlog replaced by the latest state), throttle (within a "
                         "client's throttle_ms).", ["policy"])
        drops.add_metric(["conflate"], stats.conflations)
        drops.add_metric(["throttle"], stats.throttled)
        yield drops
        yield GaugeMetricFamily("tickwire_client_queue_depth",
                                "Messages queued for clients, all clients together.",
                                value=stats.queued)
        yield GaugeMetricFamily("tickwire_client_queue_depth_max",
                                "The longest client queue, messages.", value=stats.queue_max)
        yield latency_summary(server.latency)


    def _publish(self, app: Any) -> Iterator[Metric]:
        """Publishes by channel, source and outcome (``accepted``, ``duplicate``,
        ``stale``, ``refused``); a channel that is not declared is ``-``, and at
        most ``publisher.MAX_COUNTED_PAIRS`` pairs are counted apart, so a client
        cannot make series at will."""
        stats = app.publisher.statistics()
        published = _counter("tickwire_publish", "Publishes by channel, source and outcome.",
                             ["channel", "source", "outcome"])
        for f in stats.figures:
            for outcome in ("accepted", "duplicate", "stale", "refused"):
                published.add_metric([f.channel, f.source, outcome], getattr(f, outcome))
        yield published
        yield CounterMetricFamily(
            "tickwire_publish_busy",
            "Publishes answered busy (503): the dispatcher stayed full for publish.timeout.",
            value=stats.busy)


    def _derived(self, app: Any) -> Iterator[Metric]:
        """Each derived stream's counters (``daemon.derived``), by ``name``
        (``whales``, ``bars``, ``views``)."""
        streams = [d.statistics() for d in (*app.derived, app.views)]
        for field, doc in (
            ("received", "Input messages a derived stream took."),
            ("published", "Events a derived stream published."),
            ("dropped", "Input messages a derived stream did not take while its input "
                        "was full (recovered with since, or lost)."),
            ("lost", "Streams whose missed messages a derived stream could not recover."),
            ("errors", "Input messages or ticks on which a derived stream's computation "
                       "raised."),
            ("busy", "CPU seconds a derived stream spent decoding and computing."),
        ):
            family = _counter(f"tickwire_derived_{field}", doc, ["name"])
            for stats in streams:
                family.add_metric([stats.name], getattr(stats, field))
            yield family
        queued = _gauge("tickwire_derived_queued", "Messages in a derived stream's input.",
                        ["name"])
        for stats in streams:
            queued.add_metric([stats.name], stats.queued)
        yield queued


def latency_summary(histogram: Any) -> Metric:
    """An HdrHistogram of microseconds as a Prometheus summary in seconds: p50, p99,
    p99.9, count and sum."""
    name = "tickwire_delivery_latency_seconds"
    summary = Metric(name, "Receive (from the exchange) to client write.", "summary")
    count = histogram.get_total_count()
    for quantile, percentile in (("0.5", 50.0), ("0.99", 99.0), ("0.999", 99.9)):
        value = histogram.get_value_at_percentile(percentile) / 1e6 if count else float("nan")
        summary.add_sample(name, {"quantile": quantile}, value)
    summary.add_sample(f"{name}_count", {}, count)
    total = histogram.get_mean_value() * count / 1e6 if count else 0.0
    summary.add_sample(f"{name}_sum", {}, total)
    return summary


def make_registry(app: App) -> CollectorRegistry:
    """The one registry: tickwire's collector, and the process and platform ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TickwireCollector(app))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def samples(registry: CollectorRegistry) -> list[dict[str, Any]]:
    """Every sample of ``registry`` as ``{"name", "labels", "value"}`` (admin socket)."""
    return [
        {"name": s.name, "labels": s.labels, "value": s.value}
        for metric in registry.collect()
        for s in metric.samples
    ]


@attrs.frozen
class MetricsStatistics:
    """``listen``: ``HOST:PORT`` while listening, else ``None``; ``scrapes``: of
    ``/metrics``; ``errors``: failed connections."""

    listen: str | None
    scrapes: int
    errors: int


class MetricsServer:
    """``GET /metrics`` (and ``HEAD``) on the one HTTP server (``daemon.http``), over
    TLS when ``ssl_context`` is given (``https://``).

    ``address`` is ``HOST:PORT`` once listening (``None`` before); ``scrapes`` counts
    the scrapes of ``/metrics``.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.registry = registry
        self.scrapes = 0
        self.http = HttpServer(self.answer, host, port, name="metrics",
                               setting="metrics.listen", ssl_context=ssl_context,
                               max_body=0, request_timeout=REQUEST_TIMEOUT,
                               path="/metrics")

    @property
    def address(self) -> str | None:
        """``HOST:PORT`` while listening, else ``None``."""
        return self.http.address

    def statistics(self) -> MetricsStatistics:
        """Where it listens, the scrapes of ``/metrics`` and the failed connections."""
        http = self.http.statistics()
        return MetricsStatistics(listen=http.listen, scrapes=self.scrapes, errors=http.errors)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``started(port)``. Raises ``MetricsError`` (a
        ``StartupError``, one line) when the address cannot be bound."""
        try:
            await self.http.serve(task_status=task_status)
        except ListenError as exc:
            raise MetricsError(str(exc)) from exc.__cause__

    async def answer(self, request: Request) -> Response:
        """``/metrics``: the text exposition of the registry (generated in the trio
        thread, so components are never read from another thread); ``/``: a
        pointer to it; else 404; a method other than GET and HEAD: 405."""
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", headers=(("allow", "GET, HEAD"),))
        if request.path == "/metrics":
            self.scrapes += 1
            return Response(200, generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4)
        if request.path == "/":
            return Response(200, b"tickwire metrics: /metrics\n")
        return Response(404, b"not found\n")
