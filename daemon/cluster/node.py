"""A cluster node: the engine, and what the node's role runs on it.

- ``collector``: a ``Writer`` subscribed to every stream of the dispatcher (which
  waits for it: ``Dispatcher.gate``), and one lease per configured feed
  (``hold``): the feed runs only while this node holds its lease.
- ``edge``: a ``Mirror`` of every stream into the dispatcher.
- both: publishes go to Redis (``ClusterPublisher``), numbered there once.

Leases: ``PREFIX:lease:EXCHANGE`` holds the owner's node id with an expiry of
``cluster.lease`` seconds (set if absent or renewed by its owner, one Lua script:
``daemon.cluster.engine.LEASE``). The owner renews it every third of the lease;
a standby tries every tenth, so it takes over at most a tenth of the lease after
the lease lapsed. An owner that cannot renew (Redis unreachable) stops its feed
once the lease it last renewed has run out, so two owners never ingest at once
for longer than the clocks' skew; an owner that finds another's id in the key
stops at once. On a clean shutdown the owner deletes the lease (if still its
own) so a standby starts without waiting. A feed that starts (first owner or
takeover) syncs its books from a snapshot (``book_snapshot``) and announces its
``feed_state`` as any feed does.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs
import orjson
import trio

from daemon.channels import ChannelPolicy
from daemon.cluster.engine import Engine, Write, open_engine, split_payload
from daemon.cluster.mirror import Mirror
from daemon.cluster.writer import Writer
from daemon.config import Config
from daemon.dispatch import Dispatcher
from daemon.errors import RedisUnavailable
from daemon.events import CHANNELS, Published, Trade
from daemon.supervise import Backoff

log = logging.getLogger(__name__)


def node_name(config: Config) -> str:
    """``cluster.node``, else ``HOST-PID``."""
    return config.cluster.node or f"{socket.gethostname()}-{os.getpid()}"


@attrs.frozen
class LeaseState:
    """One feed's lease as this node sees it: ``feed``, ``holder`` (node id or
    empty), ``owned`` (this node runs the feed), ``takeovers`` (times it started
    the feed)."""

    feed: str
    holder: str
    owned: bool
    takeovers: int


class Node:
    """The cluster side of one daemon in role ``collector`` or ``edge``.

    ``start_feed(name)`` / ``stop_feed(name)``: the app's (collector role);
    ``close_clients(streams or None)`` and ``on_epoch(epoch)``: see ``Mirror``."""

    def __init__(self, config: Config, dispatcher: Dispatcher,
                 start_feed: Callable[[str], Awaitable[None]],
                 stop_feed: Callable[[str], Awaitable[None]],
                 close_clients: Callable[[set[str] | None], None],
                 on_epoch: Callable[[str], None]) -> None:
        self.config = config
        self.role = config.role
        self.name = node_name(config)
        self.dispatcher = dispatcher
        self._start_feed = start_feed
        self._stop_feed = stop_feed
        self._close_clients = close_clients
        self._on_epoch = on_epoch
        self.engine: Engine | None = None
        self.writer: Writer | None = None
        self.mirror: Mirror | None = None
        self.leases: dict[str, LeaseState] = {}
        self.opened = trio.Event()
        #: set by the app once what reads the feeds' first events runs (derived streams)
        self.feeds_may_start = trio.Event()

    def backoff(self) -> Backoff:
        reconnect = self.config.reconnect
        return Backoff(reconnect.base, min(reconnect.cap, 5.0))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the engine and run the role's tasks until cancelled; ``started()``
        once the writer is subscribed (collector) or the mirror started (edge),
        without waiting for Redis."""
        cluster = self.config.cluster
        async with open_engine(cluster.redis, cluster.prefix, cluster.timeout,
                               cluster.redis_cluster) as engine, \
                trio.open_nursery() as nursery:
            self.engine = engine
            self.opened.set()
            if self.role == "collector":
                from daemon.app import new_epoch

                writer = self.writer = Writer(engine, self.name, new_epoch(), cluster.queue,
                                              cluster.batch, self.backoff())
                channels = set(self.dispatcher.channels) | set(CHANNELS)
                self.dispatcher.subscribe(writer, channels, ["*"])
                self.dispatcher.gate = writer.room
                await nursery.start(writer.run)
                for feed in self.config.exchanges:
                    nursery.start_soon(self.hold, feed)
            else:
                mirror = self.mirror = Mirror(engine, self.dispatcher, cluster.batch,
                                              self.backoff(), self._close_clients, self._on_epoch)
                await nursery.start(mirror.run)
                # ready with the streams loaded when Redis is up; else at once (unhealthy)
                with trio.move_on_after(cluster.timeout):
                    await mirror.ready.wait()
            task_status.started()

    # -- leases ----------------------------------------------------------------------

    async def hold(self, feed: str) -> None:
        """Run ``feed`` while this node holds its lease (module docstring)."""
        assert self.engine is not None
        await self.feeds_may_start.wait()
        ttl = self.config.cluster.lease
        owned = False
        takeovers = 0
        renewed = -1e18
        holder = ""
        try:
            while True:
                now = trio.current_time()
                try:
                    holder = await self.engine.acquire(feed, self.name, ttl) or ""
                    if holder == self.name:
                        renewed = now
                except RedisUnavailable as exc:
                    if owned and now - renewed >= ttl:
                        log.warning("cluster: lease of %s not renewed for %.1f s (%s): "
                                    "stopping the feed", feed, ttl, exc)
                        owned = False
                        await self._stop_feed(feed)
                    await trio.sleep(ttl / 10)
                    continue
                mine = holder == self.name
                if mine and not owned:
                    takeovers += 1
                    log.info("cluster: lease of %s taken by %s: starting the feed", feed, self.name)
                    owned = True
                    await self._start_feed(feed)
                elif owned and not mine:
                    log.warning("cluster: lease of %s is held by %s: stopping the feed", feed, holder)
                    owned = False
                    await self._stop_feed(feed)
                self.leases[feed] = LeaseState(feed, holder, owned, takeovers)
                await trio.sleep(ttl / 3 if owned else ttl / 10)
        finally:
            if owned:
                await self._release(feed)

    async def last_trades(self, exchange: str, symbols: Iterable[str]) -> list[Trade]:
        """The newest trade of each of ``exchange``'s ``symbols`` that Redis holds
        (what the feed's previous owner delivered), for this node's feed to
        recover the trades after them from the exchange (``ExchangeFeed.resume``).
        A symbol without one is left out; if Redis cannot be read, none (logged:
        the feed then starts without recovering the handover's trades)."""
        engine = self.engine
        if engine is None:
            return []
        found: list[Trade] = []
        try:
            for symbol in symbols:
                entries = await engine.last(f"trades:{exchange}:{symbol}", 1)
                if not entries:
                    continue
                body = orjson.loads(entries[-1].payload)
                found.append(Trade(
                    exchange=exchange, symbol=symbol, ts=float(body["ts"]),
                    recv_ts=float(body["recv_ts"]), id=str(body["id"]), price=body["price"],
                    size=body["size"], side=body["side"]))
        except (RedisUnavailable, ValueError, KeyError, TypeError) as exc:
            log.warning("cluster: the last trades of %s could not be read (%s): its feed "
                        "starts without recovering the trades of the handover", exchange, exc)
        return found

    async def _release(self, feed: str) -> None:
        """Give ``feed``'s lease up at shutdown, over a connection of its own (the
        engine's pool is being cancelled with everything else): within 1 s, shielded;
        if Redis does not answer, the lease lapses by itself."""
        cluster = self.config.cluster
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                async with open_engine(cluster.redis, cluster.prefix, cluster.timeout,
                                       cluster.redis_cluster) as engine:
                    if await engine.release(feed, self.name):
                        log.info("cluster: lease of %s released", feed)
            except RedisUnavailable as exc:
                log.warning("cluster: lease of %s not released (%s): it lapses in %.1f s",
                            feed, exc, cluster.lease)

    # -- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The role, the Redis connection, the leases and the streams' lag."""
        body: dict[str, Any] = {"role": self.role, "node": self.name,
                                "redis": self.config.cluster.redis,
                                "redis_cluster": self.config.cluster.redis_cluster,
                                "prefix": self.config.cluster.prefix}
        if self.writer is not None:
            body["writer"] = attrs.asdict(self.writer.statistics())
            body["connected"] = self.writer.connected or not self.writer.error
        if self.mirror is not None:
            stats = self.mirror.statistics()
            body["mirror"] = {k: v for k, v in attrs.asdict(stats).items() if k != "lags"}
            body["streams"] = [attrs.asdict(lag) for lag in stats.lags]
            body["connected"] = stats.connected
        body["leases"] = [attrs.asdict(lease) for lease in self.leases.values()]
        if self.engine is not None:
            body["round_trips"] = self.engine.round_trips
        return body


