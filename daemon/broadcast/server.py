"""The broadcast WebSocket server: accepts clients, enforces connection limits and
authentication, and runs a ``Session`` for each.

Listening is trio's TCP listener; each connection is upgraded by wsproto
(``connection.py``) within ``handshake_timeout``. A refused upgrade gets an HTTP
status: 401 (no or unknown token), 403 (Origin not allowed), 429 (too many
connections from that address), 503 (too many connections). On shutdown every
client is closed with 1001 (sessions are shielded from the cancellation itself,
so that no frame is cut; see ``Session.run``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import Any

import trio
import trio.testing
from hdrh.histogram import HdrHistogram

from daemon.broadcast.auth import Authenticator, Grant
from daemon.broadcast.connection import ConnectionClosed, Rejection, ServerConnection
from daemon.broadcast.session import CLOSE_GOING_AWAY, Session
from daemon.config import AuthConfig, ServerConfig
from daemon.dispatch import Dispatcher
from daemon.listen import open_listeners

log = logging.getLogger(__name__)

#: The coalescing window after a write is this many times what the write took (at
#: most ``max_write_delay_ms``): writing then takes at most a third of the time.
WRITE_DUTY = 2.0


class BroadcastServer:
    """Serves ``dispatcher``'s streams on ``config.listen``.

    ``hello`` is the ``welcome`` message every client gets first. Counters:
    ``connections`` accepted, ``rejected`` upgrades by status, ``slow_consumers``
    closed (4008), ``conflations`` (backlogs replaced by the latest state),
    ``ping_timeouts`` (4001). ``latency``: receive-to-client-write, microseconds.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        config: ServerConfig,
        hello: dict[str, Any],
        auth: AuthConfig | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.config = config
        self.hello = hello
        self.auth = Authenticator(auth or AuthConfig(), config.host)
        self.sessions: set[Session] = set()
        self.per_address: Counter[str] = Counter()
        self.connections = 0
        self.rejected: Counter[int] = Counter()
        self.slow_consumers = 0
        self.conflations = 0
        self.ping_timeouts = 0
        self.latency = HdrHistogram(1, 60_000_000, 3)
        #: sessions the dispatcher delivered to since the last write
        self.dirty: set[Session] = set()
        self.writes = 0  # flushes of the dirty sessions
        #: during a write, what each queue of messages became (bytes, messages,
        #: frames, batched frames, first recv_ts, the messages), by the messages'
        #: ids; ``None`` between writes
        self.queue_cache: dict[tuple[int, ...],
                               tuple[bytes, int, int, int, float, list]] | None = None
        self.shared_batches = 0  # batched frames built once and written to another session
        self._next_write = -math.inf  # trio time before which a write waits
        self._write_pending = False
        self._write_wanted = trio.Event()
        dispatcher.after_publish = self.flush
        self.port: int | None = None

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``started(port)`` once the socket listens. Raises
        ``daemon.listen.ListenError`` (one line) when the address cannot be bound."""
        listeners = await open_listeners(self.config.host, self.config.port,
                                         what="broadcast server", setting="server.listen")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            nursery.start_soon(self._drain_on_shutdown)
            nursery.start_soon(self._coalesce)
            log.info("broadcast: listening on ws://%s:%d%s", self.config.host, self.port,
                     " (authentication on)" if self.auth.enabled else "")
            task_status.started(self.port)

    def flush(self) -> None:
        """Called by the dispatcher after each batch of events: write what is queued
        to every session it reached, now if the coalescing window after the last
        write has passed, else at its end (``_coalesce``), with whatever more the
        window brings. The window counts from the end of a write and lasts
        ``WRITE_DUTY`` times what the write took, at most ``max_write_delay_ms``:
        writing to one client adds no delay; writing to many leaves the feeds twice
        that time to be read, and what they bring meanwhile goes in one write. The
        window ends early once no task is left ready to run (the feeds are read,
        the process would wait): waiting longer would save nothing, so events that
        find the process idle leave at once, and only a busy process batches."""
        if not self.dirty:
            return
        if trio.current_time() >= self._next_write:
            self._write()
        elif not self._write_pending:
            self._write_pending = True
            self._write_wanted.set()

    def _write(self) -> None:
        started = time.perf_counter()
        dirty, self.dirty = self.dirty, set()
        self.writes += 1
        self.queue_cache = {}
        try:
            for session in dirty:
                session.flush()
        finally:
            self.queue_cache = None
        took = time.perf_counter() - started
        self._next_write = trio.current_time() + min(self.config.max_write_delay_ms / 1000,
                                                      took * WRITE_DUTY)

    async def _coalesce(self) -> None:
        """Write at the end of each coalescing window that held an event, or as soon
        as every other task waits (``wait_all_tasks_blocked``: the run loop found
        nothing ready and no I/O pending)."""
        while True:
            await self._write_wanted.wait()
            self._write_wanted = trio.Event()
            with trio.move_on_at(self._next_write):
                # the window ends early when nothing else is left to do (trio.testing
                # has the one public way to learn that the run loop would wait)
                await trio.testing.wait_all_tasks_blocked()
            self._write_pending = False
            if self.dirty:
                self._write()

    async def _drain_on_shutdown(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            for session in list(self.sessions):
                session.close(CLOSE_GOING_AWAY, "server shutting down")

    async def _handle(self, stream: trio.SocketStream) -> None:
        # serve_listeners ends on a handler's exception: everything is caught here
        try:
            address = stream.socket.getpeername()
            remote = f"{address[0]}:{address[1]}"
            ip = address[0]
        except OSError:
            await stream.aclose()
            return
        self.per_address[ip] += 1
        try:
            await self._upgrade_and_serve(stream, remote, ip)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("broadcast: client %s: unexpected error", remote)
        finally:
            self.per_address[ip] -= 1
            if not self.per_address[ip]:
                del self.per_address[ip]
            await stream.aclose()

    async def _upgrade_and_serve(self, stream: trio.SocketStream, remote: str, ip: str) -> None:
        conn = ServerConnection(stream, self.config.max_message_size)
        with trio.move_on_after(self.config.handshake_timeout) as handshake_scope:
            handshake = await conn.receive_handshake()
        if handshake_scope.cancelled_caught:
            log.info("broadcast: client %s: no handshake in time", remote)
            return
        refusal = self._admit(ip)
        verdict: Grant | Rejection = refusal or self.auth.check(handshake)
        if isinstance(verdict, Rejection):
            self.rejected[verdict.status] += 1
            log.info("broadcast: client %s refused: %d %s", remote, verdict.status, verdict.reason)
            await conn.reject(verdict)
            return
        await conn.accept()
        session = Session(conn, remote, self.dispatcher, self.config, self.hello, verdict, self)
        self.connections += 1
        self.sessions.add(session)
        log.info("broadcast: client %s connected (%s)", remote, verdict.name)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            log.info("broadcast: client %s left (%s %s), sent %d",
                     remote, session.close_code or (conn.closed and conn.closed.code),
                     session.close_reason, session.counters.sent)

    def _admit(self, ip: str) -> Rejection | None:
        if len(self.sessions) >= self.config.max_connections:
            return Rejection(503, "too many connections")
        if self.per_address[ip] > self.config.max_connections_per_ip:
            return Rejection(429, "too many connections from this address")
        return None
