"""The ccxt.pro collector (mode ``watch``): any exchange ccxt streams over WebSocket,
behind a thread bridge.

Theory of operation
-------------------
ccxt.pro is asyncio-only; tickwire is trio. The two meet in a *bridge*:

1. One worker thread per exchange runs its own asyncio event loop
   (``asyncio.new_event_loop()``). The ccxt.pro exchange object is created, used
   and closed (``await exchange.close()``) inside that loop only.
2. In that loop, one asyncio task per watch: ``watch_trades(symbol)`` and
   ``watch_order_book(symbol, depth)`` per symbol, and ``watch_bids_asks(symbols)``
   for all symbols where the exchange has it, else ``watch_ticker(symbol)`` per
   symbol. When a watch returns, the task copies what ccxt returned *before its
   next await* (ccxt mutates its book sides and trade lists in place; nothing can
   change them while the task runs) and hands the copy to trio.
3. The hand-off (``HandOff``) puts each item into a bounded trio memory channel
   (``buffer``) without a round trip between the threads: the worker takes one of
   ``buffer`` slots (a ``threading.Semaphore``), then schedules the item's
   ``send_nowait`` in trio (``TrioToken.run_sync_soon``, in order); trio gives the
   slot back when it receives the item. With every slot taken the worker thread
   blocks, and with it the whole asyncio loop: ccxt reads no socket until trio
   has taken an item, so backpressure reaches the exchange's TCP window and
   nothing is dropped (ccxt's caches only fill while its loop runs, and it does not
   run while blocked).
4. The trio side (``WatchCollector.run``) takes the items in order, turns them into
   events with the pure functions below, and sends them to the dispatcher (which
   waits when full: the channel fills, the worker waits, ccxt waits).

Stopping: cancelling ``run`` closes the hand-off, so a worker waiting for a slot
raises ``ClosedResourceError``, and asks the loop (``call_soon_threadsafe``) to
set its stop event; either ends the watch
tasks (an ``asyncio.TaskGroup``), then the loop closes the exchange (its
WebSocket clients and HTTP session), shuts down its default executor and closes.
The worker's last act closes the channel's sending end. trio joins the thread
from a worker of its own (``trio.to_thread.run_sync(thread.join, timeout)``,
shielded, so trio's thread never blocks) for at most ``JOIN_TIMEOUT`` seconds.
No thread, socket or task outlives the collector.

Recovery, owned by tickwire (ccxt.pro raises where a native collector recovers):

- A book gap (ccxt's ``InvalidNonce``, including ``ChecksumError``) is counted
  (``gaps``, ``resyncs``), the book's stream gets ``FeedState`` ``resyncing`` and
  the watch starts again after the shared backoff (``daemon.supervise.Backoff``):
  ccxt subscribes again and builds a new book from a fresh snapshot. Clients keep
  the last good book meanwhile; the first whole book after it goes out as one
  ``BookSnapshot`` (and ``synced``).
- A lost connection (ccxt's ``NetworkError`` and kin, mapped by
  ``daemon.errors.ccxt_errors``) makes the feed ``reconnecting`` and the watch
  starts again after the backoff; books rebuild as above. A watch counts as up
  again at its first result, or once it waited ``SETTLE`` seconds without an error
  (a quiet symbol); when every watch is up the feed is ``subscribed`` again.
- Trades: once a trade watch is up again, the trades since the newest one
  delivered are fetched through ccxt's REST ``fetch_trades`` (up to
  ``RECOVERY_PAGES`` pages); the collector's ``TradeTracker`` (from the poll mode)
  drops every id already delivered, across re-watches and restarts, and reports
  what cannot have been covered as a ``Gap``, as does an exchange without REST
  trades. A live batch as large as ccxt's trade cache (``tradesLimit``, set to the
  REST page size) may have lost trades in ccxt's cache: ``Gap`` too.
- A frame ccxt cannot parse kills that connection's ccxt receive loop (an
  exception in an asyncio callback): the loop's exception handler counts it
  (``malformed``), and ccxt's keepalive, set to ``stale_after / 2``, declares the
  connection dead after two missed pongs (``RequestTimeout``): re-watch as above.

Books: ccxt keeps floats only, so a level's price and size are written from the
float as the poll mode does (``decimal_text``: the shortest decimal of the float,
the exchange's trailing zeros lost). Updates go out as complete ``BookUpdate``
deltas (changed levels, removed ones as size ``"0"``), never as a snapshot per
update (O(depth) on the wire to every client). The deltas come two ways:

- ccxt's standard order book (``exchange.order_book``, what most exchanges use)
  is built here with sides that note every price ccxt stores or truncates
  (``TrackedBids`` / ``TrackedAsks``): a result hands over only those prices and
  their sizes now, O(changes x log depth), and the trio side applies them to its
  copy. Measured at depth 1000: copying a side costs ~150 us and diffing two
  copies ~300 us, so a full copy and diff per update would cap a core near 1,000
  book updates per second.
- any other book (ccxt's counted and indexed books), and the first result after a
  (re-)subscribe or a ``reset`` of the book by ccxt, is copied whole (a dict per
  side) and diffed against the previous copy (``side_delta``), O(depth).

Tickers: ccxt resolves one future per message, and a ticker that arrives while
nobody awaits it only lands in ccxt's cache (``bidsasks`` / ``tickers``). So after
every result the task reads the cache of every symbol and hands over those that
changed: the latest best bid/offer of each symbol is never missed (older ones may
conflate, as a ticker stream may).

Binance: ccxt.pro's ``watch_trades`` subscribes ``<symbol>@trade`` (raw trade ids),
while the native collector and ccxt's REST ``fetch_trades`` use aggregate trades.

Coinbase (tickwire's ``coinbase`` is ccxt's ``coinbaseexchange``): ccxt.pro signs
``level2`` subscriptions, so with overridden URLs (the emulator) it gets
placeholder credentials (``SIGNS_PUBLIC``); a real feed needs real ones. ccxt.pro
drops ``last_match`` (the product's last trade, sent on subscribe), which the
native collector delivers: tickwire's subclass hands it to ccxt's ``match``
handler (``_pro_class``). The 2021 ``ticker`` channel has no sizes: such tickers
go out with sizes ``""``, as the native collector writes them
(``watch_ticker_event``).

Kraken: ccxt.pro speaks WebSocket v2, where prices and sizes are JSON numbers:
trades and tickers are written from floats too. Its ``watch_bids_asks`` keeps
results in ``exchange.tickers``, read when ``bidsasks`` lacks the symbol. Its book
checksum check is off by default (and in ccxt 4.5 cannot run on its float levels),
so a Kraken book gap shows only as a closed connection. ccxt paces WebSocket
requests with the REST rate limit (Kraken: one a second); a Kraken subscribe
request counts as a tenth of a call here (``WS_SUBSCRIBE_COST``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import trio

from daemon.collectors.base import BridgeStatistics, CollectorStatistics
from daemon.collectors.poll import (
    TIMEOUT_MS,
    TRADES_LIMIT,
    TRADES_LIMITS,
    TradeTracker,
    _rebase,
    ccxt_symbol,
    decimal_text,
    ticker_event,
)
from daemon.collectors.state import CollectorState
from daemon.config import ExchangeConfig, ReconnectConfig
from daemon.dispatch import Source
from daemon.errors import FeedDisconnected, FeedError, ccxt_errors
from daemon.events import BookSnapshot, BookUpdate, Event, FeedState, Gap, Levels, Ticker
from daemon.exchanges.base import FeedStats
from daemon.supervise import Backoff, Failure, retry

log = logging.getLogger(__name__)

#: Items the bridge's channel holds before the worker thread waits.
BRIDGE_BUFFER = 64
#: Seconds between a waiting worker's looks at whether the hand-off was closed.
HAND_OFF_POLL = 0.05
#: Seconds trio waits for the worker thread to end after a stop.
JOIN_TIMEOUT = 10.0
#: Seconds an exchange gets to close its connections and session.
CLOSE_TIMEOUT = 5.0
#: Seconds without an error after which a (re-)started watch counts as up.
SETTLE = 1.0
#: REST pages of trades fetched at most to recover a re-watch.
RECOVERY_PAGES = 3
#: Channels this collector can watch.
WATCH_CHANNELS = ("trades", "book", "ticker")
#: Prefix of the worker threads' names.
THREAD_PREFIX = "tickwire-watch"
#: ccxt ids whose ccxt.pro signs public subscriptions: ``coinbaseexchange`` signs
#: ``level2`` (``watch_order_book`` calls ``authenticate()``).
SIGNS_PUBLIC = frozenset({"coinbaseexchange"})
#: ccxt.pro spaces WebSocket subscribe requests with the exchange's REST rate limit
#: (a request costs ``options["ws"]["cost"]`` of it, 1 by default): Kraken's is one
#: call a second, so 3 channels x 7 pairs took 20 s to subscribe, at start and after
#: every reconnect. Kraken documents no fixed message rate for its spot WebSocket
#: (a limit that varies with load, answered with ``Exceeded msg rate``:
#: https://docs.kraken.com/api/docs/guides/spot-ratelimits); a tenth of a call each
#: is 10 subscribe requests a second, a start of 21 in about 2 s. A refused
#: subscription fails its watch, which is watched again with backoff.
WS_SUBSCRIBE_COST = {"kraken": 0.1}
#: The ``secret`` given to ccxt.pro on overridden URLs (``make_pro_exchange``):
#: base64, as Coinbase's HMAC key must be.
PLACEHOLDER_SECRET = "dGlja3dpcmUtZW11bGF0b3I="


# -- pure normalization: no threads, no trio, no ccxt -------------------------------------


def level_text(value: float) -> str:
    """A ccxt float as a decimal string, as the poll mode writes it."""
    text = decimal_text(None, (), value)
    if text is None:
        raise ValueError(f"not a finite number: {value!r}")
    return text


def copy_side(side: Any) -> dict[float, float]:
    """A copy of one ccxt book side (``[[price, size, ...], ...]``): ``{price: size}``."""
    return {level[0]: level[1] for level in side}


def side_levels(side: dict[float, float], descending: bool) -> Levels:
    """All levels of a copied side, best first, as decimal strings."""
    return tuple(
        (level_text(price), level_text(size))
        for price, size in sorted(side.items(), reverse=descending)
    )


def side_delta(old: dict[float, float], new: dict[float, float], descending: bool) -> Levels:
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

    def __init__(self, exchange: str, symbol: str, stats: FeedStats) -> None:
        self.exchange = exchange
        self.symbol = symbol
        self.stats = stats
        self.synced = False
        self.bids: dict[float, float] = {}
        self.asks: dict[float, float] = {}

    def book(self, bids: dict[float, float], asks: dict[float, float], ts: float,
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

    def changes(self, bids: dict[float, float], asks: dict[float, float], ts: float,
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


def tracked_order_book(snapshot: dict | None = None, depth: int | None = None) -> Any:
    """ccxt's ``OrderBook`` with sides that note what changes (``exchange.order_book``
    replacement, in the worker thread)."""
    return _tracked_classes()[0](snapshot or {}, depth)


_TRACKED: tuple | None = None


def _tracked_classes() -> tuple:
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

        def storeArray(self, delta: list) -> None:  # noqa: N802 - ccxt's name
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

        def changes(self) -> dict[float, float]:
            """``{price: size now (0.0: gone)}`` of the prices noted since the last
            call; ``whole`` and ``dirty`` start over."""
            keys = self._index  # type: ignore[attr-defined]
            out: dict[float, float] = {}
            for price in self.dirty:
                key = -price if self.side else price  # type: ignore[attr-defined]
                at = bisect_left(keys, key)
                found = at < len(keys) and keys[at] == key
                out[price] = self[at][1] if found else 0.0  # type: ignore[index]
            self.dirty = set()
            self.whole = False
            return out

    class TrackedBids(_Tracking, Bids):
        def __init__(self, deltas: Any = (), depth: int | None = None) -> None:
            self._track()
            Bids.__init__(self, list(deltas), depth)

    class TrackedAsks(_Tracking, Asks):
        def __init__(self, deltas: Any = (), depth: int | None = None) -> None:
            self._track()
            Asks.__init__(self, list(deltas), depth)

    class TrackedOrderBook(OrderBook):
        def __init__(self, snapshot: dict | None = None, depth: int | None = None) -> None:
            snapshot = dict(snapshot or {})
            snapshot["bids"] = TrackedBids(snapshot.get("bids", []), depth)
            snapshot["asks"] = TrackedAsks(snapshot.get("asks", []), depth)
            super().__init__(snapshot, depth)

    _TRACKED = (TrackedOrderBook, TrackedBids, TrackedAsks)
    return _TRACKED


def watch_ticker_event(exchange: str, symbol: str, ticker: dict[str, Any],
                       recv_ts: float) -> Ticker | None:
    """A ``Ticker`` from a ccxt.pro ticker, as the poll mode makes it
    (``ticker_event``); a ticker with both prices but no sizes (Coinbase's 2021
    ``ticker`` channel had none) has sizes ``""``, as the native collector writes
    them. ``None`` when a price is missing."""
    event = ticker_event(exchange, symbol, ticker, recv_ts)
    if event is not None or ticker.get("bidVolume") is not None or ticker.get(
            "askVolume") is not None:
        return event
    bare = ticker_event(exchange, symbol, {**ticker, "bidVolume": 0.0, "askVolume": 0.0},
                        recv_ts)
    return None if bare is None else attrs.evolve(bare, bid_size="", ask_size="")


def trades_gap(exchange: str, symbol: str, detail: str, now: float) -> Gap:
    """A ``Gap`` of trades whose ids are unknown."""
    return Gap(exchange=exchange, symbol=symbol, ts=now, recv_ts=now, stream="trades",
               detail=detail)


def rebase_urls(urls: Any, rest_url: str, ws_url: str) -> Any:
    """ccxt's ``urls["api"]`` (a string or nested dicts) with every ``http(s)`` URL
    rebased on ``rest_url`` (path kept) and every ``ws(s)`` URL on ``ws_url`` with
    the original host kept as the first path segment, since ccxt tells a market's
    type from its URL: ``wss://stream.binance.com:9443/ws`` ->
    ``ws://127.0.0.1:5001/stream.binance.com/ws``. An empty base keeps the URL."""
    if isinstance(urls, dict):
        return {key: rebase_urls(value, rest_url, ws_url) for key, value in urls.items()}
    if not isinstance(urls, str) or "://" not in urls:
        return urls
    scheme, rest = urls.split("://", 1)
    if scheme in ("ws", "wss"):
        if not ws_url:
            return urls
        hostport, slash, path = rest.partition("/")
        return f"{ws_url.rstrip('/')}/{hostport.split(':')[0]}{slash}{path}"
    return _rebase(urls, rest_url) if rest_url else urls


