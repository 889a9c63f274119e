"""Kraken WebSocket v1 public market data (``wss://ws.kraken.com``), sans-IO.

Source: Kraken WebSocket v1 API docs, https://docs.kraken.com/websockets/ (messages
``subscribe``, ``subscriptionStatus``, ``heartbeat``, ``trade``, ``ticker``, ``book``)
and its book checksum guide, https://docs.kraken.com/websockets/#book-checksum.

Theory of operation
-------------------
1. Pairs are named by their ``wsname`` (``XBT/USD``); ``parse_markets`` maps them to
   tickwire symbols (``BTC-USD``). ``on_open`` sends one ``subscribe`` per channel
   for every pair and marks every book "resyncing".
2. Kraken answers each (pair, channel) with a ``subscriptionStatus`` carrying a
   ``channelID``; data frames are arrays ``[channelID, payload..., channelName,
   pair]`` and are routed by that id. An id we were not given is malformed (and
   resyncs the book the frame names, if that book is synced).
3. A book starts with a snapshot (``as``/``bs``) and is then kept by updates
   (``a``/``b``, in one or two objects, the last one holding the checksum ``c``).
   Levels are ``[price, volume, time]`` plus an optional ``"r"`` (republished
   level that re-enters the subscribed depth): every level is applied in order, a
   zero volume removes it, then each side is cut to ``depth`` (Kraken sends no
   removal for levels that fall out of the depth).
4. After every update the CRC32 of the top 10 asks then top 10 bids is compared to
   ``c``. A match publishes a ``BookUpdate``; a mismatch, or a malformed book frame,
   resyncs that pair alone: unsubscribe, subscribe, and ignore its updates until
   Kraken's next snapshot. The checksum text is kept from one update to the next
   (``_Checksum``): a side's is made again only when its top 10 prices changed or
   the update touched one of them, from each level's text, made once per level
   and dropped when the level changes; the asks' CRC32 is kept too.
5. Trades. v1 trades carry no id: each gets ``"<time>-<k>"``, the time rounded to
   the microsecond (v1's own precision: ``"1618678142.557535"``, unchanged) and
   ``k`` the count of earlier trades of the pair at that same time. Live, ``k`` is
   counted within the connection, which is the pair's count if Kraken sends all the
   trades of one time (the fills of one taker order) in one message, so that no
   connection starts inside such a run (assumed: the capture has no two trades of a
   pair at one time to check it on). Trades go out in ``(time, k)`` order, each
   once: a trade whose key is not above the last delivered is a duplicate.
6. Recovery. After a reconnect, every pair with a delivered trade recovers what the
   connection missed from REST ``/0/public/Trades?pair=<altname>&since=<ns>``
   (``FetchTrades``; the altname is the wsname without its ``/``, as for all 293
   pairs of the recorded AssetPairs). It is asked for when Kraken confirms the
   pair's new trade subscription, not at ``on_open``: the history is then read
   after the live stream has started, so it reaches the first live trade and no
   trade falls between the two unseen (without ids, such a hole could not be
   detected). ``since`` is one microsecond before the last delivered trade, so the
   answer starts at a time boundary, with that trade itself: ``k`` is counted on
   the REST rows from there exactly as the live path counts it, keys compare across
   both, and a trade recovered and also received live goes out once. Live trades
   of the pair are held meanwhile; the recovered ones newer than the last
   delivered go out first, then the held ones newer still. A full page (1000)
   asks for the next one with ``since`` one microsecond before its last trade (not
   its ``last``, which would skip trades at that time beyond the page's end). A
   ``Gap`` (``stream="trades"``, no ids: its detail names the trades around it)
   reports an answer that cannot be read, a history that does not hold the last
   delivered trade while holding later ones, or a page of 1000 trades at one
   microsecond. A reconnect forgets recoveries in flight and starts over.
7. Nothing here raises on exchange input: unusable frames become ``Malformed``.

The trade bookkeeping of rules 5 and 6 (keys delivered, held trades, the window)
is the shared trade tracker's (``daemon.trades``, with ``TRADE_RULES``: the key
``(time, k)`` read from the id, no contiguous ids); the numbering, the paging and
Kraken's gap rules are here.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import orjson

from daemon.book import BookError, L2Book, Side
from daemon.events import BookSnapshot, FeedState, Levels, Trade
from daemon.exchanges.base import (
    ExchangeFeed,
    FeedCounters,
    FeedStatistics,
    FetchTrades,
    Outputs,
    Send,
    malformed,
    new_book_update,
    new_ticker,
    new_trade,
    normalize_symbol,
)
from daemon.trades import TradeRules, TradeTracker

#: REST path (on ``https://api.kraken.com``) of the market list ``parse_markets`` reads.
MARKETS_TARGET = "/0/public/AssetPairs"
#: REST path of the trade history (``?pair=<altname>&since=<ns>&count=<n>``).
TRADES_TARGET = "/0/public/Trades"
#: Trades per page of the REST history (Kraken's largest ``count``).
TRADES_LIMIT = 1000
#: Book depths Kraken v1 accepts in a ``book`` subscription.
DEPTHS = (10, 25, 100, 500, 1000)
#: Kraken's legacy asset names that differ from the usual ticker.
ALIASES = {"XBT": "BTC", "XDG": "DOGE"}
#: tickwire channel -> Kraken subscription name.
_SUBSCRIPTION = {"trades": "trade", "book": "book", "ticker": "ticker"}
_SIDES = {"b": "buy", "s": "sell"}
#: A heartbeat frame as Kraken sends it (others with the same meaning are parsed).
_HEARTBEAT = '{"event":"heartbeat"}'
#: Levels per side in Kraken's book checksum.
CHECKSUM_LEVELS = 10
_MICROSECOND = Decimal("0.000001")
#: A trade's place in its pair's history: (time in integer microseconds, k).
_Key = tuple[int, int]


class _Bad(ValueError):
    """A frame of the wrong shape; the message says what is wrong."""


def _asset(code: str) -> str:
    return ALIASES.get(code.upper(), code.upper())


def _strip_prefix(code: str) -> str:
    # Legacy 4-letter REST names carry an X (crypto) or Z (fiat) prefix: XXBT, ZUSD.
    return code[1:] if len(code) == 4 and code[0] in "XZ" else code


def parse_markets(body: str) -> dict[str, str]:
    """Map each Kraken ``wsname`` (``"XBT/USD"``) to its tickwire symbol (``"BTC-USD"``).

    ``body`` is the JSON answer of ``GET /0/public/AssetPairs``. Names go through
    ``ALIASES`` (XBT -> BTC, XDG -> DOGE). A pair without ``wsname`` (the ``.d``
    dark-pool pairs) is keyed ``BASE/QUOTE`` from its REST ``base``/``quote`` with
    the X/Z prefix of 4-letter codes stripped; it never replaces a real ``wsname``.
    Raises ``ValueError`` when the body is not a successful AssetPairs answer.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"AssetPairs body is not JSON: {exc}") from exc
    # "error" lists messages; only those of severity E (not W, warnings) mean failure.
    errors = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or not isinstance(doc.get("result"), dict) or any(
        str(e).startswith("E") for e in errors or ()
    ):
        raise ValueError(f"not an AssetPairs answer (error: {errors!r})")
    markets: dict[str, str] = {}
    derived: dict[str, str] = {}
    for name, pair in doc["result"].items():
        try:
            wsname = pair.get("wsname")
            if wsname:
                base, slash, quote = wsname.partition("/")
                if not (slash and base and quote):
                    raise ValueError(f"wsname {wsname!r} is not BASE/QUOTE")
                markets[wsname] = normalize_symbol(_asset(base), _asset(quote))
            else:
                base, quote = _strip_prefix(pair["base"]), _strip_prefix(pair["quote"])
                derived[f"{base}/{quote}"] = normalize_symbol(_asset(base), _asset(quote))
        except (AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"AssetPairs entry {name!r} has no usable names") from exc
    for wsname, symbol in derived.items():
        markets.setdefault(wsname, symbol)
    return markets


