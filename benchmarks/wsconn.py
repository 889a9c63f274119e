"""The benchmark load clients' WebSocket frames, shared by ``fanout.py`` and
``publish.py``: the server's frames decoded by the collector's own decoder
(``daemon.collectors.wsframes.ServerFrames``: RFC 6455 §5 checks, fragments,
partial frames across reads), pings answered, and the client's masked frames
encoded by wsproto (``FrameProtocol(client=True)``). Blocking sockets, no event
loop: a load client is a plain ``selectors`` loop.
"""

from __future__ import annotations

import socket

from wsproto.frame_protocol import FrameProtocol

from daemon.collectors.wsframes import CLOSE, PING, Control, ServerFrames

#: The largest message a load client accepts (a batch of initial books can be large).
MAX_MESSAGE = 1 << 26


def text_frame(payload: bytes | str) -> bytes:
    """One masked client text frame (RFC 6455 §5.3)."""
    return FrameProtocol(client=True, extensions=[]).send_data(
        payload if isinstance(payload, str) else payload.decode(), fin=True)


def pong_frame(payload: bytes) -> bytes:
    """One masked client pong frame answering a ping's ``payload`` (§5.5.3)."""
    return FrameProtocol(client=True, extensions=[]).pong(payload)


class ServerStream:
    """The server's frames on ``sock``: ``messages(data)`` decodes the bytes of
    one read, answers pings on the socket, and returns the data messages
    completed (``str`` or ``bytes``), ``None`` for a close frame (then stops)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.frames = ServerFrames(MAX_MESSAGE)

    def messages(self, data: bytes) -> list[str | bytes | None]:
        out: list[str | bytes | None] = []
        for item in self.frames.receive(data):
            if type(item) is not Control:
                out.append(item)  # type: ignore[arg-type]
            elif item.opcode == PING:
                self.sock.setblocking(True)
                self.sock.sendall(pong_frame(item.payload))
                self.sock.setblocking(False)
            elif item.opcode == CLOSE:
                out.append(None)
                break
        return out
