"""One client connection: its subscriptions, its bounded queue, its writer.

Theory of operation
-------------------
The dispatcher calls ``deliver`` synchronously for every message of a subscribed
stream; the message is the one encoding every client shares, and when it leaves
alone, the one frame too. ``deliver`` never blocks: it appends to this client's
queue. When the queue holds ``client_queue`` messages the client is a **slow
consumer**, and the policy depends on the data:

- ``book`` and ``ticker`` streams **conflate**: the stream's queued messages are
  taken out and one marker takes their place; when the writer reaches it, it
  sends the stream's state at that moment (the current ``book_snapshot``, the
  latest ``ticker``) marked ``"conflated": true``. Later messages of a marked
  stream are not queued: the marker already stands for them. Never a stale book.
- ``trades`` and ``system`` are lossless: the client is closed with **4008**
  ``slow consumer``, and can resume with ``since``.

``throttle_ms`` on a subscription uses the same marker: at most one message per
``book`` or ``ticker`` stream per interval, the latest state wins.

The writer batches: the messages pending when it wakes leave in one frame (a JSON
array, at most ``max_batch`` messages and ``max_frame_bytes``); one pending
message leaves at once in its own frame, prebuilt and shared by all clients. A
close never cuts a frame: the writer finishes the frame it is writing first.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from typing import Any

import attrs
import trio

from daemon.broadcast.auth import Grant
from daemon.broadcast.coalesce import Coalescer
from daemon.broadcast.connection import ConnectionClosed, ServerConnection
from daemon.broadcast.frames import Built, build_frames
from daemon.broadcast.protocol import (
    FORBIDDEN,
    RATE_LIMITED,
    TOO_MANY_SUBSCRIPTIONS,
    Ping,
    RequestError,
    Subscribe,
    parse_request,
)
from daemon.broadcast.writer import Writer, open_writer
from daemon.config import ServerConfig
from daemon.dispatch import Dispatcher, Message, Stream, matches
from daemon.wire import encode

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_SLOW_CONSUMER = 4008
CLOSE_PING_TIMEOUT = 4001
CLOSE_IDLE = 4000
CLOSE_RATE_LIMITED = 4029
SLOW_CONSUMER = "slow consumer"
#: Every LATENCY_SAMPLE-th write of a client goes into the latency histogram.
LATENCY_SAMPLE = 8
#: Seconds a closing client gets to take the frame being written and the close frame.
CLOSE_TIMEOUT = 5.0


@attrs.define(eq=False, slots=True)
class Marker:
    """Stands in a queue for a conflated or throttled stream's latest state."""

    stream: Stream


@attrs.define(slots=True)
class ServerCounters:
    """What the server's sessions did, together: one object the server owns and
    passes to each session (sessions write into nothing else of the server).
    ``slow_consumers`` closed (4008), ``conflations`` (backlogs replaced by the
    latest state), ``ping_timeouts`` (4001), ``shared_batches`` (batched frames
    written as built for another client in the same write); ``latency``:
    receive-to-client-write, microseconds (HdrHistogram)."""

    latency: Any
    slow_consumers: int = 0
    conflations: int = 0
    ping_timeouts: int = 0
    shared_batches: int = 0


@attrs.define
class SessionCounters:
    """What a session did: messages and frames sent, bytes written, conflations
    (backlogs replaced by the latest state), throttled messages, requests refused
    for the rate limit."""

    sent: int = 0
    frames: int = 0
    bytes: int = 0
    conflated: int = 0
    throttled: int = 0
    rate_limited: int = 0