def _pro_class(exchange_id: str) -> type:
    """ccxt.pro's exchange class for ``exchange_id``, or tickwire's subclass of it
    where ccxt.pro drops part of the public stream (see the module doc)."""
    import ccxt.pro

    base = getattr(ccxt.pro, exchange_id)
    if exchange_id != "coinbaseexchange":
        return base

    class CoinbaseExchange(base):  # type: ignore[misc, valid-type]
        """``coinbaseexchange`` that hands ``last_match`` (the product's last trade,
        which Coinbase sends once on a ``matches`` subscription) to ccxt's own
        ``match`` handler: ccxt.pro ignores the message type."""

        def handle_message(self, client: Any, message: Any) -> Any:
            if (isinstance(message, dict) and message.get("type") == "last_match"
                    and not client.url.endswith("?")):  # "?": ccxt's private feed
                return self.handle_trade(client, message)
            return super().handle_message(client, message)

    return CoinbaseExchange


def make_pro_exchange(
    exchange_id: str, rest_url: str = "", ws_url: str = "", *, keepalive_ms: int | None = None,
    trades_limit: int | None = None, config: dict[str, Any] | None = None,
) -> Any:
    """ccxt.pro's exchange object for ``exchange_id``: our REST timeout, spot markets
    only, URLs rebased (``rebase_urls``), WebSocket keepalive at most
    ``keepalive_ms``, trade cache of ``trades_limit``; ``config``: more of ccxt's
    constructor settings (``{"rateLimit": ms}``...). Call it inside the asyncio
    loop that will use it. Raises ``ValueError`` for an id ccxt.pro does not know."""
    import ccxt.pro

    if exchange_id not in ccxt.pro.exchanges:
        raise ValueError(f"ccxt.pro streams no exchange {exchange_id!r}")
    api = _pro_class(exchange_id)({"timeout": TIMEOUT_MS, **(config or {})})
    # only spot markets, as in the poll mode: tickwire's BASE-QUOTE are spot symbols
    markets_option = api.options.get("fetchMarkets")
    if isinstance(markets_option, dict) and "types" in markets_option:
        markets_option["types"] = ["spot"]
    elif isinstance(markets_option, list) and "spot" in markets_option:
        api.options["fetchMarkets"] = ["spot"]
    if exchange_id in ("binance", "binanceus"):
        # aggregate trades, as the native collector and the poller (ccxt's
        # fetch_trades reads aggTrades) see them: one trade id for one trade
        # whichever path brings it, so the dispatcher delivers it once
        api.options["watchTrades"] = {**api.options.get("watchTrades", {}), "name": "aggTrade"}
    if exchange_id in WS_SUBSCRIBE_COST:
        ws_options = api.options.get("ws") or {}
        api.options["ws"] = {**ws_options, "cost": WS_SUBSCRIBE_COST[exchange_id]}
    if trades_limit is not None:
        api.options["tradesLimit"] = trades_limit
    if keepalive_ms is not None:
        current = api.streaming.get("keepAlive") or keepalive_ms
        api.streaming = {**api.streaming, "keepAlive": min(current, keepalive_ms)}
    if rest_url or ws_url:
        api.urls["api"] = rebase_urls(api.urls["api"], rest_url, ws_url)
        # ccxt.pro signs some public subscriptions (Coinbase Exchange's level2): with
        # the URLs overridden (tickwire's emulator) it gets placeholder credentials,
        # which the emulator does not check and a real exchange would refuse. Only
        # there: credentials change what other exchanges' load_markets asks for.
        for field, required in api.requiredCredentials.items():
            if exchange_id in SIGNS_PUBLIC and required and not getattr(api, field, None):
                setattr(api, field, PLACEHOLDER_SECRET if field == "secret" else
                        f"tickwire-emulator-{field}")
    api.order_book = tracked_order_book  # sides that note their changes (module doc)
    return api


