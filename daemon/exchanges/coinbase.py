"""Coinbase Exchange WebSocket feed: frames in, normalized events out (sans-IO).

Source: Coinbase Exchange WebSocket feed docs,
https://docs.cdp.coinbase.com/exchange/docs/websocket-channels (feed
``wss://ws-feed.exchange.coinbase.com``, formerly ``wss://ws-feed.pro.coinbase.com``
where ``tests/captures/COINBASE.ws.28.0`` was recorded). Plain code: the collector
does the I/O and follows the contract in ``daemon.exchanges.base``.

Theory of operation
-------------------
1. One ``subscribe`` frame names every product and channel: ``trades`` -> ``matches``,
   ``book`` -> ``level2`` (or ``level2_batch``: same messages), ``ticker`` -> ``ticker``,
   and always ``heartbeat``: one frame per second per product, so a quiet connection
   still shows the collector's watchdog that it is alive. A heartbeat only records
   ``last_heartbeat``; it makes no event.
2. A book is *synced* only after a ``snapshot`` frame; ``l2update`` frames
   (``changes: [[side, price, size], ...]``, ``buy`` = bid, ``sell`` = ask, size zero
   removes) apply to it and are ignored before it. ``on_open`` marks every book
   unsynced: after any reconnect each book is rebuilt from the new snapshot.
3. Level2 has no sequence number, so the book checks itself: an update that turns
   it crossed (best bid >= best ask) proves it corrupt. Only the levels an update
   adds can cross the book (a size change keeps a price, a removal moves a best
   level away), so each new price is compared with the other side's best, and
   only when one reaches it are the two ends compared. That update is not
   published; the book resyncs: ``FeedState`` ``resyncing``, then ``unsubscribe``
   and ``subscribe`` of level2 for that one product, which brings a new snapshot.
   A malformed ``snapshot`` or ``l2update`` resyncs its book too. A snapshot that is
   itself crossed is the exchange's state (e.g. an auction): it is accepted, as
   resubscribing would only loop.
4. ``match``/``last_match`` and ``ticker`` carry the product's ``sequence``, shared by
   all its channels (a ticker has the number of its match), so the last number is
   kept per product *and* channel. A repeat is a duplicate, a decrease is out of
   order: both are counted and dropped. A skip is normal (other channels used the
   numbers), not a gap.
5. Trades go out in ``trade_id`` order, each id once. ``trade_id`` is an integer
   that grows by one per trade of a product (on the capture: 97 matches after the
   10 ``last_match`` frames, 87 consecutive pairs, no jump), so the last id
   delivered per product (kept across reconnects) is enough: an id at or below it
   is a duplicate (such as the ``last_match`` Coinbase resends on subscribe), and a
   jump above it means trades were lost. A jump, and every reconnect (for each
   product with a known last id), starts a *recovery* from the REST history
   ``/products/<id>/trades``, which lists trades newest first: ``FetchTrades`` of
   the newest page (``limit=1000``), then, while a full page does not reach back to
   the last id delivered, the next older one (``after=<oldest id of the page>``:
   Coinbase's cursor for older trades). Live trades of that product are held
   meanwhile. When the history is read, recovered and held trades go out merged in
   id order, each once. If live trades were missed *after* the newest trade of the
   history (the REST answer predates them), the newest page is read once more;
   ids still missing then are reported as a ``Gap`` (``stream="trades"``,
   ``from_id``/``to_id`` inclusive). A reconnect forgets recoveries in flight (their
   answers died with the connection) and starts over from the last id delivered.
6. Coinbase's match ``side`` is the *maker* order's side, in the REST history too;
   ``Trade.side`` is the taker's, so it is flipped (on the capture, each ticker,
   whose ``side`` is the taker's, has the opposite side of its match).
7. No call raises on exchange input: a bad frame (or REST page) becomes a
   ``Malformed`` output.

The trade bookkeeping of rule 5 (ids delivered, held and recovered trades merged,
gaps) is the shared trade tracker's (``daemon.trades``, with ``TRADE_RULES``); the
walk back through the history pages is here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from daemon.book import L2Book, Side
from daemon.events import BookSnapshot, BookUpdate, FeedState, Gap, Ticker, Trade
from daemon.exchanges.base import (
    ExchangeFeed,
    FeedCounters,
    FeedStatistics,
    FetchTrades,
    Malformed,
    Outputs,
    Send,
    malformed,
    new_book_update,
    new_ticker,
    new_trade,
    normalize_symbol,
)
from daemon.trades import TradeRules, TradeTracker, integer_key

#: REST target (on ``https://api.exchange.coinbase.com``) listing every product.
MARKETS_TARGET = "/products"
#: Trades per page of the REST history ``/products/<id>/trades`` (Coinbase's maximum).
TRADES_LIMIT = 1000
#: tickwire channel -> Coinbase channel (``book``: see ``CoinbaseFeed.book_channel``).
_CHANNELS = {"trades": "matches", "book": "level2", "ticker": "ticker"}
#: ``trade_id`` counts up by one per trade of a product (module doc, rule 5).
TRADE_RULES = TradeRules(key=integer_key, contiguous=True)
_TAKER_SIDE = {"buy": "sell", "sell": "buy"}  # maker order side -> taker side
#: Epoch microseconds of the whole-second part of recent ``time`` strings, by their
#: first 20 characters (``"2021-04-17T16:43:37."``; ``parse_time``).
_MICROS: dict[str, int] = {}
#: Entries of ``_MICROS`` beyond which it starts over.
SECONDS_MEMORY = 4096
#: Size strings a feed remembers as checked (and whether they are zero) before it
#: starts over.
SIZES_MEMORY = 4096


_ZERO = timedelta(0)
_ABSENT = object()

_E = TypeVar("_E", BookSnapshot, BookUpdate, FeedState, Gap, Ticker, Trade)


class _BadFrame(ValueError):
    """A frame that lacks a field or holds a value of the wrong form."""


def parse_markets(body: str | bytes) -> dict[str, str]:
    """Map Coinbase product ids to tickwire symbols from a ``GET /products`` body.

    ``body``: the JSON list of products, each with ``id``, ``base_currency`` and
    ``quote_currency``. Returns ``{"BTC-USD": "BTC-USD", ...}`` for every product
    listed, traded or not. Raises ``ValueError`` when the body is not such a list.
    """
    try:
        products = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"products body is not JSON: {exc}") from exc
    if not isinstance(products, list):
        raise ValueError("products body is not a JSON list")
    markets: dict[str, str] = {}
    for product in products:
        keys = ("id", "base_currency", "quote_currency")
        fields = [product.get(k) if isinstance(product, dict) else None for k in keys]
        pid, base, quote = (x if isinstance(x, str) else "" for x in fields)
        if not (pid and base and quote):
            raise ValueError(f"not a product: {str(product)[:200]}")
        markets[pid] = normalize_symbol(base, quote)
    return markets


def parse_time(text: object) -> float:
    """ISO-8601 time (``"2021-04-17T16:43:37.071893Z"``) -> Unix epoch seconds.

    A time without an offset is taken as UTC. Raises ``ValueError`` otherwise.
    Coinbase's own form (microseconds, ``Z``) is read from the epoch second of its
    first 19 characters, kept once a whole text has been read by ``datetime``
    (the result is the same float: ``datetime.timestamp`` divides the whole
    microseconds by a million too).
    """
    if type(text) is str and len(text) == 27 and text[26] == "Z":
        micros = _MICROS.get(text[:20])  # the date, the time and the dot
        if micros is not None:
            fraction = text[20:26]
            if fraction.isdigit() and fraction.isascii():
                return (micros + int(fraction)) / 1_000_000
    if not isinstance(text, str):
        raise _BadFrame(f"time is not a string: {text!r}")
    when = datetime.fromisoformat(text)
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    if len(text) == 27 and text[19] == "." and text[26] == "Z" and when.utcoffset() == _ZERO:
        if len(_MICROS) >= SECONDS_MEMORY:
            _MICROS.clear()
        _MICROS[text[:20]] = int(when.replace(microsecond=0).timestamp()) * 1_000_000
    return when.timestamp()


def _dec(value: object, what: str) -> str:
    """``value`` checked to be a decimal string (``\\d+(\\.\\d+)?``, Unicode digits
    as ``re`` reads ``\\d``), returned as sent."""
    if isinstance(value, str):
        whole, dot, fraction = value.partition(".")
        if whole.isdecimal() and (fraction.isdecimal() or not dot):
            return value
    raise _BadFrame(f"{what} is not a decimal string: {value!r}")


def _levels(raw: object, what: str) -> list[tuple[str, str]]:
    """``[[price, size, ...], ...]`` checked, as ``(price, size)`` pairs."""
    if not isinstance(raw, list):
        raise _BadFrame(f"{what} is not a list")
    out = []
    for level in raw:
        if not isinstance(level, list) or len(level) < 2:
            raise _BadFrame(f"bad {what} level: {level!r}")
        out.append((_dec(level[0], "price"), _dec(level[1], "size")))
    return out


def _pairs(raw: object, what: str) -> list[Any]:
    """``_levels`` of a snapshot side, checked in bulk (a snapshot has thousands of
    levels): ``[price, size]`` lists whose strings hold only decimal digits and
    dots, neither first nor last, are returned as they are, for ``L2Book.load`` to
    read as ``Decimal`` (it refuses the rest, such as two dots, and the caller then
    asks ``_levels`` what is wrong); anything else goes through ``_levels``."""
    if type(raw) is list and raw and {*map(type, raw)} == {list}:
        try:
            prices = [price for price, _ in raw]  # ValueError: not a pair
            sizes = [size for _, size in raw]
            if _digits_and_dots(prices) and _digits_and_dots(sizes):
                return raw
        except (TypeError, ValueError):  # not all pairs of strings
            pass
    return _levels(raw, what)


#: ``bytes.translate`` table for ``_digits_and_dots``: ``.``, ``,`` and the digits
#: as they are, any other byte -> ``x``.
_DIGITS_AND_DOTS = bytes(c if c in b".,0123456789" else ord("x") for c in range(256))


def _digits_and_dots(values: list[str]) -> bool:
    """Whether every value is made of decimal digits (``str.isdecimal``: re's
    ``\\d``) and dots, with no dot first or last; raises ``TypeError`` on a value
    that is not a string. (ASCII text is checked as bytes, through
    ``_DIGITS_AND_DOTS``: several times faster than ``str.isdecimal`` on it.)"""
    joined = ",".join(values)
    if joined.isascii():
        data = joined.encode().translate(_DIGITS_AND_DOTS)
        return b"x" not in data and b",." not in data and b".," not in data \
            and data[:1] != b"." and data[-1:] != b"."
    return (joined.replace(".", "").replace(",", "").isdecimal() and ",." not in joined
            and ".," not in joined and joined[0] != "." and joined[-1] != ".")


def _sequence(msg: dict[str, Any]) -> int:
    seq = msg["sequence"]
    if type(seq) is not int:
        raise _BadFrame(f"sequence is not an integer: {seq!r}")
    return seq


def _trade_id(value: object) -> int:
    """A ``trade_id``: an integer (or a string of digits), returned as ``int``."""
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise _BadFrame(f"trade_id is not an integer: {value!r}")


def _text(text: str | bytes) -> str:
    return text if isinstance(text, str) else text.decode("utf-8", "replace")


class _Paging:
    """How far the recovery of one product reads the history back (module doc,
    rule 5); the recovered and held trades themselves are in its ``TradeTracker``."""

    __slots__ = ("reach", "top", "second_look")

    def __init__(self, floor: int) -> None:
        self.reach = floor  # the id the current walk back through the history must reach
        self.top: int | None = None  # the newest id the history has shown
        self.second_look = False  # the newest page was read again


class CoinbaseFeed:
    """The protocol state of one Coinbase Exchange feed connection (see module doc).

    ``symbols``: tickwire symbols (``"BTC-USD"``), each a value of ``markets``
    (product id -> symbol, from ``parse_markets``); ``channels``: a subset of
    ``("trades", "book", "ticker")``; ``book_channel``: ``"level2"`` (as recorded;
    Coinbase now requires an authenticated connection for it) or ``"level2_batch"``
    (public, 50 ms batches, same messages). Raises ``ValueError`` on an unknown
    symbol or channel.

    Every call returns a list of events (``daemon.events``), ``Send`` frames and
    ``Malformed`` notes, in order; ``on_open``, a jump in trade ids and
    ``on_trades`` also return ``FetchTrades``. ``stats`` holds the counters;
    ``last_heartbeat`` the receive time (epoch s) of the last ``heartbeat`` frame on
    this connection; ``recovering`` the products whose trades are being recovered.
    """

    exchange = "coinbase"

    def __init__(
        self,
        symbols: list[str],
        channels: list[str],
        markets: dict[str, str],
        *,
        book_channel: str = "level2",
    ) -> None:
        unknown = [c for c in channels if c not in _CHANNELS]
        if unknown:
            raise ValueError(f"unknown channels {unknown}: use {sorted(_CHANNELS)}")
        if book_channel not in ("level2", "level2_batch"):
            raise ValueError(f"book_channel must be level2 or level2_batch: {book_channel!r}")
        # symbol -> product id; if two products share a symbol, the first listed wins
        product_of = {symbol: pid for pid, symbol in reversed(markets.items())}
        missing = [s for s in symbols if s not in product_of]
        if missing:
            raise ValueError(f"symbols not listed by Coinbase: {missing}")
        self.stats = FeedCounters()  # the counters; statistics() reads them
        self.last_heartbeat: float | None = None
        self.book_channel = book_channel
        coinbase_channels = {**_CHANNELS, "book": book_channel}
        self._channels = [coinbase_channels[c] for c in dict.fromkeys(channels)]
        self._product = {s: product_of[s] for s in dict.fromkeys(symbols)}
        self._symbol = {pid: s for s, pid in self._product.items()}
        self._books = {s: L2Book() for s in self._product} if "book" in channels else {}
        self._book_of = {pid: s for pid, s in self._symbol.items() if s in self._books}
        self._sizes: dict[str, bool] = {}  # size strings checked: whether not zero
        #: the second of the last time read (its first 20 characters; at first longer
        #: than any time, so that none starts with it) and its epoch microseconds
        self._second, self._micros = "." * 28, 0
        self._synced: set[str] = set()
        #: product id -> (symbol, book, its bids, its asks), while that book is synced
        self._live: dict[str, tuple[str, L2Book, Side, Side]] = {}
        #: synced books whose snapshot was crossed, while they stay crossed (rule 3)
        self._crossed: set[str] = set()
        self._last_seq: dict[tuple[str, str], int] = {}
        #: per product: trades delivered (kept across reconnects), recovery, gaps
        self._trades = {
            s: TradeTracker(self.exchange, s, TRADES_LIMIT, self.stats,
                            rules=TRADE_RULES, history=self._history)
            for s in self._product
        }
        self._paging: dict[str, _Paging] = {}
        self._opens = 0
        self._now = 0.0  # time of the last call: stamps resync() events
        self._handlers = {
            "subscriptions": lambda msg, text, ts: [],
            "heartbeat": self._on_heartbeat,
            "error": self._on_error,
            "snapshot": self._on_snapshot,
            "l2update": self._on_l2update,
            "match": self._on_match,
            "last_match": self._on_match,
            "ticker": self._on_ticker,
        }

    # -- the collector's calls ---------------------------------------------------

    def statistics(self) -> FeedStatistics:
        """The feed's counters now, frozen (``daemon.exchanges.base.FeedStatistics``)."""
        return self.stats.freeze()

    def url(self, ws_base: str) -> str:
        """The URL to connect to: ``ws_base`` itself (subscriptions go in frames)."""
        return ws_base

    @property
    def recovering(self) -> frozenset[str]:
        """Symbols whose trades are being recovered (their live trades are held)."""
        return frozenset(s for s, tracker in self._trades.items() if tracker.recovering)

    def on_open(self, now: float) -> Outputs:
        """Reset per-connection state (``now``: epoch s) and return what to send.

        Returns one ``Send`` (``{"type":"subscribe","product_ids":[...],"channels":
        [..., "heartbeat"]}``); after a reconnect, a ``FetchTrades`` per product with
        a known last trade id (module doc, rule 5); then a ``FeedState``
        ``resyncing`` per book symbol. Books, sync states and sequence numbers are
        reset; the last trade ids are kept.
        """
        self._now = now
        self._opens += 1
        self.last_heartbeat = None
        self._synced.clear()
        self._live.clear()
        self._crossed.clear()
        self._last_seq.clear()
        for tracker in self._trades.values():
            tracker.abandon()  # answers to the old connection's fetches never come
        self._paging.clear()
        for book in self._books.values():
            book.clear()
        channels = [*self._channels, "heartbeat"]
        out: Outputs = [self._frame("subscribe", list(self._product.values()), channels)]
        if self._opens > 1:
            for tracker in self._trades.values():
                out += tracker.recover()  # a product with a known last trade id
        detail = "connected: awaiting the snapshot"
        out += [
            self._event(FeedState, s, now, now, state="resyncing", detail=detail)
            for s in self._books
        ]
        return out

    def on_message(self, text: str | bytes, recv_ts: float) -> Outputs:
        """Handle one received frame (``recv_ts``: epoch s); never raises on its content."""
        self.stats.messages += 1
        self._now = recv_ts
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            return [malformed(self.stats, "not JSON", _text(text)),
                    *self._resync_unreadable(_text(text), recv_ts)]
        if type(msg) is not dict:
            return [malformed(self.stats, "not a JSON object", _text(text))]
        kind = msg.get("type")
        try:
            if kind == "l2update":  # nearly every frame
                return self._on_l2update(msg, text, recv_ts)
            handler = self._handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                return [malformed(self.stats, f"unknown type {kind!r}", _text(text))]
            return handler(msg, _text(text), recv_ts)
        except (KeyError, TypeError, ValueError) as exc:  # _BadFrame, BookError too
            reason = f"bad {kind}: {type(exc).__name__}: {exc}"
            out: Outputs = [malformed(self.stats, reason, _text(text))]
            pid = msg.get("product_id")
            symbol = self._symbol.get(pid) if isinstance(pid, str) else None
            # a lost book frame breaks the book, unless a snapshot is already awaited
            if symbol in self._books and (
                kind == "snapshot" or (kind == "l2update" and symbol in self._synced)
            ):
                out += self._resync(symbol, reason, recv_ts)
            return out

    def _resync_unreadable(self, text: str, recv_ts: float) -> Outputs:
        """An unreadable frame may have been a book update, and ``l2update`` has no
        sequence to show the loss later: resync the book it names, or every synced
        book when it names none we can read."""
        if '"l2update"' not in text and '"snapshot"' not in text and '"product_id"' in text:
            return []  # it names itself as something else (a match, a ticker)
        found = re.search(r'"product_id"\s*:\s*"([^"]+)"', text)
        symbol = self._symbol.get(found.group(1)) if found else None
        targets = [symbol] if symbol is not None else list(self._synced)
        out: Outputs = []
        for target in targets:
            if target in self._books and target in self._synced:
                out += self._resync(target, "unreadable frame", recv_ts)
        return out

    def resync(self, symbol: str, reason: str, now: float | None = None) -> Outputs:
        """Rebuild one book: ``FeedState`` ``resyncing`` (``detail=reason``) and the
        ``Send`` frames that unsubscribe and resubscribe its level2 channel; its
        updates are ignored until the new snapshot. ``now`` (epoch s) defaults to the
        time of the last call. Raises ``KeyError`` for a symbol without a book."""
        if symbol not in self._books:
            raise KeyError(f"no Coinbase book for {symbol!r}")
        return self._resync(symbol, reason, self._now if now is None else now)

    def on_snapshot(self, symbol: str, body: str | bytes, recv_ts: float) -> Outputs:
        """Nothing: Coinbase sends book snapshots over the WebSocket."""
        return []

    def on_trades(self, symbol: str, body: str | bytes, recv_ts: float) -> Outputs:
        """Take one page of the REST history asked for by ``FetchTrades``
        (``[{"trade_id", "time", "price", "size", "side"}, ...]``, newest first).

        Returns the ``FetchTrades`` of the next page while the history is not read
        back far enough; else the recovered and held trades in id order, each once,
        with a ``Gap`` before any ids that remain missing (module doc, rule 5). An
        unusable page is ``Malformed`` and ends the recovery with what it has.
        """
        tracker, paging = self._trades.get(symbol), self._paging.get(symbol)
        if tracker is None or tracker.recovery is None or paging is None:
            return []  # not asked for (or asked for by a connection since closed)
        self._now = recv_ts
        try:
            rows = orjson.loads(body)
            if not isinstance(rows, list):
                raise _BadFrame("not a list of trades")
            page = [self._trade(symbol, row, recv_ts) for row in rows]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            reason = f"bad trades page: {type(exc).__name__}: {exc}"
            out: Outputs = [malformed(self.stats, reason, _text(body))]
            out += self._end_recovery(symbol, recv_ts)
            return out
        tracker.recovered(page, recv_ts, keep=True)
        ids = [int(t.id) for t in page]
        if ids:
            paging.top = max(ids) if paging.top is None else max(paging.top, *ids)
        if len(page) >= TRADES_LIMIT and min(ids) > paging.reach + 1:
            return [self._fetch_trades(symbol, after=min(ids))]
        floor: int = tracker.recovery.floor
        newest = max(floor, paging.top if paging.top is not None else 0)
        held = sorted({int(t.id) for t in tracker.recovery.held if int(t.id) > newest})
        missed_live = bool(held) and held != list(range(newest + 1, newest + 1 + len(held)))
        if missed_live and not paging.second_look:
            # live trades were missed after the newest trade of the history: the
            # REST answer predates them, so read the newest page once more
            paging.second_look = True
            paging.reach = newest
            return [self._fetch_trades(symbol)]
        return self._end_recovery(symbol, recv_ts)

    def resume(self, trades: Iterable[Trade]) -> None:
        """``ExchangeFeed.resume``: seed each symbol's trade tracker; the next
        ``on_open`` is a reconnect as far as trades go."""
        for trade in trades:
            tracker = self._trades.get(trade.symbol)
            if tracker is not None:
                tracker.seed(trade)
                self._opens = max(self._opens, 1)

    def book(self, symbol: str) -> L2Book | None:
        """The synced book of ``symbol``, or ``None`` while unsynced or without one."""
        return self._books[symbol] if symbol in self._synced else None

    # -- frame handlers: raise KeyError/TypeError/ValueError on a bad frame --------

    def _on_heartbeat(self, msg: dict[str, Any], text: str, recv_ts: float) -> Outputs:
        self.last_heartbeat = recv_ts
        return []

    def _on_error(self, msg: dict[str, Any], text: str, recv_ts: float) -> Outputs:
        detail = f"{msg.get('message', '')} {msg.get('reason', '')}".strip()
        return [malformed(self.stats, f"exchange error: {detail}", text)]

    def _on_snapshot(self, msg: dict[str, Any], text: str, recv_ts: float) -> Outputs:
        symbol = self._known(msg, text, book=True)
        if isinstance(symbol, Malformed):
            return [symbol]
        book = self._books[symbol]
        try:
            bids, asks = _pairs(msg["bids"], "bids"), _pairs(msg["asks"], "asks")
            ts = parse_time(msg["time"]) if "time" in msg else recv_ts
            book_bids, book_asks = book.load(bids, asks)
        except (KeyError, TypeError, ValueError):
            # the first fault, as the checks one level at a time find it
            _levels(msg["bids"], "bids")
            _levels(msg["asks"], "asks")
            if "time" in msg:
                parse_time(msg["time"])
            raise
        self._synced.add(symbol)
        self._live[self._product[symbol]] = (symbol, book, book.bid_side, book.ask_side)
        self.stats.snapshots += 1
        crossed = book.is_crossed()
        if crossed:
            self._crossed.add(symbol)
        else:
            self._crossed.discard(symbol)
        detail = "level2 snapshot" + (" (crossed)" if crossed else "")
        return [
            self._event(BookSnapshot, symbol, ts, recv_ts, bids=book_bids, asks=book_asks),
            self._event(FeedState, symbol, ts, recv_ts, state="synced", detail=detail),
        ]

    def _on_l2update(self, msg: dict[str, Any], text: str | bytes, recv_ts: float) -> Outputs:
        try:
            symbol, book, bid_side, ask_side = self._live[msg["product_id"]]
        except (KeyError, TypeError):  # no synced book of that product (or no product)
            return self._on_l2update_unsynced(msg, text)
        changes = msg["changes"]
        if type(changes) is not list:
            raise _BadFrame("changes is not a list")
        when = msg.get("time", _ABSENT)
        if type(when) is str and when[:20] == self._second and when[26:] == "Z" \
                and (fraction := when[20:26]).isdigit() and fraction.isascii():
            # parse_time's fast path, inline, for a time in the second of the last one
            ts = (self._micros + int(fraction)) / 1_000_000
        elif when is _ABSENT:
            ts = recv_ts
        else:
            ts = parse_time(when)
            micros = _MICROS.get(when[:20]) if type(when) is str else None
            if micros is not None:  # its second, for the times that follow
                self._second, self._micros = when[:20], micros
        known_sizes = self._sizes
        if len(changes) == 1 and not self._crossed:
            # the usual update: one change of a level the book holds, whose size
            # string was seen before (the loop below does the same, and the rest)
            change = changes[0]
            if type(change) is list and len(change) >= 3:
                name, price, size = change[0], change[1], change[2]
                side = bid_side if name == "buy" else ask_side if name == "sell" else None
                nonzero = known_sizes.get(size) if type(size) is str else None
                if side is not None and nonzero is not None and price in side.size:
                    if nonzero:
                        side.size[price] = size
                    else:
                        side.remove(price)
                    self.stats.book_updates += 1
                    delta = ((price, size),)
                    return [new_book_update("coinbase", symbol, ts, recv_ts, delta, ())
                            if side is bid_side else
                            new_book_update("coinbase", symbol, ts, recv_ts, (), delta)]
        bids: list[tuple[str, str]] = []
        asks: list[tuple[str, str]] = []
        crossing = False  # a new level at or beyond the other side's best
        # each change is checked as it is applied (a bad one raises and the book
        # resyncs); a price the book holds was checked when its level was made
        for change in changes:
            if type(change) is not list or len(change) < 3:
                raise _BadFrame(f"bad change: {change!r}")
            name, price, size = change[0], change[1], change[2]
            if name == "buy":
                side, levels = bid_side, bids
            elif name == "sell":
                side, levels = ask_side, asks
            else:
                raise _BadFrame(f"bad change: {change!r}")
            # a size string checked before is not checked again (two thirds of them
            # on the capture: "0.00", "0.00000000", ...)
            nonzero = known_sizes.get(size) if type(size) is str else None
            if nonzero is None:
                nonzero = self._size(size)
            sizes = side.size
            if price in sizes:  # a level the book holds: its price was checked
                if nonzero:
                    sizes[price] = size
                else:
                    side.remove(price)
            elif nonzero:  # a new level: rule 3's crossed-book check looks at it
                if type(price) is not str:
                    raise _BadFrame(f"price is not a decimal string: {price!r}")
                whole, dot, fraction = price.partition(".")  # _dec(price), inline
                if not whole.isdecimal() or dot and not fraction.isdecimal():
                    raise _BadFrame(f"price is not a decimal string: {price!r}")
                key = Decimal(price)
                side.insert(price, size, key)
                if side is bid_side:
                    lowest_asks = ask_side.keys
                    crossing = crossing or bool(lowest_asks) and key >= lowest_asks[0][0]
                else:
                    highest_bids = bid_side.maxes
                    crossing = crossing or bool(highest_bids) and key <= highest_bids[-1]
            else:  # size zero at a price the book does not hold (in that spelling)
                side.put(_dec(price, "price"), size, False)
            levels.append((price, size))
        if crossing or self._crossed and symbol in self._crossed:
            if symbol not in self._crossed:  # it was not crossed: is it now?
                if book.is_crossed():
                    return self._resync(symbol, "crossed book", recv_ts)
            elif not book.is_crossed():  # a crossed snapshot's book no longer is
                self._crossed.discard(symbol)
        self.stats.book_updates += 1
        return [new_book_update("coinbase", symbol, ts, recv_ts, tuple(bids), tuple(asks))]

    def _on_l2update_unsynced(self, msg: dict[str, Any], text: str | bytes) -> Outputs:
        """An ``l2update`` of a product without a synced book: a ``Malformed`` for a
        product without a book, else nothing (the coming snapshot holds it) once
        the frame is checked."""
        pid = msg["product_id"]
        symbol = self._book_of.get(pid) if type(pid) is str else None
        if symbol is None:  # not a product with a book: say why
            known = self._known(msg, _text(text), book=True)
            if isinstance(known, Malformed):
                return [known]
        changes = msg["changes"]
        if type(changes) is not list:
            raise _BadFrame("changes is not a list")
        for change in changes:
            self._change(change)
        if "time" in msg:
            parse_time(msg["time"])
        return []

    def _size(self, size: object) -> bool:
        """Check a size string not checked before (``_dec``) and remember whether it
        is not zero (``_sizes``); raises ``_BadFrame``."""
        if not isinstance(size, str):
            raise _BadFrame(f"size is not a decimal string: {size!r}")
        whole, dot, fraction = size.partition(".")
        if not whole.isdecimal() or dot and not fraction.isdecimal():
            raise _BadFrame(f"size is not a decimal string: {size!r}")
        # not zero: a digit other than 0 (Decimal tells for other scripts' digits)
        nonzero = bool(size.strip("0.")) if size.isascii() else bool(Decimal(size))
        known_sizes = self._sizes
        if len(known_sizes) >= SIZES_MEMORY:
            known_sizes.clear()
        known_sizes[size] = nonzero
        return nonzero

    @staticmethod
    def _change(change: object) -> None:
        """Check one ``[side, price, size]`` change; raises ``_BadFrame``."""
        if not isinstance(change, list) or len(change) < 3 or change[0] not in ("buy", "sell"):
            raise _BadFrame(f"bad change: {change!r}")
        _dec(change[1], "price")
        _dec(change[2], "size")

    def _on_match(self, msg: dict[str, Any], text: str, recv_ts: float) -> Outputs:
        symbol = self._known(msg, text)
        if isinstance(symbol, Malformed):
            return [symbol]
        seq = _sequence(msg)
        trade = self._trade(symbol, msg, recv_ts)
        if not self._in_sequence(symbol, "matches", seq):
            return []
        return self._trades[symbol].live([trade], recv_ts)

    def _trade(self, symbol: str, msg: dict[str, Any], recv_ts: float) -> Trade:
        """A ``Trade`` from a match or a REST history entry (same fields)."""
        trade_id, side = _trade_id(msg["trade_id"]), _TAKER_SIDE.get(msg["side"])
        if side is None:
            raise _BadFrame(f"bad side {msg['side']!r}")
        price, size = _dec(msg["price"], "price"), _dec(msg["size"], "size")
        ts = parse_time(msg["time"])
        return new_trade(self.exchange, symbol, ts, recv_ts, str(trade_id), price, size, side)

    def _on_ticker(self, msg: dict[str, Any], text: str, recv_ts: float) -> Outputs:
        symbol = self._known(msg, text)
        if isinstance(symbol, Malformed):
            return [symbol]
        seq = _sequence(msg)
        bid, ask = _dec(msg["best_bid"], "best_bid"), _dec(msg["best_ask"], "best_ask")
        # the sizes are in today's docs but absent from the 2021 capture: "" then
        bid_size = msg.get("best_bid_size")
        bid_size = "" if bid_size is None else _dec(bid_size, "best_bid_size")
        ask_size = msg.get("best_ask_size")
        ask_size = "" if ask_size is None else _dec(ask_size, "best_ask_size")
        ts = parse_time(msg["time"]) if "time" in msg else recv_ts
        ticker = new_ticker(self.exchange, symbol, ts, recv_ts, bid, bid_size, ask, ask_size)
        if not self._in_sequence(symbol, "ticker", seq):
            return []
        self.stats.tickers += 1
        return [ticker]

    # -- helpers -----------------------------------------------------------------

    def _known(self, msg: dict[str, Any], text: str, book: bool = False) -> str | Malformed:
        """The symbol of ``msg["product_id"]``, or a counted ``Malformed``."""
        pid = msg["product_id"]
        symbol = self._symbol.get(pid) if isinstance(pid, str) else None
        if symbol is None:
            return malformed(self.stats, f"unknown product {pid!r}", text)
        if book and symbol not in self._books:
            return malformed(self.stats, f"book frame for {symbol}: no book subscribed", text)
        return symbol

    def _in_sequence(self, symbol: str, channel: str, seq: int) -> bool:
        """Record ``seq``; False (and counted) when it repeats or goes back."""
        last = self._last_seq.get((symbol, channel))
        if last is not None and seq <= last:
            if seq == last:
                self.stats.duplicates += 1
            else:
                self.stats.out_of_order += 1
            return False
        self._last_seq[symbol, channel] = seq
        return True

    def _history(self, tracker: TradeTracker) -> FetchTrades | None:
        """Start recovering the trades after the last delivered id (``None``: no
        trade delivered yet, nothing to recover from): the newest page first."""
        if tracker.last_key is None:
            return None
        self._paging[tracker.symbol] = _Paging(tracker.last_key)
        return self._fetch_trades(tracker.symbol)

    def _fetch_trades(self, symbol: str, after: int | None = None) -> FetchTrades:
        target = f"/products/{self._product[symbol]}/trades?limit={TRADES_LIMIT}"
        return FetchTrades(symbol, target if after is None else f"{target}&after={after}")

    def _end_recovery(self, symbol: str, now: float) -> Outputs:
        """Deliver what a recovery found and the live trades it held, merged."""
        self._paging.pop(symbol, None)
        out: Outputs = []
        out += self._trades[symbol].finish(now)
        return out

    def _resync(self, symbol: str, reason: str, now: float) -> Outputs:
        self.stats.resyncs += 1
        self._synced.discard(symbol)
        self._live.pop(self._product[symbol], None)
        self._books[symbol].clear()
        product, channel = [self._product[symbol]], [self.book_channel]
        return [
            self._event(FeedState, symbol, now, now, state="resyncing", detail=reason),
            self._frame("unsubscribe", product, channel),
            self._frame("subscribe", product, channel),
        ]

    def _frame(self, kind: str, products: list[str], channels: list[str]) -> Send:
        body = {"type": kind, "product_ids": products, "channels": channels}
        return Send(orjson.dumps(body).decode())

    def _event(self, cls: type[_E], symbol: str, ts: float, recv_ts: float, **fields: Any) -> _E:
        return cls(exchange=self.exchange, symbol=symbol, ts=ts, recv_ts=recv_ts, **fields)


if TYPE_CHECKING:
    _CONFORMS: type[ExchangeFeed] = CoinbaseFeed  # mypy checks CoinbaseFeed against the Protocol