class Session:
    """A connected client (see the module docstring).

    ``shared`` takes the counters of all sessions; ``coalescer`` decides when
    the queue is written (``daemon.broadcast.coalesce``).
    """

    def __init__(
        self,
        conn: ServerConnection,
        remote: str,
        dispatcher: Dispatcher,
        config: ServerConfig,
        hello: dict[str, Any],
        grant: Grant,
        shared: ServerCounters,
        coalescer: Coalescer,
    ) -> None:
        self.conn = conn
        self.remote = remote
        self.dispatcher = dispatcher
        self.config = config
        self.hello = hello
        self.grant = grant
        self.shared = shared
        self.coalescer = coalescer
        self.queue: deque[Message | Marker | bytes] = deque()  # bytes: a control message
        self.marked: set[Stream] = set()
        self.throttles: dict[tuple[str, str], float] = {}  # (channel, pattern) -> seconds
        self.last_sent: dict[Stream, float] = {}
        self.due: dict[Stream, float] = {}
        self.counters = SessionCounters()
        self.close_code: int | None = None
        self.close_reason = ""
        self.connected_at = trio.current_time()
        self._wake = trio.Event()
        self._scope = trio.CancelScope(shield=True)
        self._read_scope = trio.CancelScope()
        self._tokens = config.max_messages_per_second
        self._refilled = trio.current_time()
        self._over_since: float | None = None
        self._pong_due: float | None = None
        self.writer: Writer | None = None
        self._ping_count = 0

    # -- called by the dispatcher --------------------------------------------------------

    def deliver(self, message: Message, initial: bool = False) -> None:
        """Queue one message, or apply the throttle or the slow-consumer policy.
        ``initial`` messages (history, recovery, snapshots: bounded by retention)
        are queued past the bound."""
        if self.close_code is not None:
            return
        stream = message.stream
        if stream in self.marked:
            return  # a marker in the queue already stands for the latest state
        if stream.policy.conflates and self.throttles:
            interval = self._throttle(stream)
            if interval:
                now = trio.current_time()
                due = self.last_sent.get(stream, -math.inf) + interval
                if now < due:
                    self.counters.throttled += 1
                    self.marked.add(stream)
                    self.due[stream] = due
                    self._wake.set()
                    return
                self.last_sent[stream] = now
        if len(self.queue) >= self.config.client_queue and not initial:
            if stream.policy.conflates:
                self._conflate(stream)
                return
            self.shared.slow_consumers += 1
            log.warning("broadcast: client %s closed as a slow consumer", self.remote)
            self.close(CLOSE_SLOW_CONSUMER, SLOW_CONSUMER)
            return
        self.queue.append(message)
        self.coalescer.mark(self)

    def _conflate(self, stream: Stream) -> None:
        self.counters.conflated += 1
        self.shared.conflations += 1
        self.queue = deque(
            item for item in self.queue
            if not (isinstance(item, Message) and item.stream is stream)
        )
        self.marked.add(stream)
        self.queue.append(Marker(stream))
        self.coalescer.mark(self)

    def _throttle(self, stream: Stream) -> float:
        return max(
            (seconds for (channel, pattern), seconds in self.throttles.items()
             if channel == stream.channel and matches(pattern, stream.exchange, stream.symbol)),
            default=0.0,
        )

    def _control(self, message: dict[str, Any]) -> None:
        """Queue a control message (ack, error, pong): never conflated, never dropped."""
        if self.close_code is None:
            self.queue.append(encode(message))

    def close(self, code: int, reason: str, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close this client with ``code``: nothing more is queued, the frame being
        written is finished (within ``timeout`` seconds), then the close frame."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self.dispatcher.remove(self)
            self._read_scope.cancel()
            self._wake.set()
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + timeout)

    # -- the connection's tasks ----------------------------------------------------------

    async def run(self) -> None:
        """Serve the client until it leaves or ``close`` is called.

        The session is shielded from outside cancellation: a shutdown calls
        ``close(1001, ...)`` instead, so that no frame is cut in the middle and the
        client gets its close code.
        """
        writer = self.writer = open_writer(self.conn.stream, self._break, self._wake_writer)
        self.conn.output = self._control_output
        try:
            with self._scope:
                try:
                    self._control(self.hello)
                    self.flush()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._write)
                        keepalive = trio.CancelScope()
                        nursery.start_soon(self._keepalive, keepalive)
                        with self._read_scope:
                            await self._read()
                        keepalive.cancel()
                        if self.close_code is None:  # the client left
                            nursery.cancel_scope.cancel()
                        else:
                            self._wake.set()  # the writer finishes what it has begun
                finally:
                    self.dispatcher.remove(self)
                    self.coalescer.discard(self)
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 1.0
                if writer.pending and self._scope.cancelled_caught:
                    pass  # a frame was cut by the timeout: no close frame after it
                elif self.close_code is not None and not writer.broken:
                    await self.conn.close(self.close_code, self.close_reason)
                    await self._drain()
                    # the client's close reply, or its TCP close
                    with trio.move_on_after(1.0), contextlib.suppress(ConnectionClosed):
                        while True:
                            await self.conn.get_message()
        finally:
            writer.close()
            with trio.CancelScope(shield=True):
                await self.conn.stream.aclose()

    async def _read(self) -> None:
        while True:
            try:
                text = await self.conn.get_message()
            except ConnectionClosed as exc:
                if exc.code in (1003, 1009):  # we closed it: message too big, binary
                    self.close(exc.code, exc.reason)
                return
            if self._rate_limited():
                self.flush()
                continue
            self.handle(text)
            self.flush()

    def _rate_limited(self) -> bool:
        now = trio.current_time()
        rate = self.config.max_messages_per_second
        self._tokens = min(rate, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            if self._tokens >= rate / 2:  # the client slowed down: forgiven
                self._over_since = None
            return False
        self.counters.rate_limited += 1
        if self._over_since is None:
            self._over_since = now
        if now - self._over_since >= self.config.rate_limit_grace:
            self.close(CLOSE_RATE_LIMITED, "rate limited")
        else:
            self._control({"type": "error", "id": None, "code": RATE_LIMITED,
                           "message": f"more than {rate:g} requests per second"})
        return True

    def handle(self, text: str) -> None:
        """Answer one client request: ``ack`` + initial messages, ``pong`` or
        ``error``."""
        try:
            request = parse_request(text)
            if isinstance(request, Ping):
                self._control({"type": "pong", "id": request.id})
            elif isinstance(request, Subscribe):
                self._subscribe(request)
            else:
                self.dispatcher.unsubscribe(self, request.channels, request.symbols)
                for channel in request.channels:
                    for symbol in request.symbols:
                        self.throttles.pop((channel, symbol), None)
                self._control({"type": "ack", "id": request.id, "op": "unsubscribe",
                               "channels": request.channels, "symbols": request.symbols})
        except RequestError as exc:
            self._control({"type": "error", "id": exc.request_id, "code": exc.code,
                           "message": exc.message})

    def _subscribe(self, request: Subscribe) -> None:
        for channel in request.channels:
            for symbol in request.symbols:
                if not self.grant.allows(channel, symbol):
                    raise RequestError(
                        FORBIDDEN, f"this token may not subscribe to {channel} {symbol}",
                        request.id)
        pairs = self.dispatcher.subscriptions.get(self, set())
        new = {(c, s) for c in request.channels for s in request.symbols} - pairs
        if len(pairs) + len(new) > self.config.max_subscriptions:
            raise RequestError(
                TOO_MANY_SUBSCRIPTIONS,
                f"at most {self.config.max_subscriptions} channel x symbol pairs", request.id)
        since = request.since
        epoch_ok = request.epoch is None or request.epoch == self.hello["epoch"]
        if request.throttle_ms:
            for pair in new:
                self.throttles[pair] = request.throttle_ms / 1000
        initial, recovered = self.dispatcher.subscribe(
            self, request.channels, request.symbols, request.history,
            since if epoch_ok else None,
        )
        ack: dict[str, Any] = {"type": "ack", "id": request.id, "op": "subscribe",
                               "channels": request.channels, "symbols": request.symbols}
        if since:
            ack["recovered"] = {key: recovered.get(key, False) for key in since}
            ack["epoch"] = self.hello["epoch"]
        self._control(ack)
        for message in initial:
            self.deliver(message, initial=True)

    # -- the write side ----------------------------------------------------------------
    #
    # Every byte to the client goes through the writer in order (``writer.py``):
    # frames built from the queue, and wsproto's control frames (pong, ping, close:
    # ``conn.output``). ``flush`` (the coalescer calls it for every session the
    # dispatcher delivered to, once per write; and after a request is answered)
    # hands the queue's frames to the writer, which writes them at once on a plain
    # socket or from the writer task on a stream (TLS). The queue is moved into the
    # writer only while nothing waits in it, so a client that does not read keeps its
    # backlog in the bounded queue, where the slow-consumer policy sees it.

    def _control_output(self, data: bytes) -> None:
        if self.writer is not None:
            self.writer.emit(data, control=True)

    def _wake_writer(self) -> None:
        self._wake.set()

    def flush(self) -> None:
        """Move what is queued to the writer now, as far as the client takes it."""
        writer = self.writer
        if (writer is not None and not writer.pending and self.queue
                and self.close_code is None):
            writer.emit(self._build())

    def _break(self, piled: bool) -> None:
        """The connection failed, or (``piled``) the client does not read its
        control frames."""
        if piled:
            log.warning("broadcast: client %s dropped: it does not read its control "
                        "frames", self.remote)
        self._read_scope.cancel()
        self._wake.set()

    def _build(self) -> bytes:
        """Frames for everything queued (``frames.build_frames``). Within one write
        (``coalescer.cache``), a queue of the same messages as another session's is
        written as the bytes built for that session."""
        queue = self.queue
        cache = self.coalescer.cache
        if cache is not None:
            key = tuple(map(id, queue))
            hit = cache.get(key)
            if hit is not None:
                queue.clear()
                self.shared.shared_batches += hit.batches
                return self._account(hit)
            items: list[object] = list(queue)
        built = build_frames(queue, self._render, self.config.max_batch,
                             self.config.max_frame_bytes)
        if cache is not None and built.shareable:
            cache.put(key, built, items)
        return self._account(built)

    def _account(self, built: Built) -> bytes:
        counters = self.counters
        counters.sent += built.messages
        counters.frames += built.frames
        counters.bytes += len(built.data)
        latency = self.shared.latency
        # one write in LATENCY_SAMPLE per client is timed: recording costs about 2 us,
        # as much as the rest of a delivery
        if built.first_recv and latency is not None and not counters.frames % LATENCY_SAMPLE:
            latency.record_value(max(1, int((time.time() - built.first_recv) * 1e6)))
        return built.data

    async def _write(self) -> None:
        """Send what the writer keeps, and wait for throttles when one is due."""
        writer = self.writer
        assert writer is not None
        while not writer.broken:
            if writer.pending:
                await writer.send_pending()  # then the queue, once it is all sent
                continue
            if self.close_code is not None:
                return
            if self.queue:
                self.flush()
                continue
            self._wake = trio.Event()
            next_due = min(self.due.values(), default=math.inf)
            with trio.move_on_at(next_due):
                await self._wake.wait()
            self._release_due()

    async def _drain(self) -> None:
        writer = self.writer
        while writer is not None and writer.pending and not writer.broken:
            await writer.send_pending()

    def _render(self, item: Message | Marker | bytes) -> bytes | None:
        if isinstance(item, bytes):
            return item
        if isinstance(item, Message):
            return item.payload
        stream = item.stream
        self.marked.discard(stream)
        self.last_sent[stream] = trio.current_time()
        if stream.channel == "book":
            message = stream.snapshot_message(conflated=True)
            return message.payload if message is not None else None
        if stream.latest is None:
            return None
        return stream.latest.payload[:-1] + b',"conflated":true}'

    def _release_due(self) -> None:
        now = trio.current_time()
        for stream, due in list(self.due.items()):
            if due <= now:
                del self.due[stream]
                self.queue.append(Marker(stream))

    async def _keepalive(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._keepalive_loop()

    async def _keepalive_loop(self) -> None:
        """Ping every ``ping_interval``; no pong within ``ping_timeout`` closes the
        client (4001). A client with no subscription for ``idle_timeout`` is closed
        (4000)."""
        config = self.config
        self.conn.on_pong = self._pong
        idle_since = self.connected_at
        while self.close_code is None:
            await trio.sleep(min(config.ping_interval, config.idle_timeout))
            now = trio.current_time()
            if self._pong_due is not None and now >= self._pong_due:
                self.shared.ping_timeouts += 1
                self.close(CLOSE_PING_TIMEOUT, "ping timeout")
                return
            if self.dispatcher.subscriptions.get(self):
                idle_since = now
            elif now - idle_since >= config.idle_timeout:
                self.close(CLOSE_IDLE, "idle")
                return
            if self._pong_due is None:
                self._ping_count += 1
                self._pong_due = now + config.ping_timeout
                try:
                    await self.conn.ping(str(self._ping_count).encode())
                except ConnectionClosed:
                    return

    def _pong(self, payload: bytes) -> None:
        self._pong_due = None

    def statistics(self) -> dict[str, Any]:
        """This client's figures: address, queue depth, subscriptions, counters."""
        return {
            "remote": self.remote,
            "grant": self.grant.name,
            "queue": len(self.queue),
            **attrs.asdict(self.counters),
            "subscriptions": sorted(
                f"{c}:{p}" for c, p in self.dispatcher.subscriptions.get(self, ())
            ),
        }
