"""One client's queue and its slow-consumer and throttle policies, sans-IO.

The queue is the dispatcher's subscriber: ``ClientQueue.deliver`` takes every
message of a subscribed stream, never blocks, and tells its owner (the session)
what follows through ``QueueHooks``: ``ready`` (something to write), ``wake``
(a throttled stream is held until ``next_due``), ``conflated``, and
``slow_consumer`` (close the client with 4008). Time comes from the ``clock`` the
queue is given (seconds, any monotonic clock: ``trio.current_time`` in the
session, a plain function in tests), read only where a throttle needs it: nothing
here sleeps or touches a socket. (Hooks, not a returned verdict: this runs once
per client per message, and one Python call less per delivery is measurable in
``benchmarks/fanout.py``.)

When the queue holds ``limit`` messages the client is a **slow consumer**, and the
policy is its channel's (``daemon.channels``):

- conflating channels (``book``, ``ticker``): the stream's queued messages are
  taken out and one ``Marker`` takes their place; ``render`` turns the marker
  into the stream's state at that moment (the current ``book_snapshot``, the
  latest ``ticker``) marked ``"conflated": true``. Later messages of a marked
  stream are not queued: the marker already stands for them. Never a stale book.
- lossless channels (``trades``, ``system``): ``slow_consumer``; the queue takes
  nothing more, the session closes the client with 4008, and the client can
  resume with ``since``.

``throttle_ms`` on a subscription uses the same marker: at most one message per
conflating stream per interval; the first passes as it is, the rest wait as a
marker released by ``release_due`` once the interval is over (the latest state
wins). Control messages (ack, error, pong: bytes) are never conflated or dropped.

A throttle costs what its releases cost (a book's release is a whole
``book_snapshot``), so a client throttles at most ``max_throttled`` streams
(``server.max_throttled``, which ``requests.py`` checks when it subscribes); a
stream that appears later beyond that number is delivered unthrottled, and the
client is told once with an ``error`` (``too_many_throttled``). Each stream's
interval is found once per change of the throttles (``throttle_patterns``: three
lookups), not per message.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

import attrs

from daemon.broadcast.protocol import TOO_MANY_THROTTLED
from daemon.dispatch import Message, Stream
from daemon.wire import encode


@attrs.define(eq=False, slots=True)
class Marker:
    """Stands in a queue for a conflated or throttled stream's latest state."""

    stream: Stream


#: What a queue holds: a message, a marker for a stream's latest state, or the
#: encoded bytes of a control message.
Item = Message | Marker | bytes


class WriteStep(Protocol):
    """Whether the publish step being delivered is written at once (``now``: the
    coalescer, ``daemon.broadcast.coalesce``)."""

    @property
    def now(self) -> bool: ...


@attrs.frozen
class _Never:
    now: bool = False


#: The ``WriteStep`` of a queue whose messages are always queued.
NEVER_NOW: WriteStep = _Never()


def _not_sent(message: Message) -> bool:
    return False


@attrs.frozen
class QueueHooks:
    """What a ``ClientQueue`` tells its owner, each a call without arguments:
    ``ready`` (a message or marker was queued: write it), ``wake`` (a throttled
    stream is held: wake the writer to wait for ``next_due``), ``conflated`` (a
    backlog became its latest state), ``slow_consumer`` (a lossless message found
    the queue full: close the client); and ``send_now(message)``, in a step
    written at once with nothing queued: write ``message`` now if the connection
    is free (True), else False and it is queued."""

    ready: Callable[[], object]
    wake: Callable[[], object]
    conflated: Callable[[], object]
    slow_consumer: Callable[[], object]
    send_now: Callable[[Message], bool] = _not_sent


@attrs.frozen
class QueueStatistics:
    """A queue's figures: ``depth`` (items queued now), ``conflated`` (backlogs
    replaced by the latest state), ``throttled`` (messages held by a throttle)."""

    depth: int
    conflated: int
    throttled: int


def throttle_patterns(stream: Stream) -> tuple[tuple[str, str], ...]:
    """Every ``(channel, pattern)`` pair of a subscription that matches ``stream``:
    patterns are ``*``, ``EXCHANGE:*`` (``SOURCE:*``) or the exact symbol
    (``dispatch.SYMBOL_PATTERN``, ``KEY_PATTERN``), so there are three."""
    channel = stream.channel
    return ((channel, "*"), (channel, f"{stream.exchange}:*"),
            (channel, f"{stream.exchange}:{stream.symbol}"))


