"""The ccxt REST polling collector: any exchange ccxt knows, by polling its REST API.

Theory of operation
-------------------
``PollCollector.run`` loads the exchange's markets through ccxt, checks that
every configured ``BASE-QUOTE`` is a ccxt market ``BASE/QUOTE``, then polls in
rounds, one round every ``period`` seconds (``cfg.interval``, see "Rate limit"),
until cancelled. A round is:

1. tickers: one ``fetch_bids_asks(symbols)`` when ccxt has it for the exchange,
   else one ``fetch_ticker(symbol)`` per symbol; a ``Ticker`` goes out only when
   the top of book of its symbol changed since the last one published, and only
   with both sides and their sizes (an empty side has no ticker);
2. trades: one ``fetch_trades(symbol, since, limit)`` per symbol, handed to that
   symbol's ``TradeTracker`` (``daemon.trades``, pure), which drops the trades already seen
   and emits the new ones in time/id order, with a ``Gap`` where the answer cannot
   have covered everything since the last poll.

ccxt's async API is asyncio-only, so its sync API runs in a worker thread
(``trio.to_thread.run_sync``), one call at a time per exchange object (a
``CapacityLimiter(1)``: the object and its HTTP session are not thread-safe), with
ccxt's own ``timeout`` set so that a thread always ends: cancelling the collector
waits at most that long for the call in flight.

Rate limit: ccxt's ``rateLimit`` is the exchange's minimum delay between two
requests, in milliseconds. ccxt's own throttle is off (``enableRateLimit``: it
sleeps inside the worker thread); instead (a) every request waits in trio until
``rateLimit`` has passed since the previous one started, and (b) the round period
is ``max(interval, rateLimit * requests per round)`` (``poll_period``), so the
configured ``interval`` is raised, never lowered, to what the limit allows and
the spacing of (a) never makes rounds fall behind. Every request counts as one:
ccxt's per-endpoint ``cost`` weights are not applied.

Failures: ccxt's errors are mapped by ``daemon.errors.ccxt_errors`` into
``FeedDisconnected`` / ``FeedProtocolError``. Market loading retries them with
backoff in state ``failed``; polling retries them with backoff in state
``reconnecting`` (the backoff starts over after a run of ``healthy_after``; both
through ``daemon.supervise.retry``, which logs a repeating failure once a
minute), and
the first good round after either is ``subscribed``. Trade and ticker memory
survives a retry and a supervisor restart of ``run`` (it lives on the object), so
nothing is delivered twice. Anything else (a bug, a symbol the exchange does not
list) propagates to the supervisor.

Decimal strings: ccxt turns prices and sizes into floats. A value is taken as the
exchange sent it from the raw answer (``info``: Binance's ``bidPrice``/``bidQty``
and aggTrade ``p``/``q``, and the usual names of other exchanges) when a raw
string there parses to the same float; otherwise the float is written in plain
positional notation from its shortest ``repr`` (``6.37e-06`` -> ``"0.00000637"``):
the decimal the exchange sent minus its trailing zeros, for up to 15 significant
digits (beyond that a float cannot hold it).
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import Any

import trio

from daemon.collectors.base import CollectorStatistics
from daemon.collectors.state import CollectorState
from daemon.config import ExchangeConfig, ReconnectConfig
from daemon.dispatch import Source
from daemon.errors import FeedError, ccxt_errors
from daemon.events import Ticker
from daemon.exchanges.base import FeedStats
from daemon.supervise import Backoff, Failure, retry
from daemon.trades import TradeTracker as TradeTracker  # "as": re-exported for watch.py
from daemon.trades import decimal_text as decimal_text

log = logging.getLogger(__name__)

#: ccxt's per-request timeout (ms): a worker thread never outlives it by much.
TIMEOUT_MS = 10_000
#: Trades asked per ``fetch_trades`` call; exchanges whose maximum is known.
TRADES_LIMIT = 100
TRADES_LIMITS = {"binance": 1000, "binanceus": 1000}
#: Channels this collector can poll.
POLL_CHANNELS = ("ticker", "trades")

# Raw-answer keys that may hold a value as the exchange sent it, most specific first.
_BID = ("bidPrice", "bid", "best_bid", "bidPx", "b")
_BID_SIZE = ("bidQty", "bidSize", "bid_size", "bidSz", "bidVolume", "best_bid_size", "B")
_ASK = ("askPrice", "ask", "best_ask", "askPx", "a")
_ASK_SIZE = ("askQty", "askSize", "ask_size", "askSz", "askVolume", "best_ask_size", "A")


# -- pure helpers (no I/O) --------------------------------------------------------------


def poll_period(interval: float, rate_limit_ms: float, requests: int) -> float:
    """Seconds between the starts of two rounds: the configured ``interval``, raised
    to what ``requests`` requests per round at one per ``rate_limit_ms`` allow."""
    return max(interval, rate_limit_ms / 1000 * requests)


def ccxt_symbol(symbol: str) -> str:
    """``BASE-QUOTE`` -> ccxt's unified spot symbol ``BASE/QUOTE``."""
    base, _, quote = symbol.partition("-")
    return f"{base}/{quote}"


