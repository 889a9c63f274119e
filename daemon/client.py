"""A Python client for publishing into tickwire's channels (docs/protocol.md
"Publishing"): the desk's own signals, executions, portfolio and trading state.

::

    from daemon import client

    # over the admin Unix socket (the default; no token: the socket's mode decides)
    receipt = client.publish("signals", "momentum", "BTC-USD", {"side": "buy", "confidence": 0.8})
    receipt.seq, receipt.epoch, receipt.duplicate   # 12, "1796515639-761f825f", False

    # over HTTP (publish.listen), with a token that has a publish grant; one
    # connection kept alive for many publishes
    with client.Publisher(url="http://127.0.0.1:8766", token=token) as publisher:
        publisher.publish("portfolio", "desk1", "BTC", {"qty": "1.5"}, version=17)
        answers = publisher.publish_batch([
            client.Message("executions", "oms", "BTC-USD", {"id": "x1", "qty": "0.1"}),
            client.Message("executions", "oms", "ETH-USD", {"id": "x2", "qty": "2"}),
        ])

    # under trio: the same with ``await`` (no timeout argument: wrap in trio.fail_after)
    async with client.AsyncPublisher(url="http://127.0.0.1:8766", token=token) as publisher:
        with trio.fail_after(10):
            receipt = await publisher.publish("signals", "momentum", "BTC-USD", {"side": "sell"})

Transports
----------
- **HTTP** (``url`` given: ``http://HOST:PORT`` or ``https://...``, with any path
  prefix a reverse proxy adds): ``POST {url}/api/publish`` with the message as
  its JSON body, ``POST {url}/api/publish/batch`` with a JSON array of messages;
  ``Authorization: Bearer TOKEN`` when a token is given. Through httpx, so
  proxies from the environment, TLS verification (``verify``: a
  ``ssl.SSLContext``, or ``False``) and keep-alive are httpx's.
- **The admin Unix socket** (no ``url``): ``socket`` or the path
  ``daemon.admin.find_socket`` finds (``$RUNTIME_DIRECTORY/admin.sock``,
  ``$XDG_RUNTIME_DIR/tickwire/admin.sock``, ``/tmp/tickwire-$UID/admin.sock``,
  then ``/run/tickwire/admin.sock``); one JSON line a request,
  ``{"op":"publish","id":N,"message":{...}}``, one JSON line a reply. No token:
  whoever may open the socket (mode 0660) may publish. A batch is one request
  a message, one after the other, on one connection.

Answers and errors
------------------
- ``Receipt`` (frozen): ``seq`` (the message's number in its stream
  ``channel:source:key``, from 1), ``epoch`` (the daemon's run; a ``seq`` is
  meaningful within one epoch), ``duplicate`` (``True``: this
  ``idempotency_key`` was published before, within the daemon's
  ``publish.idempotency_window``; ``seq`` is that first publish's and nothing was
  delivered again).
- ``PublishRefused``: the daemon answered an error: ``code`` (``invalid_json``,
  ``invalid_field``, ``unauthorized``, ``forbidden``, ``unknown_channel``,
  ``stale``, ``too_large``, ``busy``; over the admin socket also the socket's
  own ``invalid_request``, ``unknown_op``, ``request_too_large``), ``message``
  for people, ``status`` (the HTTP status; over the admin socket, the status
  the same code has over HTTP, ``None`` for the socket's own codes). Nothing of
  a refused message was published. ``busy`` (the daemon stayed full for
  ``publish.timeout``) is worth retrying later.
- ``Unreachable``: no answer: nothing listens, the connection broke, or an
  answer did not come in time. When the message had been sent, it may have been
  published: retry with the same ``idempotency_key`` to publish it at most once.
- ``BadAnswer``: something answered that is not a tickwire publish answer (a
  wrong URL, a proxy's error page).

Every error derives from ``ClientError``; ``Unreachable`` also from
``daemon.admin.Unreachable`` (what ``tickwire status`` raises for the socket).
A ``Publisher`` is for one thread at a time; an ``AsyncPublisher`` for one task
at a time (over HTTP, httpx allows concurrent requests on one client).
"""

from __future__ import annotations