class ClientQueue:
    """The bounded queue of one client (see the module docstring).

    ``limit``: messages queued before the slow-consumer policy applies
    (``server.client_queue``); ``clock``: the time now, in seconds; ``hooks``:
    see ``QueueHooks``; ``max_throttled``: streams it throttles at most
    (``server.max_throttled``; ``RequestHandler`` sets it); ``step``: whether the
    step being delivered is written at once (the coalescer): then a message that
    finds the queue empty goes to ``hooks.send_now`` instead, and is queued only
    if that declines. ``items`` is read and emptied by the writer
    (``frames.build_frames`` with ``render``). ``closed``: the queue takes
    nothing more (a slow consumer, or ``close()``).
    """

    def __init__(self, limit: int, clock: Callable[[], float], hooks: QueueHooks,
                 max_throttled: float = math.inf, step: WriteStep = NEVER_NOW) -> None:
        self.limit = limit
        self.clock = clock
        self.hooks = hooks
        self.max_throttled = max_throttled
        self.step = step
        self._ready = hooks.ready
        self._send_now = hooks.send_now
        self.closed = False
        #: the client does not read: conflating streams keep only a marker
        self.holding = False
        self.items: deque[Item] = deque()
        self.marked: set[Stream] = set()
        self.throttles: dict[tuple[str, str], float] = {}  # (channel, pattern) -> seconds
        #: each stream's throttle interval (0: none), found once per change of throttles
        self.intervals: dict[Stream, float] = {}
        #: streams of ``intervals`` with a throttle (at most ``max_throttled``)
        self.throttled_streams = 0
        self.last_sent: dict[Stream, float] = {}
        self.due: dict[Stream, float] = {}
        self.conflated = 0
        self.throttled = 0

    def __len__(self) -> int:
        return len(self.items)

    def deliver(self, message: Message, initial: bool = False) -> None:
        """Queue ``message`` or apply the throttle or the slow-consumer policy.
        ``initial`` messages (history, recovery, snapshots: bounded by retention)
        are queued past the limit."""
        if self.closed:
            return
        stream = message.stream
        if stream in self.marked:
            return  # a marker in the queue already stands for the latest state
        if self.holding and stream.policy.conflates:
            self.conflated += 1
            self.marked.add(stream)
            self.items.append(Marker(stream))
            return
        if stream.policy.conflates and self.throttles:
            interval = self.intervals.get(stream)
            if interval is None:
                interval = self._interval(stream)
            if interval:
                now = self.clock()
                due = self.last_sent.get(stream, -math.inf) + interval
                if now < due:
                    self.throttled += 1
                    self.marked.add(stream)
                    self.due[stream] = due
                    self.hooks.wake()
                    return
                self.last_sent[stream] = now
        if len(self.items) >= self.limit and not initial:
            if not stream.policy.conflates:
                self.closed = True
                self.hooks.slow_consumer()
                return
            self.conflated += 1
            self.items = deque(
                item for item in self.items
                if not (isinstance(item, Message) and item.stream is stream)
            )
            self.marked.add(stream)
            self.items.append(Marker(stream))
            self.hooks.conflated()
            self._ready()
            return
        if not self.items and self.step.now and not self.holding and self._send_now(message):
            return
        self.items.append(message)
        self._ready()

    def hold(self) -> None:
        """The client does not read: replace the queued messages of every
        conflating stream by one marker per stream (its latest state when
        written), and until ``release`` conflate each new one the same way;
        control messages and lossless messages keep their place."""
        self.holding = True
        items: deque[Item] = deque()
        for item in self.items:
            if isinstance(item, Message) and item.stream.policy.conflates:
                stream = item.stream
                if stream not in self.marked:
                    self.marked.add(stream)
                    self.conflated += 1
                    items.append(Marker(stream))
            else:
                items.append(item)
        self.items = items

    def release(self) -> None:
        """The client reads again (see ``hold``)."""
        self.holding = False

    def close(self) -> None:
        """Take nothing more (control messages included)."""
        self.closed = True

    def control(self, data: bytes) -> None:
        """Queue an encoded control message (ack, error, pong), past the limit."""
        if not self.closed:
            self.items.append(data)

    def throttle(self, pairs: Iterable[tuple[str, str]], seconds: float) -> None:
        """At most one message per ``seconds`` for the streams of these
        ``(channel, symbol pattern)`` pairs."""
        for pair in pairs:
            self.throttles[pair] = seconds
        self._throttles_changed()

    def unthrottle(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Forget the throttles of these ``(channel, symbol pattern)`` pairs."""
        for pair in pairs:
            self.throttles.pop(pair, None)
        self._throttles_changed()

    @property
    def next_due(self) -> float:
        """When the next throttled stream is due (``math.inf`` when none is)."""
        return min(self.due.values(), default=math.inf)

    def release_due(self) -> bool:
        """Queue a marker for every throttled stream due now; True if any."""
        now = self.clock()
        released = False
        for stream, due in list(self.due.items()):
            if due <= now:
                del self.due[stream]
                self.items.append(Marker(stream))
                released = True
        return released

    def render(self, item: Item) -> bytes | None:
        """The JSON bytes ``item`` stands for as it leaves now: a message's
        payload, a control message, or for a marker the stream's state marked
        ``"conflated": true`` (None: the stream has no state yet)."""
        if isinstance(item, bytes):
            return item
        if isinstance(item, Message):
            return item.payload
        stream = item.stream
        self.marked.discard(stream)
        self.last_sent[stream] = self.clock()
        if stream.channel == "book":
            message = stream.snapshot_message(conflated=True)
            return message.payload if message is not None else None
        if stream.latest is None:
            return None
        return stream.latest.payload[:-1] + b',"conflated":true}'

    def statistics(self) -> QueueStatistics:
        """The queue's figures now."""
        return QueueStatistics(depth=len(self.items), conflated=self.conflated,
                               throttled=self.throttled)

    def _throttles_changed(self) -> None:
        self.intervals.clear()
        self.throttled_streams = 0

    def _interval(self, stream: Stream) -> float:
        """``stream``'s throttle interval (the longest that matches it), once per
        change of the throttles; beyond ``max_throttled`` streams none (and the
        client is told)."""
        throttles = self.throttles
        interval = max((throttles[pair] for pair in throttle_patterns(stream)
                        if pair in throttles), default=0.0)
        if interval:
            if self.throttled_streams >= self.max_throttled:
                interval = 0.0
                self.control(encode({
                    "type": "error", "id": None, "code": TOO_MANY_THROTTLED,
                    "message": f"{stream.key} is not throttled: a client throttles at most "
                               f"{self.max_throttled:g} streams (server.max_throttled)"}))
            else:
                self.throttled_streams += 1
        self.intervals[stream] = interval
        return interval