# -- the bridge: the asyncio side, in its worker thread ----------------------------------


class _Stopped(Exception):
    """The trio side is gone or asked to stop: the worker winds down."""


@attrs.frozen
class WatchPlan:
    """What one bridge watches: ``markets`` maps ``BASE-QUOTE`` to ccxt's symbol."""

    exchange: str
    ccxt_id: str
    markets: dict[str, str]
    channels: tuple[str, ...]
    depth: int
    rest_url: str
    ws_url: str
    reconnect: ReconnectConfig
    trades_limit: int
    #: per symbol, the time (ms) of the newest trade already delivered, if any:
    #: trades are recovered from there once the first watch is up
    trades_since: dict[str, int] = attrs.field(factory=dict)
    #: more of ccxt's constructor settings (``make_pro_exchange``)
    ccxt_config: dict[str, Any] = attrs.field(factory=dict, repr=False)  # may hold secrets


class HandOff:
    """Items from a worker thread to trio, in order, at most ``bound`` in trio's
    hands (see the module doc, 3). ``__call__`` runs in the worker: it blocks while
    every slot is taken and raises ``trio.ClosedResourceError`` once ``close`` was
    called (or ``trio.RunFinishedError`` once trio is gone). ``taken`` and
    ``close`` run in trio."""

    def __init__(self, send: trio.MemorySendChannel[tuple], bound: int) -> None:
        self._send = send
        self._token = trio.lowlevel.current_trio_token()
        self._slots = threading.Semaphore(bound)
        self._bound = bound
        self._closed = False
        self.waiting = False  # the worker waits for a slot

    def __call__(self, item: tuple) -> None:
        while not self._slots.acquire(timeout=HAND_OFF_POLL):
            self.waiting = True
            if self._closed:
                raise trio.ClosedResourceError
        self.waiting = False
        if self._closed:
            raise trio.ClosedResourceError
        self._token.run_sync_soon(self._deliver, item)

    def _deliver(self, item: tuple) -> None:
        try:
            self._send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the collector is stopping: the worker is told by ``close``
        except trio.WouldBlock:  # cannot happen: a slot is held for each item
            log.error("bridge: an item found the channel full (a bug); it was not sent")

    def taken(self) -> None:
        """trio received an item: its slot is free."""
        self._slots.release()

    def close(self) -> None:
        """No more items: a waiting worker raises ``ClosedResourceError``."""
        self._closed = True
        self._slots.release(self._bound)  # whoever waits wakes and sees it