import contextlib
import select
import socket as stdsocket
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import attrs
import httpx
import orjson
import trio

from daemon import __version__, admin
from daemon.publish.message import HTTP_STATUS

__all__ = [
    "AsyncPublisher",
    "BadAnswer",
    "ClientError",
    "Message",
    "PublishRefused",
    "Publisher",
    "Receipt",
    "Unreachable",
    "apublish",
    "apublish_batch",
    "publish",
    "publish_batch",
]

#: The HTTP paths of one publish and of a batch, under the ``url`` given.
PUBLISH_PATH = "/api/publish"
BATCH_PATH = "/api/publish/batch"
#: Messages in one HTTP batch request at most (the daemon's
#: ``daemon.publish.endpoint.MAX_BATCH``); a longer batch goes as several.
BATCH_SIZE = 1000
#: Default seconds any one step (connecting, sending, waiting for the answer) may take.
DEFAULT_TIMEOUT = 10.0
#: Largest admin socket reply line accepted, bytes.
MAX_REPLY = 1 << 20
#: How much of an unexpected answer an error message quotes, characters.
PREVIEW = 200

#: TLS verification for ``https://``: ``True`` (the system's CAs), a context, ``False``.
Verify = ssl.SSLContext | bool


class ClientError(Exception):
    """Base of the publish client's errors."""


class PublishRefused(ClientError):
    """The daemon refused the publish: ``code``, ``message`` (for people),
    ``status`` (HTTP status, or ``None``; see the module docstring). Its text
    is ``CODE: message``."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.message, self.status))

    def as_dict(self) -> dict[str, Any]:
        """The daemon's error answer: ``{"ok": false, "code": ..., "message": ...}``."""
        return {"ok": False, "code": self.code, "message": self.message}


class Unreachable(ClientError, admin.Unreachable):
    """No answer from the daemon (nothing listens, a broken connection, a
    timeout); one line, for people. After the message was sent, it may have been
    published (see the module docstring)."""


class BadAnswer(ClientError):
    """An answer that is not a tickwire publish answer (one line, for people)."""


