"""A minimal HTTP/1.1 server on trio and h11, for the emulator's REST endpoints.

``serve_http(handler, host, port)`` answers every GET with ``handler(target)``,
which returns ``(status, body)``; bodies are JSON. Keep-alive is supported, as
httpx and ccxt reuse connections.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import h11
import trio

log = logging.getLogger(__name__)

Handler = Callable[[str], tuple[int, bytes]]
MAX_REQUEST = 64 * 1024


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``started(port)`` with the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    task_status.started(bound)
    await trio.serve_listeners(partial(_connection, handler), listeners)


async def _connection(handler: Handler, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    try:
        async with stream:
            while True:
                event = await _next_event(conn, stream)
                if isinstance(event, h11.ConnectionClosed) or event is None:
                    return
                if not isinstance(event, h11.Request):
                    return
                target = event.target.decode("ascii", "replace")
                if event.method != b"GET":
                    status, body = 405, b'{"error":"only GET"}'
                else:
                    try:
                        status, body = handler(target)
                    except Exception as exc:  # a handler bug must not end the server
                        log.exception("emulator REST handler failed on %s", target)
                        status, body = 500, f'{{"error":"{type(exc).__name__}"}}'.encode()
                while not isinstance(await _next_event(conn, stream), h11.EndOfMessage):
                    pass
                headers = [
                    ("content-type", "application/json"),
                    ("content-length", str(len(body))),
                ]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        return


async def _next_event(conn: h11.Connection, stream: trio.SocketStream):
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            if not data and conn.their_state is not h11.DONE:
                return None
            continue
        return event
