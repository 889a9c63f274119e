"""Server WebSocket frames, built once and written to many clients.

A server frame is never masked (RFC 6455, 5.1), so the same bytes can go to every
client: the dispatcher's encoded event becomes one frame that every session
writes as it is, instead of one framing per client. wsproto still does the
handshake and parses what clients send; only outgoing data frames are built here.
"""

from __future__ import annotations

import struct

_TEXT_FIN = 0x81  # FIN + opcode 1 (text)


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked text frame carrying ``payload`` (UTF-8 JSON)."""
    n = len(payload)
    if n < 126:
        header = bytes((_TEXT_FIN, n))
    elif n < 1 << 16:
        header = struct.pack("!BBH", _TEXT_FIN, 126, n)
    else:
        header = struct.pack("!BBQ", _TEXT_FIN, 127, n)
    return header + payload


def batch_payload(payloads: list[bytes]) -> bytes:
    """Several encoded messages as one JSON array."""
    return b"[" + b",".join(payloads) + b"]"
