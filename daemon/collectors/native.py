"""The lifecycle shared by every native WebSocket collector.

Theory of operation
-------------------
``NativeCollector.run`` loads the exchange's market metadata (REST), builds the
sans-IO protocol object, then loops: connect, ``on_open`` (subscriptions), stream.
On any ``FeedError`` it reconnects after a full-jitter backoff that starts over
after a healthy run (``daemon.supervise.retry``, as every retry of the daemon);
subscriptions are restored and books resynced by ``on_open``.

While connected, one synchronous path per socket read (issue 17): the stream
task reads what the socket holds (up to 64 KiB, ``daemon.collectors.wsclient``),
decodes every complete frame in it (``wsframes``), calls the protocol for each,
and publishes all their events in the same step (``Source.publish``): no task
switch or channel hop per frame, and the fan-out is told once per read, so the
events of one read reach a client in one write. The next read waits until
these are published, so a dispatcher (or fan-out) that cannot keep up stops the
reads and the exchange's TCP window closes: backpressure, with nothing dropped.
Every frame of one read carries the read's ``recv_ts``.

REST fetches (book snapshots, trade history) run in tasks of their own,
retrying with backoff, and hand their answer to the protocol and its events to
the dispatcher in one synchronous step too, so they are ordered with the frames'
events exactly as the protocol produced them.

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

from daemon.collectors.base import CollectorStatistics
from daemon.collectors.state import CollectorState
from daemon.collectors.venues import Venue
from daemon.collectors.wsclient import FeedSocket
from daemon.config import ExchangeConfig, ReconnectConfig
from daemon.dispatch import Source
from daemon.errors import FeedError, FeedStale, feed_errors
from daemon.events import Event, Trade
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

#: Largest exchange frame accepted (Kraken and Binance snapshots can be large).
MAX_FRAME = 16 * 1024 * 1024
#: Seconds to connect (TCP, TLS and the WebSocket handshake).
CONNECT_TIMEOUT = 10.0
#: Bytes per socket read.
READ_SIZE = 64 * 1024


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
        #: bytes per socket read (the most one synchronous step handles)
        self.read_size = READ_SIZE
        #: trades delivered before this collector (``ExchangeFeed.resume``)
        self.resume_trades: list[Trade] = []

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
            feed.resume(self.resume_trades)
            self.feed = feed
            # its books are exact after each publish (one step per read): the
            # dispatcher reads them instead of keeping copies
            self.out.share_books(feed.book)
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
            async with await FeedSocket.connect(
                url, max_message=MAX_FRAME, connect_timeout=CONNECT_TIMEOUT,
                read_size=self.read_size,
            ) as ws, trio.open_nursery() as nursery:
                self.connected_since = trio.current_time()
                self.last_receive = trio.current_time()
                link = _Link(ws, nursery, http)
                await self._handle(feed.on_open(time.time()), link)
                await self.set_state("subscribed", url)
                nursery.start_soon(self._watchdog)
                await self._stream(feed, link)
        except* FeedError as group:
            raise group.exceptions[0] from None
        finally:
            self.connected_since = None

    async def _stream(self, feed: ExchangeFeed, link: _Link) -> None:
        """Read, decode, call the protocol, publish: one step per socket read."""
        ws = link.ws
        on_message = feed.on_message
        while True:
            messages = await ws.receive()
            self.last_receive = trio.current_time()  # any bytes: a snapshot under way too
            if not messages:
                continue
            self.frames += len(messages)
            recv_ts = time.time()
            if len(messages) == 1:
                await self._handle(on_message(messages[0], recv_ts), link)
                continue
            outputs: Outputs = []
            for text in messages:
                out = on_message(text, recv_ts)
                if out:
                    outputs.extend(out)
            await self._handle(outputs, link)

    async def _watchdog(self) -> None:
        limit = self.reconnect.stale_after
        while True:
            silent = trio.current_time() - self.last_receive
            if silent >= limit:
                raise FeedStale(f"{self.exchange}: no frame for {silent:.1f}s")
            await trio.sleep(limit - silent)

    async def _handle(self, outputs: Outputs, link: _Link) -> None:
        """Publish the events of ``outputs`` in one step, then send what is to be
        sent, start what is to be fetched, log what was malformed."""
        events: list[Event] = []
        sends: list[Send] = []
        last_event = self.last_event
        now = trio.current_time()
        for output in outputs:
            if isinstance(output, Send):
                sends.append(output)
            elif isinstance(output, FetchSnapshot | FetchTrades):
                link.nursery.start_soon(self._fetch, link, output)
            elif isinstance(output, Malformed):
                log.warning("%s: skipped a frame: %s: %s", self.exchange, output.reason, output.text)
            else:
                last_event[output.symbol] = now
                events.append(output)
        if events:
            await self.out.publish(events, drained=not link.ws.backlog())
        for send in sends:
            await link.ws.send_text(send.text)

    async def _fetch(self, link: _Link, request: FetchSnapshot | FetchTrades) -> None:
        """GET a book snapshot or a trade history page and hand its body to the
        protocol; REST failures retry with backoff inside this task, so one slow
        endpoint does not drop the WebSocket."""
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
        feed = self.feed
        assert feed is not None  # fetches start once the feed exists
        recv_ts = time.time()
        if isinstance(request, FetchSnapshot):
            outputs = feed.on_snapshot(request.symbol, body, recv_ts)
        else:
            outputs = feed.on_trades(request.symbol, body, recv_ts)
        await self._handle(outputs, link)

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
    """What the tasks of one connection share: the WebSocket, their nursery and
    the REST client."""

    ws: FeedSocket
    nursery: trio.Nursery
    http: httpx.AsyncClient
