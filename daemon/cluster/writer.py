"""A collector's writer: every event its dispatcher numbers goes to Redis.

The writer is a dispatcher subscriber of every stream but the node's own health
(``*:tickwire:*``: each node reports its own). Its ``deliver`` never blocks: it
queues a ``Write`` (the payload cut around its local ``seq``, which the script
replaces by the cluster's). Its policy is bounded and lossless: the dispatcher
awaits ``room()`` after each batch (``Dispatcher.gate``), so past ``queue``
events the dispatcher stops taking events and the collectors stop reading their
sockets (backpressure), as with a full dispatcher; nothing is dropped.

One task writes the queue in pipelined batches (``cluster.batch``). When Redis
fails (``RedisUnavailable``) the batch is written again after a backoff
(``daemon.supervise.retry``): the script drops what it already wrote (``wseq``
not above the one stored for this writer), so a retry neither loses nor repeats.

A book stream's current book is stored beside its stream (``:b``) with every
``book_snapshot`` and every ``retention.size // 2`` updates, so that the stream
always holds every update since the stored book: an edge starts a book from it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from functools import partial

import attrs
import trio

from daemon.cluster.engine import Engine, Write, split_payload
from daemon.dispatch import Message
from daemon.errors import RedisUnavailable
from daemon.supervise import Backoff, Failure, retry

log = logging.getLogger(__name__)

#: The exchange name of a node's own events (status, health changes): not written.
LOCAL = "tickwire"


@attrs.frozen
class WriterStatistics:
    """``written``: events Redis accepted; ``duplicates``: writes it had already
    done (retries); ``queued`` / ``peak``: events waiting now / at most;
    ``failures``: failed batches; ``connected``: the last batch went through;
    ``error``: the last failure; ``lag``: seconds the oldest queued event has
    waited."""

    written: int
    duplicates: int
    queued: int
    peak: int
    failures: int
    connected: bool
    error: str
    lag: float


@attrs.define
class _Pending:
    write: Write
    at: float


class Writer:
    """Writes a collector's events to Redis (see the module docstring).

    ``engine``: the cluster's; ``node``: this node's id (the writer of its
    writes); ``queue``: events held at most before the dispatcher waits;
    ``batch``: most events per pipelined write; ``backoff``: after a failure."""

    def __init__(self, engine: Engine, node: str, epoch: str, queue: int, batch: int,
                 backoff: Backoff) -> None:
        self.engine = engine
        self.node = node
        #: the cluster's epoch (given to new streams); read again after a failure
        self.epoch = epoch
        self.bound = queue
        self.batch = batch
        self.backoff = backoff
        self.queue: deque[_Pending] = deque()
        self._wake = trio.Event()
        self._room = trio.Event()
        self._registered: set[str] = set()
        self._unregistered: set[str] = set()
        self._updates: dict[str, int] = {}
        #: book streams whose next update carries the book (Redis may have lost it)
        self._resnap: set[str] = set()
        self.written = 0
        self.duplicates = 0
        self.peak = 0
        self.failures = 0
        self.connected = False
        self.error = ""
        self._reconnected = True

    # -- the dispatcher's side (synchronous) -------------------------------------------

    def deliver(self, message: Message) -> None:
        """Queue ``message`` for Redis; never blocks (``room`` bounds the queue)."""
        stream = message.stream
        if stream.exchange == LOCAL:
            return
        before, after = split_payload(message.payload, message.seq)
        retention = stream.retention.size if stream.retention is not None else 1
        snapshot = None
        if stream.channel == "book":
            if message.payload.startswith(b'{"type":"book_snapshot"'):
                snapshot = (before, after)
                self._updates[stream.key] = 0
            else:
                count = self._updates.get(stream.key, 0) + 1
                if count >= max(1, retention // 2) or stream.key in self._resnap:
                    book = stream.snapshot_message()
                    if book is not None:  # else (a shared book resyncs): at the next update
                        snapshot = split_payload(book.payload, message.seq)
                        self._resnap.discard(stream.key)
                        count = 0
                self._updates[stream.key] = count
        if stream.key not in self._registered:
            self._registered.add(stream.key)
            self._unregistered.add(stream.key)
        self.queue.append(_Pending(Write(
            stream=stream.key, before=before, after=after, maxlen=retention,
            recv_ts=message.recv_ts, wseq=message.seq, snapshot=snapshot,
        ), time.monotonic()))
        if len(self.queue) > self.peak:
            self.peak = len(self.queue)
        self._wake.set()

    async def room(self) -> None:
        """Return once fewer than ``queue`` events wait (the dispatcher's gate; any
        number of tasks may wait: the serving task and sources that publish)."""
        while len(self.queue) >= self.bound:
            await self._room.wait()

    # -- the writing task ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write the queue to Redis until cancelled."""
        task_status.started()
        while True:
            if not self.queue:
                self._wake = trio.Event()
                await self._wake.wait()
            batch = [self.queue[i].write for i in range(min(self.batch, len(self.queue)))]
            await retry("cluster: writing to redis", partial(self._write, batch), self.backoff,
                        retryable=(RedisUnavailable,), on_retry=self._failed, logger=log)
            for _ in batch:
                self.queue.popleft()
            if len(self.queue) < self.bound:
                self._room.set()  # every waiter wakes and looks again
                self._room = trio.Event()

    async def _write(self, batch: list[Write]) -> None:
        if self._reconnected:
            from daemon.app import new_epoch

            self.epoch = await self.engine.cluster_epoch(new_epoch())
            self._unregistered |= self._registered
            self._resnap |= {key for key in self._registered if key.startswith("book:")}
            self._reconnected = False
        if self._unregistered:
            # streams first seen while this awaits stay for the next batch
            names, self._unregistered = self._unregistered, set()
            try:
                await self.engine.register(names)
            except BaseException:
                self._unregistered |= names
                raise
        written = await self.engine.write(batch, self.node, self.epoch)
        self.connected, self.error = True, ""
        self.backoff.reset()
        for result in written:
            if result.outcome == "accepted":
                self.written += 1
            else:
                self.duplicates += 1

    def _failed(self, failure: Failure) -> None:
        self.failures += 1
        self.connected = False
        self.error = failure.cause
        self._reconnected = True

    def statistics(self) -> WriterStatistics:
        """Counters and the queue's state."""
        lag = time.monotonic() - self.queue[0].at if self.queue else 0.0
        return WriterStatistics(self.written, self.duplicates, len(self.queue), self.peak,
                                self.failures, self.connected, self.error, lag)
