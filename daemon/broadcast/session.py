"""One client connection: its subscriptions, its bounded queue, its writer.

The dispatcher calls ``deliver`` synchronously for every event of a subscribed
stream; the text is the one encoding every client shares. ``deliver`` never
blocks: it puts the text in this client's bounded queue with ``send_nowait``.
When the queue is full the client is a **slow consumer**: the policy today is
``disconnect``, counted, and the client is closed with code 1008 and reason
``slow consumer`` (it can reconnect and subscribe again). The frame being written
is finished first, so the close frame is never cut into another frame.

The writer batches: when several messages are pending they leave in one frame, a
JSON array; with one pending it leaves alone, at once.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
import trio_websocket

from daemon.broadcast.protocol import Ping, RequestError, Subscribe, parse_request
from daemon.config import ServerConfig
from daemon.dispatch import Dispatcher, Stream
from daemon.wire import encode

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
SLOW_CONSUMER = "slow consumer"
#: Seconds a closing client gets to take the frame being written.
CLOSE_TIMEOUT = 5.0
#: Seconds then given to the close handshake (at shutdown trio-websocket's reader is
#: already cancelled and the client's reply is never read: the TCP close follows).
HANDSHAKE_TIMEOUT = 1.0


class Session:
    """A connected client (see the module docstring).

    Counters: ``sent`` messages, ``frames`` written, ``dropped`` messages that could
    not be queued (then the client is closed as a slow consumer).
    """

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        dispatcher: Dispatcher,
        config: ServerConfig,
        hello: dict[str, Any],
        on_slow_consumer: Any = None,
    ) -> None:
        self.ws = ws
        self.dispatcher = dispatcher
        self.config = config
        self.hello = hello
        self.on_slow_consumer = on_slow_consumer
        self.remote = f"{ws.remote.address}:{ws.remote.port}" if hasattr(ws.remote, "port") else str(ws.remote)
        self._send, self._receive = trio.open_memory_channel[str](config.client_queue)
        self._scope = trio.CancelScope(shield=True)
        self._read_scope = trio.CancelScope()
        self._mid_frame = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.sent = 0
        self.frames = 0
        self.dropped = 0

    # -- called by the dispatcher --------------------------------------------------------

    def deliver(self, stream: Stream, seq: int, text: str) -> None:
        """Queue one encoded event; a full queue closes the client (slow consumer)."""
        self._queue(text)

    def _queue(self, text: str) -> None:
        if self.close_code is not None:
            return
        try:
            self._send.send_nowait(text)
        except trio.WouldBlock:
            self.dropped += 1
            self.close(CLOSE_POLICY, SLOW_CONSUMER)
            if self.on_slow_consumer is not None:
                self.on_slow_consumer(self)

    def close(self, code: int, reason: str, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close this client with ``code``: no more events are queued, the frame being
        written is finished (within ``timeout`` seconds), then the close handshake."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self.dispatcher.remove(self)
            self._receive.close()  # the writer stops after the frame it is writing
            self._read_scope.cancel()
        self._scope.deadline = min(self._scope.deadline, trio.current_time() + timeout)

    # -- the connection's tasks ----------------------------------------------------------

    async def run(self) -> None:
        """Serve the client until it leaves or ``close`` is called.

        The session is shielded from outside cancellation: a shutdown calls
        ``close(1001, ...)`` instead, so that no frame is cut in the middle and the
        client gets its close code.
        """
        with self._scope:
            try:
                self._queue(encode(self.hello).decode())
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write)
                    with self._read_scope:
                        await self._read()
                    if self.close_code is None:  # the client left
                        nursery.cancel_scope.cancel()
            finally:
                self.dispatcher.remove(self)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + HANDSHAKE_TIMEOUT
            if self._mid_frame:
                # The client stopped reading in the middle of a frame and the time
                # ran out: a close frame now would land inside that frame. Drop the
                # TCP connection instead (trio-websocket has no public abort).
                await self.ws._stream.aclose()
            if self.ws.closed is None and self.close_code is not None:
                await self.ws.aclose(self.close_code, self.close_reason)

    async def _read(self) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            self.handle(message)

    def handle(self, message: str | bytes) -> None:
        """Answer one client frame: ``ack`` + initial messages, ``pong`` or ``error``."""
        try:
            request = parse_request(message)
        except RequestError as exc:
            self._queue(
                encode({"type": "error", "id": exc.request_id, "code": exc.code,
                        "message": exc.message}).decode()
            )
            return
        if isinstance(request, Ping):
            self._queue(encode({"type": "pong", "id": request.id}).decode())
        elif isinstance(request, Subscribe):
            initial = self.dispatcher.subscribe(
                self, request.channels, request.symbols, request.history
            )
            self._queue(encode({"type": "ack", "id": request.id, "op": "subscribe",
                                "channels": request.channels,
                                "symbols": request.symbols}).decode())
            for text in initial:
                self._queue(text)
        else:
            self.dispatcher.unsubscribe(self, request.channels, request.symbols)
            self._queue(encode({"type": "ack", "id": request.id, "op": "unsubscribe",
                                "channels": request.channels,
                                "symbols": request.symbols}).decode())

    async def _write(self) -> None:
        try:
            await self._write_frames()
        except (trio.ClosedResourceError, trio_websocket.ConnectionClosed):
            pass

    async def _write_frames(self) -> None:
        receive = self._receive
        max_batch = self.config.max_batch
        async for first in receive:
            batch = [first]
            while len(batch) < max_batch:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            frame = first if len(batch) == 1 else "[" + ",".join(batch) + "]"
            self._mid_frame = True
            await self.ws.send_message(frame)
            self._mid_frame = False
            self.sent += len(batch)
            self.frames += 1

    def statistics(self) -> dict[str, Any]:
        """This client's figures: address, queue depth, sent, frames, dropped."""
        return {
            "remote": self.remote,
            "queue": self._send.statistics().current_buffer_used,
            "sent": self.sent,
            "frames": self.frames,
            "dropped": self.dropped,
            "subscriptions": sorted(
                f"{c}:{p}" for c, p in self.dispatcher.subscriptions.get(self, ())
            ),
        }