class ClusterHealth:
    """The node's Redis connection as a health component (critical: an edge
    without Redis serves nothing new, a collector without it writes nothing):
    unhealthy while the mirror or the writer cannot reach Redis, degraded while
    a collector's events wait more than ``LAG_WARNING`` seconds for Redis."""

    kind = "cluster"
    name = "redis"

    def __init__(self, node: Node) -> None:
        from daemon.health import CRITICAL

        self.node = node
        self.criticality = CRITICAL

    def sample(self, now: float) -> None:
        pass

    def check(self, now: float) -> Any:
        from daemon.health import DEGRADED, HEALTHY, UNHEALTHY, Check

        node = self.node
        figures = {k: v for k, v in node.status().items() if k not in ("streams", "leases")}
        health, reason = HEALTHY, ""
        if node.mirror is not None and not node.mirror.connected:
            health, reason = UNHEALTHY, f"not reading redis: {node.mirror.error or 'connecting'}"
        elif node.writer is not None:
            stats = node.writer.statistics()
            if stats.error:
                health, reason = UNHEALTHY, f"not writing to redis: {stats.error}"
            elif stats.lag > LAG_WARNING:
                health, reason = DEGRADED, f"events wait {stats.lag:.1f} s for redis"
        return Check(self.name, self.kind, self.criticality, health, reason, figures)


