"""The lifecycle shared by every native WebSocket collector.

Theory of operation
-------------------
``NativeCollector.run`` loads the exchange's market metadata (REST), builds the
sans-IO protocol object, then loops: connect, ``on_open`` (subscriptions), stream.
On any ``FeedError`` it reconnects after a full-jitter backoff that starts over
after a healthy run (``daemon.supervise.retry``, as every retry of the daemon);
subscriptions are restored and books resynced by ``on_open``.

While connected, three tasks share one nursery:

- the reader puts every frame (a ``Frame``) in a small bounded inbox;
- REST fetches (book snapshots, trade history) put their answers (``RestBody``)
  in the same inbox, retrying with backoff inside their own task;
- the processor takes the inbox in order, calls the protocol, and sends events to
  the dispatcher. When the dispatcher is full the processor waits, the inbox fills,
  the reader waits, and the exchange's socket is no longer read: backpressure.

A watchdog closes a connection that received nothing for ``stale_after`` seconds
(heartbeats and pings count: a quiet symbol does not). Every connection state
change is a ``FeedState`` event on the ``system`` channel and a counter; the
cause of the last failure is kept for status (``last_error``).
"""

from __future__ import annotations

import logging
import time
from functools import partial

import attrs
import httpx
import trio
import trio_websocket

from daemon.collectors.base import CollectorStatistics
from daemon.collectors.state import CollectorState
from daemon.collectors.venues import Venue
from daemon.config import ExchangeConfig, ReconnectConfig
from daemon.dispatch import Source
from daemon.errors import FeedDisconnected, FeedError, FeedStale, feed_errors
from daemon.exchanges.base import (
    ExchangeFeed,
    FeedStatistics,
    FetchSnapshot,
    FetchTrades,
    Malformed,
    Outputs,
    Send,
)
from daemon.supervise import Backoff, Failure, retry

log = logging.getLogger(__name__)

INBOX_SIZE = 64
#: Largest exchange frame accepted (Kraken and Binance snapshots can be large).
MAX_FRAME = 16 * 1024 * 1024
#: trio-websocket's own message queue and read size (its defaults, 1 message and
#: 4 KiB, cost a task switch per message and many reads per snapshot); bounded, so
#: backpressure still reaches the socket
WS_QUEUE = 64
WS_RECEIVE_BYTES = 64 * 1024


@attrs.define(slots=True)
class Frame:
    """Inbox message: one WebSocket frame, received at ``recv_ts`` (Unix seconds)."""

    text: str | bytes
    recv_ts: float


@attrs.define(slots=True)
class RestBody:
    """Inbox message: the body of a REST answer to ``request`` (a book snapshot or
    a trade history page), received at ``recv_ts`` (Unix seconds)."""

    request: FetchSnapshot | FetchTrades
    body: str
    recv_ts: float


InboxItem = Frame | RestBody


