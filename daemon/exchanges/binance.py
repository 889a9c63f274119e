"""Binance (and Binance.US) spot market streams, sans-IO.

Source: Binance Spot API docs, "WebSocket Streams" and "How to manage a local order
book correctly" (https://developers.binance.com/docs/binance-spot-api-docs/web-socket-streams).
Binance.US speaks the same protocol on other hosts.

Theory of operation
-------------------
One combined stream (``/stream?streams=a/b/c``) carries, per symbol,
``<sym>@aggTrade`` -> ``Trade``, ``<sym>@bookTicker`` -> ``Ticker`` and
``<sym>@depth@100ms`` -> the L2 book. Each book is kept by Binance's procedure:

1. on connecting, ask for a REST snapshot (``FetchSnapshot`` of
   ``/api/v3/depth?symbol=X&limit=1000``) and buffer the depth events meanwhile;
2. on the snapshot (``lastUpdateId`` L), drop buffered events with ``u <= L``;
   the first event kept must have ``U <= L+1 <= u``; every later one
   ``U == previous u + 1``;
3. a snapshot older than the first buffered event (``U > L+1``) is fetched again;
4. a break of rule 2 is a gap: the book is resynced from a fresh snapshot while
   clients keep the last good book, and get the new one as one ``BookSnapshot``.

Aggregate trade ids (``a``) are contiguous per symbol: a repeated or older id is a
duplicate and dropped. A jump in ids, or a reconnect, starts a recovery from the
REST ``/api/v3/aggTrades`` history (``fromId`` = last id + 1; ``startTime`` = the
exchange time last seen, for a symbol with no trade yet); live trades wait in a
buffer until the recovered ones are out. Ids the history does not have are
reported as a ``Gap``. The bookkeeping (ids delivered, the held trades, the gaps)
is the shared trade tracker's (``daemon.trades``, with ``TRADE_RULES``); the
paging of the history is here.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import TYPE_CHECKING, Any

import orjson

from daemon.book import BookError, L2Book
from daemon.events import BookSnapshot, FeedState, Trade
from daemon.exchanges.base import (
    ExchangeFeed,
    FeedCounters,
    FeedStatistics,
    FetchSnapshot,
    FetchTrades,
    Outputs,
    malformed,
    new_book_update,
    new_ticker,
    new_trade,
)
from daemon.trades import TradeRules, TradeTracker, integer_key

MARKETS_TARGET = "/api/v3/exchangeInfo"
#: Depth of the REST snapshot; 1000 is the deepest at weight 10 (5000 costs 50).
SNAPSHOT_LIMIT = 1000
#: Buffered depth events per symbol while waiting for a snapshot, before restarting.
MAX_BUFFER = 10_000
#: Trades per REST history page (Binance's maximum).
TRADES_LIMIT = 1000

#: Aggregate trade ids (``a``) count up by one per symbol (Binance Spot API,
#: "Aggregate trade streams" and ``GET /api/v3/aggTrades``).
TRADE_RULES = TradeRules(key=integer_key, contiguous=True)

_STREAMS = {"trades": "aggTrade", "ticker": "bookTicker", "book": "depth@100ms"}


def parse_markets(body: str | bytes) -> dict[str, str]:
    """Map Binance symbol ids to tickwire symbols from ``/api/v3/exchangeInfo``.

    ``{"NKNUSDT": "NKN-USDT", ...}``; assets go through ccxt's common currency codes
    (``BCHSV`` is ``BSV``), so symbols agree with the ccxt collectors. Raises
    ``ValueError`` on a body that is not an exchangeInfo answer.
    """
    import ccxt  # sync client only for its currency table

    try:
        info = orjson.loads(body)
        entries = info["symbols"]
        code = ccxt.binance().safe_currency_code
        return {
            m["symbol"]: f"{code(m['baseAsset'])}-{code(m['quoteAsset'])}" for m in entries
        }
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"not an exchangeInfo answer: {exc}") from exc


class _BookSync:
    """Sync state of one symbol's book (see the module's theory of operation)."""

    __slots__ = ("book", "synced", "fetching", "buffer", "last_u", "need_first", "ts")

    def __init__(self) -> None:
        self.book = L2Book()
        self.synced = False
        self.fetching = False
        self.buffer: list[dict[str, Any]] = []
        self.last_u = 0
        self.need_first = True
        self.ts = 0.0


class BinanceFeed:
    """The protocol of one Binance combined-stream connection.

    ``symbols``: tickwire symbols (``NKN-USDT``); ``channels``: a subset of
    ``("trades", "book", "ticker")``; ``markets``: ``parse_markets``' mapping;
    ``exchange``: ``"binance"`` or ``"binanceus"``. Raises ``ValueError`` for a
    symbol the markets do not list or an unknown channel.
    """

    def __init__(
        self,
        symbols: list[str],
        channels: list[str],
        markets: dict[str, str],
        exchange: str = "binance",
    ) -> None:
        self.exchange = exchange
        self.channels = list(channels)
        unknown = set(channels) - set(_STREAMS)
        if unknown:
            raise ValueError(f"unknown channels for {exchange}: {sorted(unknown)}")
        by_symbol = {symbol: native for native, symbol in markets.items()}
        missing = [s for s in symbols if s not in by_symbol]
        if missing:
            raise ValueError(f"{exchange} lists no market {', '.join(missing)}")
        self.native = {s: by_symbol[s] for s in symbols}  # NKN-USDT -> NKNUSDT
        self.symbols = {native: s for s, native in self.native.items()}
        #: the streams of the URL -> (kind, symbol); any other reads as on_message says
        self._routes = {f"{native.lower()}@{kind}": (kind, s)
                        for s, native in self.native.items() for kind in _STREAMS.values()}
        self.stats = FeedCounters()  # the counters; statistics() reads them
        self.books: dict[str, _BookSync] = {}
        #: per symbol: trades delivered, recovery window, gaps (``daemon.trades``)
        self.trades = {
            symbol: TradeTracker(exchange, symbol, TRADES_LIMIT, self.stats,
                                 rules=TRADE_RULES, history=self._history)
            for symbol in self.native
        }
        self.opens = 0
        self.last_exchange_ms = 0  # the latest exchange time seen (any stream)

    # -- connection -----------------------------------------------------------------

    def statistics(self) -> FeedStatistics:
        """The feed's counters now, frozen (``daemon.exchanges.base.FeedStatistics``)."""
        return self.stats.freeze()

    def url(self, ws_base: str) -> str:
        """The combined stream URL for every subscription, under ``ws_base``."""
        streams = "/".join(
            f"{native.lower()}@{_STREAMS[channel]}"
            for channel in ("book", "ticker", "trades")
            if channel in self.channels
            for native in self.native.values()
        )
        return f"{ws_base.rstrip('/')}/stream?streams={streams}"

    def on_open(self, now: float) -> Outputs:
        """A (re)connection: every book starts unsynced (subscriptions are in the
        URL); after a reconnect, the trades missed meanwhile are fetched."""
        out: Outputs = []
        self.opens += 1
        # recoveries in flight died with the connection: what they held goes on
        held_before = {symbol: tracker.abandon() for symbol, tracker in self.trades.items()}
        if self.opens > 1 and "trades" in self.channels:
            for tracker in self.trades.values():
                out += tracker.recover()
        for symbol, held in held_before.items():
            tracker = self.trades[symbol]
            if tracker.recovering:
                tracker.hold(held)
            elif held:
                out += tracker.deliver(sorted(held, key=TRADE_RULES.key), now)
        self.books = {}
        if "book" in self.channels:
            for symbol in self.native:
                sync = self.books[symbol] = _BookSync()
                out.append(self._state(symbol, now, "resyncing", "connected"))
                out += self._fetch(symbol, sync)  # events are buffered meanwhile
        return out

    def resume(self, trades: Iterable[Trade]) -> None:
        """``ExchangeFeed.resume``: seed each symbol's trade tracker; the next
        ``on_open`` is a reconnect as far as trades go."""
        for trade in trades:
            tracker = self.trades.get(trade.symbol)
            if tracker is not None:
                tracker.seed(trade)
                self.opens = max(self.opens, 1)

    def book(self, symbol: str) -> L2Book | None:
        """The book of ``symbol`` when synced, else ``None``."""
        sync = self.books.get(symbol)
        return sync.book if sync is not None and sync.synced else None

    def resync(self, symbol: str, reason: str, now: float = 0.0) -> Outputs:
        """Drop the book of ``symbol`` and fetch a fresh snapshot (``now``: epoch s)."""
        sync = self.books.get(symbol)
        if sync is None:
            return []
        self.stats.resyncs += 1
        sync.synced = False
        sync.need_first = True
        sync.buffer = []
        return [self._state(symbol, now, "resyncing", reason), *self._fetch(symbol, sync)]

    # -- frames -----------------------------------------------------------------------

    def on_message(self, text: str | bytes, recv_ts: float) -> Outputs:
        """Turn one combined-stream frame into outputs (see the module docstring)."""
        self.stats.messages += 1
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            return [malformed(self.stats, f"not JSON: {exc}", _text(text))]
        if isinstance(frame, dict) and "result" in frame and "id" in frame:
            return []  # the answer to a SUBSCRIBE request
        try:
            stream: str = frame["stream"]
            data = frame["data"]
            if not isinstance(stream, str) or not isinstance(data, dict):
                raise TypeError("stream or data of the wrong type")
        except (KeyError, TypeError) as exc:
            return [malformed(self.stats, f"not a stream frame: {exc!r}", _text(text))]
        route = self._routes.get(stream)
        if route is None:
            name, _, kind = stream.partition("@")
            symbol = self.symbols.get(name.upper())
            if symbol is None:
                return [malformed(self.stats, f"unknown stream {stream!r}", _text(text))]
        else:
            kind, symbol = route
        try:
            if kind == "aggTrade":
                return self._trade(symbol, data, recv_ts)
            if kind == "bookTicker":
                return self._ticker(symbol, data, recv_ts)
            if kind.startswith("depth"):
                return self._depth(symbol, data, recv_ts)
        except (KeyError, TypeError, ValueError) as exc:
            out: Outputs = [malformed(self.stats, f"bad {kind} data: {exc!r}", _text(text))]
            if kind.startswith("depth") and symbol in self.books:
                out += self.resync(symbol, "malformed depth event", recv_ts)
            return out
        return []  # a stream we did not ask for (kline): nothing to do

    def _trade(self, symbol: str, d: dict[str, Any], recv_ts: float) -> Outputs:
        trade = self._parse_trade(symbol, d, recv_ts)
        self.last_exchange_ms = max(self.last_exchange_ms, int(d["T"]))
        return self.trades[symbol].live([trade], recv_ts)

    def _parse_trade(self, symbol: str, d: dict[str, Any], recv_ts: float) -> Trade:
        return new_trade(
            self.exchange, symbol, int(d["T"]) / 1000, recv_ts, str(int(d["a"])),
            _dec(d["p"]), _dec(d["q"]),
            "sell" if d["m"] else "buy",  # m: the buyer is the maker, so the taker sold
        )

    def _history(self, tracker: TradeTracker) -> FetchTrades | None:
        """The first ``aggTrades`` page of a recovery: from the id after the last
        delivered, else from the exchange time last seen on any stream (``None``:
        nothing seen yet, nothing to recover from)."""
        last = tracker.last_key
        if last is not None:
            since = f"fromId={last + 1}"
        elif self.last_exchange_ms:
            since = f"startTime={self.last_exchange_ms}"
        else:
            return None
        native = self.native[tracker.symbol]
        return FetchTrades(tracker.symbol, f"/api/v3/aggTrades?symbol={native}&{since}&limit={TRADES_LIMIT}")

    def on_trades(self, symbol: str, body: str | bytes, recv_ts: float) -> Outputs:
        """Deliver recovered trades from an ``aggTrades`` page
        (``[{"a": id, "p", "q", "T", "m"}, ...]``), then the live trades held
        meanwhile; a full page asks for the next one; ids still missing before the
        first held trade are reported as a ``Gap``."""
        tracker = self.trades.get(symbol)
        if tracker is None or not tracker.recovering:
            return []
        try:
            page = orjson.loads(body)
            recovered = [self._parse_trade(symbol, d, recv_ts) for d in page]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            recovered, page = [], []
            out: Outputs = [malformed(self.stats, f"bad aggTrades page: {exc!r}", _text(body))]
        else:
            out = []
        first_held = tracker.first_held()
        if first_held is not None:
            recovered = [t for t in recovered if int(t.id) < first_held]
        out += tracker.recovered(recovered, recv_ts)
        last = tracker.last_key
        if len(page) >= TRADES_LIMIT and (first_held is None or (last or 0) + 1 < first_held):
            held = tracker.abandon()  # the next page, from the new last id
            out += tracker.recover()
            tracker.hold(held)
            return out
        out += tracker.finish(recv_ts)
        return out

    def _ticker(self, symbol: str, d: dict[str, Any], recv_ts: float) -> Outputs:
        ts = int(d["E"]) / 1000 if "E" in d else recv_ts  # spot bookTicker has no time
        ticker = new_ticker(self.exchange, symbol, ts, recv_ts,
                            _dec(d["b"]), _dec(d["B"]), _dec(d["a"]), _dec(d["A"]))
        self.stats.tickers += 1
        return [ticker]

    def _depth(self, symbol: str, d: dict[str, Any], recv_ts: float) -> Outputs:
        exchange_ms = int(d["E"])
        if exchange_ms > self.last_exchange_ms:
            self.last_exchange_ms = exchange_ms
        sync = self.books.get(symbol)
        if sync is None:
            return []
        event = {
            "U": int(d["U"]),
            "u": int(d["u"]),
            "b": _levels(d["b"]),
            "a": _levels(d["a"]),
            "ts": exchange_ms / 1000,
            "recv_ts": recv_ts,
        }
        if not sync.synced:
            if len(sync.buffer) >= MAX_BUFFER:
                sync.buffer.clear()
                sync.fetching = False
            sync.buffer.append(event)
            return self._fetch(symbol, sync)
        return self._apply(symbol, sync, event, emit=True)

    def _apply(self, symbol: str, sync: _BookSync, e: dict[str, Any], *, emit: bool) -> Outputs:
        first_u, last_u = e["U"], e["u"]
        if last_u <= sync.last_u:
            return []  # already in the book
        if sync.need_first:
            in_order = first_u <= sync.last_u + 1 <= last_u
        else:
            in_order = first_u == sync.last_u + 1
        if not in_order:
            self.stats.gaps += 1
            detail = f"gap: expected U={sync.last_u + 1}, got U={first_u}"
            out = self.resync(symbol, detail, e["recv_ts"])
            sync.buffer.append(e)
            return out
        try:
            sync.book.apply(e["b"], e["a"])
        except BookError as exc:
            self.stats.malformed += 1
            return self.resync(symbol, f"bad level: {exc}", e["recv_ts"])
        sync.last_u = last_u
        sync.need_first = False
        sync.ts = e["ts"]
        if not emit:
            return []
        self.stats.book_updates += 1
        return [new_book_update(self.exchange, symbol, e["ts"], e["recv_ts"], e["b"], e["a"])]

    # -- REST snapshots -------------------------------------------------------------

    def _fetch(self, symbol: str, sync: _BookSync) -> Outputs:
        if sync.fetching:
            return []
        sync.fetching = True
        target = f"/api/v3/depth?symbol={self.native[symbol]}&limit={SNAPSHOT_LIMIT}"
        return [FetchSnapshot(symbol=symbol, target=target)]

    def on_snapshot(self, symbol: str, body: str | bytes, recv_ts: float) -> Outputs:
        """Apply a REST depth snapshot (``{"lastUpdateId": L, "bids": [...], "asks": [...]}``)
        and the buffered events after it; returns ``BookSnapshot`` + ``FeedState`` when
        the book is whole, or another ``FetchSnapshot`` when the snapshot is too old
        or unusable."""
        sync = self.books.get(symbol)
        if sync is None or sync.synced:
            return []
        sync.fetching = False
        try:
            snap = orjson.loads(body)
            last_update_id = int(snap["lastUpdateId"])
            try:
                levels = sync.book.load(_strings(snap["bids"]), _strings(snap["asks"]))
            except (TypeError, ValueError):  # BookError too
                _levels(snap["bids"])  # the first fault, as checking level by level finds it
                _levels(snap["asks"])
                raise
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return [malformed(self.stats, f"bad depth snapshot: {exc!r}", _text(body)),
                    *self._fetch(symbol, sync)]
        buffered = [e for e in sync.buffer if e["u"] > last_update_id]
        if buffered and buffered[0]["U"] > last_update_id + 1:
            # the snapshot is older than the first event we hold: ask again
            sync.buffer = buffered
            return self._fetch(symbol, sync)
        sync.buffer = []
        sync.last_u = last_update_id
        sync.need_first = True
        sync.ts = recv_ts
        sync.synced = True
        for e in buffered:
            out = self._apply(symbol, sync, e, emit=False)
            if out:  # a gap inside the buffer: resync started again
                return out
        self.stats.snapshots += 1
        bids, asks = sync.book.levels() if buffered else levels
        return [
            BookSnapshot(
                exchange=self.exchange, symbol=symbol, ts=sync.ts, recv_ts=recv_ts,
                bids=bids, asks=asks,
            ),
            self._state(symbol, recv_ts, "synced", f"lastUpdateId {sync.last_u}"),
        ]

    def _state(self, symbol: str, now: float, state: str, detail: str) -> FeedState:
        return FeedState(
            exchange=self.exchange, symbol=symbol, ts=now, recv_ts=now, state=state, detail=detail
        )


