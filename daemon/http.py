"""The one HTTP/1.1 server (h11 on trio): the metrics endpoint, the emulator's REST,
and any later listener (a publish endpoint: POST with a JSON body) plug a handler
into it.

A handler is ``async (Request) -> Response``: the request's method, target,
headers and whole body (at most ``max_body`` bytes) in; a status, body and
content type out. The server does the rest, per RFC 9112: keep-alive (h11
decides when a connection must close), ``Content-Length`` on every response, no
body for ``HEAD``, ``400 Bad Request`` for a request h11 cannot parse (RFC 9112,
section 2.2 / 3), ``413 Content Too Large`` for a body over ``max_body`` (RFC 9110,
section 15.5.14), and ``500`` when the handler raises (logged; the server goes
on). A connection that sends no complete request within ``request_timeout``
seconds is closed.

With an ``ssl.SSLContext`` every connection is TLS (``https://``): the handshake is
part of the request timeout. The context is read at each handshake, so reloading
its certificate (``daemon.tls.reload``) applies to new connections.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

from daemon.listen import open_listeners

log = logging.getLogger(__name__)

#: Bytes read from the connection at a time.
RECEIVE_SIZE = 65536
#: Largest request head (request line and headers), bytes.
MAX_HEAD = 64 * 1024
TEXT = "text/plain; charset=utf-8"


@attrs.frozen
class Request:
    """One HTTP request: ``method`` (upper case), ``target`` (path and query, as
    sent), ``headers`` (lower-case names, in order), ``body`` (bytes, complete)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @property
    def path(self) -> str:
        """The target's path, without the query."""
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        """The target's query, parsed (``urllib.parse.parse_qs``)."""
        return parse_qs(urlsplit(self.target).query)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


@attrs.frozen
class Response:
    """An HTTP response: ``status``, ``body``, its ``content_type``, and more
    ``headers`` (``Content-Length`` is added by the server)."""

    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


#: What a listener plugs into the server.
Handler = Callable[[Request], Awaitable[Response]]


@attrs.frozen
class HttpStatistics:
    """``listen``: ``HOST:PORT`` while listening, else ``None``; ``requests``
    answered (every status); ``errors``: connections that ended in a protocol
    error, a timeout, a TLS failure, or a handler's exception."""

    listen: str | None
    requests: int
    errors: int


class HttpServer:
    """Serves ``handler`` on ``host:port`` (see the module docstring).

    ``name`` names the listener in logs and start-up errors (``"metrics"``),
    ``setting`` the configuration key of its address (``"metrics.listen"``);
    ``path``: what the start-up log line shows (``metrics: serving
    http://127.0.0.1:9108/metrics``).
    """

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        *,
        name: str,
        setting: str,
        ssl_context: ssl.SSLContext | None = None,
        max_body: int = 64 * 1024,
        request_timeout: float = 10.0,
        path: str = "/",
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.name = name
        self.setting = setting
        self.ssl_context = ssl_context
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.path = path
        #: ``HOST:PORT`` while listening, else ``None``
        self.address: str | None = None
        self._requests = 0
        self._errors = 0

    @property
    def scheme(self) -> str:
        """``https`` with TLS, else ``http``."""
        return "https" if self.ssl_context is not None else "http"

    def statistics(self) -> HttpStatistics:
        """Requests and errors so far, and the address."""
        return HttpStatistics(listen=self.address, requests=self._requests, errors=self._errors)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``started(port)`` with the bound port. Raises
        ``daemon.listen.ListenError`` when the address cannot be bound."""
        listeners = await open_listeners(self.host, self.port, what=self.name,
                                         setting=self.setting)
        port = listeners[0].socket.getsockname()[1]
        self.address = f"{self.host}:{port}"
        log.info("%s: serving %s://%s%s", self.name, self.scheme, self.address, self.path)
        try:
            task_status.started(port)
            await trio.serve_listeners(self._connection, listeners)
        finally:
            self.address = None

    async def _connection(self, stream: trio.SocketStream) -> None:
        # serve_listeners ends on a handler's exception: everything is caught here
        try:
            if self.ssl_context is not None:
                tls = trio.SSLStream(stream, self.ssl_context, server_side=True,
                                     https_compatible=True)
                with trio.fail_after(self.request_timeout):
                    await tls.do_handshake()
                async with tls:
                    await self._serve(tls)
            else:
                async with stream:
                    await self._serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                h11.ProtocolError):
            self._errors += 1
        except Exception:
            self._errors += 1
            log.exception("%s: a connection failed", self.name)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.abc.Stream) -> None:
        """Answer requests on one connection until it closes."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            try:
                with trio.fail_after(self.request_timeout):
                    request = await self._read(conn, stream)
            except h11.RemoteProtocolError as exc:
                self._errors += 1
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    await self._send(conn, stream, "GET",
                                     Response(status, f"bad request: {exc}\n".encode()))
                return
            if request is None:
                return
            if isinstance(request, Response):  # the body was too large
                await self._send(conn, stream, "GET", request)
                return
            try:
                response = await self.handler(request)
            except Exception as exc:  # a handler's bug must not end the server
                self._errors += 1
                log.exception("%s: the handler failed on %s %s", self.name, request.method,
                              request.target)
                response = Response(500, f"internal error: {type(exc).__name__}\n".encode())
            await self._send(conn, stream, request.method, response)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read(self, conn: h11.Connection, stream: trio.abc.Stream) -> Request | Response | None:
        """The next complete request; ``None`` when the client closed; a 413
        ``Response`` when its body is over ``max_body``."""
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_SIZE)
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                head = event
                length = dict(event.headers).get(b"content-length")
                if length is not None and length.isdigit() and int(length) > self.max_body:
                    return Response(413, b"request body too large\n")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body:
                    return Response(413, b"request body too large\n")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return Request(
                    method=head.method.decode("ascii"),
                    target=head.target.decode("ascii", "replace"),
                    headers=tuple((name.decode("latin-1"), value.decode("latin-1"))
                                  for name, value in head.headers),
                    body=bytes(body),
                )

    async def _send(self, conn: h11.Connection, stream: trio.abc.Stream, method: str,
                    response: Response) -> None:
        self._requests += 1
        headers = [("content-type", response.content_type),
                   ("content-length", str(len(response.body))), *response.headers]
        if response.status >= 400 and response.status not in (404, 405):
            headers.append(("connection", "close"))
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        if method != "HEAD":
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
