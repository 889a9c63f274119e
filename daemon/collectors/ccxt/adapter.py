"""The exchange adapter of the ``watch`` mode: ccxt.pro's watches, in the bridge's
asyncio loop, as ``messages.BridgeItem``s for trio.

``watch(plan, put)`` is the bridge's work (``bridge.Bridge``): it builds the
ccxt.pro exchange object (``make_pro_exchange``), loads the markets, then runs
one asyncio task per watch: ``watch_trades(symbol)`` and
``watch_order_book(symbol, depth)`` per symbol, and ``watch_bids_asks(symbols)``
for all symbols where the exchange has it, else ``watch_ticker(symbol)`` per
symbol. When a watch returns, the task copies what ccxt returned *before its next
await* (ccxt mutates its book sides and trade lists in place; nothing can change
them while the task runs) and ``put``s the copy.

Recovery, owned by tickwire (ccxt.pro raises where a native collector recovers);
each watch runs in ``daemon.supervise.retry`` (on the loop's clock):

- A book gap (ccxt's ``InvalidNonce``, including ``ChecksumError``) is a
  ``BookLost`` with ``gap`` and the watch starts again after the backoff: ccxt
  subscribes again and builds a new book from a fresh snapshot, which goes over
  whole (``WholeBook``).
- A lost connection (ccxt's ``NetworkError`` and kin, mapped by
  ``daemon.errors.ccxt_errors``) makes the feed ``reconnecting`` (a
  ``StateChange`` with the cause) and the watch starts again after the backoff;
  books rebuild as above. A watch counts as up again at its first result, or once
  it waited ``SETTLE`` seconds without an error (a quiet symbol); when every watch
  is up the feed is ``subscribed`` again.
- Trades: once a trade watch is up again, the trades since the newest one
  delivered are fetched through ccxt's REST ``fetch_trades`` (up to
  ``RECOVERY_PAGES`` pages) and handed over as ``TradesBatch``es with their
  ``since``; the trio side's trade tracker drops what was delivered. An exchange
  without REST trades, or more pages than that, is a ``TradesGap``. The first
  watch recovers the same way from ``WatchPlan.trades_since`` (a restart, or a
  cluster's takeover; there, a symbol of which nothing was delivered recovers
  the newest REST page).
- ccxt.pro's keepalive is set to ``stale_after / 2``: a connection whose frame
  ccxt could not parse (its receive loop died) is declared dead after two missed
  pongs (``RequestTimeout``), and watched again as above.

Tickers: ccxt resolves one future per message, and a ticker that arrives while
nobody awaits it only lands in ccxt's cache (``bidsasks`` / ``tickers``). So after
every result the task reads the cache of every symbol and hands over those that
changed: the latest best bid/offer of each symbol is never missed (older ones may
conflate, as a ticker stream may).

Exchange rules (production, not the emulator's: its one hook is ``overrides``):

- Binance: ccxt.pro's ``watch_trades`` would subscribe ``<symbol>@trade`` (raw
  trade ids); it is set to ``aggTrade``, as the native collector and ccxt's REST
  ``fetch_trades`` see trades: one trade id whichever path brings it.
- Coinbase (tickwire's ``coinbase`` is ccxt's ``coinbaseexchange``): ccxt.pro
  drops ``last_match`` (the product's last trade, sent on subscribe), which the
  native collector delivers: tickwire's subclass hands it to ccxt's ``match``
  handler (``_pro_class``). ccxt.pro signs ``level2``: a real feed needs
  credentials (``credentials_env``).
- Kraken: ccxt.pro speaks WebSocket v2, where prices and sizes are JSON numbers:
  trades and tickers are written from floats too. Its ``watch_bids_asks`` keeps
  results in ``exchange.tickers``, read when ``bidsasks`` lacks the symbol. Its
  book checksum check is off by default (and in ccxt 4.5 cannot run on its float
  levels), so a Kraken book gap shows only as a closed connection. ccxt paces
  WebSocket requests with the REST rate limit (Kraken: one a second); a Kraken
  subscribe request counts as a tenth of a call here (``WS_SUBSCRIBE_COST``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import attrs

from daemon.collectors.ccxt.books import copy_side, tracked_order_book, tracked_sides
from daemon.collectors.ccxt.common import TIMEOUT_MS, check_markets, spot_only
from daemon.collectors.ccxt.messages import (
    BookChanges,
    BookLost,
    BridgeItem,
    StateChange,
    TickerUpdate,
    TradesBatch,
    TradesGap,
    WholeBook,
)
from daemon.collectors.ccxt.overrides import override_urls
from daemon.config import ReconnectConfig
from daemon.errors import FeedError, ccxt_errors
from daemon.supervise import Backoff, Failure, retry

log = logging.getLogger(__name__)

#: Seconds an exchange gets to close its connections and session.
CLOSE_TIMEOUT = 5.0
#: Seconds without an error after which a (re-)started watch counts as up.
SETTLE = 1.0
#: REST pages of trades fetched at most to recover a re-watch.
RECOVERY_PAGES = 3
#: ccxt.pro spaces WebSocket subscribe requests with the exchange's REST rate limit
#: (a request costs ``options["ws"]["cost"]`` of it, 1 by default): Kraken's is one
#: call a second, so 3 channels x 7 pairs took 20 s to subscribe, at start and after
#: every reconnect. Kraken documents no fixed message rate for its spot WebSocket
#: (a limit that varies with load, answered with ``Exceeded msg rate``:
#: https://docs.kraken.com/api/docs/guides/spot-ratelimits); a tenth of a call each
#: is 10 subscribe requests a second, a start of 21 in about 2 s. A refused
#: subscription fails its watch, which is watched again with backoff.
WS_SUBSCRIBE_COST = {"kraken": 0.1}

Put = Callable[[BridgeItem], None]


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
    #: per symbol, the time (ms) of the newest trade already delivered: trades are
    #: recovered from there once the first watch is up (``None``: from the newest
    #: REST page; a symbol left out: none recovered)
    trades_since: dict[str, int | None] = attrs.field(factory=dict)
    #: more of ccxt's constructor settings (``make_pro_exchange``)
    ccxt_config: dict[str, Any] = attrs.field(factory=dict, repr=False)  # may hold secrets


def _pro_class(exchange_id: str) -> type:
    """ccxt.pro's exchange class for ``exchange_id``, or tickwire's subclass of it
    where ccxt.pro drops part of the public stream (see the module doc)."""
    import ccxt.pro

    base: type = getattr(ccxt.pro, exchange_id)
    if exchange_id != "coinbaseexchange":
        return base

    class CoinbaseExchange(base):  # type: ignore[misc]
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
    only, the exchange rules of the module docstring, URLs overridden by
    ``overrides.override_urls`` (the emulator's hook), WebSocket keepalive at most
    ``keepalive_ms``, trade cache of ``trades_limit``, books that note their
    changes (``books.tracked_order_book``); ``config``: more of ccxt's constructor
    settings (``{"rateLimit": ms}``, credentials...). Call it inside the asyncio
    loop that will use it. Raises ``ValueError`` for an id ccxt.pro does not know."""
    import ccxt.pro

    if exchange_id not in ccxt.pro.exchanges:
        raise ValueError(f"ccxt.pro streams no exchange {exchange_id!r}")
    api = _pro_class(exchange_id)({"timeout": TIMEOUT_MS, **(config or {})})
    spot_only(api)
    if exchange_id in ("binance", "binanceus"):
        api.options["watchTrades"] = {**api.options.get("watchTrades", {}), "name": "aggTrade"}
    if exchange_id in WS_SUBSCRIBE_COST:
        ws_options = api.options.get("ws") or {}
        api.options["ws"] = {**ws_options, "cost": WS_SUBSCRIBE_COST[exchange_id]}
    if trades_limit is not None:
        api.options["tradesLimit"] = trades_limit
    if keepalive_ms is not None:
        current = api.streaming.get("keepAlive") or keepalive_ms
        api.streaming = {**api.streaming, "keepAlive": min(current, keepalive_ms)}
    override_urls(api, exchange_id, rest_url, ws_url)
    api.order_book = tracked_order_book
    return api


