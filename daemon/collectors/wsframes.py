"""Decoding the frames an exchange's WebSocket server sends, sans-IO.

Why not wsproto here: the collector's hot path receives tens of thousands of
small text frames a second, and wsproto's event machinery (a generator per
buffer, an event object per frame, a state machine built for both roles) cost
about 7 us a frame, more than the exchange protocol's own parse (issue 17,
``benchmarks/ingest.py``). A server's frames are never masked (RFC 6455 §5.1),
so decoding them is a header read and a slice. wsproto keeps the jobs it is
right for: the opening handshake and encoding (masking) the few frames a
collector sends (``daemon.collectors.wsclient``).

``ServerFrames.receive(data)`` takes what one socket read returned, any number
of bytes, and returns every message completed by it, in order: a text message
as ``str`` (checked UTF-8, RFC 6455 §8.1), a binary message as ``bytes``, a
control frame as ``Control``. It reassembles fragmented messages (§5.4; control
frames may come between the fragments) and keeps a partial frame for the next
read, without copying the buffered bytes again per read (a 2 MB snapshot in 64
KiB reads is joined once). Anything RFC 6455 says a client must fail the
connection for raises ``WebSocketError`` with the close code to send (§7.4.1):
1002 for a masked frame, reserved bits or opcodes (no extension is negotiated),
a fragmented or oversized control frame, a continuation without a message or a
new message inside one, a 64-bit length with its top bit set; 1007 for a text
message that is not UTF-8; 1009 for a message over ``max_message`` bytes.
"""

from __future__ import annotations

import attrs

#: RFC 6455 §5.2 opcodes
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

#: RFC 6455 §7.4.1 close codes
NORMAL, PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG = 1000, 1002, 1007, 1009


class WebSocketError(ValueError):
    """The server broke RFC 6455: fail the connection, closing with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{reason} (close {code})")
        self.code = code
        self.reason = reason


@attrs.frozen
class Control:
    """A control frame (§5.5): ``opcode`` is ``CLOSE``, ``PING`` or ``PONG``;
    ``payload`` at most 125 bytes."""

    opcode: int
    payload: bytes


def close_reason(payload: bytes) -> tuple[int, str]:
    """A close frame's status code and reason (§5.5.1): ``(1005, "")`` for an
    empty payload (§7.1.5: no status received). Raises ``WebSocketError`` for a
    payload of one byte or a reason that is not UTF-8."""
    if not payload:
        return 1005, ""
    if len(payload) < 2:
        raise WebSocketError(PROTOCOL_ERROR, "close frame of one byte")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketError(INVALID_DATA, "close reason is not UTF-8") from None
    return int.from_bytes(payload[:2], "big"), reason


class ServerFrames:
    """The decoder of one connection's incoming frames (see the module docstring).

    ``max_message``: the largest message accepted, in bytes (the sum of its
    fragments).
    """

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._pending: list[bytes] = []  # received bytes not yet decoded
        self._pending_size = 0
        self._need = 2  # buffered bytes needed before the next frame can be read
        self._fragments: list[bytes] | None = None  # a fragmented message's parts so far
        self._fragment_opcode = TEXT
        self._fragment_size = 0

    @property
    def partial(self) -> bool:
        """Bytes of a frame are held, waiting for the rest (the rest is in flight)."""
        return self._pending_size > 0 or self._fragments is not None

    def receive(self, data: bytes) -> list[str | bytes | Control]:
        """Decode ``data`` (the next bytes of the stream); return the messages it
        completes. Raises ``WebSocketError`` (see the module docstring)."""
        if self._pending:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size < self._need:
                return []
            buf = b"".join(self._pending)
            self._pending = []
        else:
            buf = data
        out: list[str | bytes | Control] = []
        size = len(buf)
        pos = 0
        need = 2
        while size - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1]
            if length & 0x80:
                raise WebSocketError(PROTOCOL_ERROR, "masked frame from the server")
            if b0 & 0x70:
                raise WebSocketError(PROTOCOL_ERROR, "reserved bits set")
            head = pos + 2
            if length >= 126:
                if length == 126:
                    if size - pos < 4:
                        need = 4
                        break
                    length = (buf[head] << 8) | buf[head + 1]
                    head += 2
                else:
                    if size - pos < 10:
                        need = 10
                        break
                    length = int.from_bytes(buf[head:head + 8], "big")
                    if length >> 63:
                        raise WebSocketError(PROTOCOL_ERROR, "64-bit length with its top bit set")
                    head += 8
                if length > self.max_message:
                    raise WebSocketError(MESSAGE_TOO_BIG, f"a frame of {length} bytes")
            end = head + length
            if end > size:
                need = end - pos
                break
            opcode = b0 & 0x0F
            if opcode == TEXT and b0 & 0x80 and self._fragments is None:  # nearly every frame
                try:
                    out.append(buf[head:end].decode("utf-8"))
                except UnicodeDecodeError:
                    raise WebSocketError(INVALID_DATA, "text message is not UTF-8") from None
            else:
                message = self._frame(b0 & 0x80, opcode, buf[head:end])
                if message is not None:
                    out.append(message)
            pos = end
        if pos < size:
            self._pending = [buf[pos:]]
            self._pending_size = size - pos
            self._need = need
        else:
            self._pending_size = 0
        return out

    def _frame(self, fin: int, opcode: int, payload: bytes) -> str | bytes | Control | None:
        """Any frame but a whole text message outside a fragmented one."""
        if opcode >= CLOSE:
            if opcode not in (CLOSE, PING, PONG):
                raise WebSocketError(PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
            if not fin or len(payload) > 125:
                raise WebSocketError(PROTOCOL_ERROR, "fragmented or oversized control frame")
            return Control(opcode, payload)
        if opcode == CONTINUATION:
            if self._fragments is None:
                raise WebSocketError(PROTOCOL_ERROR, "continuation frame without a message")
        elif opcode in (TEXT, BINARY):
            if self._fragments is not None:
                raise WebSocketError(PROTOCOL_ERROR, "new message inside a fragmented one")
            self._fragments = []
            self._fragment_opcode = opcode
            self._fragment_size = 0
        else:
            raise WebSocketError(PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
        self._fragment_size += len(payload)
        if self._fragment_size > self.max_message:
            raise WebSocketError(MESSAGE_TOO_BIG, f"a message of over {self.max_message} bytes")
        self._fragments.append(payload)
        if not fin:
            return None
        whole = b"".join(self._fragments)
        self._fragments = None
        if self._fragment_opcode == BINARY:
            return whole
        try:
            return whole.decode("utf-8")
        except UnicodeDecodeError:
            raise WebSocketError(INVALID_DATA, "text message is not UTF-8") from None