class NativeCollector(CollectorState):
    """One exchange feed over the exchange's own WebSocket protocol.

    ``out`` is a dispatcher source; ``venue`` names the protocol and URLs; ``cfg``
    the symbols and channels (and URL overrides); ``reconnect`` the backoff.
    ``feed``: the exchange protocol object, ``None`` until the market metadata
    is loaded.
    """

    def __init__(
        self,
        venue: Venue,
        cfg: ExchangeConfig,
        reconnect: ReconnectConfig,
        out: Source,
    ) -> None:
        self.venue = venue
        self.exchange = venue.exchange
        self.cfg = cfg
        self.reconnect = reconnect
        self.out = out
        self.rest_url = cfg.rest_url or venue.rest_url
        self.ws_url = cfg.ws_url or venue.ws_url
        self.feed: ExchangeFeed | None = None
        self._init_state()
        self.last_receive = 0.0  # trio clock of the last frame
        self.frames = 0
        self.connected_since: float | None = None
        self.backoff = Backoff(reconnect.base, reconnect.cap)

    # -- the lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stream until cancelled; ``started()`` at once (the feed is started; its
        state tells how far it got). Non-network errors propagate: the supervisor
        restarts the collector."""
        task_status.started()
        async with httpx.AsyncClient(base_url=self.rest_url, timeout=10.0) as http:
            markets = await retry(
                f"{self.exchange}: cannot load markets", partial(self._load_markets, http),
                self.backoff, retryable=(FeedError, ValueError), logger=log,
                level=logging.ERROR, on_retry=partial(self._failed, "market metadata"),
            )
            feed = self.venue.make_feed(self.cfg, markets)
            self.feed = feed
            await retry(
                f"{self.exchange}: reconnecting", partial(self._connect_once, feed, http),
                self.backoff, retryable=(FeedError,),
                healthy_after=self.reconnect.healthy_after, logger=log,
                on_retry=self._reconnecting,
            )

    async def _failed(self, what: str, failure: Failure) -> None:
        await self.retrying("failed", failure, f"{what}: {failure.error}")

    async def _reconnecting(self, failure: Failure) -> None:
        state = "stale" if isinstance(failure.error, FeedStale) else "reconnecting"
        await self.retrying(state, failure)

    async def _load_markets(self, http: httpx.AsyncClient) -> dict[str, str]:
        with feed_errors(f"{self.exchange} markets"):
            response = await http.get(self.venue.markets_target)
            response.raise_for_status()
        return await trio.to_thread.run_sync(self.venue.parse_markets, response.text)

    async def _connect_once(self, feed: ExchangeFeed, http: httpx.AsyncClient) -> None:
        url = feed.url(self.ws_url)
        await self.set_state("connecting", url)
        try:
            with feed_errors(f"{self.exchange} stream"):
                async with trio_websocket.open_websocket_url(
                    url, max_message_size=MAX_FRAME, connect_timeout=10, disconnect_timeout=2,
                    message_queue_size=WS_QUEUE, receive_buffer_size=WS_RECEIVE_BYTES,
                ) as ws, trio.open_nursery() as nursery:
                    self.connected_since = trio.current_time()
                    self.last_receive = trio.current_time()
                    inbox_send, inbox_receive = trio.open_memory_channel[InboxItem](INBOX_SIZE)
                    link = _Link(ws, nursery, http, inbox_send)
                    await self._handle(feed.on_open(time.time()), link)
                    await self.set_state("subscribed", url)
                    nursery.start_soon(self._read, ws, inbox_send)
                    nursery.start_soon(self._watchdog)
                    await self._process(feed, link, inbox_receive)
        except* FeedError as group:
            raise group.exceptions[0] from None
        finally:
            self.connected_since = None

    async def _read(
        self, ws: trio_websocket.WebSocketConnection, inbox: trio.MemorySendChannel[InboxItem]
    ) -> None:
        with feed_errors(f"{self.exchange} stream"):
            while True:
                message = await ws.get_message()
                self.last_receive = trio.current_time()
                self.frames += 1
                item = Frame(message, time.time())
                try:
                    inbox.send_nowait(item)  # no schedule point per frame while there is room
                except trio.WouldBlock:
                    await inbox.send(item)

    async def _watchdog(self) -> None:
        limit = self.reconnect.stale_after
        while True:
            silent = trio.current_time() - self.last_receive
            if silent >= limit:
                raise FeedStale(f"{self.exchange}: no frame for {silent:.1f}s")
            await trio.sleep(limit - silent)

    async def _process(
        self, feed: ExchangeFeed, link: _Link, inbox_receive: trio.MemoryReceiveChannel[InboxItem]
    ) -> None:
        async for item in inbox_receive:
            # what is already queued is handled without a schedule point per item
            while True:
                if type(item) is Frame:
                    outputs = feed.on_message(item.text, item.recv_ts)
                elif isinstance(item, RestBody):
                    request = item.request
                    if isinstance(request, FetchSnapshot):
                        outputs = feed.on_snapshot(request.symbol, item.body, item.recv_ts)
                    else:
                        outputs = feed.on_trades(request.symbol, item.body, item.recv_ts)
                else:
                    raise AssertionError(f"unknown inbox item {item!r}")
                if outputs:
                    await self._handle(outputs, link)
                try:
                    item = inbox_receive.receive_nowait()
                except trio.WouldBlock:
                    break
        raise FeedDisconnected(f"{self.exchange}: stream ended")

    async def _handle(self, outputs: Outputs, link: _Link) -> None:
        for output in outputs:
            if isinstance(output, Send):
                with feed_errors(f"{self.exchange} send"):
                    await link.ws.send_message(output.text)
            elif isinstance(output, FetchSnapshot | FetchTrades):
                link.nursery.start_soon(self._fetch, link, output)
            elif isinstance(output, Malformed):
                log.warning("%s: skipped a frame: %s: %s", self.exchange, output.reason, output.text)
            else:
                self.last_event[output.symbol] = trio.current_time()
                try:
                    self.out.send_nowait(output)
                except trio.WouldBlock:
                    await self.out.send(output)  # the dispatcher is full: wait (backpressure)

    async def _fetch(self, link: _Link, request: FetchSnapshot | FetchTrades) -> None:
        """GET a book snapshot or a trade history page and queue its body; REST
        failures retry with backoff inside this task, so one slow endpoint does not
        drop the WebSocket."""
        kind = "snapshot" if isinstance(request, FetchSnapshot) else "trades"
        what = f"{self.exchange} {kind} {request.symbol}"

        async def get() -> str:
            with feed_errors(what):
                response = await link.http.get(request.target)
                response.raise_for_status()
            return response.text

        body = await retry(what, get, Backoff(self.reconnect.base, self.reconnect.cap),
                           retryable=(FeedError,), logger=log,
                           on_retry=lambda failure: self.note_error(failure.cause))
        await link.inbox.send(RestBody(request, body, time.time()))

    def statistics(self) -> CollectorStatistics:
        """State, counters, the last error, and ages in seconds: of the last frame
        on the connection and of the last event per symbol (a quiet symbol is
        reported, never a reason to reconnect); each book's ``synced``."""
        now = trio.current_time()
        feed = self.feed
        books = {}
        if "book" in self.cfg.channels:
            books = {s: feed is not None and feed.book(s) is not None for s in self.cfg.symbols}
        return CollectorStatistics(
            exchange=self.exchange,
            mode="native",
            state=self.state,
            states=dict(self.state_counts),
            frames=self.frames,
            last_frame_age=round(now - self.last_receive, 3) if self.last_receive else None,
            symbols=self.symbol_ages(now),
            books=books,
            counters=feed.statistics() if feed is not None else FeedStatistics(),
            last_error=self.last_error,
            last_error_age=self.error_age(now),
        )


@attrs.frozen
class _Link:
    """What the tasks of one connection share: the WebSocket, their nursery, the
    REST client, and the inbox's sending end."""

    ws: trio_websocket.WebSocketConnection
    nursery: trio.Nursery
    http: httpx.AsyncClient
    inbox: trio.MemorySendChannel[InboxItem]