def public_ws(exchange: Any) -> str:
    """The exchange's public WebSocket URL, for the ``connecting`` state."""
    api = exchange.urls.get("api")
    urls = api.get("ws") if isinstance(api, dict) else None
    while isinstance(urls, dict):
        urls = urls.get("spot", urls.get("public", next(iter(urls.values()), "")))
    return urls if isinstance(urls, str) else ""


async def watch(plan: WatchPlan, put: Put) -> None:
    """The bridge's work: build the exchange, load its markets, run every watch of
    ``plan`` until cancelled (or until ``put`` raises: the trio side stopped), and
    close the exchange (its WebSocket clients and HTTP session). Raises
    ``ValueError`` when the exchange lists no market of a configured symbol."""
    exchange = make_pro_exchange(
        plan.ccxt_id, plan.rest_url, plan.ws_url,
        keepalive_ms=max(100, int(plan.reconnect.stale_after * 500)),
        trades_limit=plan.trades_limit, config=plan.ccxt_config,
    )
    try:
        await Watches(plan, put, exchange).run()
    finally:
        try:
            await asyncio.wait_for(exchange.close(), CLOSE_TIMEOUT)
        except TimeoutError:
            log.error("%s: ccxt did not close within %ss", plan.exchange, CLOSE_TIMEOUT)


