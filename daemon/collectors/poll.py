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
``reconnecting`` (a round goes on past a request that fails, and only a round
where every request failed is retried: ``_round``; the backoff starts over
after a run of ``healthy_after``; both through ``daemon.supervise.retry``,
which logs a repeating failure once a minute), and the first good round after
either is ``subscribed``. Trade and ticker memory
survives a retry and a supervisor restart of ``run`` (it lives on the object), so
nothing is delivered twice. A cluster's new feed owner hands each symbol's last
trade delivered by the previous owner to ``resume`` first: polling starts from it.
Anything else (a bug, a symbol the exchange does not list) propagates to the
supervisor.

What it shares with the ``watch`` mode (symbols, tickers, decimal strings from
ccxt's floats, the spot-only exchange object, the market check, the emulator's
URL hook) is in ``daemon.collectors.ccxt``; trades go through the one trade
tracker, ``daemon.trades``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any

import trio

from daemon.collectors.base import CollectorStatistics
from daemon.collectors.ccxt.common import (
    ccxt_symbol,
    check_markets,
    make_exchange,
    ticker_event,
    trades_limit,
)
from daemon.collectors.state import CollectorState
from daemon.config import ExchangeConfig, ReconnectConfig
from daemon.dispatch import Source
from daemon.errors import FeedError, ccxt_errors
from daemon.events import Trade
from daemon.exchanges.base import FeedCounters
from daemon.supervise import Backoff, Failure, retry
from daemon.trades import TradeTracker

log = logging.getLogger(__name__)

#: Channels this collector can poll.
POLL_CHANNELS = ("ticker", "trades")

# -- pure helpers (no I/O) --------------------------------------------------------------


def poll_period(interval: float, rate_limit_ms: float, requests: int) -> float:
    """Seconds between the starts of two rounds: the configured ``interval``, raised
    to what ``requests`` requests per round at one per ``rate_limit_ms`` allow."""
    return max(interval, rate_limit_ms / 1000 * requests)


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
        self.stats = FeedCounters()
        self.failed_requests = 0  # requests that failed in a round that went on
        limit = trades_limit(exchange)
        self.trades = {s: TradeTracker(exchange, s, limit, self.stats) for s in self.markets}
        self._init_state()
        self.backoff = Backoff(reconnect.base, reconnect.cap)
        self._next_request = -math.inf  # trio clock: the earliest start of the next request
        self.last_answer: float | None = None  # trio clock of the last REST answer
        self._markets_loaded = False

    def resume(self, trades: Iterable[Trade]) -> None:
        """The last trade of each symbol the feed's previous owner delivered
        (``daemon.cluster``: this collector took the feed over), before ``run``:
        each symbol's first poll asks for the trades since it, delivers those after
        it once, and a ``Gap`` when the answer does not reach back to it (the
        tracker's poll rule 6). Trades of symbols not polled are ignored."""
        for trade in trades:
            tracker = self.trades.get(trade.symbol)
            if tracker is not None:
                tracker.seed(trade)

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
        check_markets(self.exchange, self.markets, self.api.markets)

    async def _poll(self) -> None:
        subscribed = False
        while True:
            start = trio.current_time()
            requests: list[Callable[[], Awaitable[None]]] = []
            if "ticker" in self.channels:
                requests.append(self._poll_tickers)
            if "trades" in self.channels:
                requests += [partial(self._poll_trades, symbol) for symbol in self.markets]
            await self._round(requests)
            if not subscribed:
                subscribed = True
                await self.set_state("subscribed", f"polling every {self.period:.3g}s")
            await trio.sleep_until(start + self.period)

    async def _round(self, requests: list[Callable[[], Awaitable[None]]]) -> None:
        """Make every request of a round. One that fails does not stop the others
        (a symbol whose ticker the exchange refuses still has its trades polled):
        its error is logged and kept as the last error (status); only when every
        request failed (the exchange or the network is down) does the first error
        end the round, for ``_poll``'s caller to retry with backoff."""
        errors: list[FeedError] = []
        for request in requests:
            try:
                await request()
            except FeedError as exc:
                errors.append(exc)
                self.failed_requests += 1
                self.note_error(str(exc))
                log.warning("%s: %s (the round goes on)", self.exchange, exc)
        if errors and len(errors) == len(requests):
            raise errors[0]

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
            failed_requests=self.failed_requests,
        )
