"""The broadcast WebSocket server: accepts clients and runs a ``Session`` for each."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import trio
import trio_websocket

from daemon.broadcast.session import CLOSE_GOING_AWAY, Session
from daemon.config import ServerConfig
from daemon.dispatch import Dispatcher

log = logging.getLogger(__name__)


class BroadcastServer:
    """Serves ``dispatcher``'s streams on ``config.listen``.

    ``hello`` is the ``welcome`` message every client gets first. Counters:
    ``connections`` accepted, ``slow_consumers`` disconnected by policy.
    """

    def __init__(self, dispatcher: Dispatcher, config: ServerConfig, hello: dict[str, Any]) -> None:
        self.dispatcher = dispatcher
        self.config = config
        self.hello = hello
        self.sessions: set[Session] = set()
        self.connections = 0
        self.slow_consumers = 0
        self.port: int | None = None

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``started(port)`` once the socket listens."""
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(
                    trio_websocket.serve_websocket,
                    self._handle,
                    self.config.host,
                    self.config.port,
                    None,
                    max_message_size=self.config.max_message_size,
                    connect_timeout=10,
                    disconnect_timeout=2,
                )
            )
            self.port = server.port
            nursery.start_soon(self._drain_on_shutdown)
            log.info("broadcast: listening on ws://%s:%d", self.config.host, server.port)
            task_status.started(server.port)

    async def _drain_on_shutdown(self) -> None:
        """When the server is cancelled, close every client with 1001 (sessions are
        shielded from the cancellation itself; see ``Session.run``)."""
        try:
            await trio.sleep_forever()
        finally:
            for session in list(self.sessions):
                session.close(CLOSE_GOING_AWAY, "server shutting down")

    async def _handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        session = Session(ws, self.dispatcher, self.config, self.hello, self._slow_consumer)
        self.connections += 1
        self.sessions.add(session)
        log.info("broadcast: client %s connected", session.remote)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            log.info(
                "broadcast: client %s left (%s %s), sent %d",
                session.remote, session.close_code or ws.closed and ws.closed.code,
                session.close_reason, session.sent,
            )

    def _slow_consumer(self, session: Session) -> None:
        self.slow_consumers += 1
        log.warning("broadcast: client %s closed as a slow consumer", session.remote)
