"""The lifecycle shared by every native WebSocket collector.

Theory of operation
-------------------
``NativeCollector.run`` loads the exchange's market metadata (REST), builds the
sans-IO protocol object, then loops: connect, ``on_open`` (subscriptions), stream.
On any ``FeedError`` it reconnects after a full-jitter backoff that starts over
after a healthy run; subscriptions are restored and books resynced by ``on_open``.

While connected, three tasks share one nursery:

- the reader puts every frame in a small bounded inbox;
- REST fetches (book snapshots, trade history) put their answers in the same inbox;
- the processor takes the inbox in order, calls the protocol, and sends events to
  the dispatcher. When the dispatcher is full the processor waits, the inbox fills,
  the reader waits, and the exchange's socket is no longer read: backpressure.

A watchdog closes a connection that received nothing for ``stale_after`` seconds
(heartbeats and pings count: a quiet symbol does not). Every connection state
change is a ``FeedState`` event on the ``system`` channel and a counter.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs
import httpx
import trio
import trio_websocket

from daemon.collectors.state import CollectorState
from daemon.collectors.venues import Venue
from daemon.config import ExchangeConfig, ReconnectConfig
from daemon.errors import FeedDisconnected, FeedError, FeedStale, feed_errors
from daemon.events import Event
from daemon.exchanges.base import FetchSnapshot, FetchTrades, Malformed, Send
from daemon.supervise import Backoff

log = logging.getLogger(__name__)

INBOX_SIZE = 64
#: Largest exchange frame accepted (Kraken and Binance snapshots can be large).
MAX_FRAME = 16 * 1024 * 1024
#: trio-websocket's own message queue and read size (its defaults, 1 message and
#: 4 KiB, cost a task switch per message and many reads per snapshot); bounded, so
#: backpressure still reaches the socket
WS_QUEUE = 64
WS_RECEIVE_BYTES = 64 * 1024


class NativeCollector(CollectorState):
    """One exchange feed over the exchange's own WebSocket protocol.

    ``out`` is a dispatcher source channel; ``venue`` names the protocol and URLs;
    ``cfg`` the symbols and channels (and URL overrides); ``reconnect`` the backoff.
    """

    def __init__(
        self,
        venue: Venue,
        cfg: ExchangeConfig,
        reconnect: ReconnectConfig,
        out: trio.MemorySendChannel[Event],
    ) -> None:
        self.venue = venue
        self.exchange = venue.exchange
        self.cfg = cfg
        self.reconnect = reconnect
        self.out = out
        self.rest_url = cfg.rest_url or venue.rest_url
        self.ws_url = cfg.ws_url or venue.ws_url
        self.feed: Any = None
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
            markets = await self._load_markets(http)
            self.feed = self.venue.make_feed(self.cfg, markets)
            while True:
                started = trio.current_time()
                try:
                    await self._connect_once(http)
                except FeedError as exc:
                    if trio.current_time() - started >= self.reconnect.healthy_after:
                        self.backoff.reset()
                    delay = self.backoff.next_delay()
                    state = "stale" if isinstance(exc, FeedStale) else "reconnecting"
                    await self.set_state(state, f"{exc}; retry in {delay:.2f}s")
                    log.warning("%s: %s; reconnecting in %.2fs", self.exchange, exc, delay)
                    await trio.sleep(delay)

    async def _load_markets(self, http: httpx.AsyncClient) -> dict[str, str]:
        while True:
            try:
                with feed_errors(f"{self.exchange} markets"):
                    response = await http.get(self.venue.markets_target)
                    response.raise_for_status()
                return await trio.to_thread.run_sync(self.venue.parse_markets, response.text)
            except (FeedError, ValueError) as exc:
                delay = self.backoff.next_delay()
                await self.set_state("failed", f"market metadata: {exc}")
                log.error("%s: cannot load markets (%s); retry in %.2fs", self.exchange, exc, delay)
                await trio.sleep(delay)

    async def _connect_once(self, http: httpx.AsyncClient) -> None:
        url = self.feed.url(self.ws_url)
        await self.set_state("connecting", url)
        try:
            with feed_errors(f"{self.exchange} stream"):
                async with trio_websocket.open_websocket_url(
                    url, max_message_size=MAX_FRAME, connect_timeout=10, disconnect_timeout=2,
                    message_queue_size=WS_QUEUE, receive_buffer_size=WS_RECEIVE_BYTES,
                ) as ws, trio.open_nursery() as nursery:
                    self.connected_since = trio.current_time()
                    self.last_receive = trio.current_time()
                    inbox_send, inbox_receive = trio.open_memory_channel[tuple](INBOX_SIZE)
                    await self._handle(self.feed.on_open(time.time()), ws, nursery, http, inbox_send)
                    await self.set_state("subscribed", url)
                    nursery.start_soon(self._read, ws, inbox_send)
                    nursery.start_soon(self._watchdog)
                    await self._process(ws, nursery, http, inbox_receive, inbox_send)
        except* FeedError as group:
            raise group.exceptions[0] from None
        finally:
            self.connected_since = None

    async def _read(self, ws: trio_websocket.WebSocketConnection, inbox: trio.MemorySendChannel) -> None:
        with feed_errors(f"{self.exchange} stream"):
            while True:
                message = await ws.get_message()
                self.last_receive = trio.current_time()
                self.frames += 1
                item = ("frame", message, time.time())
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

    async def _process(self, ws, nursery, http, inbox_receive, inbox_send) -> None:
        feed = self.feed
        async for item in inbox_receive:
            # what is already queued is handled without a schedule point per item
            while True:
                kind = item[0]
                if kind == "frame":
                    outputs = feed.on_message(item[1], item[2])
                elif kind == "snapshot":
                    outputs = feed.on_snapshot(item[1], item[2], item[3])
                else:
                    outputs = feed.on_trades(item[1], item[2], item[3])
                if outputs:
                    await self._handle(outputs, ws, nursery, http, inbox_send)
                try:
                    item = inbox_receive.receive_nowait()
                except trio.WouldBlock:
                    break
        raise FeedDisconnected(f"{self.exchange}: stream ended")

    async def _handle(self, outputs: list, ws, nursery, http, inbox_send) -> None:
        for output in outputs:
            if isinstance(output, Send):
                with feed_errors(f"{self.exchange} send"):
                    await ws.send_message(output.text)
            elif isinstance(output, FetchSnapshot):
                nursery.start_soon(self._fetch, http, "snapshot", output, inbox_send)
            elif isinstance(output, FetchTrades):
                nursery.start_soon(self._fetch, http, "trades", output, inbox_send)
            elif isinstance(output, Malformed):
                log.warning("%s: skipped a frame: %s: %s", self.exchange, output.reason, output.text)
            else:
                self.last_event[output.symbol] = trio.current_time()
                try:
                    self.out.send_nowait(output)
                except trio.WouldBlock:
                    await self.out.send(output)  # the dispatcher is full: wait (backpressure)

    async def _fetch(self, http, kind: str, request: FetchSnapshot | FetchTrades, inbox_send) -> None:
        """GET a book snapshot or a trade history page and queue its body as ``kind``;
        REST failures retry with backoff inside this task, so one slow endpoint does
        not drop the WebSocket."""
        backoff = Backoff(self.reconnect.base, self.reconnect.cap)
        while True:
            try:
                with feed_errors(f"{self.exchange} {kind} {request.symbol}"):
                    response = await http.get(request.target)
                    response.raise_for_status()
                break
            except FeedError as exc:
                delay = backoff.next_delay()
                log.warning("%s: %s; retry in %.2fs", self.exchange, exc, delay)
                await trio.sleep(delay)
        await inbox_send.send((kind, request.symbol, response.text, time.time()))

    def statistics(self) -> dict[str, Any]:
        """State, counters, and ages in seconds: of the last frame on the connection
        and of the last event per symbol (a quiet symbol is reported, never a reason
        to reconnect)."""
        now = trio.current_time()
        stats = self.feed.stats if self.feed is not None else None
        return {
            "exchange": self.exchange,
            "mode": "native",
            "state": self.state,
            "states": dict(self.state_counts),
            "frames": self.frames,
            "last_frame_age": round(now - self.last_receive, 3) if self.last_receive else None,
            "symbols": {
                symbol: round(now - at, 3) for symbol, at in sorted(self.last_event.items())
            },
            "counters": attrs.asdict(stats) if stats is not None else {},
        }
