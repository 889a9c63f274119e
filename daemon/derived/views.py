"""Top-of-book views: the top N levels of a book (``book`` subscriptions with
``"depth": N``) and the best bid and offer (``quote``), built once per book, depth
and interval for every client that asks the same.

Theory of operation
-------------------
1. A client's ``book`` subscription with ``depth`` N and ``throttle_ms`` T is, at
   the dispatcher, a subscription to the ``views`` channel with the pattern
   ``PATTERN:N:T`` (``view_pattern``); a ``quote`` subscription is one to
   ``quote`` with ``PATTERN:T``. Streams ``views:EXCHANGE:SYMBOL:N:T`` and
   ``quote:EXCHANGE:SYMBOL:T`` are ordinary dispatcher streams (``seq``, latest
   state for late joiners, conflation for slow clients), so the messages are
   encoded once and shared by every client of the same view.
2. The demand (kind, depth, interval, pattern) follows the dispatcher's
   subscriptions to ``views`` and ``quote`` (rule 4); ``Views.want`` names it
   ahead (the request handler, before it subscribes). ``Views`` subscribes itself
   (a ``Subscriber``) to the ``book`` streams the demand matches. Its
   ``deliver`` marks each view of that book dirty: a dict lookup, the only work
   the dispatcher does for a view.
3. The task (``run``) builds each dirty view at most once per interval: the top
   N levels through ``book_top`` (the one place that reads the dispatcher's
   book); when they differ from the view's last, it publishes a ``BookView`` (or
   ``Quote``) through its dispatcher source. So a client gets a view only when
   its top N levels changed, at most once per ``throttle_ms``, and 100 clients
   of one view cost one build per change (``builds`` in ``statistics()``).
4. Demand is event-driven: ``Views`` is the dispatcher's ``SubscriptionWatcher``
   of ``views`` and ``quote`` (``Dispatcher.watchers``), told when a subscriber
   takes a view pattern (subscribe) or lets it go (unsubscribe, or remove: a
   disconnect). It counts each pattern's holders; the first one makes the demand
   (a view that was stopped starts again: its stream forgets the latest state it
   had, a book it did not follow since, so the client that starts it gets the top
   levels as they are then), and when the last one lets go the demand is dropped
   at once, with the views only it needed and the ``book`` subscriptions only
   they needed. This costs ``O(pairs)`` per subscribe, unsubscribe or disconnect, and
   ``O(views x demand)`` when demand is dropped; nothing per event, and nothing
   for ``book`` streams no view is of. ``prune`` drops demand named by ``want``
   that nobody took up.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import attrs
import trio

from daemon.derived.runner import DerivedStatistics
from daemon.dispatch import Dispatcher, Message, Source, Stream, matches
from daemon.events import BookView, Event, Levels, Quote

log = logging.getLogger(__name__)

#: One demand: (kind ``book`` or ``quote``, depth, interval in ms, pattern).
Demand = tuple[str, int, int, str]


@attrs.frozen
class BookTop:
    """The top levels of a book and the time of its last change (exchange ``ts``,
    ``recv_ts``: epoch s)."""

    bids: Levels
    asks: Levels
    ts: float
    recv_ts: float


def book_top(stream: Stream, depth: int) -> BookTop | None:
    """The top ``depth`` levels of ``stream``'s book (``L2Book.top``), or None when
    it has none: the one place views read the dispatcher's book."""
    book, event = stream.book, stream.book_event
    if book is None or event is None:
        return None
    bids, asks = book.top(depth)
    return BookTop(tuple(bids), tuple(asks), event.ts, event.recv_ts)


def view_pattern(kind: str, pattern: str, depth: int, interval_ms: int) -> str:
    """The dispatcher pattern of a client's view subscription (module docstring,
    rule 1): ``coinbase:*`` at depth 10 and 100 ms is ``coinbase:*:10:100``."""
    if kind == "quote":
        return f"{pattern}:{interval_ms}"
    return f"{pattern}:{depth}:{interval_ms}"


@attrs.define(eq=False)
class View:
    """One view of one book: its last levels published and when it may publish
    next (trio time)."""

    book: Stream
    kind: str
    depth: int
    interval_ms: int
    last: tuple[Levels, Levels] | None = None
    due: float = -math.inf


