"""A session's writer: every byte to one client goes through it, in order.

``emit(data)`` never blocks: it writes what the connection takes now and keeps
the rest; the session's writer task calls ``send_pending`` until nothing is left.
Two implementations of one interface (``Writer``):

- ``StreamWriter`` writes through a ``trio.abc.Stream``: any stream, so a TLS
  connection (``trio.SSLStream``) works. ``emit`` only buffers; the session's
  writer task sends the buffer with ``send_all``: one task switch per client per
  write.
- ``SocketWriter``, for plain TCP only, writes at once with a non-blocking
  ``os.write`` on the connection's own file descriptor (the trio socket's
  ``send`` is async; the descriptor is already non-blocking, and no second one is
  opened: one descriptor per client): the server's write pass reaches every
  client in one synchronous loop, without waking a task per client. That loop is
  what the fan-out figures of docs/benchmarks.md measure. Measured (run Q,
  ``benchmarks/fanout.py --clients 100 --idle 0 --modes max``, and the same with
  ``TICKWIRE_WRITER=stream``): 385,502 and 385,828 deliveries/s with this writer,
  23,846 and 21,086 with ``StreamWriter`` on the same plain connections. That is
  why plain TCP keeps the raw path; TLS needs ``StreamWriter``.

Control frames (pong, ping, close) that pile up behind a full connection are
bounded (``MAX_PILED``): a client that pings and never reads is dropped. Each
writer keeps a stall clock (``stalled_since``: since when bytes have waited for
the connection without progress), which the session's slow-consumer rule reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import trio

#: Control-frame bytes piled up behind a full connection before the client is dropped.
MAX_PILED = 1 << 20


class Writer(Protocol):
    """What a session writes with (see the module docstring)."""

    @property
    def pending(self) -> bool:
        """Whether bytes wait for ``send_pending``."""

    @property
    def broken(self) -> bool:
        """Whether the connection failed (or the client was dropped)."""

    @property
    def stalled_since(self) -> float | None:
        """Since when (trio time, s) the writer has waited for the connection to
        take bytes without progress; ``None`` while it does not wait."""

    def emit(self, data: bytes, control: bool = False) -> None:
        """Write ``data`` now as far as the connection takes it, keep the rest in
        order. ``control``: a control frame, which may pile up behind a full
        connection up to ``MAX_PILED`` bytes."""

    def write_now(self, data: bytes) -> bool:
        """``emit(data)`` if nothing waits to be sent and the connection is not
        broken (True), else nothing (False): a message the caller can queue
        instead, behind what waits."""

    async def send_pending(self) -> None:
        """Send what is kept, waiting for the connection as needed."""

    def close(self) -> None:
        """Release what the writer holds (not the stream: its owner closes it)."""


class _Buffered:
    """The kept bytes, the pile-up rule and the stall clock both writers share."""

    def __init__(self, on_break: Callable[[bool], None], on_pending: Callable[[], None],
                 on_wait: Callable[[], None]) -> None:
        self._out = bytearray()
        self._piled = 0
        self._broken = False
        self._on_break = on_break
        self._on_pending = on_pending
        self._on_wait = on_wait
        self._since: float | None = None

    @property
    def stalled_since(self) -> float | None:
        return self._since

    def _waiting(self) -> None:
        """Bytes wait for the connection from now on (if they did not already)."""
        if self._since is None:
            self._since = trio.current_time()
            self._on_wait()

    def _progress(self) -> None:
        """The connection took bytes: the stall clock starts over, or stops."""
        self._since = trio.current_time() if self._out else None

    @property
    def pending(self) -> bool:
        return bool(self._out)

    @property
    def broken(self) -> bool:
        return self._broken

    def emit(self, data: bytes, control: bool = False) -> None:
        raise NotImplementedError  # each writer's own

    def write_now(self, data: bytes) -> bool:
        if self._out or self._broken:
            return False
        self.emit(data)
        return True

    def _pile(self, data: bytes) -> None:
        """Keep ``data`` behind bytes that already wait."""
        self._out += data
        self._piled += len(data)
        if self._piled > MAX_PILED:
            self._break(piled=True)

    def _break(self, piled: bool = False) -> None:
        if not self._broken:
            self._broken = True
            self._out.clear()
            self._since = None
            self._on_break(piled)


class StreamWriter(_Buffered):
    """Writes through ``stream`` (plain or TLS) from the session's writer task.
    ``on_pending`` wakes that task; ``on_break(piled)`` is called once if the
    stream fails (``False``) or the pile-up bound is passed (``True``);
    ``on_wait`` when the writer starts waiting for the connection (a send)."""

    def __init__(self, stream: trio.abc.Stream, on_break: Callable[[bool], None],
                 on_pending: Callable[[], None], on_wait: Callable[[], None]) -> None:
        super().__init__(on_break, on_pending, on_wait)
        self.stream = stream

    def emit(self, data: bytes, control: bool = False) -> None:
        if self._broken:
            return
        if self._out and control:
            self._pile(data)
            return
        self._piled = 0
        self._out += data
        self._on_pending()

    async def send_pending(self) -> None:
        data = bytes(self._out)
        self._out.clear()
        if not data or self._broken:
            return
        self._waiting()  # one send_all: its progress is not seen until it returns
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._break()
        self._progress()

    def close(self) -> None:
        pass


class SocketWriter(_Buffered):
    """Writes at once on ``stream``'s socket (plain TCP only), through its own
    descriptor: the stream owns and closes it; the writer stops using it at
    ``close``."""

    def __init__(self, stream: trio.SocketStream, on_break: Callable[[bool], None],
                 on_pending: Callable[[], None], on_wait: Callable[[], None]) -> None:
        super().__init__(on_break, on_pending, on_wait)
        self.socket = stream.socket
        self.fd = stream.socket.fileno()

    def emit(self, data: bytes, control: bool = False) -> None:
        if self._broken:
            return
        if self._out:
            # only control frames reach here while the socket is full (the session's
            # queue waits meanwhile): bounded
            self._pile(data)
            return
        self._piled = 0
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._break()
            return
        if sent < len(data):
            self._out += data[sent:]
            self._waiting()
            self._on_pending()

    async def send_pending(self) -> None:
        while self._out and not self._broken:
            await trio.lowlevel.wait_writable(self.socket)
            try:
                sent = os.write(self.fd, self._out)
            except BlockingIOError:
                continue
            except OSError:
                self._break()
                return
            del self._out[:sent]
            self._progress()
            return

    def close(self) -> None:
        # nothing more is written (the descriptor's number could be reused once the
        # stream closes it)
        self._broken = True
        self._out.clear()


#: ``TICKWIRE_WRITER=stream`` makes plain connections use ``StreamWriter`` too (to
#: measure both writers with benchmarks/fanout.py); anything else: the default.
FORCE_STREAM = os.environ.get("TICKWIRE_WRITER") == "stream"


def open_writer(stream: trio.abc.Stream, on_break: Callable[[bool], None],
                on_pending: Callable[[], None], on_wait: Callable[[], None]) -> Writer:
    """The writer for ``stream``: ``SocketWriter`` for a plain ``trio.SocketStream``
    (unless ``TICKWIRE_WRITER=stream``), ``StreamWriter`` for anything else (TLS)."""
    if isinstance(stream, trio.SocketStream) and not FORCE_STREAM:
        return SocketWriter(stream, on_break, on_pending, on_wait)
    return StreamWriter(stream, on_break, on_pending, on_wait)
