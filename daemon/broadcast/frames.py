"""Server WebSocket frames, built once and written to many clients.

A server frame is never masked (RFC 6455, 5.1), so the same bytes can go to every
client: the dispatcher's encoded event becomes one frame that every session
writes as it is, instead of one framing per client. wsproto still does the
handshake and parses what clients send; only outgoing data frames are built here,
and a client's queue is turned into them (``build_frames``: batching, sans-IO).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

from daemon.dispatch import Message

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


@attrs.frozen
class Built:
    """What one client's queue became: ``data`` (the frames, joined), ``messages``
    and ``frames`` in it, ``batches`` (frames holding a JSON array), ``first_recv``
    (the first event's ``recv_ts``, epoch s; 0 without an event), ``shareable``
    (every item was an event every subscriber shares: the bytes may go to another
    client with the same queue)."""

    data: bytes
    messages: int
    frames: int
    batches: int
    first_recv: float
    shareable: bool


class WriteCache:
    """During one write pass, the ``Built`` of each queue of shared messages, by
    the messages' ids. The messages stay referenced beside the bytes, so no id in
    a key can be reused by another object during the pass."""

    def __init__(self) -> None:
        #: the bytes built for a queue of these messages in this pass, by their ids
        #: (one message: its id alone), read with ``built.get(key)``
        self.built: dict[int | tuple[int, ...], Built] = {}
        self._kept: list[list[object]] = []  # the messages of every key

    def put(self, key: int | tuple[int, ...], built: Built, items: list[object]) -> None:
        """Remember ``built`` for the queue ``items`` (whose ids are ``key``)."""
        self.built[key] = built
        self._kept.append(items)


def build_frames(
    queue: deque[Any],
    render: Callable[[Any], bytes | None],
    max_batch: int,
    max_bytes: int,
) -> Built:
    """Empty ``queue`` into frames: batches of at most ``max_batch`` messages and
    ``max_bytes`` (a JSON array per frame); a shared message alone is its prebuilt
    frame (``Message.frame``, built once for every client). Items that are not a
    ``Message`` are rendered by ``render`` (a control message's bytes, a conflated
    state; ``None``: nothing to send)."""
    frames: list[bytes] = []
    sent = batches = 0
    first_recv = 0.0
    plain = True
    while queue:
        payloads: list[bytes] = []
        single: Message | None = None
        size = 0
        while queue and len(payloads) < max_batch:
            item = queue[0]
            is_message = type(item) is Message
            payload = item.payload if is_message else render(item)
            if payload is None:
                queue.popleft()
                plain = False
                continue
            if payloads and size + len(payload) > max_bytes:
                break
            queue.popleft()
            payloads.append(payload)
            size += len(payload) + 1
            if is_message:
                single = item
                if not first_recv:
                    first_recv = item.recv_ts
            else:
                # a control message or a conflated state: this client's only
                single = None
                plain = False
        if not payloads:
            continue
        if len(payloads) == 1 and single is not None:
            if single.frame is None:
                single.frame = text_frame(single.payload)
            frame = single.frame
        elif len(payloads) == 1:
            frame = text_frame(payloads[0])
        else:
            frame = text_frame(batch_payload(payloads))
            batches += 1
        frames.append(frame)
        sent += len(payloads)
    return Built(b"".join(frames), sent, len(frames), batches, first_recv, plain)