@attrs.frozen
class Receipt:
    """A publish the daemon accepted: ``seq`` in its stream, the daemon's
    ``epoch``, and ``duplicate`` (an ``idempotency_key`` seen before: ``seq`` is
    the first publish's, nothing delivered again)."""

    seq: int
    epoch: str
    duplicate: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The daemon's answer: ``{"ok": true, "seq": N, "epoch": "..."}``, with
        ``"duplicate": true`` for a duplicate."""
        answer: dict[str, Any] = {"ok": True, "seq": self.seq, "epoch": self.epoch}
        if self.duplicate:
            answer["duplicate"] = True
        return answer


#: One message's answer in a batch: its receipt, or why it was refused.
Answer = Receipt | PublishRefused


@attrs.frozen
class Message:
    """One publish message. ``channel``: a declared published channel;
    ``source``, ``key``: names (the stream is ``channel:source:key``); ``data``:
    a JSON object (any mapping orjson encodes), carried to subscribers
    unchanged; ``ts``: the publisher's time, epoch seconds; ``idempotency_key``:
    makes a retry safe; ``version``: orders states on ``latest`` channels (a
    version not above the key's current one is refused as ``stale``). The
    daemon checks every field; this class only carries them."""

    channel: str
    source: str
    key: str
    data: Mapping[str, Any]
    ts: float | None = None
    idempotency_key: str | None = None
    version: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The wire form: a dict with the fields that are set."""
        body: dict[str, Any] = {"channel": self.channel, "source": self.source,
                                "key": self.key, "data": self.data}
        for field in ("ts", "idempotency_key", "version"):
            value = getattr(self, field)
            if value is not None:
                body[field] = value
        return body


# -- the protocol, without I/O -----------------------------------------------------------


def _wire(message: Message | Mapping[str, Any]) -> dict[str, Any]:
    return message.as_dict() if isinstance(message, Message) else dict(message)


def _encode(value: Any) -> bytes:
    """JSON bytes; a ``data`` orjson cannot encode is the caller's ``TypeError``."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def _preview(content: bytes) -> str:
    text = " ".join(content.decode(errors="replace").split())
    return text if len(text) <= PREVIEW else text[:PREVIEW] + "..."


def _answer(obj: Any, status: int | None, where: str) -> Answer:
    """One answer (an HTTP answer, an item of a batch's, or an admin reply) as a
    ``Receipt`` or a ``PublishRefused``; ``status``: the HTTP status it came
    with (``None``: the code's). Raises ``BadAnswer`` for anything else."""
    if isinstance(obj, dict):
        if obj.get("type") == "error" or obj.get("ok") is False:
            code, message = obj.get("code"), obj.get("message")
            if isinstance(code, str) and isinstance(message, str):
                return PublishRefused(code, message,
                                      status if status is not None else HTTP_STATUS.get(code))
        elif obj.get("ok") is True:
            seq, epoch = obj.get("seq"), obj.get("epoch")
            if isinstance(seq, int) and not isinstance(seq, bool) and isinstance(epoch, str):
                return Receipt(seq, epoch, obj.get("duplicate") is True)
    raise BadAnswer(f"{where}: not a publish answer: {_preview(_encode(obj))}")


def _http_answer(response: httpx.Response) -> Answer:
    """The answer of ``POST /api/publish``: 200 and a receipt, or an error status
    and an error answer."""
    where = f"HTTP {response.status_code} from {response.url}"
    body = _http_body(response, where)
    answer = _answer(body, None if response.status_code == 200 else response.status_code, where)
    if isinstance(answer, Receipt) and response.status_code != 200:
        raise BadAnswer(f"{where}: an accepted answer with an error status")
    return answer


def _http_batch_answers(response: httpx.Response, count: int) -> list[Answer]:
    """The answers of ``POST /api/publish/batch`` (200 and one answer per message,
    in order); a refusal of the whole batch (an error status and one error
    answer) is raised as ``PublishRefused``."""
    where = f"HTTP {response.status_code} from {response.url}"
    body = _http_body(response, where)
    if response.status_code == 200 and isinstance(body, list):
        if len(body) != count:
            raise BadAnswer(f"{where}: {len(body)} answers to {count} messages")
        return [_answer(item, None, where) for item in body]
    refused = _answer(body, response.status_code, where)
    if isinstance(refused, Receipt):
        raise BadAnswer(f"{where}: one receipt for a batch of {count}")
    raise refused


def _http_body(response: httpx.Response, where: str) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise BadAnswer(f"{where}: not JSON: {_preview(response.content)}") from None


def _chunks(wire: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``wire`` in HTTP batches of at most ``BATCH_SIZE`` messages, in order."""
    return [wire[start:start + BATCH_SIZE] for start in range(0, len(wire), BATCH_SIZE)]


def _admin_request(request_id: int, message: Message | Mapping[str, Any]) -> bytes:
    """The admin socket's publish request line."""
    return _encode({"op": "publish", "id": request_id, "message": _wire(message)}) + b"\n"


def _admin_answer(line: bytes, request_id: int, path: Path) -> Answer:
    """The reply line to request ``request_id`` as an answer; raises ``BadAnswer``
    for a line that is not JSON or answers another request."""
    where = f"admin socket {path}"
    try:
        reply = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise BadAnswer(f"{where}: not JSON: {_preview(line)}") from None
    if isinstance(reply, dict) and reply.get("id") not in (request_id, None):
        raise BadAnswer(f"{where}: a reply to request {reply.get('id')!r}, not {request_id}")
    return _answer(reply, None, where)


class _Lines:
    """Splits received bytes into lines (sans-IO): ``feed`` bytes, ``next`` line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.buffer = b""

    def next(self) -> bytes | None:
        """The next complete line (without its newline), or ``None``."""
        line, newline, rest = self.buffer.partition(b"\n")
        if not newline:
            if len(self.buffer) > MAX_REPLY:
                raise BadAnswer(f"admin socket {self.path}: a reply over {MAX_REPLY} bytes")
            return None
        self.buffer = rest
        return line

    def feed(self, data: bytes) -> None:
        """Add received bytes; ``b""`` (the daemon closed) raises ``Unreachable``."""
        if not data:
            raise Unreachable(f"admin socket {self.path}: the daemon closed the connection "
                              "before answering")
        self.buffer += data


def _check_target(url: str | None, socket: str | Path | None) -> None:
    if url is not None and socket is not None:
        raise ValueError("give url (HTTP) or socket (the admin socket), not both")
    if url is not None:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise ValueError(f"url {url!r} is not a URL: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"url must be http://HOST:PORT or https://..., not {url!r}")


def _headers(token: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json", "user-agent": f"tickwire-client/{__version__}"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return headers


def _unreachable(exc: BaseException, where: str) -> Unreachable:
    """``exc`` (httpx's transport errors, socket errors) as one line."""
    if isinstance(exc, FileNotFoundError):
        return Unreachable(f"no admin socket at {where}: is tickwire running?")
    if isinstance(exc, ConnectionRefusedError):
        return Unreachable(f"{where}: connection refused: is tickwire running?")
    if isinstance(exc, PermissionError):
        return Unreachable(f"{where}: permission denied (the admin socket is for the "
                           "daemon's user and group)")
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return Unreachable(f"{where}: no answer in time ({type(exc).__name__})")
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return Unreachable(f"{where}: {text}")


#: What sending and receiving may raise that means "no answer".
_TRANSPORT_ERRORS = (OSError, httpx.TransportError, trio.BrokenResourceError,
                     trio.ClosedResourceError)


# -- blocking --------------------------------------------------------------------------------


class Publisher:
    """Publishes over one kept-alive connection (blocking): HTTP (``url``; an
    ``httpx.Client``) or the admin socket (``socket``, or the default path).

    ``token``: sent as ``Authorization: Bearer`` over HTTP (the admin socket
    takes none, and ignores it); ``timeout``: seconds any one step (connecting,
    sending, waiting for the answer) may take; ``verify``: TLS verification for
    ``https://`` (``True``: the system's CAs; an ``ssl.SSLContext``; ``False``:
    none). Raises ``ValueError`` for both ``url`` and ``socket``, or a URL that
    is not ``http(s)://``. Use it in a ``with`` block, or ``close()`` it.
    """

    def __init__(self, *, url: str | None = None, token: str | None = None,
                 socket: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT,
                 verify: Verify = True) -> None:
        _check_target(url, socket)
        self.url = url
        self.timeout = timeout
        self.path = None if url is not None else admin.find_socket(
            None if socket is None else str(socket))
        self._http = None if url is None else httpx.Client(
            base_url=url, headers=_headers(token), timeout=timeout, verify=verify)
        self._sock: stdsocket.socket | None = None
        self._lines: _Lines | None = None
        self._next_id = 1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a later publish opens another)."""
        if self._http is not None:
            self._http.close()
        self._drop()

    def publish(self, channel: str, source: str, key: str, data: Mapping[str, Any], *,
                ts: float | None = None, idempotency_key: str | None = None,
                version: int | None = None) -> Receipt:
        """Publish one message (fields as in ``Message``); returns its ``Receipt``.
        Raises ``PublishRefused``, ``Unreachable``, ``BadAnswer``; ``TypeError`` when
        orjson cannot encode ``data``."""
        message = Message(channel, source, key, data, ts, idempotency_key, version)
        if self._http is not None:
            answer = _http_answer(self._post(PUBLISH_PATH, _encode(message.as_dict())))
        else:
            answer = self._ask(message)
        if isinstance(answer, PublishRefused):
            raise answer
        return answer

    def publish_batch(self, messages: Iterable[Message | Mapping[str, Any]]) -> list[Answer]:
        """Publish ``messages`` (``Message``s, or their wire form as dicts), in
        order; returns each one's answer, in order: a ``Receipt``, or the
        ``PublishRefused`` that says why that one was not published (the others
        are published all the same). Over HTTP, one request per ``BATCH_SIZE``
        messages; over the admin socket, one request per message. Raises
        ``PublishRefused`` when the daemon refuses a whole request over HTTP (no
        token, a body too large; earlier requests of a long batch were
        published), ``Unreachable`` (some may have been published), ``BadAnswer``."""
        wire = [_wire(m) for m in messages]
        if not wire:
            return []
        if self._http is None:
            return [self._ask(message) for message in wire]
        answers: list[Answer] = []
        for chunk in _chunks(wire):
            answers += _http_batch_answers(self._post(BATCH_PATH, _encode(chunk)), len(chunk))
        return answers

    def _post(self, path: str, body: bytes) -> httpx.Response:
        assert self._http is not None
        try:
            return self._http.post(path, content=body)
        except httpx.TransportError as exc:
            raise _unreachable(exc, f"{self.url}{path}") from exc

    def _ask(self, message: Message | Mapping[str, Any]) -> Answer:
        """One request on the admin socket, and its answer."""
        assert self.path is not None
        request_id, self._next_id = self._next_id, self._next_id + 1
        request = _admin_request(request_id, message)
        try:
            sock, lines = self._connection()
            sock.sendall(request)
            while (line := lines.next()) is None:
                lines.feed(sock.recv(65536))
        except BaseException as exc:  # interrupted mid-request too: the connection is unusable
            self._drop()
            if isinstance(exc, _TRANSPORT_ERRORS):
                raise _unreachable(exc, str(self.path)) from exc
            raise
        answer = _admin_answer(line, request_id, self.path)
        if isinstance(answer, PublishRefused) and answer.code == "request_too_large":
            self._drop()  # the daemon closes the connection after this one
        return answer

    def _connection(self) -> tuple[stdsocket.socket, _Lines]:
        """The open connection, or a new one when there is none or the daemon
        closed it while idle (readable while idle: its end, or bytes nobody asked
        for)."""
        assert self.path is not None
        if self._sock is not None and self._lines is not None:
            readable, _, _ = select.select([self._sock], [], [], 0)
            if not readable:
                return self._sock, self._lines
            self._drop()
        sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
        except BaseException:
            sock.close()
            raise
        self._sock, self._lines = sock, _Lines(self.path)
        return sock, self._lines

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._lines = None


def publish(channel: str, source: str, key: str, data: Mapping[str, Any], *,
            ts: float | None = None, idempotency_key: str | None = None,
            version: int | None = None, url: str | None = None, token: str | None = None,
            socket: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT,
            verify: Verify = True) -> Receipt:
    """Publish one message on a connection of its own (blocking): over HTTP with
    ``url``, else over the admin socket. Message fields as in ``Message``;
    connection arguments as in ``Publisher``. Returns the ``Receipt``; raises
    ``PublishRefused``, ``Unreachable``, ``BadAnswer`` (``ValueError`` for both
    ``url`` and ``socket``)."""
    with Publisher(url=url, token=token, socket=socket, timeout=timeout, verify=verify) as p:
        return p.publish(channel, source, key, data, ts=ts, idempotency_key=idempotency_key,
                         version=version)


def publish_batch(messages: Iterable[Message | Mapping[str, Any]], *, url: str | None = None,
                  token: str | None = None, socket: str | Path | None = None,
                  timeout: float = DEFAULT_TIMEOUT, verify: Verify = True) -> list[Answer]:
    """Publish ``messages`` on a connection of their own (blocking); their answers
    in order, as ``Publisher.publish_batch``."""
    with Publisher(url=url, token=token, socket=socket, timeout=timeout, verify=verify) as p:
        return p.publish_batch(messages)


# -- trio ------------------------------------------------------------------------------------


class AsyncPublisher:
    """``Publisher`` for trio: the same transports and answers, awaited.

    As trio wants it, nothing here takes a timeout: wrap calls in
    ``trio.fail_after`` (``trio.TooSlowError``) or ``trio.move_on_after``; a
    publish cancelled after its message was sent may have been published
    (retry with the same ``idempotency_key``). Over HTTP it is an
    ``httpx.AsyncClient`` (anyio runs it on trio). Use it in an ``async with``
    block, or ``await aclose()``.
    """

    def __init__(self, *, url: str | None = None, token: str | None = None,
                 socket: str | Path | None = None, verify: Verify = True) -> None:
        _check_target(url, socket)
        self.url = url
        self.path = None if url is not None else admin.find_socket(
            None if socket is None else str(socket))
        self._http = None if url is None else httpx.AsyncClient(
            base_url=url, headers=_headers(token), timeout=None, verify=verify)
        self._stream: trio.SocketStream | None = None
        self._lines: _Lines | None = None
        self._next_id = 1

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (a later publish opens another)."""
        if self._http is not None:
            await self._http.aclose()
        await self._drop()

    async def publish(self, channel: str, source: str, key: str, data: Mapping[str, Any], *,
                      ts: float | None = None, idempotency_key: str | None = None,
                      version: int | None = None) -> Receipt:
        """As ``Publisher.publish``."""
        message = Message(channel, source, key, data, ts, idempotency_key, version)
        if self._http is not None:
            answer = _http_answer(await self._post(PUBLISH_PATH, _encode(message.as_dict())))
        else:
            answer = await self._ask(message)
        if isinstance(answer, PublishRefused):
            raise answer
        return answer

    async def publish_batch(self, messages: Iterable[Message | Mapping[str, Any]]) -> list[Answer]:
        """As ``Publisher.publish_batch``."""
        wire = [_wire(m) for m in messages]
        if not wire:
            return []
        if self._http is None:
            return [await self._ask(message) for message in wire]
        answers: list[Answer] = []
        for chunk in _chunks(wire):
            answers += _http_batch_answers(await self._post(BATCH_PATH, _encode(chunk)),
                                           len(chunk))
        return answers

    async def _post(self, path: str, body: bytes) -> httpx.Response:
        assert self._http is not None
        try:
            return await self._http.post(path, content=body)
        except httpx.TransportError as exc:
            raise _unreachable(exc, f"{self.url}{path}") from exc

    async def _ask(self, message: Message | Mapping[str, Any]) -> Answer:
        assert self.path is not None
        request_id, self._next_id = self._next_id, self._next_id + 1
        request = _admin_request(request_id, message)
        try:
            stream, lines = await self._connection()
            await stream.send_all(request)
            while (line := lines.next()) is None:
                lines.feed(await stream.receive_some(65536))
        except BaseException as exc:  # cancelled mid-request too: the connection is unusable
            await self._drop()
            if isinstance(exc, _TRANSPORT_ERRORS):
                raise _unreachable(exc, str(self.path)) from exc
            raise
        answer = _admin_answer(line, request_id, self.path)
        if isinstance(answer, PublishRefused) and answer.code == "request_too_large":
            await self._drop()
        return answer

    async def _connection(self) -> tuple[trio.SocketStream, _Lines]:
        assert self.path is not None
        if self._stream is not None and self._lines is not None:
            readable, _, _ = select.select([self._stream.socket.fileno()], [], [], 0)
            if not readable:
                return self._stream, self._lines
            await self._drop()
        self._stream = await trio.open_unix_socket(str(self.path))
        self._lines = _Lines(self.path)
        return self._stream, self._lines

    async def _drop(self) -> None:
        stream, self._stream, self._lines = self._stream, None, None
        if stream is not None:
            with trio.CancelScope(shield=True), contextlib.suppress(*_TRANSPORT_ERRORS):
                await stream.aclose()


async def apublish(channel: str, source: str, key: str, data: Mapping[str, Any], *,
                   ts: float | None = None, idempotency_key: str | None = None,
                   version: int | None = None, url: str | None = None, token: str | None = None,
                   socket: str | Path | None = None, verify: Verify = True) -> Receipt:
    """``publish`` for trio, on a connection of its own (no timeout: see
    ``AsyncPublisher``)."""
    async with AsyncPublisher(url=url, token=token, socket=socket, verify=verify) as p:
        return await p.publish(channel, source, key, data, ts=ts,
                               idempotency_key=idempotency_key, version=version)


async def apublish_batch(messages: Iterable[Message | Mapping[str, Any]], *,
                         url: str | None = None, token: str | None = None,
                         socket: str | Path | None = None, verify: Verify = True) -> list[Answer]:
    """``publish_batch`` for trio, on a connection of its own."""
    async with AsyncPublisher(url=url, token=token, socket=socket, verify=verify) as p:
        return await p.publish_batch(messages)
