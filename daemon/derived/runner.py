"""The task that runs one derived stream: its inputs from the dispatcher, its
outputs back into it.

Theory of operation
-------------------
1. A ``Computation`` is sans-IO (``whales``, ``bars``): ``take`` one input
   message, ``tick`` at the times ``due`` names, both returning events.
2. ``DerivedStream.run`` subscribes a ``DerivedInput`` at the dispatcher (the
   same ``Subscriber`` seam as a client). Its ``deliver`` never blocks: the
   dispatcher and every other subscriber go on whatever this stream does.
3. The input holds at most ``limit`` messages (``derived.input_queue``). Its
   slow-consumer policy is **resync**: when it is full it stops taking messages
   (each one not taken is counted in ``dropped``), and once the task has worked
   through what it holds it subscribes again with ``since`` (the last ``seq``
   it took of every lossless stream it reads, ``0`` for one it has not read
   yet): the dispatcher hands back exactly the missed messages it still retains
   (``recovered``); a stream whose missed messages are no longer retained is
   counted in ``lost`` and logged. State streams (tickers, books) just start
   again from their latest state. Nothing is lost silently.
4. Outputs go into the dispatcher through a ``Source`` (``Dispatcher.open_source``)
   with ``publish``: each batch in order, in one step (a source that makes the
   task wait, backpressure, fills its own input instead of the dispatcher's).
5. A computation that raises on a message or a tick: the error is counted in
   ``errors``, logged (its first and then once a minute), and the message is
   skipped; the task goes on. An error of the task itself ends ``run``: the app
   restarts it with backoff (``daemon.supervise``), and it subscribes again with
   ``since``. ``statistics()`` (a frozen object) is what health and status show
   (``daemon.health.DerivedHealth``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import orjson
import trio

from daemon.dispatch import Dispatcher, Message, Source, Stream, matches
from daemon.errors import describe
from daemon.events import Event

log = logging.getLogger(__name__)

#: Seconds between two log lines of a computation's repeating errors.
ERROR_LOG_EVERY = 60.0

#: One subscription of a computation: channels x patterns.
Inputs = tuple[tuple[str, ...], tuple[str, ...]]


class Computation(Protocol):
    """A derived stream's sans-IO logic. ``name``: for logs and status;
    ``inputs``: what it subscribes to; times are the daemon's clock (seconds)."""

    name: str

    @property
    def inputs(self) -> Sequence[Inputs]:
        """What it subscribes to: (channels, patterns) pairs."""
        ...

    def take(self, stream: Stream, payload: dict[str, Any], now: float) -> list[Event]:
        """The events one input message (its decoded wire object) gives."""
        ...

    def due(self) -> float:
        """When ``tick`` is next needed (``math.inf``: not before the next message)."""
        ...

    def tick(self, now: float) -> list[Event]:
        """The events due at ``now``."""
        ...

    def figures(self) -> dict[str, Any]:
        """The computation's own counters, for status."""
        ...


class DerivedInput:
    """A derived stream's input: the dispatcher's ``Subscriber``, a bounded queue
    whose overflow policy is resync (module docstring, rule 3)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: deque[Message] = deque()
        self.overflowed = False
        self.overflows = 0
        self.dropped = 0
        self._waiter: trio.Event | None = None

    def deliver(self, message: Message) -> None:
        """Queue ``message``; when full, stop taking messages until the task has
        caught up and resyncs (never blocks)."""
        if self.overflowed:
            self.dropped += 1
            return
        if len(self.items) >= self.limit:
            self.overflowed = True
            self.overflows += 1
            self.dropped += 1
        else:
            self.items.append(message)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    async def wait(self) -> None:
        """Return once a message is queued (or the input overflowed)."""
        if self.items or self.overflowed:
            await trio.lowlevel.checkpoint()
            return
        waiter = self._waiter = trio.Event()
        await waiter.wait()


@attrs.frozen
class DerivedStatistics:
    """One derived stream's figures: ``running``; ``received`` input messages
    taken, ``published`` events sent; its input's ``queued``, ``limit``,
    ``overflows``, ``dropped`` (not taken while overflowed: recovered or lost),
    ``recovered`` and ``lost`` streams at resyncs; ``errors`` (the computation
    raised), ``malformed`` (an input that is not a JSON object), ``last_error``;
    ``stalled``: the input is overflowed now (the stream is behind); ``busy``:
    CPU seconds spent decoding inputs and computing (not publishing);
    ``figures``: the computation's own."""

    name: str
    running: bool
    received: int
    published: int
    queued: int
    limit: int
    overflows: int
    dropped: int
    recovered: int
    lost: int
    errors: int
    malformed: int
    last_error: str
    stalled: bool
    figures: dict[str, Any]
    busy: float = 0.0


