"""The publish HTTP listener (``publish.listen``), on the one HTTP server
(``daemon.http``).

Routes (docs/protocol.md "Publishing"):

- ``POST /api/publish``: the body is one publish message; the answer is
  ``{"ok": true, "seq": N, "epoch": "..."}`` with 200, or
  ``{"ok": false, "code": ..., "message": ...}`` with the code's status
  (``daemon.publish.message.HTTP_STATUS``: 400, 401, 403, 404, 409, 413, 503);
- ``POST /api/publish/batch``: the body is a JSON array of messages (at most
  ``MAX_BATCH``), published in order; the answer is 200 with a JSON array of
  answers in the same order (a bad item is refused alone; the others go on);
- any other path is 404, another method 405 (``Allow: POST``).

Authorization: ``Authorization: Bearer TOKEN`` (RFC 6750, section 2.1), a token
of ``auth.tokens`` with a ``publish`` grant; without a token only when the
listener is bound to loopback and ``publish.allow_loopback_anonymous`` is set.
A missing or unknown token is 401 (``WWW-Authenticate: Bearer``), a token
without a publish grant 403. Tokens are never logged.
"""

from __future__ import annotations

import ssl

import orjson
import trio

from daemon.broadcast.auth import Authenticator, bearer
from daemon.config import AuthConfig, PublishConfig, is_loopback
from daemon.errors import StartupError
from daemon.http import HttpServer, Request, Response
from daemon.listen import ListenError
from daemon.publish.message import (
    ANYONE,
    FORBIDDEN,
    INVALID_FIELD,
    UNAUTHORIZED,
    PublishError,
    PublishGrant,
    decode,
)
from daemon.publish.publisher import Publisher

JSON = "application/json"
#: Messages in one batch at most.
MAX_BATCH = 1000
#: Seconds a connection may take to send a whole request.
REQUEST_TIMEOUT = 30.0


class PublishListenerError(StartupError):
    """The publish listener cannot listen (busy or unassignable address)."""


class PublishEndpoint:
    """Serves ``publisher`` over HTTP on ``config.listen`` (see the module
    docstring); ``auth`` holds the tokens; ``ssl_context``: HTTPS when set."""

    def __init__(self, publisher: Publisher, config: PublishConfig, auth: AuthConfig,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.publisher = publisher
        self.config = config
        self.tokens = Authenticator(auth, config.host)
        self.anonymous = config.allow_loopback_anonymous and is_loopback(config.host)
        # a batch of MAX_BATCH messages of max_message_bytes, and room for the rest
        max_body = MAX_BATCH * (config.max_message_bytes + 1024)
        self.http = HttpServer(self.answer, config.host, config.port, name="publish",
                               setting="publish.listen", ssl_context=ssl_context,
                               max_body=max_body, request_timeout=REQUEST_TIMEOUT,
                               path="/api/publish")

    @property
    def address(self) -> str | None:
        """``HOST:PORT`` while listening, else ``None``."""
        return self.http.address

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``started(port)``. Raises
        ``PublishListenerError`` (one line) when the address cannot be bound."""
        try:
            await self.http.serve(task_status=task_status)
        except ListenError as exc:
            raise PublishListenerError(str(exc)) from exc.__cause__

    def grant(self, request: Request) -> PublishGrant:
        """The publisher's grant; raises ``PublishError`` (401 or 403)."""
        token = bearer(request.header("authorization"))
        if token is None:
            if self.anonymous:
                return ANYONE
            raise PublishError(UNAUTHORIZED, "a token is required (Authorization: Bearer)")
        grant = self.tokens.grant_of(token)
        if grant is None:
            raise PublishError(UNAUTHORIZED, "unknown token")
        if grant.publish is None:
            raise PublishError(FORBIDDEN, f"token {grant.name} may not publish")
        return grant.publish

    async def answer(self, request: Request) -> Response:
        """One HTTP request's response (see the module docstring)."""
        if request.path not in ("/api/publish", "/api/publish/batch"):
            return Response(404, b"not found\n")
        if request.method != "POST":
            return Response(405, b"method not allowed\n", headers=(("allow", "POST"),))
        try:
            grant = self.grant(request)
            if request.path == "/api/publish":
                answer = await self.publisher.publish_body(request.body, grant)
                status = 200 if answer["ok"] else _status(answer["code"])
                return Response(status, orjson.dumps(answer), JSON, _headers(status))
            items = decode(request.body)
            if not isinstance(items, list) or not items or len(items) > MAX_BATCH:
                raise PublishError(INVALID_FIELD,
                                   f"a batch is a JSON array of 1 to {MAX_BATCH} messages")
        except PublishError as exc:
            return Response(exc.status, orjson.dumps(exc.answer()), JSON, _headers(exc.status))
        answers = [await self.publisher.publish(item, grant) for item in items]
        return Response(200, orjson.dumps(answers), JSON)


def _status(code: str) -> int:
    return PublishError(code, "").status


def _headers(status: int) -> tuple[tuple[str, str], ...]:
    if status == 401:
        return (("www-authenticate", 'Bearer realm="tickwire publish"'),)
    if status == 503:
        return (("retry-after", "1"),)
    return ()
