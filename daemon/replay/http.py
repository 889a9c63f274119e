"""The emulator's REST endpoints on the one HTTP server (``daemon.http``).

``serve_http(rest, host, port)`` answers every GET with ``rest(target)``, which
returns ``(status, body)``; bodies are JSON. Other methods get 405. Keep-alive is
the server's (httpx and ccxt reuse connections).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from daemon.http import HttpServer, Request, Response

#: A venue's REST: request target (path and query) -> (status, JSON body).
Handler = Callable[[str], tuple[int, bytes]]
JSON = "application/json"


class RestHandler:
    """``daemon.http`` handler over a venue's ``rest(target)``."""

    def __init__(self, rest: Handler) -> None:
        self.rest = rest

    async def __call__(self, request: Request) -> Response:
        """GET: the venue's answer as JSON; any other method: 405."""
        if request.method != "GET":
            return Response(405, b'{"error":"only GET"}', JSON, (("allow", "GET"),))
        status, body = self.rest(request.target)
        return Response(status, body, JSON)


async def serve_http(
    rest: Handler,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``rest`` until cancelled; ``started(port)`` with the bound port. Raises
    ``daemon.listen.ListenError`` when the address cannot be bound."""
    server = HttpServer(RestHandler(rest), host, port, name="emulator REST",
                        setting="the emulator's address")
    await server.serve(task_status=task_status)
