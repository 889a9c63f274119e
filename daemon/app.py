"""The nursery tree: dispatcher, broadcast server, admin socket, metrics, feeds and
the reporter under one root.

First the open-file limit is raised to the hard limit, and the broadcast server
told how many descriptors its clients may use (``daemon.limits``). Then startup
is ordered with ``nursery.start``: the dispatcher first (so sources have
somewhere to send), the admin socket (a second daemon on the same socket stops
there, before it takes any port), the broadcast server (listening), the metrics
endpoint and the publish listener (when configured), one supervised feed per
exchange (its
collector and, for a native one, its polling fallback), and last the reporter.
Then, and only then, systemd hears ``READY=1``.

The dispatcher, the server and the admin socket are critical: if one raises, the
root nursery ends and the daemon exits with the error. A feed is not: its collector
is restarted with backoff (``daemon.supervise``). Each feed runs under its own
cancel scope, so a reload (SIGHUP) restarts just the feeds whose configuration
changed; clients stay connected and their streams go on.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import attrs
import trio

from daemon import __version__
from daemon.admin import MAX_REQUEST, AdminServer, Replies, socket_path
from daemon.broadcast.server import BroadcastServer
from daemon.cluster.mirror import EPOCH_CHANGED
from daemon.cluster.node import ClusterHealth, ClusterPublisher, Node
from daemon.collectors.base import Collector
from daemon.collectors.fallback import CCXT_IDS, Fallback
from daemon.collectors.native import NativeCollector
from daemon.collectors.poll import PollCollector
from daemon.collectors.venues import venue
from daemon.collectors.watch import WatchCollector
from daemon.config import Config, ConfigError, ExchangeConfig
from daemon.derived.bars import BarsComputation
from daemon.derived.runner import DerivedStream
from daemon.derived.views import Views
from daemon.derived.whales import WhalesComputation, usd
from daemon.dispatch import Dispatcher, Retention, Source
from daemon.errors import describe
from daemon.events import Trade
from daemon.health import (
    CRITICAL,
    NONCRITICAL,
    DerivedHealth,
    Deriving,
    DispatcherHealth,
    FeedHealth,
    ListenerHealth,
    PublishHealth,
    Reporter,
    ServerHealth,
    summary,
)
from daemon.limits import prepare as prepare_descriptors
from daemon.logs import set_level
from daemon.metrics import MetricsServer, make_registry
from daemon.notify import Notifier
from daemon.publish.endpoint import PublishEndpoint
from daemon.publish.message import ANYONE
from daemon.publish.publisher import Publisher
from daemon.supervise import Backoff, supervise
from daemon.tls import TlsError, exposure_warnings, server_context
from daemon.tls import reload as reload_tls

log = logging.getLogger(__name__)


def new_epoch() -> str:
    """A string that differs at every start of the daemon: start time and randomness."""
    return f"{int(time.time())}-{secrets.token_hex(4)}"


@attrs.define(eq=False)
class Feed:
    """One exchange's running feed: its collector, fallback, health and scope."""

    name: str
    config: ExchangeConfig
    collector: Collector
    fallback: Fallback | None
    health: FeedHealth
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)