def ticker_event(
    exchange: str, symbol: str, ticker: dict[str, Any], recv_ts: float
) -> Ticker | None:
    """A ``Ticker`` from a ccxt ticker (``fetch_ticker`` / ``fetch_bids_asks``), or
    ``None`` when it lacks a side or a size (ccxt gives ``None`` for an empty side)."""
    info = ticker.get("info")
    values = (
        decimal_text(info, _BID, ticker.get("bid")),
        decimal_text(info, _BID_SIZE, ticker.get("bidVolume")),
        decimal_text(info, _ASK, ticker.get("ask")),
        decimal_text(info, _ASK_SIZE, ticker.get("askVolume")),
    )
    if None in values or not ticker.get("bid") or not ticker.get("ask"):
        return None
    bid, bid_size, ask, ask_size = values
    stamp = ticker.get("timestamp")
    return Ticker(
        exchange=exchange, symbol=symbol, ts=stamp / 1000 if stamp else recv_ts, recv_ts=recv_ts,
        bid=bid, bid_size=bid_size, ask=ask, ask_size=ask_size,  # type: ignore[arg-type]
    )


def _rebase(urls: Any, base: str) -> Any:
    """Every URL in ccxt's ``urls["api"]`` (a string or nested dicts) with its scheme
    and host replaced by ``base``, the path kept: ``https://api.binance.com/api/v3``
    -> ``http://127.0.0.1:5000/api/v3``."""
    if isinstance(urls, dict):
        return {key: _rebase(value, base) for key, value in urls.items()}
    if isinstance(urls, str) and "://" in urls:
        rest = urls.split("://", 1)[1]
        path = rest[rest.index("/"):] if "/" in rest else ""
        return base.rstrip("/") + path
    return urls


def make_exchange(exchange_id: str, rest_url: str = "") -> Any:
    """ccxt's sync exchange object for ``exchange_id``: our timeout, ccxt's throttle
    off (ours is in trio), spot markets only, REST URLs rebased on ``rest_url``.
    Raises ``ValueError`` for an id ccxt does not know."""
    import ccxt

    if exchange_id not in ccxt.exchanges:
        raise ValueError(f"ccxt knows no exchange {exchange_id!r}")
    api = getattr(ccxt, exchange_id)({"timeout": TIMEOUT_MS, "enableRateLimit": False})
    # only spot markets: tickwire's BASE-QUOTE are spot symbols, and for Binance
    # this loads /api/v3/exchangeInfo alone (not the futures' and options' infos)
    markets_option = api.options.get("fetchMarkets")
    if isinstance(markets_option, dict) and "types" in markets_option:
        markets_option["types"] = ["spot"]
    elif isinstance(markets_option, list) and "spot" in markets_option:
        api.options["fetchMarkets"] = ["spot"]
    if rest_url:
        api.urls["api"] = _rebase(api.urls["api"], rest_url)
    return api


# -- the collector task -----------------------------------------------------------------