class Bridge:
    """One asyncio loop in one worker thread with one ccxt.pro exchange object.

    ``hand_off(item)`` (a ``HandOff``) blocks while trio holds as many items as
    the bound (and raises once the collector stopped or trio is gone); ``done()``
    is called last, from the worker thread. After the thread ends, ``error`` holds
    what ended it, if anything but a stop."""

    def __init__(self, plan: WatchPlan, hand_off: Callable[[tuple], object],
                 done: Callable[[], object]) -> None:
        self.plan = plan
        self._hand_off = hand_off
        self._done = done
        self.thread = threading.Thread(
            target=self._thread_main, name=f"{THREAD_PREFIX}-{plan.exchange}", daemon=True
        )
        self.error: BaseException | None = None
        self.malformed = 0  # frames ccxt could not parse (its receive loop died)
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._pending: set[str] = set()  # watches not up yet
        self._down: dict[str, str] = {}  # watches that failed, and why

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ask the worker to wind down (from any thread); returns at once."""
        self._stop.set()
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(stopping.set)

    # -- the thread ------------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's own: ccxt and aiohttp may ask
        loop.set_exception_handler(self._on_loop_error)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - handed to the trio side
            if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            self.error = exc
        finally:
            try:
                # what ccxt left running (its spawned snapshot fetches, closes)
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                with contextlib.suppress(Exception):  # trio has finished: nobody to tell
                    self._done()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, json.JSONDecodeError):  # orjson's is one too
            self.malformed += 1
            log.warning("%s: ccxt could not parse a frame (%s): that connection is "
                        "watched again once its keepalive fails", self.plan.exchange, exc)
            return
        log.error("%s: asyncio: %s", self.plan.exchange, context.get("message"),
                  exc_info=exc)

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        if self._stop.is_set():
            return
        plan = self.plan
        exchange = make_pro_exchange(
            plan.ccxt_id, plan.rest_url, plan.ws_url,
            keepalive_ms=max(100, int(plan.reconnect.stale_after * 500)),
            trades_limit=plan.trades_limit, config=plan.ccxt_config,
        )
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._until_stopped())
                await self._load_markets(exchange)
                self._start_watches(group, exchange)
        except* _Stopped:
            pass
        finally:
            try:
                await asyncio.wait_for(exchange.close(), CLOSE_TIMEOUT)
            except TimeoutError:
                log.error("%s: ccxt did not close within %ss", plan.exchange, CLOSE_TIMEOUT)

    async def _until_stopped(self) -> None:
        assert self._stopping is not None
        await self._stopping.wait()
        raise _Stopped

    def _put(self, item: tuple) -> None:
        """Hand ``item`` to trio; blocks this thread (and its loop) while trio is full."""
        if self._stop.is_set():
            raise _Stopped
        try:
            self._hand_off(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError,
                trio.Cancelled) as exc:
            raise _Stopped from exc

    def _state(self, state: str, detail: str, error: str | None = None) -> None:
        self._put(("state", state, detail, error))

    def _backoff(self) -> Backoff:
        return Backoff(self.plan.reconnect.base, self.plan.reconnect.cap)

    async def _load_markets(self, exchange: Any) -> None:
        plan = self.plan
        self._state("connecting", _public_ws(exchange))

        async def load() -> None:
            with ccxt_errors(f"{plan.exchange} markets"):
                await exchange.load_markets()

        def failed(failure: Failure) -> None:
            self._state("failed", f"market metadata: {failure.error}; retry in "
                        f"{failure.delay:.2f}s", failure.cause)

        await retry(f"{plan.exchange}: cannot load markets", load, self._backoff(),
                    retryable=(FeedError,), on_retry=failed, logger=log, level=logging.ERROR,
                    clock=asyncio.get_running_loop().time, sleep=asyncio.sleep)
        missing = [s for s, market in plan.markets.items() if market not in exchange.markets]
        if missing:
            raise ValueError(f"{plan.exchange} lists no market {', '.join(missing)}")

    def _start_watches(self, group: asyncio.TaskGroup, exchange: Any) -> None:
        plan = self.plan
        has = exchange.has
        for symbol, market in plan.markets.items():
            if "trades" in plan.channels:
                self._pending.add(f"trades {symbol}")
                group.create_task(self._trades(exchange, symbol, market))
            if "book" in plan.channels:
                self._pending.add(f"book {symbol}")
                group.create_task(self._book(exchange, symbol, market))
        if "ticker" in plan.channels:
            if has.get("watchBidsAsks"):
                self._pending.add("bids/asks")
                group.create_task(self._tickers(exchange, "bids/asks", list(plan.markets)))
            else:
                for symbol in plan.markets:
                    self._pending.add(f"ticker {symbol}")
                    group.create_task(self._tickers(exchange, f"ticker {symbol}", [symbol]))

    # -- watch states -----------------------------------------------------------------

    def _up(self, what: str) -> None:
        was_down = self._down.pop(what, None) is not None
        was_pending = what in self._pending
        self._pending.discard(what)
        if (was_down or was_pending) and not self._pending and not self._down:
            detail = "every watch streaming" if was_pending else f"{what}: watching again"
            self._state("subscribed", detail)

    def _failed(self, what: str, detail: str, cause: str) -> None:
        self._pending.discard(what)
        first = not self._down
        self._down[what] = detail
        if first:
            self._state("reconnecting", f"{what}: {detail}", cause)

    async def _settled(self, what: str, awaitable: Any,
                       on_up: Callable[[], Any] | None = None) -> Any:
        """Await a watch; a watch not up yet counts as up at its first result, or
        after ``SETTLE`` seconds without an error (then ``on_up`` runs first)."""
        if what not in self._pending and what not in self._down:
            return await awaitable
        future = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait({future}, timeout=SETTLE)
            if not done:
                self._up(what)
                if on_up is not None:
                    await on_up()
            return await future
        finally:
            if not future.done():
                future.cancel()

    async def _keep(self, what: str, step: Callable[[bool], Any],
                    on_error: Callable[[FeedError, str], None] | None = None) -> None:
        """``await step(again)`` forever; after a ccxt error, ``on_error``, the watch
        counted down and the backoff (``daemon.supervise.retry``), ``again`` is
        true; the backoff starts over after a healthy run."""
        again = False

        async def attempt() -> None:
            nonlocal again
            while True:
                await step(again)
                again = False

        def failed(failure: Failure) -> None:
            nonlocal again
            again = True
            detail = f"{failure.error}; watching again in {failure.delay:.2f}s"
            if on_error is not None:
                on_error(failure.error, detail)  # type: ignore[arg-type]
            self._failed(what, detail, failure.cause)

        await retry(f"{self.plan.exchange}: {what}", attempt, self._backoff(),
                    retryable=(FeedError,), healthy_after=self.plan.reconnect.healthy_after,
                    on_retry=failed, logger=log, clock=asyncio.get_running_loop().time,
                    sleep=asyncio.sleep)

    # -- the watches ------------------------------------------------------------------

    async def _trades(self, exchange: Any, symbol: str, market: str) -> None:
        what = f"trades {symbol}"
        newest: list[int | None] = [self.plan.trades_since.get(symbol)]
        recover = [newest[0] is not None]

        async def recover_now() -> None:
            if recover[0]:
                recover[0] = False
                newest[0] = await self._recover(exchange, symbol, market, newest[0])

        async def step(again: bool) -> None:
            if again:
                recover[0] = True
            with ccxt_errors(f"{self.plan.exchange} {what}"):
                trades = await self._settled(what, exchange.watch_trades(market), recover_now)
                batch = [dict(trade) for trade in trades]
                recv_ts = time.time()
                self._up(what)
                await recover_now()  # a first result came before SETTLE
            for trade in batch:
                stamp = trade.get("timestamp")
                if stamp is not None and (newest[0] is None or stamp > newest[0]):
                    newest[0] = stamp
            self._put(("trades", symbol, batch, recv_ts, None))

        await self._keep(what, step)

    async def _recover(self, exchange: Any, symbol: str, market: str,
                       since: int | None) -> int | None:
        """Hand over the REST trades since ``since`` (ms; ``None``: the newest page);
        returns the newest trade time seen."""
        plan = self.plan
        if not exchange.has.get("fetchTrades"):
            self._put(("trades_gap", symbol, "no REST trade history to recover from: trades "
                       "while the watch was down may be missing", time.time()))
            return since
        for _ in range(RECOVERY_PAGES):
            with ccxt_errors(f"{plan.exchange} trades {symbol} (recovery)"):
                page = await exchange.fetch_trades(market, since, plan.trades_limit)
            batch = [dict(trade) for trade in page]
            self._put(("trades", symbol, batch, time.time(), since))
            stamps = [t["timestamp"] for t in batch if t.get("timestamp") is not None]
            newest = max(stamps, default=since)
            if since is None or len(batch) < plan.trades_limit or newest == since:
                return newest
            since = newest
        self._put(("trades_gap", symbol, f"more than {RECOVERY_PAGES} pages of trades to "
                   f"recover: trades after {since} may be missing", time.time()))
        return since

    async def _book(self, exchange: Any, symbol: str, market: str) -> None:
        import ccxt

        what = f"book {symbol}"
        depth = self.plan.depth
        tracking = _tracked_classes()[1:]
        whole = [True]  # the next result goes over whole (after a start or an error)

        async def step(again: bool) -> None:
            with ccxt_errors(f"{self.plan.exchange} {what}"):
                book = await self._settled(what, exchange.watch_order_book(market, depth))
            bids, asks = book["bids"], book["asks"]
            stamp = book.get("timestamp")
            recv_ts = time.time()
            self._up(what)
            if (whole[0] or not isinstance(bids, tracking) or not isinstance(asks, tracking)
                    or bids.whole or asks.whole):
                item = ("book", symbol, copy_side(bids), copy_side(asks), stamp, recv_ts)
                if isinstance(bids, tracking) and isinstance(asks, tracking):
                    bids.changes(), asks.changes()  # start over from this copy
                whole[0] = False
            else:
                item = ("book_changes", symbol, bids.changes(), asks.changes(), stamp, recv_ts)
            self._put(item)

        def on_error(exc: FeedError, detail: str) -> None:
            whole[0] = True
            gap = isinstance(exc.__cause__, ccxt.InvalidNonce)  # ChecksumError is one
            self._put(("book_lost", symbol, gap, detail, time.time()))

        await self._keep(what, step, on_error)

    async def _tickers(self, exchange: Any, what: str, symbols: list[str]) -> None:
        markets = {symbol: self.plan.markets[symbol] for symbol in symbols}
        bids_asks = what == "bids/asks"
        # symbol -> the last ccxt ticker handed over (held, so identity is meaningful)
        seen: dict[str, Any] = {}

        async def step(again: bool) -> None:
            with ccxt_errors(f"{self.plan.exchange} {what}"):
                if bids_asks:
                    watch = exchange.watch_bids_asks(list(markets.values()))
                else:
                    watch = exchange.watch_ticker(markets[symbols[0]])
                await self._settled(what, watch)
            recv_ts = time.time()
            self._up(what)
            # ccxt.pro's kraken keeps what watch_bids_asks brings in ``tickers``
            caches = (exchange.bidsasks, exchange.tickers) if bids_asks else (exchange.tickers,)
            changed = []
            for symbol, market in markets.items():
                ticker = next((c[market] for c in caches if market in c), None)
                if ticker is not None and seen.get(symbol) is not ticker:
                    seen[symbol] = ticker
                    changed.append((symbol, dict(ticker)))
            for symbol, ticker in changed:
                self._put(("ticker", symbol, ticker, recv_ts))

        await self._keep(what, step)


def _public_ws(exchange: Any) -> str:
    urls = exchange.urls.get("api", {}).get("ws") if isinstance(exchange.urls.get("api"),
                                                                 dict) else None
    while isinstance(urls, dict):
        urls = urls.get("spot", urls.get("public", next(iter(urls.values()), "")))
    return urls if isinstance(urls, str) else ""


# -- the collector: the trio side ---------------------------------------------------------


class WatchCollector(CollectorState):
    """One exchange streamed through ccxt.pro (see the module docstring).

    ``exchange``: the name events carry; ``ccxt_id``: ccxt's id (default: the
    same); ``cfg``: symbols, channels, ``depth``, URL overrides; ``out``: a
    dispatcher source channel; ``buffer``: the bridge's bound; ``ccxt_config``:
    more of ccxt's constructor settings: the API credentials of ``credentials_env``
    (never logged: the plan's repr leaves them out); tests pace ccxt's requests
    faster with ``{"rateLimit": ms}`` (ccxt.pro paces WebSocket subscribe requests
    as REST calls). Trade memory and
    books survive a re-watch and a supervisor restart of ``run`` (they live on the
    object): nothing is delivered twice, and a restart sends each book again as a
    snapshot.
    """

    def __init__(
        self,
        exchange: str,
        cfg: ExchangeConfig,
        reconnect: ReconnectConfig,
        out: Source,
        *,
        ccxt_id: str | None = None,
        buffer: int = BRIDGE_BUFFER,
        ccxt_config: dict[str, Any] | None = None,
    ) -> None:
        self.exchange = exchange
        self.ccxt_config = dict(ccxt_config or {})
        self.ccxt_id = ccxt_id or exchange
        self.cfg = cfg
        self.reconnect = reconnect
        self.out = out
        self.buffer = buffer
        self.markets = {symbol: ccxt_symbol(symbol) for symbol in cfg.symbols}
        self.channels = tuple(c for c in WATCH_CHANNELS if c in cfg.channels)
        self.stats = FeedStats()
        self.trades_limit = TRADES_LIMITS.get(self.ccxt_id, TRADES_LIMIT)
        self.trades = {s: TradeTracker(exchange, s, self.trades_limit, self.stats)
                       for s in self.markets}
        self.books = {s: BookTracker(exchange, s, self.stats) for s in self.markets}
        self._init_state()
        self.items = 0
        self.peak_buffer = 0
        self.last_receive = 0.0  # trio clock of the last item
        self.bridge: Bridge | None = None
        self.channel: trio.MemorySendChannel[tuple] | None = None
        self.hand_off: HandOff | None = None

    # -- the lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stream until cancelled; ``started()`` at once (the state tells how far it
        got). What ends the bridge other than a stop (a symbol the exchange does
        not list, a bug) propagates: the supervisor restarts the collector."""
        task_status.started()
        now = time.time()
        for book in self.books.values():  # a restart: every book is sent whole again
            for event in book.lost(False, "collector restarted", now):
                await self.publish(event)
        token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[tuple](self.buffer)
        plan = WatchPlan(
            exchange=self.exchange, ccxt_id=self.ccxt_id, markets=dict(self.markets),
            channels=self.channels, depth=self.cfg.depth, rest_url=self.cfg.rest_url,
            ws_url=self.cfg.ws_url, reconnect=self.reconnect, trades_limit=self.trades_limit,
            trades_since={s: t.last_ts for s, t in self.trades.items() if t.last_ts is not None},
            ccxt_config=self.ccxt_config,
        )
        hand_off = HandOff(send, self.buffer)
        bridge = Bridge(
            plan,
            hand_off=hand_off,
            done=partial(trio.from_thread.run_sync, send.close, trio_token=token),
        )
        self.bridge, self.channel, self.hand_off = bridge, send, hand_off
        try:
            async with receive:
                bridge.start()
                async for item in receive:
                    used = receive.statistics().current_buffer_used + 1  # with this one
                    self.peak_buffer = max(self.peak_buffer, used)
                    hand_off.taken()
                    await self._handle(item)
        finally:
            hand_off.close()
            with trio.CancelScope(shield=True):
                await self._join(bridge)
        if bridge.error is not None:
            raise bridge.error
        raise FeedDisconnected(f"{self.exchange}: the ccxt.pro bridge ended")

    async def _join(self, bridge: Bridge) -> None:
        bridge.stop()
        if not bridge.thread.is_alive():
            return
        await trio.to_thread.run_sync(bridge.thread.join, JOIN_TIMEOUT)
        if bridge.thread.is_alive():
            log.error("%s: the ccxt.pro worker thread did not end within %ss",
                      self.exchange, JOIN_TIMEOUT)

    async def _handle(self, item: tuple) -> None:
        self.items += 1
        self.last_receive = trio.current_time()
        kind = item[0]
        if self.bridge is not None:
            self.stats.malformed = self.bridge.malformed
        if kind == "trades":
            _, symbol, trades, recv_ts, since = item
            self.stats.messages += 1
            for event in self.trades[symbol].page(trades, since, recv_ts):
                await self.publish(event)
        elif kind in ("book", "book_changes"):  # a whole copy, or the changed levels
            _, symbol, bids, asks, stamp, recv_ts = item
            self.stats.messages += 1
            ts = stamp / 1000 if stamp else recv_ts
            tracker = self.books[symbol]
            apply = tracker.book if kind == "book" else tracker.changes
            for event in apply(bids, asks, ts, recv_ts):
                await self.publish(event)
        elif kind == "ticker":
            _, symbol, ticker, recv_ts = item
            self.stats.messages += 1
            await self._ticker(symbol, ticker, recv_ts)
        elif kind == "book_lost":
            _, symbol, gap, detail, now = item
            for event in self.books[symbol].lost(gap, detail, now):
                await self.publish(event)
        elif kind == "trades_gap":
            _, symbol, detail, now = item
            self.stats.gaps += 1
            await self.publish(trades_gap(self.exchange, symbol, detail, now))
        elif kind == "state":
            await self.set_state(item[1], item[2], item[3])
        else:
            raise AssertionError(f"unknown bridge item {kind!r}")

    async def _ticker(self, symbol: str, ticker: dict[str, Any], recv_ts: float) -> None:
        event = watch_ticker_event(self.exchange, symbol, ticker, recv_ts)
        if event is not None:
            await self.publish_ticker(event, self.stats)

    def statistics(self) -> CollectorStatistics:
        """The same report as ``NativeCollector.statistics`` (``frames`` counts the
        items that crossed the bridge), plus the bridge: its buffer (used, bound,
        peak), the worker waiting to hand off, and whether its thread is alive."""
        now = trio.current_time()
        channel = self.channel.statistics() if self.channel is not None else None
        books = {s: b.synced for s, b in self.books.items()} if "book" in self.channels else {}
        return CollectorStatistics(
            exchange=self.exchange,
            mode="watch",
            state=self.state,
            states=dict(self.state_counts),
            frames=self.items,
            last_frame_age=round(now - self.last_receive, 3) if self.last_receive else None,
            symbols=self.symbol_ages(now),
            books=books,
            counters=self.stats.freeze(),
            last_error=self.last_error,
            last_error_age=self.error_age(now),
            bridge=BridgeStatistics(
                buffer_used=channel.current_buffer_used if channel else 0,
                buffer_size=self.buffer,
                peak_buffer=self.peak_buffer,
                waiting=bool(self.hand_off and self.hand_off.waiting),
                thread_alive=bool(self.bridge and self.bridge.thread.is_alive()),
            ),
        )
