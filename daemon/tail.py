"""``tickwire tail``: a client that subscribes, prints events one a line, and resumes.

When the connection ends for a reason that passes (the daemon restarts: 1001; this
client fell behind: 4008; no pong in time: 4001; the connection dropped: 1006), it
connects again after a full-jitter backoff (the daemon's one retry loop,
``daemon.supervise.retry``; the backoff starts over once subscribed) and
subscribes with ``since``: per stream, the last ``seq`` it printed, and the
``epoch`` it printed it in (docs/protocol.md, "Recovery with since"). What the daemon still retains arrives
exactly once. A stream it could not recover starts fresh, and a line on stderr
says so; its messages at or below the last ``seq`` printed (the ``history`` sent
again) are not printed twice. After a daemon restart (another epoch) every stream
starts fresh, and stderr says that too.

``Resume`` is the protocol side (no I/O); ``tail_events`` runs it over trio-websocket.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import attrs
import orjson
import trio_websocket

from daemon.events import EVENT_TYPES
from daemon.supervise import Backoff, Failure, retry

log = logging.getLogger(__name__)

#: The channel of each event ``type`` on the wire.
CHANNEL_OF_TYPE = {cls.TYPE: cls.CHANNEL for cls in reversed(EVENT_TYPES)}
#: Close codes after which tail stops instead of resuming: the daemon refused what
#: this client sent (1002 protocol error, 1003 binary, 1008 policy, 1009 too big,
#: 4029 rate limited). Every other close is resumed.
FINAL_CLOSE_CODES = frozenset({1002, 1003, 1008, 1009, 4029})
#: Refusals of the upgrade that pass (too many connections): retried when resuming.
#: The others (401, 403: no or a wrong token, a foreign Origin) stop tail.
BUSY_STATUSES = frozenset({429, 503})


def market_stream(message: dict[str, Any]) -> tuple[str | None, str]:
    """The channel and stream key of a market or derived message: a ``bar``'s
    stream ends with its ``interval`` (``bars:coinbase:BTC-USD:1m``), a depth-N
    ``book_snapshot``'s with ``depth`` and ``interval_ms`` (``views:...``), a
    ``quote``'s with ``interval_ms``."""
    kind = message.get("type", "")
    channel = CHANNEL_OF_TYPE.get(kind)
    symbol = message.get("symbol")
    if kind == "bar":
        symbol = f"{symbol}:{message.get('interval')}"
    elif kind == "book_snapshot" and "depth" in message:
        channel = "views"
        symbol = f"{symbol}:{message.get('depth')}:{message.get('interval_ms')}"
    elif kind == "quote":
        symbol = f"{symbol}:{message.get('interval_ms')}"
    return channel, f"{channel}:{message.get('exchange')}:{symbol}"


class TailError(Exception):
    """The daemon answered ``error`` or closed the connection for good."""


class _Reconnect(Exception):
    """A connection ended in a way that passes: ``retry`` connects again. Its message
    is the note for stderr."""


@attrs.define
class Resume:
    """What a resuming subscriber remembers between connections.

    ``channels`` x ``symbols`` is the subscription, ``history`` the retained messages
    asked for with it. ``epoch``: the daemon's, from its last welcome; ``last``:
    per stream key (``channel:exchange:symbol``, a published channel's
    ``channel:source:key``), the highest ``seq`` printed.
    """

    channels: list[str]
    symbols: list[str]
    history: int = 0
    epoch: str | None = None
    #: ``book`` as top-of-book views of this depth (0: whole books) and at most one
    #: message per ``throttle_ms`` per stream
    depth: int = 0
    throttle_ms: int = 0
    last: dict[str, int] = attrs.field(factory=dict)

    def welcome(self, message: dict[str, Any]) -> list[str]:
        """Take the daemon's welcome; returns notes for stderr (a restart)."""
        epoch = message.get("epoch")
        notes = []
        if self.epoch is not None and epoch != self.epoch:
            notes.append(f"tail: the daemon restarted (epoch {self.epoch} -> {epoch}): "
                         "every stream starts again")
            self.last.clear()
        self.epoch = epoch
        return notes

    def subscribe(self) -> dict[str, Any]:
        """The subscribe request for this connection: with ``since`` when some stream
        has been printed in the current epoch."""
        request: dict[str, Any] = {"op": "subscribe", "id": 1, "channels": self.channels,
                                   "symbols": self.symbols, "history": self.history}
        if self.depth:
            request["depth"] = self.depth
        if self.throttle_ms:
            request["throttle_ms"] = self.throttle_ms
        if self.last:
            request["since"] = dict(self.last)
            request["epoch"] = self.epoch
        return request

    def ack(self, message: dict[str, Any]) -> list[str]:
        """Take the subscribe ack; returns a note for each stream not recovered."""
        return [f"tail: {stream}: the missed messages are no longer retained; "
                "it starts again" for stream, ok in message.get("recovered", {}).items()
                if not ok]

    def accept(self, message: dict[str, Any]) -> bool:
        """Whether to print ``message`` (an event): not if its stream was printed up
        to its ``seq`` already (a ``book_snapshot`` may repeat the last ``seq``: it
        is the book's state, printed again)."""
        seq = message.get("seq")
        if "source" in message:  # a published channel's message names its stream
            channel = message.get("channel")
            stream = f"{channel}:{message.get('source')}:{message.get('key')}"
        else:
            channel, stream = market_stream(message)
        if channel is None or not isinstance(seq, int):
            return True
        last = self.last.get(stream)
        if last is not None and seq <= last and not (
                (message["type"] == "book_snapshot" or message.get("partial") is True)
                and seq == last):
            return False
        self.last[stream] = max(seq, last or 0)
        return True


