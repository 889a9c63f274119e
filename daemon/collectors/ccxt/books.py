"""The books of the ``watch`` mode: ccxt.pro's order books as tickwire's events.

ccxt keeps floats only, so a level's price and size are written from the float as
the poll mode does (``level_text``: the shortest decimal of the float, the
exchange's trailing zeros lost). Updates go out as complete ``BookUpdate`` deltas
(changed levels, removed ones as size ``"0"``), never as a snapshot per update
(O(depth) on the wire to every client). The deltas come two ways:

- ccxt's standard order book (``exchange.order_book``, what most exchanges use)
  is built with sides that note every price ccxt stores or truncates
  (``tracked_order_book``: ``TrackedBids`` / ``TrackedAsks``, in the worker thread):
  a result hands over only those prices and their sizes now, O(changes x log
  depth), and the trio side applies them to its copy (``BookTracker.changes``).
  Measured at depth 1000: copying a side costs ~150 us and diffing two copies
  ~300 us, so a full copy and diff per update would cap a core near 1,000 book
  updates per second.
- any other book (ccxt's counted and indexed books), and the first result after a
  (re-)subscribe or a ``reset`` of the book by ccxt, is copied whole (``copy_side``,
  a dict per side) and diffed against the previous copy (``BookTracker.book``,
  ``side_delta``), O(depth).

``BookTracker`` is pure (no threads, no trio, no ccxt); the tracked sides import
ccxt on first use.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any

from daemon.collectors.ccxt.common import level_text
from daemon.events import BookSnapshot, BookUpdate, Event, FeedState, Levels
from daemon.exchanges.base import FeedCounters

#: One copied side of a book: ``{price: size}`` (ccxt's floats).
Side = dict[float, float]


def copy_side(side: Iterable[Sequence[float]]) -> Side:
    """A copy of one ccxt book side (``[[price, size, ...], ...]``): ``{price: size}``."""
    return {level[0]: level[1] for level in side}


def side_levels(side: Side, descending: bool) -> Levels:
    """All levels of a copied side, best first, as decimal strings."""
    return tuple(
        (level_text(price), level_text(size))
        for price, size in sorted(side.items(), reverse=descending)
    )


def side_delta(old: Side, new: Side, descending: bool) -> Levels:
    """The levels that turn ``old`` into ``new``: changed and new levels with their
    size, removed ones with size ``"0"``; best first."""
    changed = [(price, size) for price, size in new.items() if old.get(price) != size]
    changed += [(price, 0.0) for price in old if price not in new]
    if not changed:
        return ()
    changed.sort(reverse=descending)
    return tuple(
        (level_text(price), level_text(size) if size else "0") for price, size in changed
    )


class BookTracker:
    """The published book of one symbol, from the copies of ccxt's book.

    The first book after ``lost`` (and the very first) goes out as a
    ``BookSnapshot`` with a ``synced`` state; the next ones as complete
    ``BookUpdate`` deltas (none when nothing changed)."""

    def __init__(self, exchange: str, symbol: str, stats: FeedCounters) -> None:
        self.exchange = exchange
        self.symbol = symbol
        self.stats = stats
        self.synced = False
        self.bids: Side = {}
        self.asks: Side = {}

    def book(self, bids: Side, asks: Side, ts: float,
             recv_ts: float) -> list[Event]:
        """Events for a new copy of the book."""
        if not self.synced:
            self.synced = True
            self.bids, self.asks = bids, asks
            self.stats.snapshots += 1
            return [
                BookSnapshot(
                    exchange=self.exchange, symbol=self.symbol, ts=ts, recv_ts=recv_ts,
                    bids=side_levels(bids, True), asks=side_levels(asks, False),
                ),
                self._state("synced", f"{len(bids)} bids, {len(asks)} asks", recv_ts),
            ]
        bid_delta = side_delta(self.bids, bids, True)
        ask_delta = side_delta(self.asks, asks, False)
        self.bids, self.asks = bids, asks
        if not bid_delta and not ask_delta:
            return []
        self.stats.book_updates += 1
        return [BookUpdate(exchange=self.exchange, symbol=self.symbol, ts=ts, recv_ts=recv_ts,
                           bids=bid_delta, asks=ask_delta)]

    def changes(self, bids: Side, asks: Side, ts: float,
                recv_ts: float) -> list[Event]:
        """Events for the levels that changed since the last copy or changes
        (``{price: size}``, size 0 for a removed level): a ``BookUpdate`` of those
        that really differ from the book as published. Only while synced: the
        worker sends a whole copy first."""
        if not self.synced:
            raise ValueError(f"{self.symbol}: book changes before a whole book")
        delta = []
        for held, new, descending in ((self.bids, bids, True), (self.asks, asks, False)):
            side = []
            for price, size in new.items():
                if held.get(price, 0.0) == size:
                    continue
                if size:
                    held[price] = size
                else:
                    del held[price]
                side.append((price, size))
            side.sort(reverse=descending)
            delta.append(tuple((level_text(p), level_text(s) if s else "0") for p, s in side))
        if not delta[0] and not delta[1]:
            return []
        self.stats.book_updates += 1
        return [BookUpdate(exchange=self.exchange, symbol=self.symbol, ts=ts, recv_ts=recv_ts,
                           bids=delta[0], asks=delta[1])]

    def lost(self, gap: bool, detail: str, now: float) -> list[Event]:
        """The book broke (``gap``) or its watch stopped: the next copy is a snapshot.
        A ``resyncing`` state goes out once, when a synced book is lost."""
        if gap:
            self.stats.gaps += 1
            self.stats.resyncs += 1
        if not self.synced:
            return []
        self.synced = False
        return [self._state("resyncing", detail, now)]

    def _state(self, state: str, detail: str, now: float) -> FeedState:
        return FeedState(exchange=self.exchange, symbol=self.symbol, ts=now, recv_ts=now,
                         state=state, detail=detail)


def tracked_order_book(snapshot: dict[str, Any] | None = None, depth: int | None = None) -> Any:
    """ccxt's ``OrderBook`` with sides that note what changes (``exchange.order_book``
    replacement, in the worker thread)."""
    return _tracked_classes()[0](snapshot or {}, depth)


_TRACKED: tuple[type, type, type] | None = None


def tracked_sides() -> tuple[type, type]:
    """``(TrackedBids, TrackedAsks)``: a ccxt side that is one of them has
    ``changes()`` and ``whole`` (see ``_tracked_classes``)."""
    return _tracked_classes()[1:]


def _tracked_classes() -> tuple[type, type, type]:
    """``(TrackedOrderBook, TrackedBids, TrackedAsks)``, built on first use (ccxt is
    imported only then)."""
    global _TRACKED
    if _TRACKED is not None:
        return _TRACKED
    from ccxt.async_support.base.ws.order_book import OrderBook
    from ccxt.async_support.base.ws.order_book_side import Asks, Bids

    class _Tracking:
        """A ccxt book side that notes the prices it stores or truncates
        (``dirty``) and whether it was cleared (``whole``: ccxt reset the book)."""

        def _track(self) -> None:
            self.dirty: set[float] = set()
            self.whole = True

        def storeArray(self, delta: list[Any]) -> None:  # noqa: N802 - ccxt's name
            self.dirty.add(delta[0])
            super().storeArray(delta)  # type: ignore[misc]

        def limit(self) -> None:
            depth = self._depth  # type: ignore[attr-defined]
            for level in self[depth:]:  # type: ignore[index]
                self.dirty.add(level[0])
            super().limit()  # type: ignore[misc]

        def clear(self) -> None:
            self.whole = True
            self.dirty.clear()
            super().clear()  # type: ignore[misc]

        def changes(self) -> Side:
            """``{price: size now (0.0: gone)}`` of the prices noted since the last
            call; ``whole`` and ``dirty`` start over."""
            keys = self._index  # type: ignore[attr-defined]
            out: Side = {}
            for price in self.dirty:
                key = -price if self.side else price  # type: ignore[attr-defined]
                at = bisect_left(keys, key)
                found = at < len(keys) and keys[at] == key
                out[price] = self[at][1] if found else 0.0  # type: ignore[index]
            self.dirty = set()
            self.whole = False
            return out

    class TrackedBids(_Tracking, Bids):  # type: ignore[misc]
        def __init__(self, deltas: Any = (), depth: int | None = None) -> None:
            self._track()
            Bids.__init__(self, list(deltas), depth)

    class TrackedAsks(_Tracking, Asks):  # type: ignore[misc]
        def __init__(self, deltas: Any = (), depth: int | None = None) -> None:
            self._track()
            Asks.__init__(self, list(deltas), depth)

    class TrackedOrderBook(OrderBook):  # type: ignore[misc]
        def __init__(self, snapshot: dict[str, Any] | None = None, depth: int | None = None) -> None:
            snapshot = dict(snapshot or {})
            snapshot["bids"] = TrackedBids(snapshot.get("bids", []), depth)
            snapshot["asks"] = TrackedAsks(snapshot.get("asks", []), depth)
            super().__init__(snapshot, depth)

    _TRACKED = (TrackedOrderBook, TrackedBids, TrackedAsks)
    return _TRACKED
