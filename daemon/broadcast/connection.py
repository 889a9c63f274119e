"""A server WebSocket connection on a trio stream: wsproto for the handshake and for
what the client sends; prebuilt frames (``frames.py``) for what we send.

All writes go through one lock, so a control frame (pong, ping, close) never lands
inside a data frame. ``abort`` drops the TCP connection when a close frame can no
longer be sent cleanly (a frame was cut by a timeout).

A request that is not a valid opening handshake gets an HTTP answer, never a
silent close: ``check_request`` (sans-IO) judges the request head by RFC 6455
section 4.2.1 and RFC 9110, and ``receive_handshake`` sends its ``Rejection``
through wsproto (which can answer after it has refused a request itself):
``426 Upgrade Required`` with ``Upgrade: websocket`` for a request that asks for
no WebSocket at all (a plain HTTP GET), ``426`` with ``Sec-WebSocket-Version: 13``
for another WebSocket version (section 4.4), ``400 Bad Request`` with a one-line
reason for a malformed handshake (not a GET, a missing header, a
``Sec-WebSocket-Key`` that is not 16 bytes in base64, more than one ``Origin``).
"""

from __future__ import annotations

import binascii
import contextlib
from collections.abc import Callable, Sequence
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
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
    """An HTTP refusal of the upgrade: status (400, 401, 403, 426, 429, 431, 503), a
    one-line reason (the body) and more response headers (lower-case names)."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()


class HandshakeRefused(ConnectionClosed):
    """The request was not a valid WebSocket handshake; it was answered with
    ``rejection`` and the connection closed."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(1002, rejection.reason)
        self.rejection = rejection


#: What a client must send: ``Sec-WebSocket-Version: 13`` (RFC 6455 section 4.4).
WEBSOCKET_VERSION = "13"


def check_request(head: bytes) -> Rejection | None:
    """Judge the HTTP request at the start of ``head`` as a WebSocket opening
    handshake (RFC 6455 section 4.2.1): ``None`` when it is a valid one (or not
    complete yet), else the answer to give. Sans-IO; the reasons never quote the
    client's bytes."""
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(head)
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError as exc:
        if exc.error_status_hint == 431:
            return Rejection(431, "request header fields too large")
        reason = {"Missing mandatory Host: header": "missing header Host",
                  "Found multiple Host: headers": "more than one Host header"}
        return Rejection(400, reason.get(str(exc), "not a well-formed HTTP/1.1 request"))
    if not isinstance(event, h11.Request):
        return None
    return check_upgrade(event.method, event.http_version, event.headers)


def check_upgrade(method: bytes, http_version: bytes,
                  headers: Sequence[tuple[bytes, bytes]]) -> Rejection | None:
    """``check_request`` on a parsed request (header names in lower case)."""
    def values(name: bytes) -> list[bytes]:
        return [value for key, value in headers if key == name]

    def tokens(name: bytes) -> set[bytes]:
        return {token.strip().lower() for value in values(name) for token in value.split(b",")}

    upgrade = tokens(b"upgrade")
    keys = values(b"sec-websocket-key")
    versions = values(b"sec-websocket-version")
    if b"websocket" not in upgrade and not keys and not versions:
        return Rejection(426, "this is a WebSocket endpoint: connect with a WebSocket client "
                              "(ws:// or wss://, RFC 6455)",
                         (("upgrade", "websocket"), ("connection", "upgrade")))
    if method != b"GET":
        return Rejection(400, "a WebSocket handshake is a GET request")
    if http_version != b"1.1":
        return Rejection(400, "a WebSocket handshake is an HTTP/1.1 request")
    if b"websocket" not in upgrade:
        return Rejection(400, "missing header Upgrade: websocket")
    if b"upgrade" not in tokens(b"connection"):
        return Rejection(400, "missing header Connection: Upgrade")
    version = (("sec-websocket-version", WEBSOCKET_VERSION),)
    if not versions:
        return Rejection(400, f"missing header Sec-WebSocket-Version: {WEBSOCKET_VERSION}",
                         version)
    if versions != [WEBSOCKET_VERSION.encode()]:
        return Rejection(426, f"unsupported WebSocket version: this server speaks version "
                              f"{WEBSOCKET_VERSION}", version)
    if not keys:
        return Rejection(400, "missing header Sec-WebSocket-Key")
    if len(keys) > 1:
        return Rejection(400, "more than one Sec-WebSocket-Key header")
    if not valid_key(keys[0]):
        return Rejection(400, "Sec-WebSocket-Key is not 16 bytes in base64")
    if len(values(b"origin")) > 1:
        return Rejection(400, "more than one Origin header")
    return None


def valid_key(key: bytes) -> bool:
    """Whether ``key`` is a ``Sec-WebSocket-Key``: 16 bytes in base64 (RFC 6455
    section 4.1, item 7)."""
    try:
        return len(key) == 24 and len(binascii.a2b_base64(key, strict_mode=True)) == 16
    except binascii.Error:
        return False


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
        """Read the HTTP upgrade request. Raises ``HandshakeRefused`` (once the
        client has its answer: see the module docstring) for a request that is not
        a valid WebSocket handshake, ``ConnectionClosed`` if the peer leaves."""
        head = bytearray()  # bounded: wsproto refuses a head over h11's 16 KiB
        while True:
            for event in self.ws.events():
                if isinstance(event, Request):
                    rejection = check_request(bytes(head))
                    if rejection is not None:
                        await self._refuse(rejection)
                    parts = urlsplit(event.target)
                    headers = {
                        name.decode("latin-1").lower(): value.decode("latin-1")
                        for name, value in event.extra_headers
                    }
                    return Handshake(event.target, parse_qs(parts.query), headers)
            data = await self._receive_bytes()
            head += data
            try:
                self.ws.receive_data(data)
            except RemoteProtocolError as exc:
                hint = exc.event_hint
                status = hint.status_code if isinstance(hint, RejectConnection) else 400
                await self._refuse(check_request(bytes(head)) or Rejection(status, str(exc)))

    async def _refuse(self, rejection: Rejection) -> None:
        await self.reject(rejection)
        raise HandshakeRefused(rejection)

    async def accept(self) -> None:
        """Complete the upgrade."""
        await self._send_event(AcceptConnection())

    async def reject(self, rejection: Rejection) -> None:
        """Refuse the upgrade with an HTTP status and a one-line body, then close
        (a client that is gone meanwhile is no error)."""
        body = f"{rejection.reason}\n".encode()
        headers = dict(rejection.headers)
        # the connection ends with this answer (RFC 9112 section 9.6)
        headers["connection"] = ", ".join(filter(None, (headers.get("connection"), "close")))
        headers |= {"content-type": "text/plain; charset=utf-8",
                    "content-length": str(len(body))}
        try:
            data = self.ws.send(RejectConnection(
                status_code=rejection.status, has_body=True,
                headers=[(name.encode(), value.encode()) for name, value in headers.items()],
            )) + self.ws.send(RejectData(data=body))
            # h11 leaves the reason phrase empty (RFC 9112 allows it): name it for people
            status = f"HTTP/1.1 {rejection.status} ".encode()
            if data.startswith(status + b"\r\n"):
                data = status + HTTPStatus(rejection.status).phrase.encode() + data[len(status):]
            async with self.send_lock:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            pass
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

    async def _receive_bytes(self) -> bytes:
        if self.closed is not None:
            raise self.closed
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed = self.closed or ConnectionClosed(1006, "connection dropped")
            raise self.closed
        return bytes(data)

    async def _receive_some(self) -> None:
        data = await self._receive_bytes()
        try:
            self.ws.receive_data(data)
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