#: Seconds a collector's oldest event may wait for Redis before it is degraded.
LAG_WARNING = 5.0


class ClusterPublisher:
    """The ``Source`` a cluster node's ``Publisher`` sends into: each published
    message is written to Redis at once (``Engine.write``: its idempotency key
    and version are checked there, so a publish to any node is numbered once) and
    its receipt settled; the edges' mirrors deliver it. While Redis is
    unreachable, ``send`` retries with backoff: the publisher's timeout then
    answers ``busy``. (A publish without an idempotency key that times out
    after Redis wrote it but before it answered is written again if retried.)"""

    def __init__(self, node: Node, channels: dict[str, ChannelPolicy] | Any, window: float) -> None:
        self.node = node
        self.channels = channels
        self.window = window
        #: told the cluster's epoch at each publish (the publisher's answers carry it)
        self.on_epoch: Callable[[str], None] | None = None

    async def send(self, event: Any, /) -> None:
        """Write one ``Published`` event; raises ``TypeError`` for another event."""
        if not isinstance(event, Published):
            raise TypeError(f"a cluster publisher takes published messages, not {event!r}")
        await self.node.opened.wait()
        engine = self.node.engine
        assert engine is not None
        body: dict[str, object] = {
            "type": event.type, "channel": event.channel, "source": event.source,
            "key": event.key, "data": orjson.Fragment(event.data), "ts": event.ts,
            "recv_ts": event.recv_ts, "seq": 0,
        }
        if event.version is not None:
            body["version"] = event.version
        before, after = split_payload(orjson.dumps(body), 0)
        policy = self.channels.get(event.channel)
        retention = self.node.dispatcher.retention.get(event.channel) or (
            policy.retention if policy is not None else None)
        write = Write(stream=f"{event.channel}:{event.source}:{event.key}", before=before,
                      after=after, maxlen=retention.size if retention is not None else 1,
                      recv_ts=event.recv_ts, idempotency=event.idempotency_key,
                      window=self.window, version=event.version)
        backoff = self.node.backoff()
        from daemon.app import new_epoch

        while True:
            try:
                epoch = await engine.cluster_epoch(new_epoch())
                await engine.register([write.stream])  # edges find the stream there
                [written] = await engine.write([write], self.node.name, epoch)
                break
            except RedisUnavailable as exc:
                log.warning("cluster: publish: %s", exc)
                await trio.sleep(backoff.next_delay())
        if self.on_epoch is not None:
            self.on_epoch(epoch)
        if event.receipt is not None:
            event.receipt.settle(written.outcome, written.seq, written.version)

    async def publish(self, events: Iterable[Any], /, *, drained: bool = False) -> None:
        """``send`` each of ``events`` in order (``drained``: unused, each is
        written to Redis)."""
        for event in events:
            await self.send(event)

    def share_books(self, books: Any, /) -> None:
        """Published messages have no books: nothing to share."""

    def send_nowait(self, value: Any, /) -> None:
        """Not available: a write to Redis awaits. Raises ``trio.WouldBlock``."""
        raise trio.WouldBlock

    def close(self) -> None:
        """Nothing to close."""

    async def aclose(self) -> None:
        """Nothing to close."""

    async def __aenter__(self) -> ClusterPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