async def tail_events(
    url: str,
    channels: list[str],
    symbols: list[str],
    history: int = 0,
    *,
    depth: int = 0,
    throttle_ms: int = 0,
    resume: bool = True,
    token: str | None = None,
    backoff: Backoff | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> None:
    """Subscribe to ``channels`` x ``symbols`` on ``url`` and write every event to
    ``out`` (stdout), one JSON object a line (batches are split); notes go to ``err``
    (stderr). With ``resume``, a connection that ends is followed by another (see
    the module docstring), through the daemon's one retry loop
    (``daemon.supervise.retry``), with delays from ``backoff`` (default 0.5 s doubling
    to 30 s), started over once subscribed again.
    ``token``: sent as ``Authorization: Bearer TOKEN`` (a daemon with auth on).
    ``depth``: ``book`` as views of the top N levels; ``throttle_ms``: at most one
    message per stream per interval (docs/protocol.md).

    Raises ``TailError`` on an ``error`` reply, on a close in ``FINAL_CLOSE_CODES``,
    on a refused upgrade (HTTP 401, 403; 429 and 503 too at the first connection),
    and without ``resume`` on any close; ``OSError`` if the first connection cannot
    be made, or ``trio_websocket.HandshakeError`` if its handshake fails (later
    connections are retried).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    state = Resume(channels, symbols, history, depth=depth, throttle_ms=throttle_ms)
    backoff = backoff or Backoff(0.5, 30.0)
    connected_once = False
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else None

    async def connect_once() -> None:
        """One connection, from the handshake to its end; ``_Reconnect`` when it
        ended in a way that passes."""
        nonlocal connected_once
        try:
            async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
                connected_once = True
                await _serve(ws, state, backoff, out, err)
        except trio_websocket.ConnectionClosed as exc:
            closed = exc.reason
            code = closed.code if closed is not None else 1006  # no close frame: abnormal
            reason = (closed.reason if closed is not None else None) or ""
            if not resume or code in FINAL_CLOSE_CODES:
                raise TailError(f"closed: {code} {reason}".rstrip()) from None
            raise _Reconnect(f"closed: {code} {reason}".rstrip()) from None
        except trio_websocket.ConnectionRejected as exc:  # an HTTP status
            if not (resume and connected_once and exc.status_code in BUSY_STATUSES):
                raise TailError(f"refused: HTTP {exc.status_code} "
                                f"{(exc.body or b'').decode(errors='replace').strip()}") from None
            raise _Reconnect(f"refused: HTTP {exc.status_code}") from None
        except (OSError, trio_websocket.HandshakeError) as exc:
            # trio-websocket gives a refused connection as a HandshakeError from OSError
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            if not connected_once or not resume:
                if isinstance(cause, OSError):
                    raise cause from None
                raise
            raise _Reconnect(f"cannot reconnect: {cause if cause else repr(exc)}") from None

    def say(failure: Failure) -> None:
        err.write(f"tail: {failure.error}; connecting again in {failure.delay:.1f} s\n")
        err.flush()

    # the notes are tail's stderr; the retry loop's own lines only at DEBUG
    await retry("tail", connect_once, backoff, retryable=(_Reconnect,), on_retry=say,
                logger=log, level=logging.DEBUG)


async def _serve(ws: trio_websocket.WebSocketConnection, state: Resume, backoff: Backoff,
                 out: TextIO, err: TextIO) -> None:
    welcome = orjson.loads(await ws.get_message())
    notes = state.welcome(welcome)
    await ws.send_message(orjson.dumps(state.subscribe()).decode())
    while True:
        parsed = orjson.loads(await ws.get_message())
        lines = []
        for item in parsed if isinstance(parsed, list) else [parsed]:
            kind = item.get("type")
            if kind == "ack":
                notes += state.ack(item)
                backoff.reset()  # subscribed again: the next failure starts over
            elif kind == "error":
                raise TailError(orjson.dumps(item).decode())
            elif kind != "welcome" and state.accept(item):
                lines.append(orjson.dumps(item).decode() + "\n")
        if notes:
            err.write("".join(note + "\n" for note in notes))
            err.flush()
            notes = []
        if lines:
            out.write("".join(lines))
            out.flush()