def _decimal(value: object) -> Decimal:
    """A price or volume string as a finite, non-negative ``Decimal``; else ``_Bad``."""
    try:
        number = Decimal(value) if isinstance(value, str) else None
    except InvalidOperation:
        number = None
    # only a string with a minus sign can be negative (comparing costs more)
    if number is None or not number.is_finite() or ("-" in value and number < 0):  # type: ignore[operator]
        raise _Bad(f"not a decimal price or volume: {value!r}")
    return number


def _check(value: object) -> None:
    """``_decimal(value)`` without its result: a plain string of ASCII digits with at
    most one dot (and a digit) is one, and is told without parsing it."""
    if type(value) is str and value.isascii() and value.replace(".", "", 1).isdigit():
        return
    _decimal(value)


def _time(value: object) -> float:
    """A Kraken time string (``"1618678142.557535"``, epoch s) as a float; else ``_Bad``."""
    try:
        seconds = float(value) if isinstance(value, str) else math.nan
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise _Bad(f"not a time: {value!r}")
    return seconds


def _trade_time(value: object) -> tuple[int, float, str]:
    """A trade time, a string (WebSocket) or a number (REST, read as ``Decimal``), in
    epoch seconds rounded to the microsecond: as integer microseconds, as a float,
    and as the decimal text of the trade id (six decimals, ``str`` of the rounded
    ``Decimal``); else ``_Bad``. A string of ASCII digits with a dot before six
    digits, as v1 writes them, is at the microsecond already: read, not rounded,
    and it is its own text unless it has a leading zero. The float is the
    microseconds divided by a million: Python divides integers correctly rounded,
    so it is the float nearest the decimal, what ``float`` of the text gives."""
    if type(value) is str and value[-7:-6] == ".":
        digits = value.replace(".", "", 1)
        if digits.isdigit() and digits.isascii():
            micros = int(digits)
            text = value if value[0] not in "0." or value[:2] == "0." else _when_text(micros)
            return micros, micros / 1_000_000, text
    try:
        ok = isinstance(value, str | int | Decimal) and not isinstance(value, bool)
        number = Decimal(value) if ok else None  # type: ignore[arg-type]
        if number is None or not number.is_finite() or number < 0:
            raise _Bad(f"not a trade time: {value!r}")
        when = number.quantize(_MICROSECOND)  # InvalidOperation: beyond 28 digits
    except ArithmeticError as exc:
        raise _Bad(f"not a trade time: {value!r}") from exc
    micros = int(when.scaleb(6))
    return micros, micros / 1_000_000, _when_text(micros)