class Watches:
    """The watches of one exchange object, and the feed state they make together
    (module docstring)."""

    def __init__(self, plan: WatchPlan, put: Put, exchange: Any) -> None:
        self.plan = plan
        self.put = put
        self.exchange = exchange
        self._pending: set[str] = set()  # watches not up yet
        self._down: dict[str, str] = {}  # watches that failed, and why

    async def run(self) -> None:
        """Load the markets (retrying network faults), then watch until cancelled."""
        await self._load_markets()
        async with asyncio.TaskGroup() as group:
            self._start_watches(group)

    def _state(self, state: str, detail: str, error: str | None = None) -> None:
        self.put(StateChange(state, detail, error))

    def _backoff(self) -> Backoff:
        return Backoff(self.plan.reconnect.base, self.plan.reconnect.cap)

    async def _retry(self, name: str, attempt: Callable[[], Awaitable[None]],
                     on_retry: Callable[[Failure], None], level: int = logging.WARNING,
                     healthy_after: float = float("inf")) -> None:
        """``daemon.supervise.retry`` on this loop's clock, retrying ccxt's network
        and exchange errors (``FeedError``)."""
        await retry(f"{self.plan.exchange}: {name}", attempt, self._backoff(),
                    retryable=(FeedError,), healthy_after=healthy_after, on_retry=on_retry,
                    logger=log, level=level, clock=asyncio.get_running_loop().time,
                    sleep=asyncio.sleep)

    async def _load_markets(self) -> None:
        plan, exchange = self.plan, self.exchange
        self._state("connecting", public_ws(exchange))

        async def load() -> None:
            with ccxt_errors(f"{plan.exchange} markets"):
                await exchange.load_markets()

        def failed(failure: Failure) -> None:
            self._state("failed", f"market metadata: {failure.error}; retry in "
                        f"{failure.delay:.2f}s", failure.cause)

        await self._retry("cannot load markets", load, failed, level=logging.ERROR)
        check_markets(plan.exchange, plan.markets, exchange.markets)

    def _start_watches(self, group: asyncio.TaskGroup) -> None:
        plan = self.plan
        for symbol, market in plan.markets.items():
            if "trades" in plan.channels:
                self._pending.add(f"trades {symbol}")
                group.create_task(self._trades(symbol, market))
            if "book" in plan.channels:
                self._pending.add(f"book {symbol}")
                group.create_task(self._book(symbol, market))
        if "ticker" in plan.channels:
            if self.exchange.has.get("watchBidsAsks"):
                self._pending.add("bids/asks")
                group.create_task(self._tickers("bids/asks", list(plan.markets)))
            else:
                for symbol in plan.markets:
                    self._pending.add(f"ticker {symbol}")
                    group.create_task(self._tickers(f"ticker {symbol}", [symbol]))

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

    async def _settled(self, what: str, awaitable: Awaitable[Any],
                       on_up: Callable[[], Awaitable[None]] | None = None) -> Any:
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

    async def _keep(self, what: str, step: Callable[[bool], Coroutine[Any, Any, None]],
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
            if on_error is not None and isinstance(failure.error, FeedError):
                on_error(failure.error, detail)
            self._failed(what, detail, failure.cause)

        await self._retry(what, attempt, failed,
                          healthy_after=self.plan.reconnect.healthy_after)

    # -- the watches ------------------------------------------------------------------

    async def _trades(self, symbol: str, market: str) -> None:
        exchange = self.exchange
        what = f"trades {symbol}"
        newest: int | None = self.plan.trades_since.get(symbol)
        recover = symbol in self.plan.trades_since

        async def recover_now() -> None:
            nonlocal recover, newest
            if recover:
                recover = False
                newest = await self._recover(symbol, market, newest)

        async def step(again: bool) -> None:
            nonlocal recover, newest
            if again:
                recover = True
            with ccxt_errors(f"{self.plan.exchange} {what}"):
                trades = await self._settled(what, exchange.watch_trades(market), recover_now)
                batch = [dict(trade) for trade in trades]
                recv_ts = time.time()
                self._up(what)
                await recover_now()  # a first result came before SETTLE
            for trade in batch:
                stamp = trade.get("timestamp")
                if stamp is not None and (newest is None or stamp > newest):
                    newest = stamp
            self.put(TradesBatch(symbol, batch, recv_ts))

        await self._keep(what, step)

    async def _recover(self, symbol: str, market: str, since: int | None) -> int | None:
        """Hand over the REST trades since ``since`` (ms; ``None``: the newest page);
        returns the newest trade time seen."""
        plan, exchange = self.plan, self.exchange
        if not exchange.has.get("fetchTrades"):
            self.put(TradesGap(symbol, "no REST trade history to recover from: trades "
                               "while the watch was down may be missing", time.time()))
            return since
        for _ in range(RECOVERY_PAGES):
            with ccxt_errors(f"{plan.exchange} trades {symbol} (recovery)"):
                page = await exchange.fetch_trades(market, since, plan.trades_limit)
            batch = [dict(trade) for trade in page]
            self.put(TradesBatch(symbol, batch, time.time(), since))
            stamps = [t["timestamp"] for t in batch if t.get("timestamp") is not None]
            newest = max(stamps, default=since)
            if since is None or len(batch) < plan.trades_limit or newest == since:
                return newest
            since = newest
        self.put(TradesGap(symbol, f"more than {RECOVERY_PAGES} pages of trades to "
                           f"recover: trades after {since} may be missing", time.time()))
        return since

    async def _book(self, symbol: str, market: str) -> None:
        import ccxt

        exchange = self.exchange
        what = f"book {symbol}"
        depth = self.plan.depth
        tracking = tracked_sides()
        whole = True  # the next result goes over whole (after a start or an error)

        async def step(again: bool) -> None:
            nonlocal whole
            with ccxt_errors(f"{self.plan.exchange} {what}"):
                book = await self._settled(what, exchange.watch_order_book(market, depth))
            bids, asks = book["bids"], book["asks"]
            stamp = book.get("timestamp")
            recv_ts = time.time()
            self._up(what)
            tracked = isinstance(bids, tracking) and isinstance(asks, tracking)
            if whole or not tracked or bids.whole or asks.whole:
                self.put(WholeBook(symbol, copy_side(bids), copy_side(asks), stamp, recv_ts))
                if tracked:
                    bids.changes(), asks.changes()  # start over from this copy
                whole = False
            else:
                self.put(BookChanges(symbol, bids.changes(), asks.changes(), stamp, recv_ts))

        def on_error(exc: FeedError, detail: str) -> None:
            nonlocal whole
            whole = True
            gap = isinstance(exc.__cause__, ccxt.InvalidNonce)  # ChecksumError is one
            self.put(BookLost(symbol, gap, detail, time.time()))

        await self._keep(what, step, on_error)

    async def _tickers(self, what: str, symbols: list[str]) -> None:
        exchange = self.exchange
        markets = {symbol: self.plan.markets[symbol] for symbol in symbols}
        bids_asks = what == "bids/asks"
        # symbol -> the last ccxt ticker handed over (held, so identity is meaningful)
        seen: dict[str, Any] = {}

        async def step(again: bool) -> None:
            with ccxt_errors(f"{self.plan.exchange} {what}"):
                if bids_asks:
                    watching = exchange.watch_bids_asks(list(markets.values()))
                else:
                    watching = exchange.watch_ticker(markets[symbols[0]])
                await self._settled(what, watching)
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
                self.put(TickerUpdate(symbol, ticker, recv_ts))

        await self._keep(what, step)