class DerivedStream:
    """Runs one ``Computation`` (see the module docstring). ``source``: where its
    events go (``Dispatcher.open_source()``); ``limit``: its input's bound;
    ``clock``: the daemon's clock (``trio.current_time``)."""

    def __init__(self, computation: Computation, dispatcher: Dispatcher, source: Source,
                 limit: int, clock: Callable[[], float] = trio.current_time) -> None:
        self.computation = computation
        self.name = computation.name
        self.dispatcher = dispatcher
        self.source = source
        self.limit = limit
        self.clock = clock
        self.input = DerivedInput(limit)
        #: per lossless input stream, the last ``seq`` taken (resync with ``since``)
        self.positions: dict[str, int] = {}
        self.running = False
        self.received = 0
        self.published = 0
        self.recovered = 0
        self.lost = 0
        self.errors = 0
        self.malformed = 0
        self.busy = 0.0
        self.last_error = ""
        self._error_logged_at = -math.inf
        self._errors_unlogged = 0
        self._overflows = 0
        self._dropped = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe, then take, compute and publish until cancelled."""
        dispatcher = self.dispatcher
        self.input = source = DerivedInput(self.limit)
        try:
            source.items.extend(self._subscribe(source))
            self.running = True
            task_status.started()
            computation = self.computation
            while True:
                if not source.items and not source.overflowed:
                    with trio.move_on_at(computation.due()):
                        await source.wait()
                started = time.thread_time()
                batch = list(source.items)
                source.items.clear()
                now = self.clock()
                outputs: list[Event] = []
                for message in batch:
                    self._take(message, now, outputs)
                if computation.due() <= now:
                    try:
                        outputs += computation.tick(now)
                    except Exception as exc:
                        self._error(exc, "tick")
                self.busy += time.thread_time() - started
                if outputs:
                    # in order, in this step (``Source.publish``): a bar is never
                    # overtaken by the next one
                    await self.source.publish(outputs)
                    self.published += len(outputs)
                if source.overflowed and not source.items:
                    source.items.extend(self._resync(source))
                await trio.lowlevel.checkpoint()
        finally:
            self.running = False
            self._overflows += source.overflows
            self._dropped += source.dropped
            dispatcher.remove(source)

    def _subscribe(self, source: DerivedInput) -> list[Message]:
        """Subscribe ``source`` to every input, with ``since`` for what this
        stream has read before (a restart) and ``0`` for lossless streams it has
        not read yet; count what could not be recovered."""
        since = dict(self.positions)
        if since:
            for stream in self.dispatcher.streams.values():
                if stream.policy.lossless and stream.key not in since and self._reads(stream):
                    since[stream.key] = 0
        initial: list[Message] = []
        recovered: dict[str, bool] = {}
        for channels, patterns in self.computation.inputs:
            messages, found = self.dispatcher.subscribe(source, channels, patterns, 0, since)
            initial += messages
            recovered.update({k: v for k, v in found.items() if k not in recovered or v})
        for key, ok in recovered.items():
            if ok:
                self.recovered += 1
            elif self.dispatcher.streams.get(key) is not None:
                self.lost += 1
                log.error("derived %s: %s: missed messages are no longer retained; "
                          "they are lost to this stream", self.name, key)
        return initial

    def _reads(self, stream: Stream) -> bool:
        return any(stream.channel in channels and
                   any(matches(p, stream.exchange, stream.symbol) for p in patterns)
                   for channels, patterns in self.computation.inputs)

    def _resync(self, source: DerivedInput) -> list[Message]:
        """The input overflowed and the task has caught up: subscribe again with
        ``since`` (module docstring, rule 3)."""
        log.warning("derived %s: input full (%d messages): resyncing with since",
                    self.name, self.limit)
        self.dispatcher.remove(source)
        source.overflowed = False
        return self._subscribe(source)

    def _take(self, message: Message, now: float, outputs: list[Event]) -> None:
        self.received += 1
        stream = message.stream
        if stream.policy.lossless:
            self.positions[stream.key] = message.seq
        try:
            payload = orjson.loads(message.payload)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            self.malformed += 1
            return
        try:
            outputs += self.computation.take(stream, payload, now)
        except Exception as exc:
            self._error(exc, stream.key)

    def _error(self, exc: Exception, where: str) -> None:
        """Count and log (rate-limited) a computation's error; the task goes on."""
        self.errors += 1
        self.last_error = f"{where}: {describe(exc)}"
        now = trio.current_time()
        if now - self._error_logged_at >= ERROR_LOG_EVERY:
            more = f" ({self._errors_unlogged} more since the last line)" \
                if self._errors_unlogged else ""
            log.error("derived %s: %s failed%s", self.name, where, more, exc_info=exc)
            self._error_logged_at, self._errors_unlogged = now, 0
        else:
            self._errors_unlogged += 1

    def statistics(self) -> DerivedStatistics:
        """The figures now."""
        source = self.input
        return DerivedStatistics(
            name=self.name, running=self.running, received=self.received,
            published=self.published, queued=len(source.items), limit=self.limit,
            overflows=self._overflows + source.overflows,
            dropped=self._dropped + source.dropped, recovered=self.recovered,
            lost=self.lost, errors=self.errors, malformed=self.malformed,
            last_error=self.last_error, stalled=source.overflowed,
            figures=self.computation.figures(), busy=round(self.busy, 6),
        )
