"""The WebSocket client connection of a native collector: the I/O edge.

``FeedSocket.connect(url)`` opens TCP (and TLS for ``wss://``, trio's
``SSLStream`` with the system's CAs or the context given), does the opening
handshake with wsproto (RFC 6455 §4.1: it builds the request and checks the
server's ``101`` and ``Sec-WebSocket-Accept``), and from then on:

- ``receive()`` reads once from the socket (up to ``read_size`` bytes, whatever
  it holds) and returns every data message that read completed, decoded by
  ``daemon.collectors.wsframes`` (why not wsproto there: see that module). A
  ping is answered with a pong before it returns; a close frame is answered and
  raises ``FeedDisconnected`` with the server's code and reason; so does the end
  of the stream. While the caller does not call ``receive``, nothing is read and
  the exchange's TCP window closes: that is the collector's backpressure.
- ``send_text(text)``: one masked text frame (wsproto encodes it; sends are a
  few subscriptions, not the hot path). Sends from several tasks take turns.
- ``aclose()``: a close frame (1000) if the connection is still open, within
  ``close_timeout`` seconds, then the socket is closed.

Errors: every failure to connect, handshake, read or write raises
``FeedDisconnected`` naming the URL's host and the cause; a server that breaks
RFC 6455 is failed with the close code ``wsframes`` names (§7.1.7) and raises
``FeedDisconnected`` too.
"""

from __future__ import annotations

import array
import fcntl
import ssl
import termios
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import ProtocolError

from daemon.collectors.wsframes import (
    CLOSE,
    NORMAL,
    PING,
    Control,
    ServerFrames,
    WebSocketError,
    close_reason,
)
from daemon.errors import FeedDisconnected

#: The largest response head accepted in the handshake, bytes.
MAX_HEAD = 64 * 1024
#: A socket read, bytes: a Coinbase or Binance frame is a few hundred bytes, so
#: one read is a few hundred frames when the exchange is busy.
READ_SIZE = 64 * 1024