class PollCollector(CollectorState):
    """One exchange polled through ccxt's REST API (see the module docstring).

    ``exchange``: a ccxt exchange id; ``cfg``: symbols, channels (``ticker``,
    ``trades``; ``book`` is not polled), ``rest_url`` and ``interval``; ``out``: a
    dispatcher source channel. After construction: ``period`` (seconds per round,
    after the rate-limit rule), ``requests_per_round``; while running: ``state``,
    ``state_counts``, ``stats`` (``messages`` counts REST answers).
    """

    def __init__(
        self,
        exchange: str,
        cfg: ExchangeConfig,
        reconnect: ReconnectConfig,
        out: Source,
        *,
        ccxt_id: str | None = None,
        label: str = "",
    ) -> None:
        self.exchange = exchange
        self.cfg = cfg
        self.reconnect = reconnect
        self.out = out
        self.label = label  # a prefix of state details ("fallback: ")
        self.api = make_exchange(ccxt_id or exchange, cfg.rest_url)
        self.limiter = trio.CapacityLimiter(1)
        self.markets = {symbol: ccxt_symbol(symbol) for symbol in cfg.symbols}
        self.channels = [c for c in POLL_CHANNELS if c in cfg.channels]
        ignored = [c for c in cfg.channels if c not in POLL_CHANNELS]
        if ignored:
            log.warning("%s: polling has no %s channel; ignored", exchange, ", ".join(ignored))
        self.bids_asks = bool(self.api.has.get("fetchBidsAsks"))
        n = len(self.markets)
        self.requests_per_round = (
            ((1 if self.bids_asks else n) if "ticker" in self.channels else 0)
            + (n if "trades" in self.channels else 0)
        )
        self.spacing = float(self.api.rateLimit) / 1000
        self.interval = cfg.interval
        self.period = poll_period(self.interval, self.api.rateLimit, self.requests_per_round)
        if self.period > self.interval:
            log.info("%s: poll interval raised from %.3gs to %.3gs (rate limit %sms x %d requests)",
                     exchange, self.interval, self.period, self.api.rateLimit,
                     self.requests_per_round)
        self.stats = FeedStats()
        limit = TRADES_LIMITS.get(exchange, TRADES_LIMIT)
        self.trades = {s: TradeTracker(exchange, s, limit, self.stats) for s in self.markets}
        self._init_state()
        self.backoff = Backoff(reconnect.base, reconnect.cap)
        self._next_request = -math.inf  # trio clock: the earliest start of the next request
        self.last_answer: float | None = None  # trio clock of the last REST answer
        self._markets_loaded = False

    # -- the lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll until cancelled; ``started()`` at once (its state tells how far it
        got). Non-network errors propagate: the supervisor restarts the collector."""
        task_status.started()
        await self.set_state("connecting", self._public_url())
        if not self._markets_loaded:
            await retry(
                f"{self.exchange}: cannot load markets", self._load_markets, self.backoff,
                retryable=(FeedError,), logger=log, level=logging.ERROR,
                on_retry=self._markets_failed,
            )
        self._check_markets()
        await retry(
            f"{self.exchange}: polling", self._poll, self.backoff, retryable=(FeedError,),
            healthy_after=self.reconnect.healthy_after, logger=log,
            on_retry=partial(self.retrying, "reconnecting"),
        )

    async def _markets_failed(self, failure: Failure) -> None:
        await self.retrying("failed", failure, f"market metadata: {failure.error}")

    def _public_url(self) -> str:
        urls = self.api.urls["api"]
        if isinstance(urls, dict):
            urls = urls.get("public", urls.get("rest", next(iter(urls.values()), "")))
        return urls if isinstance(urls, str) else ""

    async def _load_markets(self) -> None:
        await self._call("markets", self.api.load_markets)
        self._markets_loaded = True

    def _check_markets(self) -> None:
        missing = [s for s, market in self.markets.items() if market not in self.api.markets]
        if missing:
            raise ValueError(f"{self.exchange} lists no market {', '.join(missing)}")

    async def _poll(self) -> None:
        subscribed = False
        while True:
            start = trio.current_time()
            if "ticker" in self.channels:
                await self._poll_tickers()
            if "trades" in self.channels:
                for symbol in self.markets:
                    await self._poll_trades(symbol)
            if not subscribed:
                subscribed = True
                await self.set_state("subscribed", f"polling every {self.period:.3g}s")
            await trio.sleep_until(start + self.period)

    async def _poll_tickers(self) -> None:
        if self.bids_asks:
            answer = await self._call(
                "bids/asks", self.api.fetch_bids_asks, list(self.markets.values())
            )
            recv_ts = time.time()
            for symbol, market in self.markets.items():
                if market in answer:
                    await self._ticker(symbol, answer[market], recv_ts)
        else:
            for symbol, market in self.markets.items():
                answer = await self._call(f"ticker {symbol}", self.api.fetch_ticker, market)
                await self._ticker(symbol, answer, time.time())

    async def _ticker(self, symbol: str, ticker: dict[str, Any], recv_ts: float) -> None:
        event = ticker_event(self.exchange, symbol, ticker, recv_ts)
        if event is not None:
            await self.publish_ticker(event, self.stats)

    async def _poll_trades(self, symbol: str) -> None:
        tracker = self.trades[symbol]
        since = tracker.since()
        answer = await self._call(
            f"trades {symbol}", self.api.fetch_trades, self.markets[symbol], since, tracker.limit
        )
        for event in tracker.page(answer, since, time.time()):
            await self.publish(event)

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in a worker thread, at most one request per ``rateLimit``."""
        now = trio.current_time()
        if self._next_request > now:
            await trio.sleep_until(self._next_request)
            now = trio.current_time()
        self._next_request = now + self.spacing
        with ccxt_errors(f"{self.exchange} {what}"):
            answer = await trio.to_thread.run_sync(partial(fn, *args), limiter=self.limiter)
        self.stats.messages += 1
        self.last_answer = trio.current_time()
        return answer

    def statistics(self) -> CollectorStatistics:
        """The same report as ``NativeCollector.statistics`` (``frames`` counts REST
        answers, ``last_frame_age`` is the last one's age; no books), plus the poll
        ``period`` and ``requests_per_round``."""
        now = trio.current_time()
        return CollectorStatistics(
            exchange=self.exchange,
            mode="poll",
            state=self.state,
            states=dict(self.state_counts),
            frames=self.stats.messages,
            last_frame_age=round(now - self.last_answer, 3) if self.last_answer else None,
            symbols=self.symbol_ages(now),
            books={},
            counters=self.stats.freeze(),
            last_error=self.last_error,
            last_error_age=self.error_age(now),
            period=self.period,
            requests_per_round=self.requests_per_round,
        )
