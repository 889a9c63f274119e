"""The ccxt.pro collector (mode ``watch``): any exchange ccxt streams over WebSocket,
behind a thread bridge. This module is the trio side; the rest is in
``daemon.collectors.ccxt``:

- ``ccxt.bridge``: the worker thread with its asyncio loop, and the bounded
  hand-off to trio (backpressure down to the exchange's TCP window);
- ``ccxt.adapter``: the ccxt.pro exchange object and its watches, recovery (gaps,
  lost connections, trades from REST), in that loop;
- ``ccxt.messages``: what crosses the bridge (small attrs classes);
- ``ccxt.books``: ccxt's books as ``BookSnapshot`` / complete ``BookUpdate`` deltas;
- ``ccxt.common``: what ``poll`` shares (symbols, tickers, decimal strings, markets);
- ``ccxt.overrides``: the one hook for the emulator (URLs, placeholder credentials).

Theory of operation
-------------------
``WatchCollector.run`` starts a ``Bridge`` whose work is ``adapter.watch``, takes
its items in order from a bounded channel (``buffer``), turns them into events
with the pure trackers, and sends them to the dispatcher (which waits when full:
the channel fills, the worker waits, ccxt waits). Trades go through the one trade
tracker (``daemon.trades.TradeTracker``, ccxt rules), which drops every id
already delivered, across re-watches and restarts (a restart recovers from the
newest trade delivered), and reports what cannot have been covered as a ``Gap``;
books through ``books.BookTracker``; tickers are published when their top of book
changed. A cluster's new feed owner seeds the trade trackers with the previous
owner's last trades (``resume``): they are recovered from like a restart. A live
batch as large as ccxt's trade cache (``tradesLimit``, set to the
REST page size) may have lost trades in ccxt's cache: ``Gap`` too.

Stopping: cancelling ``run`` closes the hand-off and stops the bridge; trio joins
the thread from a worker of its own (``trio.to_thread.run_sync(thread.join,
timeout)``, shielded, so trio's thread never blocks) for at most ``JOIN_TIMEOUT``
seconds. No thread, socket or task outlives the collector. What ends the bridge
other than a stop (a symbol the exchange does not list, a bug) is raised to the
supervisor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from functools import partial
from typing import Any

import trio

from daemon.collectors.base import BridgeStatistics, CollectorStatistics
from daemon.collectors.ccxt.adapter import WatchPlan, watch
from daemon.collectors.ccxt.books import BookTracker
from daemon.collectors.ccxt.bridge import THREAD_PREFIX, Bridge, HandOff
from daemon.collectors.ccxt.common import ccxt_symbol, trades_limit, watch_ticker_event
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
from daemon.collectors.state import CollectorState
from daemon.config import ExchangeConfig, ReconnectConfig
from daemon.dispatch import Source
from daemon.errors import FeedDisconnected
from daemon.events import Trade
from daemon.exchanges.base import FeedCounters
from daemon.trades import TradeTracker

__all__ = ["BRIDGE_BUFFER", "THREAD_PREFIX", "HandOff", "WatchCollector"]

log = logging.getLogger(__name__)

#: Items the bridge's channel holds before the worker thread waits.
BRIDGE_BUFFER = 64
#: Seconds trio waits for the worker thread to end after a stop.
JOIN_TIMEOUT = 10.0
#: Channels this collector can watch.
WATCH_CHANNELS = ("trades", "book", "ticker")


class WatchCollector(CollectorState):
    """One exchange streamed through ccxt.pro (see the module docstring).

    ``exchange``: the name events carry; ``ccxt_id``: ccxt's id (default: the
    same); ``cfg``: symbols, channels, ``depth``, URL overrides; ``out``: a
    dispatcher source; ``buffer``: the bridge's bound; ``ccxt_config``: more of
    ccxt's constructor settings: the API credentials of ``credentials_env`` (never
    logged: the plan's repr leaves them out); tests pace ccxt's requests faster
    with ``{"rateLimit": ms}`` (ccxt.pro paces WebSocket subscribe requests as REST
    calls). Trade memory and books survive a re-watch and a supervisor restart of
    ``run`` (they live on the object): nothing is delivered twice, and a restart
    sends each book again as a snapshot.
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
        self.stats = FeedCounters()
        self.trades_limit = trades_limit(self.ccxt_id)
        self.trades = {s: TradeTracker(exchange, s, self.trades_limit, self.stats)
                       for s in self.markets}
        self.books = {s: BookTracker(exchange, s, self.stats) for s in self.markets}
        #: symbols to recover from the newest REST page while none of their trades
        #: was delivered (``resume``)
        self.unseeded: set[str] = set()
        self._init_state()
        self.items = 0
        self.peak_buffer = 0
        self.last_receive = 0.0  # trio clock of the last item
        self.bridge: Bridge[BridgeItem] | None = None
        self.channel: trio.MemorySendChannel[BridgeItem] | None = None
        self.hand_off: HandOff[BridgeItem] | None = None

    def resume(self, trades: Iterable[Trade]) -> None:
        """The last trade of each symbol the feed's previous owner delivered
        (``daemon.cluster``: this collector took the feed over), before ``run``:
        once a symbol's trade watch is up, the trades since it are recovered from
        REST (as after a restart), those after it delivered once, and a ``Gap``
        when the history does not reach back to it (the tracker's poll rule 6).
        Trades of symbols not watched are ignored. When ``trades`` is not empty,
        a watched symbol without one (the previous owner delivered none of it,
        or Redis would hold it) recovers the newest REST page, as a poll feed
        starts: none of those was delivered."""
        trades = list(trades)
        for trade in trades:
            tracker = self.trades.get(trade.symbol)
            if tracker is not None:
                tracker.seed(trade)
        if trades:  # the feed ran before: the others' trades too (none was delivered)
            self.unseeded = {s for s, t in self.trades.items() if t.last_ts is None}

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
        send, receive = trio.open_memory_channel[BridgeItem](self.buffer)
        plan = WatchPlan(
            exchange=self.exchange, ccxt_id=self.ccxt_id, markets=dict(self.markets),
            channels=self.channels, depth=self.cfg.depth, rest_url=self.cfg.rest_url,
            ws_url=self.cfg.ws_url, reconnect=self.reconnect, trades_limit=self.trades_limit,
            trades_since={s: t.last_ts for s, t in self.trades.items()
                          if t.last_ts is not None or s in self.unseeded},
            ccxt_config=self.ccxt_config,
        )
        hand_off = HandOff(send, self.buffer)
        bridge = Bridge(
            self.exchange, partial(watch, plan), hand_off=hand_off,
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

    async def _join(self, bridge: Bridge[BridgeItem]) -> None:
        bridge.stop()
        if not bridge.thread.is_alive():
            return
        await trio.to_thread.run_sync(bridge.thread.join, JOIN_TIMEOUT)
        if bridge.thread.is_alive():
            log.error("%s: the ccxt.pro worker thread did not end within %ss",
                      self.exchange, JOIN_TIMEOUT)

    async def _handle(self, item: BridgeItem) -> None:
        self.items += 1
        self.last_receive = trio.current_time()
        if self.bridge is not None:
            self.stats.malformed = self.bridge.malformed
        if isinstance(item, TradesBatch):
            self.stats.messages += 1
            for event in self.trades[item.symbol].page(item.trades, item.since, item.recv_ts):
                await self.publish(event)
        elif isinstance(item, WholeBook | BookChanges):  # a whole copy, or the changed levels
            self.stats.messages += 1
            ts = item.stamp / 1000 if item.stamp else item.recv_ts
            tracker = self.books[item.symbol]
            apply = tracker.book if isinstance(item, WholeBook) else tracker.changes
            for event in apply(item.bids, item.asks, ts, item.recv_ts):
                await self.publish(event)
        elif isinstance(item, TickerUpdate):
            self.stats.messages += 1
            ticker = watch_ticker_event(self.exchange, item.symbol, item.ticker, item.recv_ts)
            if ticker is not None:
                await self.publish_ticker(ticker, self.stats)
        elif isinstance(item, BookLost):
            for event in self.books[item.symbol].lost(item.gap, item.detail, item.now):
                await self.publish(event)
        elif isinstance(item, TradesGap):
            await self.publish(self.trades[item.symbol].gap(item.now, item.detail))
        elif isinstance(item, StateChange):
            await self.set_state(item.state, item.detail, item.error)
        else:
            raise AssertionError(f"unknown bridge item {item!r}")

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