class FeedSocket:
    """One open client WebSocket connection (see the module docstring); use
    ``connect`` to make one, and ``async with`` (or ``aclose``) to close it."""

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection, frames: ServerFrames,
                 what: str, read_size: int = READ_SIZE) -> None:
        self.stream = stream
        self.ws = ws
        self.frames = frames
        self.what = what
        self.read_size = read_size
        #: ``backlog``'s FIONREAD count, written in place (no bytes object per call)
        self._unread = array.array("i", [0])
        self.closed = False
        self._send_lock = trio.Lock()
        self._first = b""  # bytes that came with the handshake's response

    @classmethod
    async def connect(cls, url: str, *, max_message: int, connect_timeout: float = 10.0,
                      ssl_context: ssl.SSLContext | None = None,
                      read_size: int = READ_SIZE) -> FeedSocket:
        """Connect to ``url`` (``ws://`` or ``wss://``) within ``connect_timeout`` seconds.

        Raises ``FeedDisconnected`` if the host cannot be reached, TLS fails, the
        server refuses the upgrade (its HTTP status is in the message) or answers
        it wrongly; ``ValueError`` for a URL that is not ``ws://`` or ``wss://``.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a WebSocket URL: {url!r}")
        secure = parts.scheme == "wss"
        host = parts.hostname
        port = parts.port or (443 if secure else 80)
        what = f"{host}:{port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = host if parts.port is None else f"{host}:{port}"
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(connect_timeout):
                tcp = await trio.open_tcp_stream(host, port)
                stream = tcp
                if secure:
                    context = ssl_context or ssl.create_default_context()
                    stream = trio.SSLStream(tcp, context, server_hostname=host,
                                            https_compatible=True)
                    await stream.do_handshake()
                ws = WSConnection(ConnectionType.CLIENT)
                await stream.send_all(ws.send(Request(host=host_header, target=target)))
                head, rest = await _read_head(stream)
                ws.receive_data(head)
                for event in ws.events():
                    if isinstance(event, RejectConnection):
                        raise FeedDisconnected(
                            f"{what}: handshake rejected (HTTP {event.status_code})")
                    if isinstance(event, AcceptConnection):
                        break
                else:
                    raise FeedDisconnected(f"{what}: handshake answered without a response")
                socket = cls(stream, ws, ServerFrames(max_message), what, read_size)
                socket._first = rest
                return socket
        except trio.TooSlowError:
            await _abort(stream)
            raise FeedDisconnected(f"{what}: no connection within {connect_timeout:g}s") from None
        except (OSError, trio.BrokenResourceError, ProtocolError) as exc:
            await _abort(stream)
            raise FeedDisconnected(f"{what}: cannot connect: {_cause(exc)}") from exc
        except BaseException:
            await _abort(stream)
            raise

    async def receive(self) -> list[str | bytes]:
        """Read once and return the data messages completed (maybe none: a
        partial frame, a ping). Raises ``FeedDisconnected`` (module docstring)."""
        if self._first:
            data, self._first = self._first, b""
        else:
            try:
                received = await self.stream.receive_some(self.read_size)
            except (OSError, trio.BrokenResourceError) as exc:
                raise FeedDisconnected(f"{self.what}: {_cause(exc)}") from exc
            if not received:
                self.closed = True
                raise FeedDisconnected(f"{self.what}: the server closed the connection")
            data = received if type(received) is bytes else bytes(received)
        try:
            items = self.frames.receive(data)
        except WebSocketError as exc:
            await self._fail(exc.code, exc.reason)
            raise FeedDisconnected(f"{self.what}: {exc}") from exc
        for item in items:
            if type(item) is Control:
                return await self._control(items)
        return items  # type: ignore[return-value]  # no Control among them

    def backlog(self) -> bool:
        """More of the server's data is already here: a message begun and not
        complete, bytes TLS holds (decrypted, ``SSLObject.pending``, or received
        and not yet decrypted, in trio's incoming ``MemoryBIO``), or unread bytes
        in the socket (``FIONREAD``, ioctl(2)). The collector tells the dispatcher
        (``Source.publish``'s ``drained``): what is here is read before the
        fan-out writes. trio does not publish its ``SSLStream``'s incoming BIO;
        where a later trio has none by that name, a TLS stream always says true
        (the fan-out's window decides, as for any source), and the test of this
        method fails."""
        if self.frames.partial:
            return True
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            incoming = getattr(stream, "_incoming", None)
            if not isinstance(incoming, ssl.MemoryBIO) or incoming.pending or stream.pending():
                return True
            stream = stream.transport_stream
        if not isinstance(stream, trio.SocketStream):
            return True  # unknown: let the fan-out's window decide
        try:
            fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, self._unread, True)
        except OSError:
            return False  # the next read says what went wrong
        return self._unread[0] > 0

    async def _control(self, items: list[str | bytes | Control]) -> list[str | bytes]:
        messages: list[str | bytes] = []
        for item in items:
            if not isinstance(item, Control):
                messages.append(item)
            elif item.opcode == PING:
                await self._send(self.ws.send(Pong(payload=item.payload)))
            elif item.opcode == CLOSE:
                try:
                    code, reason = close_reason(item.payload)
                except WebSocketError as exc:
                    await self._fail(exc.code, exc.reason)
                    raise FeedDisconnected(f"{self.what}: {exc}") from exc
                await self._fail(NORMAL if code == 1005 else code, "")
                raise FeedDisconnected(f"{self.what}: closed ({code} {reason})".rstrip())
            # a pong (unsolicited: we send no pings) is ignored, RFC 6455 §5.5.3
        return messages

    async def send_text(self, text: str) -> None:
        """Send one text message. Raises ``FeedDisconnected``."""
        if self.closed:
            raise FeedDisconnected(f"{self.what}: send on a closed connection")
        await self._send(self.ws.send(TextMessage(data=text)))

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise FeedDisconnected(f"{self.what}: {_cause(exc)}") from exc

    async def _fail(self, code: int, reason: str) -> None:
        """Send a close frame with ``code`` (best effort) and close the socket."""
        if not self.closed:
            self.closed = True
            try:
                with trio.move_on_after(1.0):
                    await self._send(self.ws.send(CloseConnection(code=code, reason=reason)))
            except (FeedDisconnected, ProtocolError):
                pass
        await _abort(self.stream)

    async def aclose(self) -> None:
        """Close with 1000 (best effort, at most a second), then the socket."""
        with trio.CancelScope(shield=True):
            await self._fail(NORMAL, "")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc_value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()


async def _read_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    """Read the handshake's response head (up to the blank line, RFC 7230 §3) and
    return it and the bytes after it (the first frames, if the server sent them
    at once). Raises ``FeedDisconnected``."""
    data = b""
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[:end + 4], data[end + 4:]
        if len(data) > MAX_HEAD:
            raise FeedDisconnected(f"handshake response head over {MAX_HEAD} bytes")
        chunk = await stream.receive_some(READ_SIZE)
        if not chunk:
            raise FeedDisconnected("the server closed the connection in the handshake")
        data += chunk


def _cause(exc: BaseException) -> str:
    """``exc`` and what caused it (trio's ``BrokenResourceError`` wraps the
    ``ssl`` or socket error that says why)."""
    cause = exc.__cause__
    return f"{exc!r}: {cause!r}" if cause is not None else repr(exc)


async def _abort(stream: trio.abc.Stream | None) -> None:
    if stream is not None:
        await trio.aclose_forcefully(stream)
