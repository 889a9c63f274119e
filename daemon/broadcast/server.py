"""The broadcast WebSocket server: accepts clients, enforces connection limits and
authentication, and runs a ``Session`` for each.

Listening is trio's TCP listener (with TLS, ``wss://``, when given an
``ssl.SSLContext``: ``daemon.tls``), with an accept loop of our own. Each
connection is checked and counted against the connection limits the moment it is
accepted (``admission.py``: ``max_connections``, the descriptor budget,
``max_connections_per_ip``), and counts until it is closed. One over a limit is
answered 503 (or 429, per address) with ``Retry-After`` and closed; the others
are upgraded by wsproto (``connection.py``) within ``handshake_timeout``, or
refused with an HTTP status: 400 (a malformed handshake), 426 (not a WebSocket
request, or another WebSocket version), 401 (no or unknown token), 403 (Origin
not allowed). On shutdown every client is closed with 1001 (sessions are
shielded from the cancellation itself, so that no frame is cut; see
``Session.run``).

When ``accept`` fails for lack of descriptors (EMFILE and its kind: the budget
was not enough, see ``daemon.limits``), the loop logs one line, lets go of its
spare descriptors so that the admin socket still answers, and waits until a
connection ends or a second has passed; it takes the spares back, and accepts
again, once one more descriptor is free besides them, and logs one line then,
without waiting for a client to come (both lines quiet for a minute after one:
``admission.QuietLines``); the status says so at once too. trio's
``serve_listeners`` would log a traceback per failed accept instead.
"""

from __future__ import annotations

import errno
import logging
import ssl
from collections import Counter
from typing import Any

import attrs
import trio
from hdrh.histogram import HdrHistogram

from daemon.broadcast.admission import Admission, Ticket
from daemon.broadcast.auth import Authenticator, Grant
from daemon.broadcast.coalesce import Coalescer
from daemon.broadcast.connection import (
    ConnectionClosed,
    HandshakeRefused,
    Rejection,
    ServerConnection,
)
from daemon.broadcast.session import CLOSE_GOING_AWAY, ServerCounters, Session
from daemon.config import AuthConfig, ServerConfig
from daemon.derived.views import Views
from daemon.dispatch import Dispatcher
from daemon.limits import CAPACITY_ERRNOS, Spares
from daemon.listen import open_listeners
from daemon.publish.publisher import Publisher

log = logging.getLogger(__name__)

#: Seconds a refused connection gets to send its request (then it is closed unanswered).
REFUSE_TIMEOUT = 2.0
#: Bytes of a refused connection's request read at most before it is answered.
REFUSE_READ = 16384
#: Seconds between attempts to accept again after ``accept`` failed for lack of descriptors.
RETRY_ACCEPT = 1.0


def errno_name(exc: OSError) -> str:
    """``EMFILE`` for ``exc``'s errno."""
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


@attrs.frozen
class ServerStatistics:
    """The server's figures at one moment: ``listen`` (``HOST:PORT`` or ``None``),
    ``clients`` connected, ``connections`` accepted, ``rejected`` upgrades by HTTP
    status, ``slow_consumers`` (4008), ``conflations``, ``ping_timeouts`` (4001),
    ``writes`` (coalesced write passes), ``shared_batches``; over every client
    since the start (those gone included): ``messages``, ``frames`` and ``bytes``
    sent, ``throttled``; now: ``queued`` (messages in every client queue) and
    ``queue_max`` (the longest queue); the connection limits: ``open``
    (connections counted now, handshakes included), ``limit`` (admitted at most:
    ``max_connections`` or the descriptor budget), ``at_limit`` (the limit new
    clients are refused for now: ``max_connections``, ``descriptors``, ``accept``
    when accepting fails for lack of descriptors; ``None``: none)."""

    listen: str | None
    clients: int
    connections: int
    rejected: dict[int, int]
    slow_consumers: int
    conflations: int
    ping_timeouts: int
    writes: int
    shared_batches: int
    messages: int
    frames: int
    bytes: int
    throttled: int
    queued: int
    queue_max: int
    open: int = 0
    limit: int = 0
    at_limit: str | None = None


