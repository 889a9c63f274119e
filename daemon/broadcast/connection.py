"""A server WebSocket connection on a trio stream: wsproto for the handshake and for
what the client sends; prebuilt frames (``frames.py``) for what we send.

All writes go through one lock, so a control frame (pong, ping, close) never lands
inside a data frame. ``abort`` drops the TCP connection when a close frame can no
longer be sent cleanly (a frame was cut by a timeout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import attrs
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

RECEIVE_SIZE = 65536


class ConnectionClosed(Exception):
    """The connection is closed; ``code`` and ``reason`` say how (1006: dropped)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


@attrs.frozen
class Handshake:
    """What a client asked for: request target, its query, and its headers (lower-case
    names)."""

    target: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@attrs.frozen
class Rejection:
    """An HTTP refusal of the upgrade: status (401, 403, 429, 503) and a reason."""

    status: int
    reason: str


class ServerConnection:
    """One client over ``stream`` (see the module docstring)."""

    def __init__(self, stream: trio.abc.Stream, max_message_size: int) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self.max_message_size = max_message_size
        self.send_lock = trio.StrictFIFOLock()
        self.closed: ConnectionClosed | None = None
        self.on_pong: Callable[[bytes], None] | None = None
        #: once set (by a session), every frame we send goes to it, in order, instead
        #: of the stream: the session owns the write side (see ``Session``)
        self.output: Callable[[bytes], None] | None = None
        self._text: list[str] = []
        self._size = 0

    # -- handshake ----------------------------------------------------------------------

    async def receive_handshake(self) -> Handshake:
        """Read the HTTP upgrade request. Raises ``ConnectionClosed`` if the peer
        leaves or sends something that is not a WebSocket handshake."""
        while True:
            for event in self.ws.events():
                if isinstance(event, Request):
                    parts = urlsplit(event.target)
                    headers = {
                        name.decode("latin-1").lower(): value.decode("latin-1")
                        for name, value in event.extra_headers
                    }
                    return Handshake(event.target, parse_qs(parts.query), headers)
            await self._receive_some()

    async def accept(self) -> None:
        """Complete the upgrade."""
        await self._send_event(AcceptConnection())

    async def reject(self, rejection: Rejection) -> None:
        """Refuse the upgrade with an HTTP status and a one-line body, then close."""
        body = f"{rejection.reason}\n".encode()
        try:
            await self._send_event(RejectConnection(
                status_code=rejection.status, has_body=True,
                headers=[(b"content-type", b"text/plain"),
                         (b"content-length", str(len(body)).encode())],
            ))
            await self._send_event(RejectData(data=body))
        finally:
            await self.stream.aclose()

    # -- receiving ------------------------------------------------------------------

    async def get_message(self) -> str:
        """The next complete text message. Pings are answered, pongs reported to
        ``on_pong``. Raises ``ConnectionClosed`` when the client closes or breaks
        the connection, and closes with 1009 a message over ``max_message_size``
        and with 1003 a binary one."""
        while True:
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self._size += len(event.data)
                    if self._size > self.max_message_size:
                        await self.close(1009, "message too big")
                        raise ConnectionClosed(1009, "message too big")
                    self._text.append(event.data)
                    if event.message_finished:
                        text = "".join(self._text)
                        self._text, self._size = [], 0
                        return text
                elif isinstance(event, BytesMessage):
                    await self.close(1003, "text frames only")
                    raise ConnectionClosed(1003, "text frames only")
                elif isinstance(event, Ping):
                    await self._send_event(event.response())
                elif isinstance(event, Pong):
                    if self.on_pong is not None:
                        self.on_pong(event.payload)
                elif isinstance(event, CloseConnection):
                    if self.closed is None:
                        self.closed = ConnectionClosed(event.code, event.reason or "")
                        with contextlib.suppress(ConnectionClosed):
                            await self._send_event(event.response())
                    await self.stream.aclose()
                    raise self.closed
            await self._receive_some()

    async def _receive_some(self) -> None:
        if self.closed is not None:
            raise self.closed
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed = self.closed or ConnectionClosed(1006, "connection dropped")
            raise self.closed
        try:
            self.ws.receive_data(bytes(data))
        except RemoteProtocolError as exc:
            self.closed = ConnectionClosed(1002, str(exc))
            await self.abort()
            raise self.closed from None

    # -- sending --------------------------------------------------------------------

    async def send_frames(self, data: bytes) -> None:
        """Write prebuilt frames (several may be joined). Raises ``ConnectionClosed``."""
        if self.closed is not None:
            raise self.closed
        async with self.send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed = self.closed or ConnectionClosed(1006, "connection dropped")
                raise self.closed from None

    async def ping(self, payload: bytes) -> None:
        """Send a WebSocket ping."""
        await self._send_event(Ping(payload=payload))

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame (once) and stop sending; the client's reply or its
        TCP close ends the connection."""
        if self.closed is not None:
            return
        self.closed = ConnectionClosed(code, reason)
        try:
            data = self.ws.send(CloseConnection(code=code, reason=reason))
            if self.output is not None:
                self.output(data)
                return
            async with self.send_lock:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            pass

    async def abort(self) -> None:
        """Drop the TCP connection now, without a close handshake."""
        self.closed = self.closed or ConnectionClosed(1006, "aborted")
        await self.stream.aclose()

    async def _send_event(self, event: Event) -> None:
        if self.closed is not None and not isinstance(event, CloseConnection):
            raise self.closed
        if self.output is not None:
            try:
                self.output(self.ws.send(event))
            except LocalProtocolError as exc:
                raise ConnectionClosed(1006, str(exc)) from None
            return
        async with self.send_lock:
            try:
                await self.stream.send_all(self.ws.send(event))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed = self.closed or ConnectionClosed(1006, "connection dropped")
                raise self.closed from None
            except LocalProtocolError as exc:
                raise ConnectionClosed(1006, str(exc)) from None