def _when_text(micros: int) -> str:
    """Microseconds since the epoch as seconds with six decimals (``"1618678142.557535"``)."""
    return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"


def _ns(micros: int) -> int:
    return micros * 1000


def _text(text: str | bytes) -> str:
    return text if isinstance(text, str) else text.decode("utf-8", "replace")


class _Paging:
    """How far the recovery of one pair has read the history (module doc, rule 6);
    the held trades themselves are in its ``TradeTracker``."""

    __slots__ = ("since", "first_page")

    def __init__(self, since: int) -> None:
        self.since = since  # ns, of the page asked for
        self.first_page = True


def _levels(raw: object) -> list[tuple[str, str, float]]:
    """Validated ``[price, volume, time(, "r")]`` levels as ``(price, volume, time)``."""
    if not isinstance(raw, list):
        raise _Bad("book levels are not a list")
    out = []
    for level in raw:
        if not isinstance(level, list) or not 3 <= len(level) <= 4:
            raise _Bad(f"book level of the wrong shape: {level!r}")
        _decimal(level[0])
        _decimal(level[1])
        out.append((level[0], level[1], _time(level[2])))
    return out


def checksum(asks: Iterable[Sequence[str]], bids: Iterable[Sequence[str]]) -> int:
    """Kraken's book checksum of these levels, unsigned 32-bit: the CRC32 of the asks
    (ascending) then the bids (descending), each level as price then volume (its
    first two fields; a time after them is ignored) with ``.`` removed and leading
    zeros stripped, all concatenated (v1 book checksum guide; v2 computes the same
    over prices and quantities written at the pair's precision). The caller passes
    the top 10 levels of each side (``CHECKSUM_LEVELS``)."""
    return zlib.crc32("".join(
        level[0].replace(".", "").lstrip("0") + level[1].replace(".", "").lstrip("0")
        for side in (asks, bids) for level in side
    ).encode())


def book_checksum(book: L2Book) -> int:
    """Kraken's checksum (``checksum``) of the top 10 asks and bids of ``book``."""
    bids, asks = book.top(CHECKSUM_LEVELS)
    return checksum(asks, bids)


#: Strings kept by a feed's ``_Digits`` before it starts over.
DIGITS_MEMORY = 50_000


class _Digits(dict[str, str]):
    """Each price or volume string as Kraken's checksum writes it (``.`` removed,
    leading zeros stripped), computed once per string (``_Fragments`` asks)."""

    def __missing__(self, text: str) -> str:
        if len(self) >= DIGITS_MEMORY:
            self.clear()
        digits = self[text] = text.replace(".", "").lstrip("0")
        return digits


class _Fragments(dict[str, str]):
    """The checksum text of each level of one side (``_Digits`` of its price, then
    of its volume), by price string, made when first asked for; the owner drops a
    price's entry whenever its level changes (``_Top.update``)."""

    __slots__ = ("side", "digits")

    def __init__(self, side: Side, digits: _Digits) -> None:
        super().__init__()
        self.side = side
        self.digits = digits

    def __missing__(self, price: str) -> str:
        if len(self) >= DIGITS_MEMORY:
            self.clear()
        digits = self.digits
        text = self[price] = digits[price] + digits[self.side.size[price]]
        return text


class _Top:
    """The checksum bytes of one side's top 10 levels (``data``) and their prices,
    kept from one update to the next: made again only when the top prices differ
    or one of them was touched."""

    __slots__ = ("prices", "data", "fragments")

    def __init__(self, side: Side, digits: _Digits) -> None:
        self.prices: list[str] | None = None
        self.data = b""
        self.fragments = _Fragments(side, digits)

    def update(self, prices: list[str], touched: list[str]) -> bool:
        """Take the side's top 10 ``prices`` now, after the levels at ``touched``
        changed; whether ``data`` changed."""
        fragments = self.fragments
        if touched:
            for price in touched:
                fragments.pop(price, None)
            if prices == self.prices and not any(map(prices.__contains__, touched)):
                return False
        elif prices == self.prices:
            return False
        self.prices = prices
        self.data = "".join(map(fragments.__getitem__, prices)).encode()
        return True


class _Checksum:
    """Kraken's checksum of one book, kept up to date from the levels each update
    touched: equal to ``book_checksum(book)`` (``reset`` after a snapshot)."""

    __slots__ = ("asks", "bids", "ask_crc")

    def __init__(self, book: L2Book, digits: _Digits) -> None:
        self.asks = _Top(book.ask_side, digits)
        self.bids = _Top(book.bid_side, digits)
        self.ask_crc = 0  # CRC32 of asks.data

    def reset(self) -> None:
        """Forget what was kept: the book was replaced."""
        self.asks.prices = self.bids.prices = None
        self.asks.fragments.clear()
        self.bids.fragments.clear()

    def __call__(self, book: L2Book, asks: list[str], bids: list[str]) -> int:
        """The checksum of ``book``, whose levels at ``asks`` and ``bids`` (price
        strings) may have changed since the last call."""
        if self.asks.update(book.ask_side.first(CHECKSUM_LEVELS), asks):
            self.ask_crc = zlib.crc32(self.asks.data)
        self.bids.update(book.bid_side.last(CHECKSUM_LEVELS), bids)
        return zlib.crc32(self.bids.data, self.ask_crc)


