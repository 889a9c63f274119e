"""The dispatcher: one task between every event source and every subscriber.

Theory of operation
-------------------
Sources (collectors today; other processes and derived streams later) send events
into one bounded ``trio`` memory channel from ``open_source()``. When it is full,
their ``send`` waits: backpressure reaches the collector, which stops reading its
socket. Nothing is dropped here.

For each event the dispatcher, in one synchronous step:

1. finds its stream (``channel:exchange:symbol``) and gives it the next ``seq``
   (from 1, contiguous);
2. encodes it once (``daemon.wire``) into the text every subscriber gets;
3. drops a trade whose id the stream already carried (two sources, one trade),
   counting it in ``duplicates``;
4. keeps what late joiners need: the current L2 book of a ``book`` stream, the
   latest ``ticker``, the last N ``trades`` and ``system`` events;
5. hands the text to every subscriber of the stream with ``deliver``, which never
   blocks: a subscriber that cannot keep up applies its own named policy.

``subscribe`` runs synchronously too, so a new subscriber's initial messages (book
snapshot, latest ticker, history) and the live events that follow them are
contiguous in ``seq``: no event can slip in between.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections import deque
from collections.abc import Iterable
from typing import Protocol

import attrs
import orjson
import trio

from daemon.book import BookError, L2Book
from daemon.events import BookSnapshot, BookUpdate, Event, Ticker, Trade
from daemon.wire import event_dict

log = logging.getLogger(__name__)

#: Trade ids remembered per stream to drop a trade that two sources both bring.
TRADE_IDS_KEPT = 10_000

#: ``exchange:SYMBOL`` with ``*`` allowed for either part, or ``*`` alone.
SYMBOL_PATTERN = re.compile(r"^(\*|[a-z0-9_.]+:(\*|[A-Z0-9.]+-[A-Z0-9.]+))$")


class Subscriber(Protocol):
    """What the dispatcher needs of a subscriber (a broadcast session)."""

    def deliver(self, stream: Stream, seq: int, text: str) -> None:
        """Take one encoded event without blocking (queue it or apply a policy)."""


@attrs.define(eq=False)
class Stream:
    """One ``channel:exchange:symbol`` stream and what it retains.

    ``seq``: the last sequence number given; ``history``: ``(seq, text)`` of the
    last events (trades, system); ``book``: the current L2 book (book streams);
    ``latest``: ``(seq, text)`` of the last event (tickers and books).
    """

    key: str
    channel: str
    exchange: str
    symbol: str
    seq: int = 0
    history: deque[tuple[int, str]] | None = None
    book: L2Book | None = None
    book_event: Event | None = None
    latest: tuple[int, str] | None = None
    subscribers: set[Subscriber] = attrs.field(factory=set)
    #: recent trade ids (trades streams): a trade id is delivered once, whichever
    #: source (native feed, REST recovery, polling fallback) brings it
    trade_ids: set[str] = attrs.field(factory=set)
    trade_order: deque[str] = attrs.field(factory=deque)

    def snapshot_text(self) -> str | None:
        """The current book as a ``book_snapshot`` at this stream's ``seq``."""
        if self.book is None or self.book_event is None:
            return None
        bids, asks = self.book.levels()
        ref = self.book_event
        event = BookSnapshot(
            exchange=ref.exchange, symbol=ref.symbol, ts=ref.ts, recv_ts=ref.recv_ts,
            bids=bids, asks=asks,
        )
        return orjson.dumps(event_dict(event, self.seq)).decode()


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
    """Whether ``exchange:symbol`` is matched by a subscription pattern."""
    if pattern == "*":
        return True
    return fnmatch.fnmatchcase(f"{exchange}:{symbol}", pattern)


