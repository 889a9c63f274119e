"""What every exchange protocol hands back to its collector, and its counters.

Theory of operation
-------------------
An exchange protocol object (``BinanceFeed``, ``CoinbaseFeed``, ``KrakenFeed``)
holds the state of one WebSocket connection's worth of subscriptions. The
collector task (I/O) drives it:

1. ``feed.url(ws_base)`` is the URL to connect to;
2. after connecting, ``feed.on_open(now)`` resets every book to "not synced" and
   returns the frames to send (subscriptions): after a reconnect, every
   subscription is restored and every book resynced;
3. each text frame goes to ``feed.on_message(text, recv_ts)``;
4. Binance-style books ask for a REST snapshot with ``FetchSnapshot``; the collector
   GETs it and hands the body to ``feed.on_snapshot(symbol, body, recv_ts)``;
5. after a reconnect, or a jump in trade ids, ``FetchTrades`` asks for the REST
   trade history; its body goes to ``feed.on_trades(symbol, body, recv_ts)``.
   Live trades of that symbol wait until the recovered ones are out, and every
   trade id goes out once; what the history cannot cover is a ``Gap`` event.

Each call returns a list of ``FeedOutput``, in order: events for the dispatcher
(``FeedEvent``), frames to ``Send``, snapshots and trade pages to fetch
(``FetchSnapshot``, ``FetchTrades``), and ``Malformed`` notes for the log.
``ExchangeFeed`` is the typed contract; ``statistics()`` returns the feed's
counters as a frozen ``FeedStatistics``. The rules:

- A call never raises on bad exchange input. A frame that cannot be parsed is
  counted in ``stats.malformed`` and reported as ``Malformed``; where it belonged
  to a book, that book is resynced.
- A book is only published whole: while it resyncs, no ``BookUpdate`` of it goes
  out, and the new state goes out as one ``BookSnapshot``; clients keep the last
  good book until then.
- A ``BookUpdate`` is a complete delta: levels the exchange drops implicitly (a
  depth limit) are sent as explicit size-``"0"`` removals, so any consumer that
  applies the updates holds the same book.
- ``FeedState`` events announce every book state change (``resyncing``, ``synced``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar, cast

import attrs

from daemon.book import L2Book
from daemon.events import BookSnapshot, BookUpdate, FeedState, Gap, Levels, Ticker, Trade

#: The events an exchange protocol produces (a subset of ``daemon.events.Event``).
FeedEvent = Trade | BookSnapshot | BookUpdate | Ticker | FeedState | Gap


@attrs.frozen
class Send:
    """A text frame to send on the exchange connection (subscribe, resubscribe)."""

    text: str


@attrs.frozen
class FetchSnapshot:
    """GET ``target`` (path and query) on the exchange's REST base URL and hand the
    body to ``on_snapshot(symbol, body, recv_ts)``."""

    symbol: str
    target: str


@attrs.frozen
class FetchTrades:
    """GET ``target`` (the exchange's REST trade history) and hand the body to
    ``on_trades(symbol, body, recv_ts)``: trades missed while disconnected, or
    behind a gap in trade ids, are recovered and delivered before the live ones."""

    symbol: str
    target: str


@attrs.frozen
class Malformed:
    """A frame the protocol could not use: why, and the frame (cut to 200 chars)."""

    reason: str
    text: str


#: One output of an exchange protocol call: an event for the dispatcher, or an
#: action for the collector (``Send``, ``FetchSnapshot``, ``FetchTrades``), or a
#: note for the log (``Malformed``). Collectors dispatch on the class.
FeedOutput = FeedEvent | Send | FetchSnapshot | FetchTrades | Malformed
#: What every call of ``ExchangeFeed`` returns, in the order the collector acts on it.
Outputs = list[FeedOutput]


@attrs.frozen(kw_only=True)
class FeedStatistics:
    """A feed's counters at one moment (``ExchangeFeed.statistics()``), frozen.

    Every field counts up from 0 over the feed's life (Prometheus counters):
    ``messages``: frames received; ``malformed``: frames skipped as unusable;
    ``trades``, ``tickers``, ``book_updates``, ``snapshots``: events produced;
    ``resyncs``: books that were found broken and rebuilt; ``gaps``: sequence (or
    trade id) gaps detected; ``checksum_ok`` / ``checksum_mismatch``: verified
    checksums; ``duplicates`` / ``out_of_order``: repeated or decreasing sequence
    numbers or trade ids.
    """

    messages: int = 0
    malformed: int = 0
    trades: int = 0
    tickers: int = 0
    book_updates: int = 0
    snapshots: int = 0
    resyncs: int = 0
    gaps: int = 0
    checksum_ok: int = 0
    checksum_mismatch: int = 0
    duplicates: int = 0
    out_of_order: int = 0


@attrs.define
class FeedCounters:
    """The mutable counters a feed (or a collector) increments as it works; the
    fields and their meaning are ``FeedStatistics``'. ``freeze()`` is the frozen
    copy that ``statistics()`` methods return."""

    messages: int = 0
    malformed: int = 0
    trades: int = 0
    tickers: int = 0
    book_updates: int = 0
    snapshots: int = 0
    resyncs: int = 0
    gaps: int = 0
    checksum_ok: int = 0
    checksum_mismatch: int = 0
    duplicates: int = 0
    out_of_order: int = 0

    def freeze(self) -> FeedStatistics:
        """These counters now, as a ``FeedStatistics``."""
        return FeedStatistics(
            messages=self.messages, malformed=self.malformed, trades=self.trades,
            tickers=self.tickers, book_updates=self.book_updates, snapshots=self.snapshots,
            resyncs=self.resyncs, gaps=self.gaps, checksum_ok=self.checksum_ok,
            checksum_mismatch=self.checksum_mismatch, duplicates=self.duplicates,
            out_of_order=self.out_of_order,
        )


class ExchangeFeed(Protocol):
    """The sans-IO protocol of one exchange connection, as a collector drives it
    (module docstring: the order of the calls and the rules of their outputs).

    Implemented by ``BinanceFeed``, ``CoinbaseFeed`` and ``KrakenFeed``; times are
    Unix epoch seconds (``recv_ts``: when the collector received the frame or the
    REST body). No method raises on exchange input: what cannot be used is a
    ``Malformed`` output (and a resync of the book it concerns).
    """

    @property
    def exchange(self) -> str:
        """The exchange id the feed's events carry (``binance``, ``coinbase``, ...)."""
        ...

    def url(self, ws_base: str) -> str:
        """The WebSocket URL to connect to under ``ws_base`` (Binance names its
        streams in it; the others subscribe by message and return ``ws_base``)."""
        ...

    def on_open(self, now: float) -> Outputs:
        """A (re)connection is up: every book starts unsynced; returns the
        subscriptions to ``Send``, the ``FetchSnapshot`` / ``FetchTrades`` to start,
        and ``FeedState`` ``resyncing`` per book."""
        ...

    def on_message(self, text: str | bytes, recv_ts: float) -> Outputs:
        """One text frame received on the connection."""
        ...

    def on_snapshot(self, symbol: str, body: str | bytes, recv_ts: float) -> Outputs:
        """The REST body a ``FetchSnapshot`` of ``symbol`` asked for."""
        ...

    def on_trades(self, symbol: str, body: str | bytes, recv_ts: float) -> Outputs:
        """The REST body a ``FetchTrades`` of ``symbol`` asked for."""
        ...

    def resume(self, trades: Iterable[Trade]) -> None:
        """The last trade of each symbol another collector delivered before this
        feed took over (``daemon.cluster``: a new lease owner): the next
        ``on_open`` recovers the trades after them from the REST history, as after
        a reconnect (no duplicate; a ``Gap`` where the history does not reach).
        Trades of symbols the feed does not carry are ignored."""
        ...

    def book(self, symbol: str) -> L2Book | None:
        """The synced L2 book of ``symbol``, or ``None`` while it resyncs (or when
        the feed keeps no book of it). Read it; do not change it."""
        ...

    def statistics(self) -> FeedStatistics:
        """The feed's counters now (frozen)."""
        ...


def malformed(stats: FeedCounters, reason: str, text: str) -> Malformed:
    """Count a malformed frame and describe it for the log."""
    stats.malformed += 1
    return Malformed(reason=reason, text=text[:200])


_Event = TypeVar("_Event")


def event_maker(cls: type[_Event]) -> Callable[..., _Event]:
    """A constructor of ``cls`` (an ``attrs.frozen`` slotted event class) taking
    every field by position, in declaration order, for the protocols' hot paths.

    attrs' ``__init__`` takes keywords and sets each field through
    ``object.__setattr__``; this one sets each slot through its descriptor, which
    is what that call does in the end: the same object for half the time (a
    ``BookUpdate``, best of 5: 0.36 us against 0.78 us). Generated once per class,
    as attrs generates its own; only for classes whose fields have no validator,
    converter or ``on_setattr`` hook (checked here)."""
    fields = attrs.fields(cast(Any, cls))
    names = [field.name for field in fields]
    if not attrs.has(cls) or getattr(cls, "__attrs_post_init__", None) is not None or any(
        field.validator is not None or field.converter is not None
        or field.on_setattr not in (None, attrs.setters.NO_OP) or not field.name.isidentifier()
        for field in fields
    ):
        raise TypeError(f"{cls.__name__}: event_maker needs plain attrs fields")
    namespace: dict[str, Any] = {"new": object.__new__, "cls": cls}
    namespace.update((f"set_{name}", cls.__dict__[name].__set__) for name in names)
    body = "".join(f"    set_{name}(event, {name})\n" for name in names)
    source = f"def make({', '.join(names)}):\n    event = new(cls)\n{body}    return event\n"
    exec(compile(source, f"<event maker of {cls.__name__}>", "exec"), namespace)  # noqa: S102
    return cast(Callable[..., _Event], namespace["make"])


#: ``Trade(exchange, symbol, ts, recv_ts, id, price, size, side)``, by position.
new_trade: Callable[[str, str, float, float, str, str, str, str], Trade] = event_maker(Trade)
#: ``Ticker(exchange, symbol, ts, recv_ts, bid, bid_size, ask, ask_size)``, by position.
new_ticker: Callable[[str, str, float, float, str, str, str, str], Ticker] = event_maker(Ticker)
#: ``BookUpdate(exchange, symbol, ts, recv_ts, bids, asks)``, by position.
new_book_update: Callable[[str, str, float, float, Levels, Levels], BookUpdate] = \
    event_maker(BookUpdate)


def normalize_symbol(base: str, quote: str) -> str:
    """``BASE-QUOTE`` in upper case: the one symbol form tickwire uses."""
    return f"{base.upper()}-{quote.upper()}"