class BroadcastServer:
    """Serves ``dispatcher``'s streams on ``config.listen``.

    ``hello`` is the ``welcome`` message every client gets first; ``publisher``
    takes the ``publish`` requests of clients whose grant allows it. Counters:
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
        ssl_context: ssl.SSLContext | None = None,
        publisher: Publisher | None = None,
        views: Views | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        #: builds the top-of-book views clients ask for (None: ``depth`` and ``quote``
        #: are refused)
        self.views = views
        self.config = config
        self.hello = hello
        #: takes the clients' ``publish`` requests (none: clients cannot publish)
        self.publisher = publisher
        self.auth = Authenticator(
            auth or AuthConfig(), config.host,
            anonymous_publish=publisher is not None and publisher.config.allow_loopback_anonymous)
        #: TLS for every connection (``wss://``) when set; see ``daemon.tls``
        self.ssl_context = ssl_context
        self.sessions: set[Session] = set()
        #: the connection limits (the descriptor budget is set by ``daemon.app``)
        self.admission = Admission(config.max_connections, config.max_connections_per_ip,
                                   clock=trio.current_time, notify=log.warning)
        #: whether ``accept`` fails for lack of descriptors (see the module docstring)
        self.out_of_descriptors = False
        self.spares = Spares()
        self._room = trio.Event()
        self.connections = 0
        self.rejected: Counter[int] = Counter()
        self.latency = HdrHistogram(1, 60_000_000, 3)
        #: what every session counts together (sessions are given this object)
        self.counters = ServerCounters(latency=self.latency)
        #: messages, frames, bytes, throttled of the sessions that have left
        self.departed = [0, 0, 0, 0]
        self.coalescer = Coalescer(config.max_write_delay_ms / 1000)
        dispatcher.fan_out = self.coalescer
        self.port: int | None = None

    # the figures, as attributes (status, metrics and tests read them)
    @property
    def slow_consumers(self) -> int:
        return self.counters.slow_consumers

    @property
    def conflations(self) -> int:
        return self.counters.conflations

    @property
    def ping_timeouts(self) -> int:
        return self.counters.ping_timeouts

    @property
    def shared_batches(self) -> int:
        return self.counters.shared_batches

    @property
    def writes(self) -> int:
        return self.coalescer.writes

    @property
    def scheme(self) -> str:
        """``wss`` with TLS, else ``ws``."""
        return "wss" if self.ssl_context is not None else "ws"

    def statistics(self) -> ServerStatistics:
        """The server's figures now (see ``ServerStatistics``)."""
        sessions = list(self.sessions)
        messages, frames, sent_bytes, throttled = self.departed
        queues = [len(s.queue) for s in sessions]
        for session in sessions:
            c = session.counters
            messages += c.sent
            frames += c.frames
            sent_bytes += c.bytes
            throttled += session.queue.throttled
        counters = self.counters
        return ServerStatistics(
            listen=f"{self.config.host}:{self.port}" if self.port else None,
            clients=len(sessions), connections=self.connections,
            rejected=dict(self.rejected), slow_consumers=counters.slow_consumers,
            conflations=counters.conflations, ping_timeouts=counters.ping_timeouts,
            writes=self.coalescer.writes, shared_batches=counters.shared_batches,
            messages=messages, frames=frames, bytes=sent_bytes, throttled=throttled,
            queued=sum(queues), queue_max=max(queues, default=0),
            open=self.admission.connections, limit=self.admission.limit,
            at_limit="accept" if self.out_of_descriptors else self.admission.at_limit,
        )

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``started(port)`` once the socket listens. Raises
        ``daemon.listen.ListenError`` (one line) when the address cannot be bound."""
        listeners = await open_listeners(self.config.host, self.config.port,
                                         what="broadcast server", setting="server.listen")
        self.port = listeners[0].socket.getsockname()[1]
        self.spares.hold()
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept, listener, nursery)
                nursery.start_soon(self._drain_on_shutdown)
                nursery.start_soon(self.coalescer.serve)
                log.info("broadcast: listening on %s://%s:%d%s", self.scheme, self.config.host,
                         self.port,
                         " (authentication on)" if self.auth.enabled else "")
                task_status.started(self.port)
        finally:
            self.spares.release()

    async def _drain_on_shutdown(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            for session in list(self.sessions):
                session.close(CLOSE_GOING_AWAY, "server shutting down")

    # -- accepting -----------------------------------------------------------------------

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept connections on ``listener`` (for ``nursery``) until cancelled: each
        is admitted or refused at once (``admission.py``); see the module docstring
        for a lack of descriptors."""
        admission = self.admission
        async with listener:
            while True:
                if self.out_of_descriptors:
                    while not self.spares.hold(headroom=1):
                        with trio.move_on_after(RETRY_ACCEPT):
                            await self._room.wait()
                    # descriptors are free again: said now, not at the next client
                    self.out_of_descriptors = False
                    admission.lines.line("accepting", f"broadcast: accepting clients again "
                                                      f"({admission.connections} connections)")
                while not admission.accepting:
                    with trio.move_on_after(RETRY_ACCEPT):
                        await self._room.wait()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in CAPACITY_ERRNOS:
                        raise
                    self._no_descriptor(exc)
                    continue
                try:
                    address = stream.socket.getpeername()
                except OSError:  # the client has gone already
                    stream.socket.close()
                    continue
                ticket = admission.admit(address[0])
                nursery.start_soon(self._handle, stream, f"{address[0]}:{address[1]}", ticket)

    def _no_descriptor(self, exc: OSError) -> None:
        """``accept`` failed for lack of descriptors: let go of the spares (for the
        admin socket) and log it once."""
        self.spares.release()
        if not self.out_of_descriptors:
            self.out_of_descriptors = True
            admission = self.admission
            admission.lines.line("no descriptor", (
                f"broadcast: cannot accept clients: {errno_name(exc)} ({exc.strerror}); new "
                f"clients wait until descriptors are free ({admission.connections} "
                f"connections, {admission.refusing} refused being answered); the admin socket "
                "keeps working: raise the open-file limit or lower server.max_connections"))

    def _ended(self, ticket: Ticket) -> None:
        self.admission.release(ticket)
        self._room.set()
        self._room = trio.Event()

    async def _handle(self, stream: trio.SocketStream, remote: str, ticket: Ticket) -> None:
        # the accept loop ends on a handler's exception: everything is caught here
        try:
            if ticket.refusal is not None:
                await self._refuse(stream, remote, ticket)
            else:
                await self._upgrade_and_serve(stream, remote, ticket.address)
        except HandshakeRefused as exc:  # answered: 400, 426 or 431 (connection.py)
            self.rejected[exc.rejection.status] += 1
            log.info("broadcast: client %s refused: %d %s", remote, exc.rejection.status,
                     exc.rejection.reason)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("broadcast: client %s: unexpected error", remote)
        finally:
            try:
                await trio.aclose_forcefully(stream)
            finally:
                self._ended(ticket)

    async def _refuse(self, stream: trio.SocketStream, remote: str, ticket: Ticket) -> None:
        """Answer a connection over a limit: read its request (so that closing does
        not reset the connection under the answer), send the refusal, close."""
        refusal = ticket.refusal
        assert refusal is not None
        self.rejected[refusal.status] += 1
        log.debug("broadcast: client %s refused: %d %s", remote, refusal.status, refusal.reason)
        client: trio.abc.Stream = stream
        with trio.move_on_after(REFUSE_TIMEOUT):
            try:
                if self.ssl_context is not None:
                    client = tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
                    await tls.do_handshake()
                request = b""
                while b"\r\n\r\n" not in request and len(request) < REFUSE_READ:
                    data = await client.receive_some(REFUSE_READ)
                    if not data:
                        return
                    request += data
                await client.send_all(refusal.response())
            except trio.BrokenResourceError:
                return

    async def _upgrade_and_serve(self, stream: trio.SocketStream, remote: str, ip: str) -> None:
        client: trio.abc.Stream = stream
        if self.ssl_context is not None:
            client = trio.SSLStream(stream, self.ssl_context, server_side=True)
        conn = ServerConnection(client, self.config.max_message_size)
        with trio.move_on_after(self.config.handshake_timeout) as handshake_scope:
            if isinstance(client, trio.SSLStream):
                try:
                    await client.do_handshake()
                except trio.BrokenResourceError as exc:
                    log.info("broadcast: client %s: TLS handshake failed (%s)", remote,
                             exc.__cause__ or exc)
                    return
            handshake = await conn.receive_handshake()
        if handshake_scope.cancelled_caught:
            log.info("broadcast: client %s: no handshake in time", remote)
            return
        verdict: Grant | Rejection = self.auth.check(handshake)
        if isinstance(verdict, Rejection):
            self.rejected[verdict.status] += 1
            log.info("broadcast: client %s refused: %d %s", remote, verdict.status, verdict.reason)
            await conn.reject(verdict)
            return
        await conn.accept()
        session = Session(conn, remote, self.dispatcher, self.config, self.hello, verdict,
                          self.counters, self.coalescer, self.publisher, self.views)
        self.connections += 1
        self.sessions.add(session)
        log.info("broadcast: client %s connected (%s)", remote, verdict.name)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            c = session.counters
            departed = self.departed
            departed[0] += c.sent
            departed[1] += c.frames
            departed[2] += c.bytes
            departed[3] += session.queue.throttled
            log.info("broadcast: client %s left (%s %s), sent %d",
                     remote, session.close_code or (conn.closed and conn.closed.code),
                     session.close_reason, session.counters.sent)