def _id(key: _Key) -> str:
    return f"{_when_text(key[0])}-{key[1]}"


def trade_key(trade: Trade) -> _Key:
    """The ``(time, k)`` key of a Kraken trade, read back from its id (rule 5): the
    time in integer microseconds."""
    when, _, k = trade.id.rpartition("-")
    return int(Decimal(when).scaleb(6)), int(k)


#: v1 trades have no id: ``(time, k)`` orders them, and says nothing of a gap.
TRADE_RULES = TradeRules(key=trade_key)


class KrakenFeed:
    """The protocol state of one Kraken v1 connection (see ``daemon.exchanges.base``).

    ``symbols``: tickwire symbols (``BTC-USD``), each a value of ``markets`` (as from
    ``parse_markets``); ``channels``: a subset of ``("trades", "book", "ticker")``;
    ``depth``: the book subscription depth, one of ``DEPTHS``. Raises ``ValueError``
    on anything else. ``last_heartbeat`` is the ``recv_ts`` of the latest heartbeat
    (``None`` before one), ``system_status`` the latest ``systemStatus`` status,
    ``recovering`` the symbols whose trades are being recovered (module doc, rule 6).
    """

    exchange = "kraken"

    def __init__(
        self, symbols: list[str], channels: list[str], markets: dict[str, str], depth: int = 10
    ) -> None:
        if depth not in DEPTHS:
            raise ValueError(f"Kraken book depth must be one of {DEPTHS}, not {depth!r}")
        unknown = [c for c in channels if c not in _SUBSCRIPTION]
        if unknown:
            raise ValueError(f"unknown channels {unknown}; known: {tuple(_SUBSCRIPTION)}")
        wsnames: dict[str, str] = {}
        for wsname, symbol in markets.items():
            wsnames.setdefault(symbol, wsname)
        missing = [s for s in symbols if s not in wsnames]
        if missing:
            raise ValueError(f"symbols not listed on Kraken: {missing}")
        self.symbols = list(dict.fromkeys(symbols))
        self.channels = list(dict.fromkeys(channels))
        self.depth = depth
        self.stats = FeedCounters()  # the counters; statistics() reads them
        self.last_heartbeat: float | None = None
        self.system_status: str | None = None
        self._wsname = {s: wsnames[s] for s in self.symbols}
        self._symbol = {w: s for s, w in self._wsname.items()}
        self._books = {s: L2Book(depth) for s in self.symbols} if "book" in channels else {}
        self._synced: set[str] = set()
        self._channel_ids: dict[int, tuple[str, str]] = {}  # channelID -> (channel, symbol)
        #: (Kraken subscription name, pair) -> (channel, symbol), for those asked for
        self._routes = {(_SUBSCRIPTION[c], self._wsname[s]): (c, s)
                        for c in self.channels for s in self.symbols}
        self._trade_run: dict[str, _Key] = {}  # symbol -> (time, k) of the connection
        #: per pair: trades delivered (kept across reconnects), recovery, gaps
        self._trades = {
            s: TradeTracker(self.exchange, s, TRADES_LIMIT, self.stats,
                            rules=TRADE_RULES, history=self._history)
            for s in self.symbols
        }
        self._paging: dict[str, _Paging] = {}
        digits = _Digits()  # checksum text of price and volume strings
        self._checksums = {s: _Checksum(book, digits) for s, book in self._books.items()}
        self._to_recover: set[str] = set()  # after a reconnect, until subscribed
        self._opens = 0
        #: what ``on_open`` sends: the same frames on every connection
        self._subscribe = [self._frame("subscribe", c, self.symbols) for c in self.channels]
        self._now = 0.0  # latest time handed in, for events of resync()

    @property
    def recovering(self) -> frozenset[str]:
        """Symbols whose trades are being recovered (their live trades are held)."""
        return frozenset(s for s, tracker in self._trades.items() if tracker.recovering)

    # -- connection ------------------------------------------------------------------

    def statistics(self) -> FeedStatistics:
        """The feed's counters now, frozen (``daemon.exchanges.base.FeedStatistics``)."""
        return self.stats.freeze()

    def url(self, ws_base: str) -> str:
        """The URL to connect to: ``ws_base`` itself (v1 subscribes by message)."""
        return ws_base

    def _frame(self, event: str, channel: str, symbols: list[str]) -> Send:
        depth = {"depth": self.depth} if channel == "book" else {}
        sub = {"name": _SUBSCRIPTION[channel], **depth}
        pairs = [self._wsname[s] for s in symbols]
        return Send(orjson.dumps({"event": event, "pair": pairs, "subscription": sub}).decode())

    def on_open(self, now: float) -> Outputs:
        """Forget every channelID and book, and return what to send on a new connection:
        one ``Send`` subscribe per channel (all pairs), then a ``FeedState``
        ``resyncing`` per book symbol. After a reconnect, each pair with a delivered
        trade will recover the trades missed once its trade subscription is
        confirmed (module doc, rule 6)."""
        self._now = now
        self._opens += 1
        self._channel_ids.clear()
        self._synced.clear()
        self._trade_run.clear()
        for tracker in self._trades.values():
            if tracker.recovery is not None:
                tracker.abandon()  # answers to the old connection's fetches never come
        self._paging.clear()
        self._to_recover = (
            {s for s, tracker in self._trades.items() if tracker.last_key is not None}
            if self._opens > 1 and "trades" in self.channels else set()
        )
        for book in self._books.values():
            book.clear()
        out: Outputs = [*self._subscribe]
        detail = "waiting for the book snapshot"
        return out + [self._state(s, now, "resyncing", detail) for s in self._books]

    def _state(self, symbol: str, ts: float, state: str, detail: str = "") -> FeedState:
        return FeedState(
            exchange=self.exchange, symbol=symbol, ts=ts, recv_ts=ts, state=state, detail=detail
        )

    def resync(self, symbol: str, reason: str, now: float | None = None) -> Outputs:
        """Rebuild one book: ``FeedState`` ``resyncing`` (``detail=reason``) and a
        ``Send`` unsubscribe then subscribe of that pair's book; its updates are
        ignored until Kraken's new snapshot. ``now`` (epoch s) stamps the event and
        defaults to the time of the last call. Raises ``KeyError`` for a symbol
        without a book."""
        if symbol not in self._books:
            raise KeyError(f"no Kraken book for {symbol!r}")
        self.stats.resyncs += 1
        self._synced.discard(symbol)
        self._books[symbol].clear()
        ts = self._now if now is None else now
        return [
            self._state(symbol, ts, "resyncing", reason),
            self._frame("unsubscribe", "book", [symbol]),
            self._frame("subscribe", "book", [symbol]),
        ]

    def on_snapshot(self, symbol: str, body: str | bytes, recv_ts: float) -> Outputs:
        """Nothing: Kraken sends book snapshots over the WebSocket."""
        return []

    def on_trades(self, symbol: str, body: str | bytes, recv_ts: float) -> Outputs:
        """Take one answer of the REST trade history asked for by ``FetchTrades``
        (``{"error": [], "result": {<pair>: [[price, volume, time, side, ordertype,
        misc, id], ...], "last": ns}}``).

        Returns the recovered trades newer than the last delivered, then either the
        ``FetchTrades`` of the next page or the live trades held meanwhile; a
        ``Gap`` where trades may be lost, and ``Malformed`` for an unusable answer
        (module doc, rule 6).
        """
        tracker, paging = self._trades.get(symbol), self._paging.get(symbol)
        if tracker is None or not tracker.recovering or paging is None:
            return []  # not asked for (or asked for by a connection since closed)
        self._now = recv_ts
        last: _Key = tracker.last_key
        try:
            keys, trades = self._history_page(symbol, body, recv_ts)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            out: Outputs = [
                malformed(self.stats, f"bad Trades answer: {exc}", _text(body)),
                tracker.gap(recv_ts, f"trades after {_id(last)} may be missing: "
                            "the trade history could not be read"),
            ]
            out += self._end_recovery(symbol)
            return out
        out = []
        if paging.first_page:
            paging.first_page = False
            newer = [key for key in keys if key > last]
            if newer and last not in keys:
                out.append(tracker.gap(recv_ts, (
                    f"trades between {_id(last)} and {_id(min(newer))} may be missing: "
                    "the trade history does not hold the last trade delivered")))
        out += tracker.recovered(trades, recv_ts)
        if len(keys) >= TRADES_LIMIT:
            since = _ns(keys[-1][0]) - 1000
            if since > paging.since:
                paging.since = since
                out.append(self._fetch_trades(symbol, since))
                return out
            out.append(tracker.gap(recv_ts, (
                f"trades after {_id(keys[-1])} may be missing: a page of "
                f"{TRADES_LIMIT} trades within one microsecond")))
        out += self._end_recovery(symbol)
        return out

    def resume(self, trades: Iterable[Trade]) -> None:
        """``ExchangeFeed.resume``: seed each symbol's trade tracker; the next
        ``on_open`` is a reconnect as far as trades go."""
        for trade in trades:
            tracker = self._trades.get(trade.symbol)
            if tracker is not None:
                tracker.seed(trade)
                self._opens = max(self._opens, 1)

    def book(self, symbol: str) -> L2Book | None:
        """The synced book of ``symbol`` (cut to ``depth``), or ``None`` while unsynced
        or without one."""
        return self._books[symbol] if symbol in self._synced else None

    # -- frames ----------------------------------------------------------------------

    def on_message(self, text: str | bytes, recv_ts: float) -> Outputs:
        """Turn one received text frame into outputs (events, ``Send``, ``Malformed``).

        Never raises on exchange input; see the module docstring for the rules.
        """
        self.stats.messages += 1
        self._now = recv_ts
        if text == _HEARTBEAT:  # the most common frame (one a second), told by its text
            self.last_heartbeat = recv_ts
            return []
        if not isinstance(text, str):
            text = text.decode("utf-8", "replace")
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            return [malformed(self.stats, "not JSON", text)]
        if type(message) is dict:
            event = message.get("event")
            if event == "heartbeat":  # the most common: one a second
                self.last_heartbeat = recv_ts
                return []
            try:
                if event == "subscriptionStatus":  # one per pair and channel
                    return self._on_subscription(message, text)
                return self._on_event(message, text)
            except (TypeError, AttributeError) as exc:  # a field of the wrong type
                return [malformed(self.stats, f"bad event: {exc}", text)]
        if not isinstance(message, list):
            return [malformed(self.stats, "neither an object nor an array", text)]
        route = self._channel_ids.get(message[0]) if message and type(message[0]) is int else None
        try:
            if len(message) < 4:
                raise _Bad("data array too short")
            if route is None:
                raise _Bad(f"unknown channelID {message[0]!r}")
            channel, symbol = route
            if channel == "book":
                return self._on_book(symbol, message[1:-2], recv_ts)
            if channel == "trades":
                return self._on_trades(symbol, message, recv_ts)
            return self._on_ticker(symbol, message, recv_ts)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            out: Outputs = [malformed(self.stats, str(exc), text)]
            book_symbol = self._book_named(message, route)
            if book_symbol is not None:
                out += self.resync(book_symbol, f"malformed book frame: {exc}")
            return out

    def _book_named(self, message: list[Any], route: tuple[str, str] | None) -> str | None:
        """The book a bad data frame concerns: by its channelID, else by the pair it
        names, then only if synced (a stray frame during a resubscription is no news)."""
        if route is not None:
            return route[1] if route[0] == "book" else None
        if len(message) >= 3 and str(message[-2]).startswith("book"):
            named = self._symbol.get(message[-1]) if isinstance(message[-1], str) else None
            return named if named in self._synced else None
        return None

    def _on_event(self, message: dict[str, Any], text: str) -> Outputs:
        event = message.get("event")
        if event == "heartbeat":
            self.last_heartbeat = self._now
        elif event == "systemStatus":
            self.system_status = message.get("status")
        elif event == "subscriptionStatus":
            return self._on_subscription(message, text)
        elif event == "error":
            return [malformed(self.stats, f"error: {message.get('errorMessage')}", text)]
        return []

    def _on_subscription(self, message: dict[str, Any], text: str) -> Outputs:
        """A ``subscriptionStatus``: ``subscribed`` routes the data frames of its
        ``channelID`` to the (channel, pair) it names from now on, if that is one we
        asked for (else ``Malformed``); ``unsubscribed`` stops that; ``error`` is
        ``Malformed``. A trade subscription answered after a reconnect starts the
        pair's recovery (module doc, rule 6)."""
        status = message.get("status")
        sub = message.get("subscription")
        name = sub.get("name") if type(sub) is dict else None
        pair = message.get("pair")
        route = self._routes.get((name, pair)) if type(name) is str and type(pair) is str \
            else None
        # the trade subscription of a reconnected pair is answered: recover its
        # missed trades now (module doc, rule 6); the history is readable either way
        out: Outputs = []
        if self._to_recover and status in ("subscribed", "error") and name == "trade" \
                and route is not None and route[1] in self._to_recover:
            self._to_recover.discard(route[1])
            out += self._trades[route[1]].recover()
        if status == "error":
            reason = f"subscription error: {message.get('errorMessage')}"
            return [malformed(self.stats, reason, text), *out]
        channel_id = message.get("channelID")
        if status == "subscribed":
            if type(channel_id) is not int or route is None:
                return [malformed(self.stats, "subscription not asked for", text)]
            self._channel_ids[channel_id] = route
        elif status == "unsubscribed" and type(channel_id) is int:
            self._channel_ids.pop(channel_id, None)
        return out

    def _on_trades(self, symbol: str, frame: list[Any], recv_ts: float) -> Outputs:
        """``[channelID, [[price, volume, time, side, orderType, misc], ...], "trade",
        pair]`` -> ``Trade``s.

        Kraken v1 has no trade id: the id is ``"<time>-<k>"`` (module doc, rule 5),
        ``k`` counted over this connection's trades of the pair, so ids are
        deterministic and unique as long as trade times do not go backwards. Held
        while the pair recovers; trades not newer than the last delivered dropped.
        """
        if len(frame) != 4 or type(frame[1]) is not list:
            raise _Bad("trade payload is not one list")
        keys, trades = self._read_trades(symbol, frame[1], self._trade_run.get(symbol), recv_ts)
        if keys:
            self._trade_run[symbol] = keys[-1]
        return self._trades[symbol].live(trades, recv_ts, keys)

    def _read_trades(
        self, symbol: str, entries: list[Any], previous: _Key | None, recv_ts: float
    ) -> tuple[list[_Key], list[Trade]]:
        """Trade entries (WebSocket ``[price, volume, time, side, ...]``, or REST rows,
        whose time is a number) that follow the trade keyed ``previous``: their keys
        and ``Trade``s, in order. Raises ``_Bad`` (or ``IndexError``, ``TypeError``,
        ``KeyError``) on a bad entry."""
        keys: list[_Key] = []
        trades: list[Trade] = []
        for entry in entries:
            price, size, time, side = entry[0], entry[1], entry[2], entry[3]
            # _check(price), _check(size), inline
            if not (type(price) is str and price.isascii() and price.replace(".", "", 1).isdigit()):
                _decimal(price)
            if not (type(size) is str and size.isascii() and size.replace(".", "", 1).isdigit()):
                _decimal(size)
            # _trade_time(time), inline for v1's own form (six decimals, no leading zero)
            digits = time.replace(".", "", 1) if type(time) is str and time[-7:-6] == "." else ""
            if digits.isdigit() and digits.isascii() and time[0] not in "0.":
                micros = int(digits)
                ts, text = micros / 1_000_000, time
            else:
                micros, ts, text = _trade_time(time)
            taker = _SIDES.get(side)
            if taker is None:
                raise _Bad(f"trade side {side!r}")
            k = previous[1] + 1 if previous is not None and previous[0] == micros else 0
            previous = (micros, k)
            keys.append(previous)
            trades.append(new_trade("kraken", symbol, ts, recv_ts, f"{text}-{k}", price, size, taker))
        return keys, trades

    def _history(self, tracker: TradeTracker) -> FetchTrades | None:
        """The first history page of a recovery: from a microsecond before the last
        delivered trade (``None``: none delivered, nothing to recover from)."""
        if tracker.last_key is None:
            return None
        since = _ns(tracker.last_key[0]) - 1000
        self._paging[tracker.symbol] = _Paging(since)
        return self._fetch_trades(tracker.symbol, since)

    def _fetch_trades(self, symbol: str, since: int) -> FetchTrades:
        altname = self._wsname[symbol].replace("/", "")
        target = f"{TRADES_TARGET}?pair={altname}&since={since}&count={TRADES_LIMIT}"
        return FetchTrades(symbol, target)

    def _history_page(
        self, symbol: str, body: str | bytes, recv_ts: float
    ) -> tuple[list[_Key], list[Trade]]:
        """The keys and ``Trade``s of a Trades answer, ``k`` counted from its first
        row; raises ``ValueError`` (``_Bad``), ``KeyError``, ... on a bad answer."""
        answer = json.loads(body, parse_float=Decimal)  # times exact, as sent
        errors = answer.get("error") or []
        if any(str(e).startswith("E") for e in errors):
            raise _Bad(f"Kraken error {errors}")
        rows = [v for k, v in answer["result"].items() if k != "last"]
        if len(rows) != 1 or not isinstance(rows[0], list):
            raise _Bad("no list of trades in the result")
        return self._read_trades(symbol, rows[0], None, recv_ts)

    def _end_recovery(self, symbol: str) -> Outputs:
        """Close the recovery: the live trades held meanwhile that are still new."""
        self._paging.pop(symbol, None)
        out: Outputs = []
        out += self._trades[symbol].finish(self._now)
        return out

    def _on_ticker(self, symbol: str, frame: list[Any], recv_ts: float) -> Outputs:
        """``[channelID, {"a": [price, wholeLotVolume, lotVolume], "b": [...], ...},
        "ticker", pair]`` -> ``Ticker``.

        Sizes are the lot volume (index 2), the exact decimal; the whole-lot volume
        (index 1) is its integer part. v1 tickers carry no time: ``ts`` is ``recv_ts``.
        """
        if len(frame) != 4 or type(frame[1]) is not dict:
            raise _Bad("ticker payload is not one object")
        ask, bid = frame[1]["a"], frame[1]["b"]
        _check(bid[0])
        _check(bid[2])
        _check(ask[0])
        _check(ask[2])
        self.stats.tickers += 1
        return [new_ticker("kraken", symbol, recv_ts, recv_ts, bid[0], bid[2], ask[0], ask[2])]

    def _on_book(self, symbol: str, payload: list[Any], recv_ts: float) -> Outputs:
        if not (isinstance(payload[0], dict) if len(payload) == 1 else len(payload) == 2
                and isinstance(payload[0], dict) and isinstance(payload[1], dict)):
            raise _Bad("book payload is not one or two objects")
        if "as" in payload[0] or "bs" in payload[0]:
            return self._on_book_snapshot(symbol, payload, recv_ts)
        if symbol not in self._synced:
            return []  # an update from before the (re)subscription's snapshot
        return self._on_book_update(symbol, payload, recv_ts)

    def _on_book_snapshot(self, symbol: str, payload: list[Any], recv_ts: float) -> Outputs:
        asks, ask_ts = _snapshot_levels(payload[0].get("as", []))
        bids, bid_ts = _snapshot_levels(payload[0].get("bs", []))
        book = self._books[symbol]
        bid_levels, ask_levels = book.load(bids, asks)
        self._checksums[symbol].reset()
        self._synced.add(symbol)
        self.stats.snapshots += 1
        ts = max([t for t in (ask_ts, bid_ts) if t is not None], default=recv_ts)
        return [
            BookSnapshot(exchange=self.exchange, symbol=symbol, ts=ts, recv_ts=recv_ts,
                         bids=bid_levels, asks=ask_levels),
            self._state(symbol, recv_ts, "synced", "snapshot received"),
        ]

    def _on_book_update(self, symbol: str, payload: list[Any], recv_ts: float) -> Outputs:
        """Apply ``{"a": levels}`` and/or ``{"b": levels, "c": checksum}``, verify the
        checksum (always sent by v1; an update without one is applied unverified), and
        publish the complete delta: every touched level with its new size, and the
        levels the depth cut as ``"0"``. ``ts`` is the latest level time.

        Levels are checked as they are applied (a bad one raises, and the caller
        resyncs the book, which clears what was applied): a price already in the
        book was checked when its level was made, a volume is checked by the book,
        and both must be non-negative (a string without ``-`` is)."""
        book = self._books[symbol]
        asks: list[str] = []
        bids: list[str] = []
        latest = -math.inf
        checksum = None
        respelled = book.ask_side.respelled + book.bid_side.respelled
        for part in payload:
            for key, side, touched in (("a", book.ask_side, asks), ("b", book.bid_side, bids)):
                if key not in part:
                    continue
                levels = part[key]
                if type(levels) is not list:
                    raise _Bad("book levels are not a list")
                put = side.set
                for level in levels:
                    if type(level) is not list or not 3 <= len(level) <= 4:
                        raise _Bad(f"book level of the wrong shape: {level!r}")
                    price, volume, when = level[0], level[1], level[2]
                    try:
                        signed = "-" in price or "-" in volume
                    except TypeError:  # not strings
                        signed = True
                    if signed:  # else the book checks them (module doc of daemon.book)
                        _decimal(price)
                        _decimal(volume)
                    try:
                        seconds = float(when) if type(when) is str else math.nan
                    except ValueError:
                        seconds = math.nan
                    if seconds - seconds:  # nan for nan and the infinities, else 0.0
                        _time(when)  # raises _Bad (or takes a str subclass)
                        raise _Bad(f"not a time: {when!r}")
                    if seconds > latest:
                        latest = seconds
                    try:
                        put(price, volume)
                    except BookError:
                        _decimal(price)  # raises _Bad, saying which
                        _decimal(volume)
                        raise
                    touched.append(price)
            checksum = part.get("c", checksum)
        if not asks and not bids:
            raise _Bad("book update without levels")
        if checksum is not None and not (isinstance(checksum, str) and checksum.isascii()
                                         and checksum.isdigit()):
            raise _Bad(f"checksum {checksum!r} is not a decimal integer")
        cut_bids, cut_asks = book.truncate(self.depth)
        if checksum is None:  # v1 always sends one: what was kept starts over
            self._checksums[symbol].reset()
        elif self._checksums[symbol](book, asks, bids) != int(checksum):
            self.stats.checksum_mismatch += 1
            return self.resync(symbol, f"checksum mismatch (Kraken {checksum})")
        else:
            self.stats.checksum_ok += 1
        if respelled != book.ask_side.respelled + book.bid_side.respelled:
            deltas = _respelled_deltas(book, (bids, asks), (cut_bids, cut_asks))
        elif len(bids) + len(asks) == 1 and not cut_bids and not cut_asks:  # the usual
            deltas = ((), ((asks[0], book.ask_side.size.get(asks[0], "0")),)) if asks \
                else (((bids[0], book.bid_side.size.get(bids[0], "0")),), ())
        else:
            deltas = (_delta(book.bid_side, bids, cut_bids),
                      _delta(book.ask_side, asks, cut_asks))
        self.stats.book_updates += 1
        return [new_book_update("kraken", symbol, latest, recv_ts, deltas[0], deltas[1])]