class Dispatcher:
    """Numbers, encodes, retains and fans out events (see the module docstring).

    ``buffer``: bound of the input channel; ``history``: events retained per
    stream by channel (``{"trades": 1000, "system": 100}``).
    """

    def __init__(self, buffer: int, history: dict[str, int]) -> None:
        self._send, self._receive = trio.open_memory_channel[Event](buffer)
        self._buffer = buffer
        self.history_sizes = dict(history)
        self.streams: dict[str, Stream] = {}
        self.subscriptions: dict[Subscriber, set[tuple[str, str]]] = {}
        self.events = 0
        self.rejected = 0
        self.duplicates = 0

    def open_source(self) -> trio.MemorySendChannel[Event]:
        """A send channel for one source; close it (``async with``) when done."""
        return self._send.clone()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish every event from the sources until cancelled."""
        async with self._receive:
            task_status.started()
            async for event in self._receive:
                self.publish(event)

    # -- publishing ---------------------------------------------------------------------

    def _stream(self, channel: str, exchange: str, symbol: str) -> Stream:
        key = f"{channel}:{exchange}:{symbol}"
        stream = self.streams.get(key)
        if stream is None:
            size = self.history_sizes.get(channel)
            stream = Stream(
                key=key, channel=channel, exchange=exchange, symbol=symbol,
                history=deque(maxlen=size) if size else None,
            )
            self.streams[key] = stream
            for subscriber, pairs in self.subscriptions.items():
                if any(c == channel and matches(p, exchange, symbol) for c, p in pairs):
                    stream.subscribers.add(subscriber)
        return stream

    def publish(self, event: Event) -> None:
        """Number, encode, retain and deliver one event; never blocks.

        A trade whose id the stream carried among its last ``TRADE_IDS_KEPT`` is
        dropped and counted in ``duplicates``.

        A book update for a stream that has no book yet, or with levels that are not
        decimals, is a source's bug: it is counted in ``rejected``, logged, and not
        numbered, so clients never see a hole in ``seq``.
        """
        stream = self._stream(event.CHANNEL, event.exchange, event.symbol)
        if isinstance(event, Trade):
            if event.id in stream.trade_ids:
                self.duplicates += 1
                return
            stream.trade_ids.add(event.id)
            stream.trade_order.append(event.id)
            if len(stream.trade_order) > TRADE_IDS_KEPT:
                stream.trade_ids.discard(stream.trade_order.popleft())
        try:
            if isinstance(event, BookSnapshot):
                book = L2Book()
                book.load(event.bids, event.asks)
                stream.book = book
            elif isinstance(event, BookUpdate):
                if stream.book is None:
                    raise BookError("book_update before any book_snapshot")
                stream.book.apply(event.bids, event.asks)
        except BookError as exc:
            self.rejected += 1
            log.error("dispatch: rejected an event of %s: %s", stream.key, exc)
            return
        self.events += 1
        stream.seq += 1
        seq = stream.seq
        text = orjson.dumps(event_dict(event, seq)).decode()
        if isinstance(event, BookSnapshot | BookUpdate):
            stream.book_event = event
        elif isinstance(event, Ticker):
            stream.latest = (seq, text)
        if stream.history is not None:
            stream.history.append((seq, text))
        for subscriber in list(stream.subscribers):
            subscriber.deliver(stream, seq, text)

    # -- subscriptions ----------------------------------------------------------------

    def subscribe(
        self,
        subscriber: Subscriber,
        channels: Iterable[str],
        patterns: Iterable[str],
        history: int = 0,
    ) -> list[str]:
        """Add ``channels`` x ``patterns`` for ``subscriber``; return its initial
        messages, in order: per matching stream the current book snapshot, the latest
        ticker, or up to ``history`` retained trades / system events (newest last).
        Streams already subscribed are not sent again."""
        pairs = self.subscriptions.setdefault(subscriber, set())
        new_pairs = {(c, p) for c in channels for p in patterns} - pairs
        pairs |= new_pairs
        initial: list[str] = []
        for stream in self.streams.values():
            if subscriber in stream.subscribers:
                continue
            if not any(
                c == stream.channel and matches(p, stream.exchange, stream.symbol)
                for c, p in new_pairs
            ):
                continue
            stream.subscribers.add(subscriber)
            initial.extend(self.initial_messages(stream, history))
        return initial

    def initial_messages(self, stream: Stream, history: int) -> list[str]:
        """What a new subscriber of ``stream`` gets before live events."""
        if stream.channel == "book":
            text = stream.snapshot_text()
            return [text] if text is not None else []
        if stream.latest is not None:
            return [stream.latest[1]]
        if stream.history is not None and history > 0:
            retained = list(stream.history)[-history:]
            return [text for _, text in retained]
        return []

    def unsubscribe(
        self, subscriber: Subscriber, channels: Iterable[str], patterns: Iterable[str]
    ) -> None:
        """Remove ``channels`` x ``patterns``; streams no pair matches stop."""
        pairs = self.subscriptions.get(subscriber, set())
        pairs -= {(c, p) for c in channels for p in patterns}
        for stream in self.streams.values():
            if subscriber in stream.subscribers and not any(
                c == stream.channel and matches(p, stream.exchange, stream.symbol)
                for c, p in pairs
            ):
                stream.subscribers.discard(subscriber)

    def remove(self, subscriber: Subscriber) -> None:
        """Forget a subscriber entirely (it disconnected)."""
        self.subscriptions.pop(subscriber, None)
        for stream in self.streams.values():
            stream.subscribers.discard(subscriber)

    def statistics(self) -> DispatcherStatistics:
        """Counters and the input channel's fill."""
        stats = self._send.statistics()
        return DispatcherStatistics(
            events=self.events,
            rejected=self.rejected,
            duplicates=self.duplicates,
            streams=len(self.streams),
            subscribers=len(self.subscriptions),
            buffer_used=stats.current_buffer_used,
            buffer_size=self._buffer,
            tasks_waiting_send=stats.tasks_waiting_send,
        )