def _levels(raw: Any) -> tuple[tuple[str, str], ...]:
    """``[[price, size], ...]`` as a tuple of ``(price, size)`` string pairs; raises
    ``TypeError`` or ``ValueError`` otherwise (the book checks the decimals)."""
    try:
        levels = tuple(map(tuple, raw))
    except TypeError:  # a level that is no sequence: said below
        levels = ((),)
    for level in levels:  # a depth event has a few levels: checked one by one
        if len(level) != 2 or type(level[0]) is not str or type(level[1]) is not str:
            return tuple((_dec(price), _dec(size)) for price, size in raw)  # raises (or subclasses)
    return levels


def _strings(raw: Any) -> Any:
    """``raw``, a snapshot side ``[[price, size], ...]``, checked to hold only strings
    (in bulk, by joining them: it has a thousand levels; ``L2Book.load`` checks
    that each is a pair of decimals); raises ``TypeError`` otherwise."""
    "".join(chain.from_iterable(raw))
    return raw


def _dec(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a decimal string, got {value!r}")
    return value


def _text(text: str | bytes) -> str:
    return text if isinstance(text, str) else text.decode("utf-8", "replace")


if TYPE_CHECKING:
    _CONFORMS: type[ExchangeFeed] = BinanceFeed  # mypy checks BinanceFeed against the Protocol