def _snapshot_levels(raw: object) -> tuple[list[Any], float | None]:
    """A snapshot side's ``[price, volume, time(, "r")]`` levels checked as
    ``_levels`` checks them: the ``[price, volume]`` pairs and the latest time
    (``None`` without levels); raises ``_Bad``. A snapshot has a thousand levels:
    they are checked in bulk (strings without ``-``, as the book then checks that
    they are decimals; finite times), and by ``_levels`` when that is not enough."""
    try:
        if type(raw) is not list or not {*map(type, raw)} <= {list} \
                or not {*map(len, raw)} <= {3, 4}:
            raise _Bad("shape")
        prices, volumes = "".join(map(itemgetter(0), raw)), "".join(map(itemgetter(1), raw))
        times = [*map(itemgetter(2), raw)]
        seconds = [*map(float, times)] if {*map(type, times)} <= {str} else []
        if "-" in prices or "-" in volumes or len(seconds) != len(raw) \
                or not all(map(math.isfinite, seconds)):
            raise _Bad("values")
    except (_Bad, TypeError, ValueError):
        levels = _levels(raw)  # raises _Bad, with what is wrong (or takes "-0")
        return [level[:2] for level in levels], max((lv[2] for lv in levels), default=None)
    return [level[:2] for level in raw], max(seconds, default=None)