class App:
    """One daemon instance built from ``config``. After ``run`` has started:
    ``port`` is the broadcast server's port, ``admin.path`` the admin socket,
    ``metrics_port`` the metrics endpoint's port and ``publish_port`` the publish
    listener's (or ``None``)."""

    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier if notifier is not None else Notifier()
        self.epoch = new_epoch()
        self.started_at = time.time()
        channels = config.channel_table()
        self.dispatcher = Dispatcher(
            config.dispatch.buffer,
            {
                channel: Retention(retention.size, retention.max_age)
                for channel, retention in attrs.asdict(config.history, recurse=False).items()
            },
            channels=channels,
            idempotency_window=config.publish.idempotency_window,
        )
        hello = self.hello = {"type": "welcome", "server": "tickwire", "version": __version__,
                              "epoch": self.epoch}
        #: roles collector and edge: the Redis side (``daemon.cluster``)
        self.cluster: Node | None = None
        source: Source = self.dispatcher.open_source()
        if config.role != "all":
            self.cluster = Node(config, self.dispatcher, self._start_feed_named, self._stop_feed,
                                self._close_clients, self._set_epoch)
            source = ClusterPublisher(self.cluster, channels, config.publish.idempotency_window)
        #: every way in (WebSocket, admin socket, HTTP) publishes through this one
        self.publisher = Publisher(source, channels, config.publish, self.epoch)
        if isinstance(source, ClusterPublisher):  # its answers carry the cluster's epoch
            source.on_epoch = partial(setattr, self.publisher, "epoch")
        #: the top-of-book views clients ask for (``book`` with ``depth``, ``quote``)
        self.views = Views(self.dispatcher, self.dispatcher.open_source())
        self.server = BroadcastServer(self.dispatcher, config.server, hello, config.auth,
                                      publisher=self.publisher, views=self.views)
        self.endpoint: PublishEndpoint | None = None
        if config.publish.listen:
            self.endpoint = PublishEndpoint(self.publisher, config.publish, config.auth)
        self.feeds: dict[str, Feed] = {}
        self.collectors: dict[str, Collector] = {}
        self.fallbacks: dict[str, Fallback] = {}
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.publish_port: int | None = None
        self.registry = make_registry(self)
        self.admin = AdminServer(
            socket_path(config.admin.socket), Replies(self).answer,
            publish=partial(self.publisher.publish, grant=ANYONE),
            max_request=max(MAX_REQUEST, 2 * config.publish.max_message_bytes + 4096))
        self.metrics: MetricsServer | None = None
        if config.metrics.listen:
            self.metrics = MetricsServer(self.registry, config.metrics.host, config.metrics.port)
        self._health = [
            DispatcherHealth(self.dispatcher, config.reporter),
            ServerHealth(self.server),
            ListenerHealth("admin", self.admin, CRITICAL),
        ]
        if self.metrics is not None:
            self._health.append(ListenerHealth("metrics", self.metrics, NONCRITICAL))
        if self.cluster is not None:
            self._health.append(ClusterHealth(self.cluster))
        self._health.append(PublishHealth(self.publisher, self.endpoint, NONCRITICAL,
                                          config.reporter))
        #: the derived streams of ``[derived]`` (``daemon.derived``)
        # derived streams are computed where the feeds are (role all or collector);
        # an edge gets them from Redis
        self.derived = self._make_derived() if config.role != "edge" else []
        deriving: list[Deriving] = [*self.derived, self.views]
        self._health += [DerivedHealth(derived, config.reporter) for derived in deriving]
        self.reporter = Reporter(
            self.components, self.dispatcher.open_source(), self.notifier, config.reporter,
            time.monotonic(),
        )
        self._root: trio.Nursery | None = None
        self._reload_lock = trio.Lock()

    def components(self) -> list[Any]:
        """Every component's health object, feeds last."""
        return [*self._health, *(feed.health for feed in self.feeds.values())]

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the whole tree until cancelled; ``started(port)`` once everything has
        started and the server listens. ``STOPPING=1`` goes out as soon as the tree
        is cancelled (or fails)."""
        # the open-file limit raised to the hard one; the clients' share of it
        self.server.admission.budget = prepare_descriptors(self.config)
        async with trio.open_nursery() as root:
            self._root = root
            root.start_soon(self._stopping)
            await root.start(self.dispatcher.serve)
            await root.start(self.admin.serve)  # first: a second daemon stops here
            if self.cluster is not None:
                # before clients: an edge's welcome has the cluster's epoch when Redis is
                # up; a collector starts each feed once it holds its lease
                await root.start(self.cluster.run)
            for derived in self.derived:  # before the feeds: they read from the first event
                await root.start(self._run_derived, derived)
            await root.start(self._run_derived, self.views)
            self._start_tls()
            self.port = await root.start(self.server.serve)
            if self.metrics is not None:
                self.metrics_port = await root.start(self.metrics.serve)
            if self.endpoint is not None:
                self.publish_port = await root.start(self.endpoint.serve)
            if self.cluster is None:
                for name, exchange in self.config.exchanges.items():
                    await self._start_feed(name, exchange)
            else:  # a collector's feeds start as it takes their leases
                self.cluster.feeds_may_start.set()
            self.reporter.tick(notify=False)
            self.notifier.ready(summary(self.reporter.health, self.reporter.checks))
            await root.start(self.reporter.run)
            log.info(
                "tickwire %s started: epoch %s, %d feeds, %s:%d, admin %s%s",
                __version__, self.epoch, len(self.feeds),
                f"{self.server.scheme}://{self.config.server.host}", self.port,
                self.admin.path,
                "" if self.cluster is None else f"; role {self.config.role}, node {self.cluster.name}",
            )
            task_status.started(self.port)

    async def _stopping(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.notifier.stopping("stopping: closing clients")

    # -- derived streams ---------------------------------------------------------------

    def _make_derived(self) -> list[DerivedStream]:
        """One ``DerivedStream`` per derived stream ``[derived]`` turns on: whales
        when ``enabled``, bars when it names intervals."""
        config = self.config.derived
        computations: list[WhalesComputation | BarsComputation] = []
        whales = config.whales
        if whales.enabled:
            computations.append(WhalesComputation(
                usd(whales.threshold), {key: usd(v) for key, v in whales.thresholds.items()},
                whales.symbols))
        bars = config.bars
        if bars.intervals:
            computations.append(BarsComputation(bars.intervals, bars.grace, bars.empty_bars,
                                                bars.partial_ms, bars.symbols))
        return [DerivedStream(c, self.dispatcher, self.dispatcher.open_source(),
                              config.input_queue) for c in computations]

    async def _run_derived(self, derived: DerivedStream | Views, *,
                           task_status: trio.TaskStatus[None]) -> None:
        """Run one derived stream, restarted with backoff when its task fails (its
        health is unhealthy meanwhile); ``started`` once it has subscribed."""
        first = True

        async def attempt() -> None:
            nonlocal first
            if first:
                first = False
                await derived.run(task_status=task_status)
            else:
                await derived.run()

        reconnect = self.config.reconnect
        async with derived.source:
            await supervise(f"derived {derived.name}", attempt,
                            Backoff(reconnect.base, reconnect.cap), reconnect.healthy_after)

    # -- the cluster -------------------------------------------------------------------

    async def _start_feed_named(self, name: str) -> None:
        """A collector's lease was taken: start the configured feed ``name``."""
        exchange = self.config.exchanges.get(name)
        if exchange is not None and not any(
                key == name or key.startswith(f"{name}/") for key in self.feeds):
            assert self.cluster is not None
            # the previous owner's last trades: the feed recovers the ones after them
            resume = await self.cluster.last_trades(name, exchange.symbols)
            await self._start_feed(name, exchange, resume)

    def _close_clients(self, streams: set[str] | None) -> None:
        """Close with 1012 the clients of ``streams`` (``None``: every client): the
        history their numbers refer to is gone (a new epoch)."""
        subscribed: set[object] = set()
        for key in streams or ():
            stream = self.dispatcher.streams.get(key)
            if stream is not None:
                subscribed |= stream.subscribers
        for session in list(self.server.sessions):
            if streams is None or session in subscribed:
                session.close(EPOCH_CHANGED, "the streams' epoch changed: reconnect with since")

    def _set_epoch(self, epoch: str) -> None:
        """The cluster's epoch: the welcome's and the publish answers' from now on."""
        self.epoch = self.hello["epoch"] = self.publisher.epoch = epoch

    # -- feeds -------------------------------------------------------------------------

    def _make_feed(self, name: str, exchange: ExchangeConfig, key: str | None = None) -> Feed:
        """The collector of ``exchange``'s mode, its polling fallback (native and
        watch modes, unless ``fallback_after`` is 0) and its health object; ``key``:
        the feed's name (``coinbase/poll`` for symbols of another mode), by default
        the exchange's ``name``."""
        collector: Collector
        if exchange.mode == "poll":
            # a poll mode beside native symbols (``symbols_mode``) polls the same
            # exchange: ccxt's id of tickwire's (``coinbase``: Coinbase Exchange)
            collector = PollCollector(name, exchange, self.config.reconnect,
                                      self.dispatcher.open_source(),
                                      ccxt_id=CCXT_IDS.get(name, name) if key else None)
        elif exchange.mode == "watch":
            # ccxt's id of tickwire's exchange (``coinbase``: Coinbase Exchange)
            collector = WatchCollector(name, exchange, self.config.reconnect,
                                       self.dispatcher.open_source(),
                                       ccxt_id=CCXT_IDS.get(name, name),
                                       ccxt_config=exchange.credentials())
        else:
            collector = NativeCollector(venue(name), exchange, self.config.reconnect,
                                        self.dispatcher.open_source())
        fallback = None
        if exchange.mode in ("native", "watch") and exchange.fallback_after > 0:
            fallback = Fallback(collector, partial(self._fallback_poller, name, exchange),
                                exchange.fallback_after)
        health = FeedHealth(name, collector, fallback, self.dispatcher, self.config.reporter,
                            label=key)
        return Feed(key or name, exchange, collector, fallback, health)

    async def _start_feed(self, name: str, exchange: ExchangeConfig,
                          resume: Sequence[Trade] = ()) -> None:
        """Start ``name``'s feeds: one per mode its symbols use (``symbols_mode``):
        the feed ``name`` for ``mode``'s symbols, ``name/MODE`` for the others.
        ``resume``: the last trades delivered before (a cluster's new lease
        owner), which the collector (native, poll or watch) recovers the trades
        after."""
        assert self._root is not None
        self.collectors.pop(name, None)
        self.fallbacks.pop(name, None)
        for mode, group in exchange.groups():
            key = name if mode == exchange.mode else f"{name}/{mode}"
            feed = self._make_feed(name, group, key if exchange.symbols_mode else None)
            handed = [t for t in resume if t.symbol in group.symbols]
            if isinstance(feed.collector, NativeCollector):
                feed.collector.resume_trades = handed
            elif isinstance(feed.collector, PollCollector | WatchCollector):
                feed.collector.resume(handed)
            self.feeds[key] = feed
            if key == name:
                self.collectors[name] = feed.collector
                if feed.fallback is not None:
                    self.fallbacks[name] = feed.fallback
            await self._root.start(self._run_feed, feed)

    async def _run_feed(self, feed: Feed, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            with feed.scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(self._supervised, feed.name, feed.collector))
                    if feed.fallback is not None:
                        await nursery.start(feed.fallback.run)
                    task_status.started()
        finally:
            if feed.fallback is not None and feed.fallback.poller is not None:
                feed.fallback.poller.out.close()
            feed.done.set()

    async def _stop_feed(self, name: str) -> None:
        """Stop ``name``'s feeds (each mode's)."""
        self.collectors.pop(name, None)
        self.fallbacks.pop(name, None)
        for key in [k for k in self.feeds if k == name or k.startswith(f"{name}/")]:
            feed = self.feeds.pop(key)
            feed.scope.cancel()
            await feed.done.wait()

    def _fallback_poller(self, name: str, exchange: ExchangeConfig) -> PollCollector:
        return PollCollector(
            name, exchange, self.config.reconnect, self.dispatcher.open_source(),
            ccxt_id=CCXT_IDS.get(name, name),
            label="fallback: ",
        )

    async def _supervised(
        self, name: str, collector: Collector, *, task_status: trio.TaskStatus[None]
    ) -> None:
        first = True

        async def attempt() -> None:
            nonlocal first
            try:
                if first:
                    first = False
                    await collector.run(task_status=task_status)
                else:
                    await collector.run()
            except Exception as exc:
                await collector.set_state("failed", f"{type(exc).__name__}: {exc}",
                                          describe(exc))
                raise

        reconnect = self.config.reconnect
        async with collector.out:
            await supervise(
                f"collector {name}", attempt, Backoff(reconnect.base, reconnect.cap),
                reconnect.healthy_after,
            )

    # -- reload ------------------------------------------------------------------------

    def _start_tls(self) -> None:
        """TLS for clients from ``[server.tls]`` (``daemon.tls``); raises ``TlsError``
        (a ``StartupError``); logs ``exposure_warnings`` (tokens in the clear, auth
        off on a public address)."""
        context = server_context(self.config.server.tls)
        self.server.ssl_context = context
        if self.metrics is not None:
            self.metrics.http.ssl_context = context
        if self.endpoint is not None:
            self.endpoint.http.ssl_context = context
        for warning in exposure_warnings(self.config):
            log.warning("%s", warning)

    def _reload_tls(self, config: Config) -> list[str]:
        """SIGHUP: the certificate and key files read again (new connections)."""
        context = self.server.ssl_context
        if context is None or not config.server.tls.on:
            return []
        try:
            reload_tls(context, config.server.tls)
        except TlsError as exc:
            log.error("reload: %s; the running certificate stays", exc)
            return []
        return ["TLS certificate reloaded"]

    async def reload(self, load: Callable[[], Config]) -> list[str]:
        """Re-read the configuration with ``load()`` and apply its exchanges (and log
        level): stop the feeds that are gone, restart those whose settings changed,
        start the new ones; the other feeds, the server and its clients are not
        touched. Settings that need a restart are logged; a configuration that does
        not load is logged and changes nothing. systemd hears ``RELOADING=1`` first
        and ``READY=1`` when done. Returns what changed, e.g. ``["restarted kraken"]``."""
        async with self._reload_lock:
            self.notifier.reloading()
            changes: list[str] = []
            try:
                config = load()
            except ConfigError as exc:
                log.error("reload: config error: %s; the running configuration stays", exc)
                self.notifier.ready(f"reload failed: {exc}")
                return changes
            try:
                old = self.config.exchanges
                new = config.exchanges
                if self.cluster is not None and new != old:
                    log.warning("reload: [exchanges] changed; in role %s it applies at the next "
                                "start (a feed runs where its lease is)", self.config.role)
                    new = old
                for name in [n for n in old if n not in new or new[n] != old[n]]:
                    await self._stop_feed(name)
                for name, exchange in new.items():
                    if old.get(name) != exchange:
                        await self._start_feed(name, exchange)
                        changes.append(f"{'restarted' if name in old else 'started'} {name}")
                changes += [f"stopped {name}" for name in old if name not in new]
                if config.log_level != self.config.log_level:
                    set_level(config.log_level)
                    changes.append(f"log level {config.log_level}")
                changes += self._reload_tls(config)
                for section in ("server", "admin", "metrics", "dispatch", "history",
                                "reconnect", "reporter", "auth", "publish", "channels", "derived"):
                    if getattr(config, section, None) != getattr(self.config, section, None):
                        log.warning("reload: [%s] changed; it applies at the next start", section)
                self.config = attrs.evolve(self.config, exchanges=dict(new),
                                           log_level=config.log_level)
                log.info("reload: %s", ", ".join(changes) if changes else "nothing changed")
            finally:
                self.reporter.tick(notify=False)
                self.notifier.ready(summary(self.reporter.health, self.reporter.checks))
            return changes
