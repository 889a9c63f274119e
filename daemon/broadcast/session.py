"""One client connection: the tasks that serve it, composed of parts with one job each.

- ``requests.RequestHandler`` (sans-IO) answers the client's requests and applies
  its rate limit;
- ``queue.ClientQueue`` (sans-IO) holds what waits for the client and applies the
  slow-consumer and throttle policies (conflate, or close with 4008);
- ``frames.build_frames`` turns the queue into WebSocket frames (batches);
- ``writer`` writes them (the raw socket for plain TCP, trio's stream for TLS);
- ``coalesce.Coalescer`` decides when the queues are written.

The session itself is the glue and the I/O: it reads frames, runs the keepalive
(ping, idle) and the writer task, and closes the client. The session's queue is
the dispatcher's subscriber: the dispatcher calls ``queue.deliver`` synchronously
for every message of a subscribed stream, and it never blocks. A close never
cuts a frame: the writer finishes the frame it is writing first, then the close
frame.

Slow consumers
--------------
The queue's policy (``queue.py``) decides what a slow client gets, not the
socket buffers: the connection's send buffer is bounded (``server.send_buffer``,
``SO_SNDBUF``), and the writer's stall clock says since when it has waited for
the client to take bytes. After ``stall_timeout`` (default 10 s) of no progress
the client is a slow consumer: closed 4008 if it has a lossless subscription,
else its queue holds (every state stream conflated to one marker, the latest
state) until the writer has sent what it keeps. A ping cannot leave while the
writer waits, so its timeout does not run meanwhile: a stalled client is closed
4001 only after ``stall_timeout + ping_timeout``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import attrs
import trio

from daemon.broadcast.auth import Grant
from daemon.broadcast.coalesce import Coalescer
from daemon.broadcast.connection import ConnectionClosed, ServerConnection
from daemon.broadcast.frames import Built, build_frames, text_frame
from daemon.broadcast.protocol import FORBIDDEN, Publish
from daemon.broadcast.queue import ClientQueue, QueueHooks
from daemon.broadcast.requests import Answer, RequestHandler
from daemon.broadcast.writer import Writer, open_writer
from daemon.config import ServerConfig
from daemon.derived.views import Views
from daemon.dispatch import Dispatcher, Message
from daemon.publish.publisher import Publisher
from daemon.wire import encode

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_SLOW_CONSUMER = 4008
CLOSE_PING_TIMEOUT = 4001
CLOSE_IDLE = 4000
#: Every LATENCY_SAMPLE-th write of an event (of all clients together) goes into
#: the latency histogram.
LATENCY_SAMPLE = 16
#: Seconds a closing client gets to take the frame being written and the close frame.
CLOSE_TIMEOUT = 5.0


@attrs.define(slots=True)
class ServerCounters:
    """What the server's sessions did, together: one object the server owns and
    passes to each session (sessions write into nothing else of the server).
    ``slow_consumers`` closed (4008), ``conflations`` (backlogs replaced by the
    latest state), ``ping_timeouts`` (4001), ``shared_batches`` (batched frames
    written as built for another client in the same write); ``latency``:
    receive-to-client-write, microseconds (HdrHistogram)."""

    latency: Any
    #: writes of an event left before the next is timed (``LATENCY_SAMPLE``)
    until_sample: int = LATENCY_SAMPLE
    slow_consumers: int = 0
    conflations: int = 0
    ping_timeouts: int = 0
    shared_batches: int = 0


@attrs.define
class SessionCounters:
    """What a session wrote: messages and frames sent, bytes written."""

    sent: int = 0
    frames: int = 0
    bytes: int = 0


@attrs.frozen
class SessionStatistics:
    """One client's figures: ``remote`` address, ``grant`` (its token's name),
    ``queue`` depth, messages ``sent``, ``frames``, ``bytes`` written,
    ``conflated`` backlogs, ``throttled`` messages, requests refused for the rate
    limit (``rate_limited``), and its ``subscriptions`` (``channel:pattern``)."""

    remote: str
    grant: str
    queue: int
    sent: int
    frames: int
    bytes: int
    conflated: int
    throttled: int
    rate_limited: int
    subscriptions: tuple[str, ...]


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
        publisher: Publisher | None = None,
        views: Views | None = None,
    ) -> None:
        self.conn = conn
        self.remote = remote
        self.dispatcher = dispatcher
        self.config = config
        self.hello = hello
        self.grant = grant
        self.shared = shared
        self.coalescer = coalescer
        self.publisher = publisher
        self.queue = ClientQueue(config.client_queue, trio.current_time, QueueHooks(
            ready=coalescer.marker(self), wake=self._wake_writer,
            conflated=self._conflated, slow_consumer=self._slow_consumer,
            send_now=self._send_now), step=coalescer)
        self.requests = RequestHandler(self.queue, dispatcher, grant, config,
                                       str(hello["epoch"]), trio.current_time(), views)
        self.counters = SessionCounters()
        self.close_code: int | None = None
        self.close_reason = ""
        self.connected_at = trio.current_time()
        self._wake = trio.Event()
        self._scope = trio.CancelScope(shield=True)
        self._read_scope = trio.CancelScope()
        #: when the outstanding ping went out (``None``: none is outstanding)
        self._ping_at: float | None = None
        #: set when the writer starts waiting for the client (the stall clock runs)
        self._waits = trio.Event()
        self.writer: Writer | None = None
        self._ping_count = 0

    # -- called by the dispatcher --------------------------------------------------------

    def _conflated(self) -> None:
        self.shared.conflations += 1

    def _slow_consumer(self) -> None:
        self.shared.slow_consumers += 1
        log.warning("broadcast: client %s closed as a slow consumer", self.remote)
        self.close(CLOSE_SLOW_CONSUMER, "slow consumer")

    def close(self, code: int, reason: str, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close this client with ``code``: nothing more is queued, the frame being
        written is finished (within ``timeout`` seconds), then the close frame."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self.queue.close()
            self.dispatcher.remove(self.queue)
            self._read_scope.cancel()
            self._wake.set()
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + timeout)

    def handle(self, text: str | bytes) -> None:
        """Answer one client request (``requests.RequestHandler``): queue its
        replies and initial messages, or close the client."""
        self.apply(self.requests.receive(text, trio.current_time()))

    def apply(self, answer: Answer) -> None:
        """Carry out an ``Answer``: replies first, then the initial messages."""
        if answer.close is not None:
            self.close(answer.close.code, answer.close.reason)
            return
        if self.close_code is not None:
            return
        for reply in answer.replies:
            self.queue.control(encode(reply))
        for message in answer.initial:
            self.queue.deliver(message, initial=True)

    # -- the connection's tasks ----------------------------------------------------------

    async def run(self) -> None:
        """Serve the client until it leaves or ``close`` is called.

        The session is shielded from outside cancellation: a shutdown calls
        ``close(1001, ...)`` instead, so that no frame is cut in the middle and the
        client gets its close code.
        """
        writer = self.writer = open_writer(self.conn.stream, self._break, self._wake_writer,
                                           self._writer_waits)
        _bound_send_buffer(self.conn.stream, self.config.send_buffer)
        self.conn.output = self._control_output
        try:
            with self._scope:
                try:
                    self.queue.control(encode(self.hello))
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
                    self.dispatcher.remove(self.queue)
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
            answer = self.requests.receive(text, trio.current_time())
            if answer.publish is not None:
                await self._publish(answer.publish)
            else:
                self.apply(answer)
            self.flush()

    async def _publish(self, request: Publish) -> None:
        """Publish for the client (its read waits meanwhile: backpressure) and
        queue the answer: ``ack`` with ``seq`` and ``epoch``, or an ``error``."""
        grant = self.grant.publish
        if self.publisher is None or grant is None:
            reply: dict[str, Any] = {"type": "error", "id": request.id, "code": FORBIDDEN,
                                     "message": "publishing is not available here"}
        else:
            result = await self.publisher.publish(request.message, grant)
            if result.pop("ok"):
                reply = {"type": "ack", "id": request.id, "op": "publish", **result}
            else:
                reply = {"type": "error", "id": request.id, **result}
        self.apply(Answer(replies=(reply,)))

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

    def _writer_waits(self) -> None:
        self._waits.set()

    def flush(self) -> None:
        """Move what is queued to the writer now, as far as the client takes it."""
        writer = self.writer
        queue = self.queue
        if (queue.items and writer is not None and not writer.pending
                and self.close_code is None and not queue.holding):
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
        queue = self.queue.items
        cache = self.coalescer.cache
        if cache is not None:
            # one message (the common case at a moderate rate): its id alone
            key: int | tuple[int, ...] = id(queue[0]) if len(queue) == 1 else tuple(map(id, queue))
            hit = cache.built.get(key)
            if hit is not None:
                queue.clear()
                self.shared.shared_batches += hit.batches
                return self._account(hit)
            items: list[object] = list(queue)
        built = build_frames(queue, self.queue.render, self.config.max_batch,
                             self.config.max_frame_bytes)
        if cache is not None and built.shareable:
            cache.put(key, built, items)
        return self._account(built)

    def _account(self, built: Built) -> bytes:
        self._count(built.messages, built.frames, len(built.data), built.first_recv)
        return built.data

    def _count(self, messages: int, frames: int, size: int, first_recv: float) -> None:
        """Count a write of ``messages`` in ``frames`` (``size`` bytes), whose
        first event was received at ``first_recv`` (epoch s; 0: no event)."""
        counters = self.counters
        counters.sent += messages
        counters.frames += frames
        counters.bytes += size
        if first_recv:
            # one write of an event in LATENCY_SAMPLE is timed (recording costs about
            # 2 us, as much as the rest of a delivery), counted over all clients: a
            # count per client would time every client's write of the same event
            # (clients subscribed together count alike), 200 us more for that event
            # at 100 clients
            shared = self.shared
            shared.until_sample -= 1
            if not shared.until_sample:
                shared.until_sample = LATENCY_SAMPLE
                if shared.latency is not None:
                    shared.latency.record_value(max(1, int((time.time() - first_recv) * 1e6)))

    def _send_now(self, message: Message) -> bool:
        """In a step the coalescer writes at once, ``message`` found the queue
        empty: write its frame (built once for every client, ``Message.frame``)
        now, if nothing waits in the writer and the client is not closing (True);
        else False, and the queue keeps it."""
        writer = self.writer
        if writer is None or self.close_code is not None:
            return False
        frame = message.frame
        if frame is None:
            frame = message.frame = text_frame(message.payload)
        if not writer.write_now(frame):
            return False
        self._count(1, 1, len(frame), message.recv_ts)
        self.coalescer.sent_now += 1
        return True

    async def _write(self) -> None:
        """Send what the writer keeps, and wait for throttles when one is due."""
        writer = self.writer
        assert writer is not None
        while not writer.broken:
            if writer.pending:
                await writer.send_pending()  # then the queue, once it is all sent
                if self.queue.holding and writer.stalled_since is None:
                    self.queue.release()  # the client reads again: the latest states
                continue
            if self.close_code is not None:
                return
            if self.queue and not self.queue.holding:
                self.flush()
                continue
            self._wake = trio.Event()
            with trio.move_on_at(self.queue.next_due):
                await self._wake.wait()
            self.queue.release_due()

    async def _drain(self) -> None:
        writer = self.writer
        while writer is not None and writer.pending and not writer.broken:
            await writer.send_pending()

    async def _keepalive(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._keepalive_loop()

    async def _keepalive_loop(self) -> None:
        """Keepalive, idle clients and the slow-consumer contract (see "Slow
        consumers" in the module docstring).

        A ping every ``ping_interval``; no pong within ``ping_timeout`` closes the
        client (4001), counted from when the ping could leave: not while the writer
        waits for the client. A writer that has waited ``stall_timeout`` for the
        client to take bytes makes it a slow consumer (``_stalled``); one that waits
        ``stall_timeout + ping_timeout`` closes it 4001. No subscription for
        ``idle_timeout`` closes it (4000)."""
        config = self.config
        self.conn.on_pong = self._pong
        idle_since = self.connected_at
        next_ping = self.connected_at + config.ping_interval
        writer = self.writer
        assert writer is not None
        while self.close_code is None:
            stalled = writer.stalled_since
            deadlines = [idle_since + config.idle_timeout]
            if stalled is not None:
                deadlines.append(stalled + config.stall_timeout + (
                    config.ping_timeout if self.queue.holding else 0.0))
            elif self._ping_at is not None:
                deadlines.append(self._ping_at + config.ping_timeout)
            else:
                deadlines.append(next_ping)
            with trio.move_on_at(min(deadlines)):
                if stalled is None:
                    self._waits = trio.Event()
                    await self._waits.wait()  # the writer waits for the client
                    continue
                await trio.sleep_forever()
            now = trio.current_time()
            stalled = writer.stalled_since
            if stalled is not None:
                if self._ping_at is not None:
                    self._ping_at = now  # stuck behind data: its time starts when it leaves
                waited = now - stalled
                if waited >= config.stall_timeout + config.ping_timeout:
                    self.shared.ping_timeouts += 1
                    self.close(CLOSE_PING_TIMEOUT, "ping timeout")
                    return
                if waited >= config.stall_timeout and not self.queue.holding and self._stalled():
                    return
            elif self._ping_at is not None and now - self._ping_at >= config.ping_timeout:
                self.shared.ping_timeouts += 1
                self.close(CLOSE_PING_TIMEOUT, "ping timeout")
                return
            if self.dispatcher.subscriptions.get(self.queue):
                idle_since = now
            elif now - idle_since >= config.idle_timeout:
                self.close(CLOSE_IDLE, "idle")
                return
            if self._ping_at is None and stalled is None and now >= next_ping:
                self._ping_count += 1
                self._ping_at = now
                next_ping = now + config.ping_interval
                try:
                    await self.conn.ping(str(self._ping_count).encode())
                except ConnectionClosed:
                    return

    def _stalled(self) -> bool:
        """The client has taken nothing for ``stall_timeout``: 4008 with a lossless
        subscription (returns True: closed); else conflate what waits and hold the
        queue until the writer has sent what it keeps."""
        channels = self.dispatcher.channels
        lossless = any(channels[c].lossless if c in channels else True
                       for c, _ in self.dispatcher.subscriptions.get(self.queue, ()))
        if lossless:
            self._slow_consumer()
            return True
        self.queue.hold()
        self.shared.conflations += 1
        log.info("broadcast: client %s does not read: its streams are conflated until it "
                 "does", self.remote)
        return False

    def _pong(self, payload: bytes) -> None:
        self._ping_at = None

    def statistics(self) -> SessionStatistics:
        """This client's figures now (see ``SessionStatistics``)."""
        queue = self.queue.statistics()
        counters = self.counters
        return SessionStatistics(
            remote=self.remote, grant=self.grant.name, queue=queue.depth,
            sent=counters.sent, frames=counters.frames, bytes=counters.bytes,
            conflated=queue.conflated, throttled=queue.throttled,
            rate_limited=self.requests.rate_limit.refused,
            subscriptions=tuple(sorted(
                f"{c}:{p}" for c, p in self.dispatcher.subscriptions.get(self.queue, ())
            )),
        )


def _bound_send_buffer(stream: trio.abc.Stream, size: int) -> None:
    """Set the TCP send buffer of ``stream``'s socket (under TLS, its transport's)
    to ``size`` bytes (Linux doubles it and turns its autotuning off), so that
    what the kernel holds for a client that stops reading stays small."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream) and size:
        with contextlib.suppress(OSError):
            stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, size)