def _delta(side: Side, touched: list[str], cut: list[tuple[str, str]]) -> Levels:
    """One side of a ``BookUpdate``: each price touched (once) with its size now, or
    ``"0"`` when it is gone, then the levels the depth cut that were not touched."""
    if len(touched) > 1:
        touched = list(dict.fromkeys(touched))
    size = side.size
    delta = [(price, size.get(price, "0")) for price in touched]
    if cut:
        delta += [(price, "0") for price, _ in cut if price not in touched]
    return tuple(delta)


def _respelled_deltas(
    book: L2Book, touched: tuple[list[str], list[str]],
    cut: tuple[list[tuple[str, str]], list[tuple[str, str]]],
) -> tuple[Levels, Levels]:
    """``_delta`` for an update that sent a known price in another spelling: one
    entry per price value (the spelling the book holds), in the order first sent."""
    deltas = []
    for side, prices, gone in zip((book.bid_side, book.ask_side), touched, cut, strict=True):
        now = {Decimal(price): price for price in side.size}
        levels = {Decimal(price): price for price in prices}
        levels.update((Decimal(price), price) for price, _ in gone if Decimal(price) not in levels)
        deltas.append(tuple(
            (now[key], side.size[now[key]]) if key in now else (price, "0")
            for key, price in levels.items()
        ))
    return deltas[0], deltas[1]


if TYPE_CHECKING:
    _CONFORMS: type[ExchangeFeed] = KrakenFeed  # mypy checks KrakenFeed against the Protocol