class Views:
    """Every view (module docstring). ``source``: from ``Dispatcher.open_source()``."""

    name = "views"

    def __init__(self, dispatcher: Dispatcher, source: Source,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.dispatcher = dispatcher
        self.source = source
        self.clock = clock
        self.demand: set[Demand] = set()
        #: subscribers holding each (channel, pattern) of ``views`` and ``quote``
        self.holders: dict[tuple[str, str], int] = {}
        self.views: dict[tuple[Stream, str, int, int], View] = {}
        #: each book's views (an empty list: a book no demand matches)
        self.by_book: dict[Stream, list[View]] = {}
        self.dirty: set[View] = set()
        self._wake = trio.Event()
        self.running = False
        self.received = 0
        self.builds = 0
        self.unchanged = 0
        self.published = 0
        self.busy = 0.0
        for channel in ("views", "quote"):
            dispatcher.watchers[channel] = self

    # -- demand (called by the request handler, synchronously) -------------------------

    def want(self, kind: str, depth: int, interval_ms: int, patterns: tuple[str, ...]) -> None:
        """Serve views of ``kind`` (``book``, ``quote``: depth 1) at ``depth`` and
        ``interval_ms`` for the book streams matching ``patterns``; the ones that
        exist are built at the task's next turn."""
        new = {(kind, depth, interval_ms, p) for p in patterns} - self.demand
        if new:
            self._add(new)

    def held(self, channel: str, pattern: str) -> None:
        """A subscriber took ``channel`` (``views``, ``quote``) x ``pattern``
        (``view_pattern``'s): its first holder makes the demand (module docstring,
        rule 4)."""
        count = self.holders.get((channel, pattern), 0)
        self.holders[(channel, pattern)] = count + 1
        demand = _demand(channel, pattern)
        if count == 0 and demand is not None and demand not in self.demand:
            self._add({demand})

    def released(self, channel: str, pattern: str) -> None:
        """A subscriber let ``channel`` x ``pattern`` go (unsubscribed,
        disconnected): when it was the last, the demand goes (rule 4)."""
        count = self.holders.get((channel, pattern), 0) - 1
        if count > 0:
            self.holders[(channel, pattern)] = count
            return
        self.holders.pop((channel, pattern), None)
        demand = _demand(channel, pattern)
        if demand is not None and demand in self.demand:
            self._drop({demand})

    def _add(self, new: set[Demand]) -> None:
        self.demand |= new
        self.dispatcher.subscribe(self, ["book"], [p for _, _, _, p in new])
        for book in [s for s in self.dispatcher.streams.values() if s.channel == "book"]:
            self._views_of(book)
        self._wake.set()

    def prune(self) -> None:
        """Drop demand no subscriber holds: named by ``want`` and never subscribed
        to (the rest goes as subscribers let go: module docstring, rule 4);
        ``O(demand)``."""
        gone = {d for d in self.demand
                if (_channel(d[0]), view_pattern(d[0], d[3], d[1], d[2])) not in self.holders}
        if gone:
            self._drop(gone)

    def _drop(self, gone: set[Demand]) -> None:
        """Drop ``gone``, the views only it needed and the book subscriptions only
        they needed."""
        self.demand -= gone
        patterns = {d[3] for d in gone} - {d[3] for d in self.demand}
        if patterns:
            self.dispatcher.unsubscribe(self, ["book"], patterns)
        self.by_book.clear()
        shapes = {(kind, depth, interval) for kind, depth, interval, _ in gone}
        for key, view in list(self.views.items()):
            if (view.kind, view.depth, view.interval_ms) in shapes and not self._wanted(view):
                del self.views[key]
                self.dirty.discard(view)

    def _wanted(self, view: View) -> bool:
        book = view.book
        return any(kind == view.kind and depth == view.depth and interval == view.interval_ms
                   and matches(pattern, book.exchange, book.symbol)
                   for kind, depth, interval, pattern in self.demand)

    def _views_of(self, book: Stream) -> list[View]:
        """``book``'s views as the demand makes them (new ones dirty)."""
        views = []
        for kind, depth, interval, pattern in self.demand:
            if matches(pattern, book.exchange, book.symbol):
                key = (book, kind, depth, interval)
                view = self.views.get(key)
                if view is None:
                    view = self.views[key] = View(book, kind, depth, interval)
                    self.dirty.add(view)
                    stream = self.dispatcher.streams.get(_stream_key(view))
                    if stream is not None:  # it stopped before: a book it did not follow
                        stream.latest = None  # since, never sent to a client that starts it
                if view not in views:
                    views.append(view)
        self.by_book[book] = views
        return views

    # -- the dispatcher's subscriber -----------------------------------------------------

    def deliver(self, message: Message) -> None:
        """A book changed: its views are dirty (never blocks)."""
        self.received += 1
        book = message.stream
        views = self.by_book.get(book)
        if views is None:
            views = self._views_of(book)
        if views:
            self.dirty.update(views)
            self._wake.set()

    # -- the task ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Build and publish dirty views at most once per interval, until
        cancelled."""
        if self.demand:  # a restart: subscribe again to the books the demand names
            self.dispatcher.subscribe(self, ["book"], sorted({d[3] for d in self.demand}))
            self.by_book.clear()
            self.dirty.update(self.views.values())
        self.running = True
        task_status.started()
        try:
            while True:
                now = self.clock()
                due = min((v.due for v in self.dirty), default=math.inf)
                if due > now:
                    self._wake = trio.Event()
                    with trio.move_on_at(due):
                        await self._wake.wait()
                    continue
                started = time.thread_time()
                events = self.build(now)
                self.busy += time.thread_time() - started
                if events:
                    await self.source.publish(events)  # in order, in this step
                    self.published += len(events)
        finally:
            self.running = False
            self.dispatcher.remove(self)

    def build(self, now: float) -> list[Event]:
        """The views due at ``now`` whose top levels changed (sans-IO)."""
        events: list[Event] = []
        for view in [v for v in self.dirty if v.due <= now]:
            self.dirty.discard(view)
            top = book_top(view.book, view.depth)
            self.builds += 1
            if top is None:
                continue
            levels = (top.bids, top.asks)
            if levels == view.last:
                self.unchanged += 1
                continue
            view.last = levels
            view.due = now + view.interval_ms / 1000
            events.append(_event(view, top))
        return events

    def statistics(self) -> DerivedStatistics:
        """The figures for health and status: book messages ``received``, views
        ``published``; ``figures``: views, demand, ``builds`` (top levels read),
        ``unchanged`` (builds whose top levels had not changed)."""
        return DerivedStatistics(
            name=self.name, running=self.running, received=self.received,
            published=self.published, queued=len(self.dirty), limit=0, overflows=0,
            dropped=0, recovered=0, lost=0, errors=0, malformed=0, last_error="",
            stalled=False, figures={"views": len(self.views), "demand": len(self.demand),
                                    "builds": self.builds, "unchanged": self.unchanged},
            busy=round(self.busy, 6))


def _channel(kind: str) -> str:
    return "quote" if kind == "quote" else "views"


def _demand(channel: str, pattern: str) -> Demand | None:
    """The demand of a ``view_pattern`` on ``channel`` (None: not one)."""
    parts = pattern.rsplit(":", 1 if channel == "quote" else 2)
    try:
        if channel == "quote" and len(parts) == 2:
            return ("quote", 1, int(parts[1]), parts[0])
        if channel == "views" and len(parts) == 3:
            return ("book", int(parts[1]), int(parts[2]), parts[0])
    except ValueError:
        pass
    return None


def _stream_key(view: View) -> str:
    """The dispatcher's key of ``view``'s stream (module docstring, rule 1)."""
    book = view.book
    tail = view_pattern(view.kind, "", view.depth, view.interval_ms)
    return f"{_channel(view.kind)}:{book.exchange}:{book.symbol}{tail}"


def _event(view: View, top: BookTop) -> Event:
    book = view.book
    if view.kind == "quote":
        bid = top.bids[0] if top.bids else ("", "")
        ask = top.asks[0] if top.asks else ("", "")
        return Quote(exchange=book.exchange, symbol=book.symbol, ts=top.ts,
                     recv_ts=top.recv_ts, bid=bid[0], bid_size=bid[1], ask=ask[0],
                     ask_size=ask[1], interval_ms=view.interval_ms)
    return BookView(exchange=book.exchange, symbol=book.symbol, ts=top.ts,
                    recv_ts=top.recv_ts, bids=top.bids, asks=top.asks, depth=view.depth,
                    interval_ms=view.interval_ms)

