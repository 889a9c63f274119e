"""The dispatcher: one task between every event source and every subscriber.

Theory of operation
-------------------
Sources (collectors, the health reporter, publishers: other processes through
``daemon.publish``; derived streams) get an inlet from ``open_source()``
(``Source``). They ``send`` events into one bounded queue (``daemon.inbox``),
which the dispatcher's task publishes; when it is full their ``send`` waits:
backpressure reaches the source, which stops reading its socket. Or they
``publish`` a batch in their own step (the native collectors, once per socket
read): what is queued goes first, so every source's events keep their order.
Nothing is dropped here.

For each event the dispatcher, in one synchronous step:

1. finds its stream (``channel:exchange:symbol``; a published message's
   ``channel:source:key``); a trade whose id the stream already carried (two
   sources, one trade) is dropped and counted in ``duplicates``; a published
   message whose idempotency key was seen within the window is not numbered
   again (its receipt gets the first one's ``seq``), nor one whose ``version`` is
   not above the key's current one (``stale``);
2. gives it the stream's next ``seq`` (from 1, contiguous) and encodes it once
   (``daemon.wire``) into the ``Message`` every subscriber gets;
3. keeps what late joiners and reconnecting clients need: the current L2 book of
   a ``book`` stream (the source's own when it shares it, ``Source.share_books``:
   a native collector's exact book, so no update is applied twice; else a book
   kept here from the events), the latest ``ticker``, and the last messages of every stream
   within its channel's retention (count and age) for ``since`` recovery;
4. hands the message to every subscriber of the stream with ``deliver``, which
   never blocks: a subscriber that cannot keep up applies its own named policy.

``subscribe`` runs synchronously too, so a new subscriber's initial messages (book
snapshot, latest ticker, history, recovered messages) and the live events that
follow them are contiguous in ``seq``: no event can slip in between.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Protocol, Self

import attrs
import orjson
import trio

from daemon.book import BookError, L2Book
from daemon.channels import DEFAULT, ChannelPolicy, policy_of, table
from daemon.channels import Retention as Retention  # re-exported: the dispatcher's API
from daemon.events import (
    KEYED_TYPES,
    BookSnapshot,
    BookUpdate,
    Event,
    Keyed,
    MarketEvent,
    Published,
    Trade,
)
from daemon.inbox import Inbox
from daemon.recent import Recent
from daemon.wire import encode_event

log = logging.getLogger(__name__)

#: Trade ids remembered per stream to drop a trade that two sources both bring.
TRADE_IDS_KEPT = 10_000

#: ``exchange:SYMBOL`` with ``*`` allowed for either part, or ``*`` alone.
SYMBOL_PATTERN = re.compile(r"^(\*|[a-z0-9_.]+:(\*|[A-Z0-9.]+-[A-Z0-9.]+))$")
#: A published channel's ``source:key`` with ``*`` allowed for either part, or ``*``.
KEY_PATTERN = re.compile(r"^(\*|[a-z0-9][a-z0-9_.-]*:(\*|[A-Za-z0-9][A-Za-z0-9_./-]*))$")
#: Idempotency keys remembered at most (the window bounds them by age too).
IDEMPOTENCY_KEYS_KEPT = 100_000
#: Derived events whose stream has more parts than ``exchange:symbol`` (``Keyed``).
_KEYED = frozenset(KEYED_TYPES)


class Source(Protocol):
    """What ``Dispatcher.open_source()`` hands a source, and all a source may do
    with it:

    - ``await publish(events)``: publish ``events`` in order, and tell the
      fan-out once. The dispatcher's inlet does it in the caller's step, without
      a schedule point: whatever other sources queued before is published first
      (order is kept), then ``events``. For a source that reads a socket: one
      call per read, so the events of one read reach clients in one write, and
      the next read waits until they are published (the native collectors,
      ``daemon.collectors.native``). Another implementation (an engine on the
      network) may wait: backpressure, as ``send``. ``drained=True``: the
      source has nothing more waiting to be read (its socket is empty): the
      fan-out may write at once rather than wait for more within its window
      (``daemon.broadcast.coalesce``);
    - ``send`` an event (waits while the dispatcher's input channel is full:
      backpressure; the dispatcher's task publishes it), ``send_nowait`` one
      (raises ``trio.WouldBlock`` when full);
    - close it when done (``async with``, ``close`` or ``aclose``; a closed source
      raises ``trio.ClosedResourceError``).

    A source that keeps exact L2 books (a native collector's protocol) says so
    once with ``share_books(books)``: ``books(symbol)`` is the book of that
    symbol as its published events leave it, or ``None`` while it resyncs. The
    book streams it ``publish``es then keep no book of their own: a late
    joiner's snapshot is read from it (``Stream.book``), and no update is
    applied twice. Events it ``send``s are applied to a book of the dispatcher's
    own, as every other source's (ccxt collectors, the polling fallback).

    Sources today: collectors, the polling fallback, the health reporter, the
    publisher (other processes' messages)."""

    async def publish(self, events: Iterable[Event], /, *, drained: bool = False) -> None: ...
    def share_books(self, books: BookLookup, /) -> None: ...
    async def send(self, value: Event, /) -> None: ...
    def send_nowait(self, value: Event, /) -> None: ...
    def close(self) -> None: ...
    async def aclose(self) -> None: ...
    async def __aenter__(self) -> Self: ...
    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_value: BaseException | None,
        traceback: TracebackType | None, /,
    ) -> None: ...


#: A source's books by symbol (``Source.share_books``).
BookLookup = Callable[[str], L2Book | None]


class Inlet:
    """The ``Source`` of ``Dispatcher.open_source()``: ``send`` and ``send_nowait``
    queue into the dispatcher's ``Inbox``, ``publish`` publishes at once (see
    ``Source``)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._inbox = dispatcher.inbox
        self.closed = False
        self.books: BookLookup | None = None

    async def send(self, value: Event, /) -> None:
        """Queue ``value``, waiting while the inbox is full. Raises
        ``trio.ClosedResourceError`` once this source is closed."""
        if self.closed:
            raise trio.ClosedResourceError("this source is closed")
        await self._inbox.put(value)

    def send_nowait(self, value: Event, /) -> None:
        """Queue ``value``; ``trio.WouldBlock`` when the inbox is full. Raises
        ``trio.ClosedResourceError`` once this source is closed."""
        if self.closed:
            raise trio.ClosedResourceError("this source is closed")
        self._inbox.put_nowait(value)

    async def publish(self, events: Iterable[Event], /, *, drained: bool = False) -> None:
        """Publish ``events`` now, without a schedule point (``Source.publish``);
        then, where the dispatcher has a ``gate`` (a cluster collector's writer to
        Redis), wait while it is full: the caller's next read waits with it.
        Raises ``trio.ClosedResourceError`` once this source is closed."""
        if self.closed:
            raise trio.ClosedResourceError("this source is closed")
        self._dispatcher.publish_now(events, self.books, drained)
        if self._dispatcher.gate is not None:
            await self._dispatcher.gate()

    def share_books(self, books: BookLookup, /) -> None:
        """``Source.share_books``."""
        self.books = books

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_value: BaseException | None,
        traceback: TracebackType | None, /,
    ) -> None:
        self.close()


@attrs.define(slots=True, eq=False)
class Message:
    """One encoded event of one stream, shared by every subscriber.

    ``payload``: the JSON bytes; ``recv_ts``: when tickwire received the source frame
    (epoch s, for latency); ``at``: when it was published (monotonic s, for
    retention); ``frame``: the WebSocket frame of the payload alone, built once by
    the first session that sends it alone, then reused by all.
    """

    stream: Stream
    seq: int
    payload: bytes
    recv_ts: float
    at: float
    frame: bytes | None = None


class FanOut(Protocol):
    """Who writes what the dispatcher delivered to its subscribers (the broadcast
    server's coalescer, ``daemon.broadcast.coalesce``), told around each publish
    step: ``begin`` before the step's last event is delivered, ``end`` once it
    is (always, even if the delivery raised)."""

    def begin(self, drained: bool) -> None:
        """The step's last event is next. ``drained``: the source has nothing
        more to read (``Source.publish``): the step may be written at once."""

    def end(self) -> None:
        """The step is delivered: write it now or later."""

    def flush(self, drained: bool = False) -> None:
        """``begin`` and ``end`` with nothing delivered between: after a batch
        published event by event (the dispatcher's task, a cluster edge)."""


class Subscriber(Protocol):
    """What the dispatcher needs of a subscriber (a broadcast session)."""

    def deliver(self, message: Message) -> None:
        """Take one message without blocking (queue it or apply a policy)."""


class SubscriptionWatcher(Protocol):
    """Follows who holds a channel's subscriptions (``Dispatcher.watchers``): told
    on subscribe, unsubscribe and remove, never on an event."""

    def held(self, channel: str, pattern: str) -> None:
        """One more subscriber holds ``channel`` x ``pattern``."""

    def released(self, channel: str, pattern: str) -> None:
        """One subscriber that held ``channel`` x ``pattern`` let it go."""


@attrs.define(eq=False)
class Stream:
    """One ``channel:exchange:symbol`` stream and what it retains.

    ``policy``: its channel's (``daemon.channels``); ``seq``: the last sequence
    number given; ``history``: the retained messages;
    ``book``: the current L2 book (book streams); ``latest``: the last message of
    any other stream (the latest ticker, status, published state).
    """

    key: str
    channel: str
    exchange: str
    symbol: str
    policy: ChannelPolicy = attrs.field(default=attrs.Factory(
        lambda self: policy_of(self.channel), takes_self=True))
    retention: Retention | None = None
    seq: int = 0
    history: deque[Message] = attrs.field(factory=deque)
    #: the book kept here (from a source that does not share its own), or ...
    own_book: L2Book | None = None
    #: ... the source's books (``Source.share_books``)
    shared_books: BookLookup | None = None
    book_event: MarketEvent | None = None
    latest: Message | None = None
    subscribers: set[Subscriber] = attrs.field(factory=set)
    trade_ids: Recent[None] = attrs.field(factory=lambda: Recent(TRADE_IDS_KEPT))
    #: the ``version`` of the latest published state (``latest`` channels)
    version: int | None = None
    #: encoded snapshots of the current book, by extra fields (``conflated``): every
    #: subscriber of a moment shares one; cleared whenever the book changes
    snapshots: dict[tuple[tuple[str, object], ...], Message] = attrs.field(factory=dict)
    #: the bar in progress of a ``bars`` stream (``"partial": true``, not numbered)
    partial: Message | None = None

    @property
    def book(self) -> L2Book | None:
        """The current L2 book (book streams): as the published events leave it,
        or ``None`` before the first snapshot and while a shared one resyncs.
        Read it; do not change it."""
        if self.shared_books is not None:
            return self.shared_books(self.symbol)
        return self.own_book

    def retain(self, message: Message) -> None:
        """Keep ``message`` within this channel's retention."""
        if self.retention is None:
            return
        history = self.history
        history.append(message)
        if len(history) > self.retention.size:
            history.popleft()
        oldest = message.at - self.retention.max_age
        while history and history[0].at < oldest:
            history.popleft()

    def snapshot_message(self, **extra: object) -> Message | None:
        """The current book as a ``book_snapshot`` at this stream's ``seq``, encoded
        once per book state (and ``extra``) for every subscriber that asks."""
        book = self.book
        if book is None or self.book_event is None:
            return None  # none yet, or a shared book resyncs: never a stale one
        key = tuple(sorted(extra.items()))
        cached = self.snapshots.get(key)
        if cached is not None:
            return cached
        bids, asks = book.levels()
        ref = self.book_event
        event = BookSnapshot(
            exchange=ref.exchange, symbol=ref.symbol, ts=ref.ts, recv_ts=ref.recv_ts,
            bids=bids, asks=asks,
        )
        payload = encode_event(event, self.seq, **extra)
        message = self.snapshots[key] = Message(
            self, self.seq, payload, ref.recv_ts, time.monotonic())
        return message

    def since(self, seq: int) -> list[Message] | None:
        """The retained messages after ``seq``, or ``None`` if some are no longer
        retained (or ``seq`` is ahead of the stream)."""
        if seq > self.seq:
            return None
        if seq == self.seq:
            return []
        if not self.history or self.history[0].seq > seq + 1:
            return None
        return [m for m in self.history if m.seq > seq]


@attrs.frozen
class DispatcherStatistics:
    """A frozen view for status reports: events in, streams, the input channel."""

    events: int
    rejected: int
    duplicates: int
    streams: int
    subscribers: int
    buffer_used: int
    buffer_size: int
    tasks_waiting_send: int


def matches(pattern: str, exchange: str, symbol: str) -> bool:
    """Whether ``exchange:symbol`` is matched by a subscription pattern. A derived
    stream's symbol has more parts (``BTC-USD:1m``): ``coinbase:BTC-USD`` matches
    each of them, ``coinbase:BTC-USD:1m`` one."""
    if pattern == "*":
        return True
    name = f"{exchange}:{symbol}"
    return fnmatch.fnmatchcase(name, pattern) or (
        ":" in symbol and fnmatch.fnmatchcase(name, f"{pattern}:*"))


class Dispatcher:
    """Numbers, encodes, retains and fans out events (see the module docstring).

    ``buffer``: bound of the input channel; ``retention``: per channel name (a
    channel it does not name keeps its policy's default, ``daemon.channels``);
    ``channels``: every channel's policy (``daemon.channels.table()``: the market
    data's and the published channels'); ``idempotency_window``: seconds a
    publish's idempotency key is remembered.
    """

    def __init__(self, buffer: int, retention: Mapping[str, Retention],
                 channels: Mapping[str, ChannelPolicy] | None = None,
                 idempotency_window: float = 300.0) -> None:
        #: what sources ``send``, in arrival order (``daemon.inbox``)
        self.inbox: Inbox[Event] = Inbox(buffer)
        self.retention = dict(retention)
        self.channels = channels if channels is not None else table()
        self.idempotency: Recent[int] = Recent(IDEMPOTENCY_KEYS_KEPT, idempotency_window)
        self.streams: dict[str, Stream] = {}
        self.subscriptions: dict[Subscriber, set[tuple[str, str]]] = {}
        self.events = 0
        self.rejected = 0
        self.duplicates = 0
        #: told around each publish step (the server writes then): ``FanOut``
        self.fan_out: FanOut | None = None
        #: awaited after each batch (a cluster collector's writer: ``daemon.cluster``):
        #: while it waits, no event is taken (backpressure to the sources)
        self.gate: Callable[[], Awaitable[None]] | None = None
        self._delivering = False
        self._removed: list[Subscriber] = []
        #: per channel, who follows its subscriptions (the views' demand:
        #: ``daemon.derived.views``); told by subscribe, unsubscribe and remove only
        self.watchers: dict[str, SubscriptionWatcher] = {}

    def open_source(self) -> Source:
        """The inlet of one source (``Source``); close it (``async with``) when
        done."""
        return Inlet(self)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish every event the sources ``send`` until cancelled, up to 256 per
        step, telling the fan-out once per step."""
        inbox = self.inbox
        task_status.started()
        while True:
            await inbox.wait()
            for event in inbox.take(256):
                self.publish(event)
            if self.fan_out is not None:
                self.fan_out.flush(False)
            if self.gate is not None:
                await self.gate()

    def publish_now(self, events: Iterable[Event], books: BookLookup | None = None,
                    drained: bool = False) -> None:
        """Publish what the input channel holds, then ``events`` (their source's
        ``books``, if it shares them), telling the fan-out (``FanOut``, with the
        source's ``drained``) before the last one and after it: one synchronous
        step (``Source.publish``)."""
        inbox = self.inbox
        if inbox.items:
            for queued in inbox.take(len(inbox)):
                self.publish(queued)
        fan_out = self.fan_out
        if fan_out is None:
            for event in events:
                self.publish(event, books)
            return
        last: Event | None = None
        for event in events:
            if last is not None:
                self.publish(last, books)
            last = event
        fan_out.begin(drained)
        try:
            if last is not None:
                self.publish(last, books)
        finally:
            fan_out.end()

    # -- publishing ---------------------------------------------------------------------

    def _stream(self, channel: str, exchange: str, symbol: str) -> Stream:
        key = f"{channel}:{exchange}:{symbol}"
        stream = self.streams.get(key)
        if stream is None:
            rules = self.channels.get(channel, DEFAULT)
            stream = Stream(
                key=key, channel=channel, exchange=exchange, symbol=symbol, policy=rules,
                retention=self.retention.get(channel, rules.retention),
            )
            self.streams[key] = stream
            for subscriber, pairs in self.subscriptions.items():
                if any(c == channel and matches(p, exchange, symbol) for c, p in pairs):
                    stream.subscribers.add(subscriber)
        return stream

    def publish(self, event: Event, books: BookLookup | None = None) -> None:
        """Number, encode, retain and deliver one event; never blocks.

        A trade whose id the stream carried among its last ``TRADE_IDS_KEPT`` is
        dropped and counted in ``duplicates``. A book update for a stream that has
        no book yet, or with levels that are not decimals, is a source's bug: it is
        counted in ``rejected``, logged, and not numbered, so clients never see a
        hole in ``seq``. ``books``: the source's own books, when it shares them
        (``Source.share_books``): a book event is then not applied here.
        """
        if isinstance(event, Published):
            self._publish_published(event)
            return
        if type(event) in _KEYED:
            self._publish_keyed(event)  # type: ignore[arg-type]
            return
        stream = self._stream(event.CHANNEL, event.exchange, event.symbol)
        if isinstance(event, Trade):
            if event.id in stream.trade_ids:
                self.duplicates += 1
                return
            stream.trade_ids.add(event.id, None, 0.0)
        if stream.snapshots and isinstance(event, BookSnapshot | BookUpdate):
            stream.snapshots.clear()
        try:
            if isinstance(event, BookSnapshot):
                if books is not None:
                    stream.shared_books, stream.own_book = books, None
                else:
                    book = L2Book()
                    book.load(event.bids, event.asks)
                    stream.shared_books, stream.own_book = None, book
            elif isinstance(event, BookUpdate):
                if books is not None and books is stream.shared_books:
                    pass  # the source's book, already changed
                elif stream.own_book is None:
                    raise BookError("book_update before any book_snapshot from its source")
                else:
                    stream.own_book.apply(event.bids, event.asks)
        except BookError as exc:
            self.rejected += 1
            log.error("dispatch: rejected an event of %s: %s", stream.key, exc)
            return
        self.events += 1
        stream.seq += 1
        message = Message(
            stream, stream.seq, encode_event(event, stream.seq), event.recv_ts,
            time.monotonic(),
        )
        if isinstance(event, BookSnapshot | BookUpdate):
            stream.book_event = event
        else:
            stream.latest = message
        stream.retain(message)
        self._deliver(stream, message)

    def publish_numbered(self, key: str, seq: int, payload: bytes, recv_ts: float, at: float,
                         book: BookSnapshot | BookUpdate | None = None) -> None:
        """Deliver an event numbered and encoded elsewhere (a cluster edge mirrors
        Redis: ``daemon.cluster.mirror``) as it is: stream ``key``
        (``channel:exchange:symbol``), ``seq``, ``payload``, ``recv_ts`` (epoch s),
        ``at`` (monotonic s, for retention). ``book``: a book stream's decoded
        event, applied to the stream's book (a bad one drops the book until the
        next snapshot: the source checked it already). A ``seq`` that does not
        follow the stream's last one starts its history again: nothing before the
        hole is recovered across it. Never blocks."""
        channel, exchange, symbol = key.split(":", 2)
        stream = self._stream(channel, exchange, symbol)
        if seq != stream.seq + 1:
            stream.history.clear()
        message = Message(stream, seq, payload, recv_ts, at)
        if book is not None:
            stream.snapshots.clear()
            try:
                if isinstance(book, BookSnapshot):
                    stream.own_book = L2Book()
                    stream.own_book.load(book.bids, book.asks)
                elif stream.own_book is not None:
                    stream.own_book.apply(book.bids, book.asks)
            except BookError as exc:
                stream.own_book = None
                log.error("dispatch: a numbered event of %s left no book: %s", key, exc)
            stream.book_event = book
        else:
            stream.latest = message
        self.events += 1
        stream.seq = seq
        stream.retain(message)
        self._deliver(stream, message)

    def _publish_published(self, event: Published) -> None:
        """A published message: check its idempotency key and version, number it,
        encode it once with its ``data`` unchanged, retain and deliver it, and
        settle its receipt (``accepted``, ``duplicate`` or ``stale``)."""
        now = time.monotonic()
        receipt = event.receipt
        idempotency = None
        if event.idempotency_key is not None:
            # scoped to the stream, as a cluster's Redis script scopes it
            idempotency = (event.channel, event.source, event.key, event.idempotency_key)
            first = self.idempotency.get(idempotency, now)
            if first is not None:
                self.duplicates += 1
                if receipt is not None:
                    receipt.settle("duplicate", first)
                return
        stream = self._stream(event.channel, event.source, event.key)
        if (event.version is not None and stream.version is not None
                and event.version <= stream.version):
            if receipt is not None:
                receipt.settle("stale", stream.seq, stream.version)
            return
        self.events += 1
        stream.seq += 1
        body: dict[str, object] = {
            "type": event.type, "channel": event.channel, "source": event.source,
            "key": event.key, "data": orjson.Fragment(event.data), "ts": event.ts,
            "recv_ts": event.recv_ts, "seq": stream.seq,
        }
        if event.version is not None:
            body["version"] = stream.version = event.version
        message = Message(stream, stream.seq, orjson.dumps(body), event.recv_ts, now)
        stream.latest = message
        stream.retain(message)
        if idempotency is not None:
            self.idempotency.add(idempotency, stream.seq, now)
        if receipt is not None:
            receipt.settle("accepted", stream.seq, event.version)
        self._deliver(stream, message)

    def _publish_keyed(self, event: Keyed) -> None:
        """A derived event of a stream ``channel:exchange:stream_symbol``
        (``daemon.derived``): numbered, retained and delivered like any other; a
        partial bar is not numbered (it carries the stream's current ``seq``) nor
        retained: it is the stream's ``partial``, which late joiners get after the
        history."""
        stream = self._stream(event.CHANNEL, event.exchange, event.stream_symbol)
        now = time.monotonic()
        if getattr(event, "partial", False):
            message = Message(stream, stream.seq, encode_event(event, stream.seq),
                              event.recv_ts, now)
            stream.partial = message
            self._deliver(stream, message)
            return
        self.events += 1
        stream.seq += 1
        message = Message(stream, stream.seq, encode_event(event, stream.seq), event.recv_ts, now)
        stream.latest = message
        if not getattr(event, "revision", 0):
            stream.partial = None  # a bar closed (a revision is of an older one)
        stream.retain(message)
        self._deliver(stream, message)

    def _deliver(self, stream: Stream, message: Message) -> None:
        """Hand ``message`` to every subscriber of ``stream``, iterating the set
        itself (no copy per event): a subscriber removed meanwhile (a slow consumer
        closed by its ``deliver``) leaves the sets once the loop is done."""
        self._delivering = True
        try:
            for subscriber in stream.subscribers:
                subscriber.deliver(message)
        finally:
            self._delivering = False
            if self._removed:
                removed, self._removed = self._removed, []
                for subscriber in removed:
                    self.remove(subscriber)

    # -- subscriptions ----------------------------------------------------------------

    def subscribe(
        self,
        subscriber: Subscriber,
        channels: Iterable[str],
        patterns: Iterable[str],
        history: int = 0,
        since: Mapping[str, int] | None = None,
    ) -> tuple[list[Message], dict[str, bool]]:
        """Add ``channels`` x ``patterns`` for ``subscriber``.

        Returns its initial messages, in order, and for each stream named in
        ``since`` (``{stream key: last seq seen}``) whether it was recovered. Per
        newly matched stream: with ``since`` and every missed message retained,
        exactly the missed messages; otherwise the current book snapshot, the
        latest ticker, or up to ``history`` retained trades / system events.
        """
        since = since or {}
        pairs = self.subscriptions.setdefault(subscriber, set())
        new_pairs = {(c, p) for c in channels for p in patterns} - pairs
        pairs |= new_pairs
        initial: list[Message] = []
        recovered = {key: False for key in since}
        for stream in self.streams.values():
            if subscriber in stream.subscribers:
                continue
            if not any(
                c == stream.channel and matches(p, stream.exchange, stream.symbol)
                for c, p in new_pairs
            ):
                continue
            stream.subscribers.add(subscriber)
            if stream.key in since:
                missed = stream.since(since[stream.key])
                if missed is not None:
                    recovered[stream.key] = True
                    initial.extend(missed)
                    continue
            initial.extend(self.initial_messages(stream, history))
        if self.watchers:
            self._tell(new_pairs, held=True)
        return initial, recovered

    def initial_messages(self, stream: Stream, history: int) -> list[Message]:
        """What a new subscriber of ``stream`` gets before live events: its
        channel policy's ``late_joiner`` (``daemon.channels``)."""
        late_joiner = stream.policy.late_joiner
        if late_joiner == "snapshot":
            message = stream.snapshot_message()
            return [message] if message is not None else []
        if late_joiner == "history":
            messages = list(stream.history)[-history:] if history > 0 else []
            if stream.partial is not None:
                messages.append(stream.partial)
            return messages
        return [stream.latest] if stream.latest is not None else []

    def unsubscribe(
        self, subscriber: Subscriber, channels: Iterable[str], patterns: Iterable[str]
    ) -> None:
        """Remove ``channels`` x ``patterns``; streams no pair matches stop."""
        pairs = self.subscriptions.get(subscriber, set())
        gone = pairs & {(c, p) for c in channels for p in patterns}
        pairs -= gone
        for stream in self.streams.values():
            if subscriber in stream.subscribers and not any(
                c == stream.channel and matches(p, stream.exchange, stream.symbol)
                for c, p in pairs
            ):
                stream.subscribers.discard(subscriber)
        if self.watchers:
            self._tell(gone, held=False)

    def remove(self, subscriber: Subscriber) -> None:
        """Forget a subscriber entirely (it disconnected); during a delivery, once
        it is done."""
        if self._delivering:
            self._removed.append(subscriber)
            return
        pairs = self.subscriptions.pop(subscriber, None)
        if pairs is None:
            return
        for stream in self.streams.values():
            stream.subscribers.discard(subscriber)
        if self.watchers:
            self._tell(pairs, held=False)

    def _tell(self, pairs: Iterable[tuple[str, str]], held: bool) -> None:
        """Tell ``watchers`` of the ``pairs`` a subscriber took (``held``) or let go."""
        for channel, pattern in pairs:
            watcher = self.watchers.get(channel)
            if watcher is not None:
                if held:
                    watcher.held(channel, pattern)
                else:
                    watcher.released(channel, pattern)

    def statistics(self) -> DispatcherStatistics:
        """Counters and the input channel's fill."""
        stats = self.inbox.statistics()
        return DispatcherStatistics(
            events=self.events,
            rejected=self.rejected,
            duplicates=self.duplicates,
            streams=len(self.streams),
            subscribers=len(self.subscriptions),
            buffer_used=stats.queued,
            buffer_size=stats.size,
            tasks_waiting_send=stats.tasks_waiting_put,
        )
