"""An edge's mirror: the cluster's streams from Redis into the edge's dispatcher.

Theory of operation
-------------------
The mirror follows every stream in the registry (``PREFIX:streams``; looked at
again every ``SCAN`` seconds). A stream it starts to follow is loaded as a late
joiner would need it: a book from its stored book (``:b``, a ``book_snapshot`` at
seq S) and the updates after S; any other stream from its last ``retention.size``
entries (history for ``since`` recovery and late joiners, the last one its latest
value). Then blocking XREADs hand over new entries as they are written (no
notification round trip), in batches of ``cluster.batch`` per stream: one task
scans the registry and follows new streams, and one reader per slot
(``Engine.slot``) reads all the followed streams of its slot with one blocking
XREAD after another. On one Redis every stream is in "slot" 0: one reader, one
XREAD on every stream, as before Redis Cluster was supported. A stream followed
while its slot's reader waits joins that reader's next XREAD (at most ``SCAN``
later; its retained entries are loaded at once).

Why a reader per slot, not per node: Redis Cluster refuses a multi-key command
whose keys hash to different slots even when one node serves them all
(CROSSSLOT; coredis refuses it before sending, ``ClusterCrossSlotError``, as
checked on a 3-master cluster: two streams of one node in one XREAD fail), and
coredis splits a cross-slot command over slots only for commands with a routing
strategy (MGET, DEL...), not for XREAD. One XREAD per node is not possible; the
other ways round it cost more latency: a per-node pipeline of non-blocking
per-slot XREADs must poll (an interval of delay, and a round trip per slot per
poll even when nothing is written), and a notification (sharded PUBLISH from the
script) costs a second round trip before the read. A blocking reader per slot
keeps one Redis's latency (the entry arrives in the reply that waited for it);
its cost is one idle connection per followed slot on the node that serves it
(``engine.CLUSTER_CONNECTIONS`` per node at most). With a hash tag per stream
two streams rarely share one of the 16384 slots, so that is about one reader
and one connection per stream: fine for the thousands of streams of a desk
(Redis's default ``maxclients`` is 10,000), not for millions.

Each entry goes into the dispatcher as it is (``Dispatcher.publish_numbered``:
same ``seq``, same bytes on every edge), so fan-out, batching, slow-consumer
policies, late joiners and ``since`` recovery are the dispatcher's and the
broadcast server's as in role ``all``; a book's entries are decoded and applied
to the edge's copy of the book (late joiners' snapshots, conflation).

When Redis fails (``RedisUnavailable``) the clients stay connected; the mirror is
unhealthy and reconnects with backoff (``daemon.supervise.retry``), then reads
again from each stream's last seq: nothing is missed while Redis held it. If a
stream's entries were trimmed meanwhile (a hole), a book restarts from its
stored book (one ``book_snapshot``) and any other stream goes on after the hole
(its ``seq`` jumps: that is the announcement; nothing before the hole is
recovered across it). When the cluster's epoch changed (Redis lost its data),
or a stream's own epoch did, or the stream was made again (its metadata's
``born``: a Redis Cluster master came back empty while ``PREFIX:epoch`` lives
on another, so the cluster's epoch stayed), the streams start over and the clients of those
streams are closed with 1012 ("reconnect"): their numbers meant another history;
they come back with ``since`` and get ``recovered: false`` and fresh state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import orjson
import trio

from daemon.cluster.engine import Engine, Entry
from daemon.dispatch import Dispatcher
from daemon.errors import RedisUnavailable
from daemon.events import BookSnapshot, BookUpdate
from daemon.supervise import Backoff, Failure, retry

log = logging.getLogger(__name__)

#: Seconds between two looks at the registry (and the longest blocking read).
SCAN = 0.25
#: The close code of a client whose streams' history changed (RFC 6455: service restart).
EPOCH_CHANGED = 1012


@attrs.frozen
class StreamLag:
    """One followed stream: its last ``seq`` here and ``delay``, seconds between
    Redis getting its last entry and this edge delivering it."""

    stream: str
    seq: int
    delay: float


@attrs.frozen
class MirrorStatistics:
    """``connected``: reading Redis now; ``error``: the last failure;
    ``reconnects``: failures so far; ``streams``: followed; ``entries``: read;
    ``holes``: entries Redis no longer held when read; ``resets``: streams
    started over for a new epoch; ``epoch``: the cluster's; ``lags``: per
    stream; ``readers``: blocking XREADs at a time, one per slot followed (1 on
    one Redis)."""

    connected: bool
    error: str
    reconnects: int
    streams: int
    entries: int
    holes: int
    resets: int
    epoch: str
    lags: tuple[StreamLag, ...]
    readers: int = 0


def book_event(payload: bytes) -> BookSnapshot | BookUpdate:
    """The book event of an encoded ``book_snapshot`` / ``book_update`` (as the
    collector encoded it: docs/protocol.md). Raises ``ValueError`` / ``KeyError``
    on anything else."""
    obj = orjson.loads(payload)
    cls = BookSnapshot if obj["type"] == "book_snapshot" else BookUpdate
    if obj["type"] not in ("book_snapshot", "book_update"):
        raise ValueError(f"not a book event: {obj['type']!r}")
    return cls(exchange=obj["exchange"], symbol=obj["symbol"], ts=obj["ts"],
               recv_ts=obj["recv_ts"], bids=tuple(map(tuple, obj["bids"])),
               asks=tuple(map(tuple, obj["asks"])))


class Mirror:
    """Follows the cluster's streams into ``dispatcher`` (see the module docstring).

    ``close_clients(streams or None)``: closes with 1012 the clients of those
    streams (``None``: every client); ``on_epoch(epoch)``: the cluster's epoch,
    when first known and when it changes (the welcome's from then on)."""

    def __init__(self, engine: Engine, dispatcher: Dispatcher, batch: int, backoff: Backoff,
                 close_clients: Callable[[set[str] | None], None],
                 on_epoch: Callable[[str], None]) -> None:
        self.engine = engine
        self.dispatcher = dispatcher
        self.batch = batch
        self.backoff = backoff
        self.close_clients = close_clients
        self.on_epoch = on_epoch
        self.epoch: str | None = None
        #: last seq delivered, and epoch, per followed stream
        self.followed: dict[str, int] = {}
        self.epochs: dict[str, tuple[str, str]] = {}
        #: followed streams by slot (``Engine.slot``), and the slots being read
        self.slots: dict[int, set[str]] = {}
        self.reading: set[int] = set()
        self.delays: dict[str, float] = {}
        self.connected = False
        self.error = ""
        self.reconnects = 0
        self.entries = 0
        self.holes = 0
        self.resets = 0
        self.ready = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mirror until cancelled; ``started()`` at once (Redis may be down)."""
        task_status.started()
        await retry("cluster: reading redis", self._session, self.backoff,
                    retryable=(RedisUnavailable,), on_retry=self._failed, logger=log)

    def _failed(self, failure: Failure) -> None:
        self.connected = False
        self.error = failure.cause
        self.reconnects += 1

    async def _session(self) -> None:
        from daemon.app import new_epoch

        epoch = await self.engine.cluster_epoch(new_epoch())
        if self.epoch is not None and epoch != self.epoch:
            log.warning("cluster: the cluster's epoch changed (%s -> %s): Redis lost its data; "
                        "every stream starts over", self.epoch, epoch)
            for key in list(self.followed):
                self._forget(key)
            self.close_clients(None)
        if epoch != self.epoch:
            self.epoch = epoch
            self.on_epoch(epoch)
        changed: set[str] = set()
        for key in list(self.followed):
            meta = await self.engine.meta(key)
            if meta is None or (meta.epoch, meta.born) != self.epochs.get(key):
                changed.add(key)
                self._forget(key)
        if changed:
            log.warning("cluster: %d streams have a new epoch and start over", len(changed))
            self.close_clients(changed)
        if self.reconnects:
            log.info("cluster: reading redis again (epoch %s, %d streams)", epoch, len(self.followed))
        self.connected, self.error = True, ""
        self.backoff.reset()
        self.ready.set()
        # a reader or the scan that loses Redis records why and ends the session
        # (no exception group: ``retry`` sees the ``RedisUnavailable`` itself)
        failed: list[RedisUnavailable] = []
        try:
            async with trio.open_nursery() as nursery:
                try:
                    while True:
                        for key in sorted(await self.engine.streams() - self.followed.keys()):
                            await self._follow(key)
                        for slot in self.slots.keys() - self.reading:
                            self.reading.add(slot)
                            nursery.start_soon(self._read, slot, failed, nursery.cancel_scope)
                        await trio.sleep(SCAN)
                except RedisUnavailable as exc:
                    failed.append(exc)
                    nursery.cancel_scope.cancel()
        finally:
            self.reading.clear()
        raise failed[0]

    async def _read(self, slot: int, failed: list[RedisUnavailable],
                    session: trio.CancelScope) -> None:
        """Read the followed streams of ``slot`` with one blocking XREAD after
        another (module docstring) until cancelled; on ``RedisUnavailable``, add
        it to ``failed`` and cancel the ``session``."""
        try:
            while True:
                after = {key: self.followed[key] for key in self.slots.get(slot, ())}
                if not after:
                    await trio.sleep(SCAN)
                    continue
                got = await self.engine.read(after, SCAN, self.batch)
                resync = [key for key, entries in got.items() if not self._apply(key, entries)]
                for key in resync:
                    await self._restart_book(key)
                if got and self.dispatcher.fan_out is not None:
                    self.dispatcher.fan_out.flush(False)
        except RedisUnavailable as exc:
            failed.append(exc)
            session.cancel()

    def _forget(self, key: str) -> None:
        """Stop following ``key`` and empty its local stream (subscribers stay)."""
        self.followed.pop(key, None)
        self.epochs.pop(key, None)
        self.slots.get(self.engine.slot(key), set()).discard(key)
        stream = self.dispatcher.streams.get(key)
        if stream is not None:
            stream.seq = 0
            stream.history.clear()
            stream.own_book = stream.shared_books = None
            stream.book_event = stream.latest = None
            stream.snapshots.clear()
        self.resets += 1

    async def _follow(self, key: str) -> None:
        """Start following ``key``: load what a late joiner needs (module docstring)."""
        meta = await self.engine.meta(key)
        if meta is None:
            return  # registered before its first write: next scan
        channel = key.partition(":")[0]
        if channel == "book":
            stored = await self.engine.book(key)
            if stored is None:
                return
            seq, payload = stored
            self._deliver(key, Entry(seq, payload, 0.0, time.time()))
            self.followed[key] = seq
        else:
            policy = self.dispatcher.channels.get(channel)
            retention = self.dispatcher.retention.get(channel) or (
                policy.retention if policy is not None else None)
            size = retention.size if retention is not None else 1
            entries = await self.engine.last(key, max(1, size))
            self.followed[key] = entries[0].seq - 1 if entries else meta.seq
            self._apply(key, entries)
        self.epochs[key] = (meta.epoch, meta.born)
        self.slots.setdefault(self.engine.slot(key), set()).add(key)

    async def _restart_book(self, key: str) -> None:
        stored = await self.engine.book(key)
        if stored is None:
            return
        seq, payload = stored
        log.warning("cluster: %s: entries were trimmed before this edge read them; "
                    "restarting the book at seq %d", key, seq)
        self._deliver(key, Entry(seq, payload, 0.0, time.time()))
        self.followed[key] = seq

    def _apply(self, key: str, entries: list[Entry]) -> bool:
        """Deliver ``entries`` of ``key`` after its last seq; ``False`` when a book
        stream has a hole (it must restart from its stored book)."""
        book = key.startswith("book:")
        for entry in entries:
            last = self.followed.get(key, 0)
            if entry.seq <= last:
                continue
            if entry.seq != last + 1 and last:
                self.holes += 1
                if book:
                    return False
            self._deliver(key, entry)
            self.followed[key] = entry.seq
        return True

    def _deliver(self, key: str, entry: Entry) -> None:
        now = time.time()
        event: Any = None
        if key.startswith("book:"):
            event = book_event(entry.payload)
        recv_ts = entry.recv_ts or (event.recv_ts if event is not None else 0.0)
        self.dispatcher.publish_numbered(
            key, entry.seq, entry.payload, recv_ts,
            time.monotonic() - max(0.0, now - entry.wall), event)
        self.entries += 1
        self.delays[key] = max(0.0, now - entry.wall)

    def statistics(self) -> MirrorStatistics:
        """The connection, counters and each followed stream's lag."""
        lags = tuple(StreamLag(key, seq, round(self.delays.get(key, 0.0), 6))
                     for key, seq in sorted(self.followed.items()))
        return MirrorStatistics(self.connected, self.error, self.reconnects, len(self.followed),
                                self.entries, self.holes, self.resets, self.epoch or "", lags,
                                len(self.reading))
