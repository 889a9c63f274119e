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
import os
import socket
import time
from collections import deque
from typing import Any

import attrs
import trio

from daemon.broadcast.auth import Grant
from daemon.broadcast.connection import ConnectionClosed, ServerConnection
from daemon.broadcast.frames import batch_payload, text_frame
from daemon.broadcast.protocol import (
    FORBIDDEN,
    RATE_LIMITED,
    TOO_MANY_SUBSCRIPTIONS,
    Ping,
    RequestError,
    Subscribe,
    parse_request,
)
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
#: Control-frame bytes piled up behind a full socket before the client is dropped.
MAX_PILED = 1 << 20
#: Every LATENCY_SAMPLE-th write of a client goes into the latency histogram.
LATENCY_SAMPLE = 8
#: Seconds a closing client gets to take the frame being written and the close frame.
CLOSE_TIMEOUT = 5.0


@attrs.define(eq=False, slots=True)
class Marker:
    """Stands in a queue for a conflated or throttled stream's latest state."""

    stream: Stream


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

    ``server`` gives the epoch, the latency histogram and the policy counters.
    """

    def __init__(
        self,
        conn: ServerConnection,
        remote: str,
        dispatcher: Dispatcher,
        config: ServerConfig,
        hello: dict[str, Any],
        grant: Grant,
        server: Any,
    ) -> None:
        self.conn = conn
        self.remote = remote
        self.dispatcher = dispatcher
        self.config = config
        self.hello = hello
        self.grant = grant
        self.server = server
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
        self._out = bytearray()  # bytes the socket has not taken yet, in order
        self._piled = 0  # control-frame bytes added to _out while it was not empty
        self._broken = False
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
            self.server.slow_consumers += 1
            log.warning("broadcast: client %s closed as a slow consumer", self.remote)
            self.close(CLOSE_SLOW_CONSUMER, SLOW_CONSUMER)
            return
        self.queue.append(message)
        self.server.dirty.add(self)

    def _conflate(self, stream: Stream) -> None:
        self.counters.conflated += 1
        self.server.conflations += 1
        self.queue = deque(
            item for item in self.queue
            if not (isinstance(item, Message) and item.stream is stream)
        )
        self.marked.add(stream)
        self.queue.append(Marker(stream))
        self.server.dirty.add(self)

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
        self._open_output()
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
                    self.server.dirty.discard(self)
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 1.0
                if self._out and self._scope.cancelled_caught:
                    pass  # a frame was cut by the timeout: no close frame after it
                elif self.close_code is not None and not self._broken:
                    await self.conn.close(self.close_code, self.close_reason)
                    await self._drain()
                    # the client's close reply, or its TCP close
                    with trio.move_on_after(1.0), contextlib.suppress(ConnectionClosed):
                        while True:
                            await self.conn.get_message()
        finally:
            self.raw.close()
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
    # Every byte to the client goes through ``_out`` in order: frames built from the
    # queue, and wsproto's control frames (pong, ping, close: ``conn.output``). The
    # bytes are written at once, without waiting, on a duplicate of the socket's file
    # descriptor: by ``flush`` (the server calls it for every session the dispatcher
    # delivered to, once per batch of events), after a request is answered, and by the
    # writer task, which is only woken when the socket is full or a throttle is due.
    # The queue is moved into ``_out`` only while ``_out`` is empty, so a client that
    # does not read keeps its backlog in the bounded queue, where the slow-consumer
    # policy sees it.

    def _open_output(self) -> None:
        self.raw = socket.socket(fileno=os.dup(self.conn.stream.socket.fileno()))
        self.raw.setblocking(False)
        self.conn.output = self._emit

    def flush(self) -> None:
        """Move what is queued to the socket now, as far as it takes it."""
        if not self._out and self.queue and self.close_code is None:
            self._emit(self._build())

    def _emit(self, data: bytes) -> None:
        if self._broken:
            return
        if self._out:
            # only control frames reach here while the socket is full (the queue
            # waits there): pongs to a client that pings and never reads are bounded
            self._out += data
            self._piled += len(data)
            if self._piled > MAX_PILED:
                log.warning("broadcast: client %s dropped: it does not read its control "
                            "frames", self.remote)
                self._break()
            return
        self._piled = 0
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._break()
            return
        if sent < len(data):
            self._out += data[sent:]
            self._wake.set()  # the writer task waits until the socket takes more

    def _send_pending(self) -> None:
        try:
            sent = self.raw.send(self._out)
        except BlockingIOError:
            return
        except OSError:
            self._break()
            return
        del self._out[:sent]

    def _break(self) -> None:
        self._broken = True
        self._out.clear()
        self._read_scope.cancel()
        self._wake.set()

    def _build(self) -> bytes:
        """Frames for everything queued: batches of at most ``max_batch`` messages
        and ``max_frame_bytes``; a message alone is its shared prebuilt frame. Within
        one write (``server.queue_cache``), a queue of the same messages as another
        session's is written as the bytes built for that session."""
        queue, server = self.queue, self.server
        whole = server.queue_cache
        key: tuple[int, ...] | None = None
        if whole is not None:
            key = tuple(map(id, queue))
            hit = whole.get(key)
            if hit is not None:
                data, sent, frames, batches, first_recv, _ = hit
                queue.clear()
                server.shared_batches += batches
                return self._account(data, sent, frames, first_recv)
            items = list(queue)
        data, sent, frames, batches, first_recv, plain = self._build_frames()
        if key is not None and plain:
            # the messages stay referenced with the bytes, so no id in a key can be
            # reused by another object during the write
            whole[key] = (data, sent, frames, batches, first_recv, items)
        return self._account(data, sent, frames, first_recv)

    def _account(self, data: bytes, sent: int, frames: int, first_recv: float) -> bytes:
        counters = self.counters
        counters.sent += sent
        counters.frames += frames
        counters.bytes += len(data)
        latency = self.server.latency
        # one write in LATENCY_SAMPLE per client is timed: recording costs about 2 us,
        # as much as the rest of a delivery
        if first_recv and latency is not None and not counters.frames % LATENCY_SAMPLE:
            latency.record_value(max(1, int((time.time() - first_recv) * 1e6)))
        return data

    def _build_frames(self) -> tuple[bytes, int, int, int, float, bool]:
        """Empty the queue into frames: ``(bytes, messages, frames, batched frames,
        recv_ts of the first event, whether every item was a shared event)``."""
        max_batch, max_bytes = self.config.max_batch, self.config.max_frame_bytes
        frames: list[bytes] = []
        sent = batches = 0
        first_recv = 0.0
        plain = True
        queue = self.queue
        while queue:
            payloads: list[bytes] = []
            single: Message | None = None
            size = 0
            while queue and len(payloads) < max_batch:
                item = queue[0]
                is_message = type(item) is Message
                payload = item.payload if is_message else self._render(item)
                if payload is None:
                    queue.popleft()
                    plain = False
                    continue
                if payloads and size + len(payload) > max_bytes:
                    break
                queue.popleft()
                payloads.append(payload)
                size += len(payload) + 1
                if is_message:
                    single = item
                    if not first_recv:
                        first_recv = item.recv_ts
                else:
                    # a control message or a conflated state: this client's only
                    single = None
                    plain = False
            if not payloads:
                continue
            if len(payloads) == 1 and single is not None:
                if single.frame is None:
                    single.frame = text_frame(single.payload)
                frame = single.frame
            elif len(payloads) == 1:
                frame = text_frame(payloads[0])
            else:
                frame = text_frame(batch_payload(payloads))
                batches += 1
            frames.append(frame)
            sent += len(payloads)
        return b"".join(frames), sent, len(frames), batches, first_recv, plain

    async def _write(self) -> None:
        """Wait for the socket when it is full, and for throttles when one is due."""
        while not self._broken:
            if self._out:
                await trio.lowlevel.wait_writable(self.raw)
                self._send_pending()
                if not self._out:
                    self.flush()
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
        while self._out and not self._broken:
            await trio.lowlevel.wait_writable(self.raw)
            self._send_pending()

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
                self.server.ping_timeouts += 1
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
