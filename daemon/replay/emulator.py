"""The exchange emulator: serves recorded traffic on 127.0.0.1 as the exchange would.

Theory of operation
-------------------
One ``Emulator`` plays one exchange: a REST server (recorded answers, and books as
they stand at this moment of the replay) and a WebSocket server. All capture files
of the exchange form one tape, merged by recorded time. The tape starts when the
first connection subscribes to something, and plays with the recorded timing
divided by ``speed`` (``None``: as fast as the slowest connection reads). Each
frame advances the venue's state (its books) and goes to every open connection
that subscribed to it, through a small bounded queue per connection: a connection
that does not read holds the tape, as a TCP window would.

The WebSocket side is the broadcast server's ``ServerConnection`` (wsproto for
the handshake and for what clients send, prebuilt frames for what we send): the
frames queued for a connection leave together in one write (at most
``WRITE_BATCH``), as a busy exchange's server streams them.

A connection that comes later (a reconnect) joins the tape where it is: what it
missed is gone, as on a real exchange, and its collector must recover. Faults
(``tape.Faults``) are injected by frame number.

Looping (``loop``): the tape plays again and again; pass ``k`` (from 0) plays the
frames the venue's ``shift(frame, k)`` makes of each recorded frame (pass 0: the
recording as it is), so that every pass continues the last one: trade ids,
sequence numbers and exchange times shifted by ``k`` spans, books kept consistent
(each venue's docstring says how). With ``speed``, pass ``k`` starts ``k`` times the
venue's ``prepare_loop`` period after the first. Faults apply to the first pass
only (their frame numbers are tape numbers of that pass). ``passes`` bounds the
number of passes (tests); ``None`` loops until cancelled.

Rate (``rate``): exchange frames per second, overriding the recorded timing:
frame ``n`` (counted over every pass) leaves ``n / rate`` seconds after the start.

Start (``autostart``): the tape starts when a connection first subscribes; with
``autostart=False`` only when ``started`` is set by the caller (a collector that
subscribes over several connections, like ccxt.pro, is started once all are up).
``wait_keys(wanted)`` returns once the open connections together hold every
routing key in ``wanted``: what a caller waits for before it sets ``started``
when a collector's subscriptions trickle in (ccxt.pro throttles its requests).

Per-connection views (``Venue.deliver(path, keys, key, text)``): the text a
connection opened on ``path`` gets of a frame, or ``None`` when the frame is not
for it. Usually the frame as recorded, to the connections whose keys hold its
routing key; a venue whose exchange sends one event in several forms (Binance:
wrapped on ``/stream``, bare on ``/ws``; an ``aggTrade`` also served as the
``@trade`` stream ccxt.pro asks for; Kraken: v1 or v2 by path) renders it per
connection.
"""

from __future__ import annotations

import itertools
import logging
from functools import partial
from typing import Protocol

import attrs
import trio

from daemon.broadcast.connection import ConnectionClosed, ServerConnection
from daemon.broadcast.frames import text_frame
from daemon.replay.capture import Capture, Received, exchange_of
from daemon.replay.http import serve_http
from daemon.replay.tape import NO_FAULTS, Faults, merge_frames

log = logging.getLogger(__name__)

CONNECTION_QUEUE = 16
#: A connection's writer joins at most this many queued frames into one write.
WRITE_BATCH = 16
#: Seconds a client has to send its WebSocket upgrade request.
HANDSHAKE_TIMEOUT = 10.0
MAX_MESSAGE_SIZE = 1 << 20
#: At full speed (no ``speed``, no ``rate``) the tape yields to other tasks once per
#: this many frames (and whenever a connection's queue is full).
MAX_SPEED_BURST = 16


class Venue(Protocol):
    """An exchange's emulation logic (``daemon.replay.venues``), sans-IO: what the
    emulator calls, and every venue implements (``BinanceVenue``, ``CoinbaseVenue``,
    ``KrakenVenue``; mypy checks them against it in ``make_venue``)."""

    @property
    def exchange(self) -> str:
        """The exchange id (``binance``, ``binanceus``, ``coinbase``, ``kraken``)."""
        ...

    def subscriptions(self, captures: list[Capture]) -> tuple[list[str], list[str]]:
        """``(symbols, channels)`` the recorded connections subscribed, as tickwire
        names (``BTC-USD``; ``trades``, ``book``, ``ticker``): what ``tickwire
        replay`` configures its collector with."""
        ...

    def greeting(self, path: str = "/") -> list[str]:
        """What a new connection on ``path`` gets before anything it asks for
        (Kraken's ``systemStatus``, or v2's ``status`` on a v2 path)."""
        ...

    def open(self, path: str) -> set[str]:
        """The routing keys a new connection on ``path`` holds (Binance names its
        streams in the path; the others subscribe by message)."""
        ...

    def on_client_message(self, keys: set[str], text: str) -> list[str]:
        """The answers to a client's text frame; subscriptions change ``keys``."""
        ...

    def route(self, frame: Received) -> str | None:
        """Advance the venue's state by one tape frame; its routing key, or ``None``
        for a frame that goes to nobody."""
        ...

    def deliver(self, path: str, keys: set[str], key: str, text: str) -> str | None:
        """The text a connection on ``path`` holding ``keys`` gets of a frame routed
        to ``key`` (module doc, "Per-connection views"), ``None``: nothing."""
        ...

    def corrupt_checksum(self, text: str) -> str:
        """``text`` with a wrong checksum (a fault), where the exchange has one."""
        ...

    def rest(self, target: str) -> tuple[int, bytes]:
        """The status and body of a REST GET of ``target`` (path and query)."""
        ...

    def prepare_loop(self, tape: list[Received]) -> float:
        """Learn the spans to shift by from the whole tape, before anything plays;
        return the period of one pass in seconds (what exchange times shift by)."""
        ...

    def shift(self, frame: Received, pass_number: int) -> list[str]:
        """The frames to play for recorded ``frame`` in pass ``pass_number`` (>= 1):
        usually one, shifted; none for a frame that only makes sense once; an extra
        one where the venue must bring its books back to the recording's."""
        ...


def make_venue(exchange: str, captures: list[Capture]) -> Venue:
    """The venue emulator of ``exchange`` over ``captures``; ``KeyError`` if none."""
    venue: Venue
    if exchange in ("binance", "binanceus"):
        from daemon.replay.venues.binance import BinanceVenue

        venue = BinanceVenue(captures, exchange)
    elif exchange == "coinbase":
        from daemon.replay.venues.coinbase import CoinbaseVenue

        venue = CoinbaseVenue(captures)
    elif exchange == "kraken":
        from daemon.replay.venues.kraken import KrakenVenue

        venue = KrakenVenue(captures)
    else:
        raise KeyError(exchange)
    return venue


@attrs.define(eq=False)
class _Connection:
    ws: ServerConnection
    keys: set[str]
    send: trio.MemorySendChannel[str]
    path: str = "/"
    closed: bool = False
    #: held while a client request's replies are queued, so no tape frame can
    #: slip between them (a frame before its book's snapshot would be lost)
    lock: trio.StrictFIFOLock = attrs.field(factory=trio.StrictFIFOLock)
    #: the connection's handler: a close (fault) gives it a deadline
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    ended: trio.Event = attrs.field(factory=trio.Event)  # the TCP connection is closed


@attrs.frozen
class EmulatorStatistics:
    """An emulator's tape: ``position`` (the next frame's index in ``frames``),
    ``pass_number`` (0 on the first pass of ``--loop``), ``played`` (frames due so
    far, every pass), ``sent`` (frames written to a connection), ``connections``
    open, ``finished`` (the tape ended, without ``--loop``)."""

    exchange: str
    position: int
    frames: int
    pass_number: int
    played: int
    sent: int
    connections: int
    finished: bool


@attrs.frozen
class EmulatorAddress:
    """Where an emulator listens: base URLs for a collector's ``rest_url``/``ws_url``."""

    exchange: str
    rest_url: str
    ws_url: str


class Emulator:
    """Plays ``captures`` (all of one exchange) at ``speed`` with ``faults``;
    ``loop``, ``passes`` and ``rate`` as the module docstring says (``rate``, in
    frames per second, overrides ``speed``).

    After ``serve`` has started: ``address`` has the URLs, ``finished`` is set at
    the end of the tape (of the last pass), ``sent`` counts frames sent per
    connection total, ``pass_number`` is the pass playing (from 0), ``played`` the
    frames played over all passes, ``play_started`` the trio time the tape started.
    Raises ``ValueError`` for captures of no or several exchanges.
    """

    def __init__(
        self,
        captures: list[Capture],
        speed: float | None = 1.0,
        faults: Faults = NO_FAULTS,
        host: str = "127.0.0.1",
        *,
        loop: bool = False,
        passes: int | None = None,
        rate: float | None = None,
        autostart: bool = True,
    ) -> None:
        found = {exchange_of(url) for capture in captures for url in capture.urls}
        exchanges = {exchange for exchange in found if exchange is not None}
        if len(exchanges) != 1:
            raise ValueError(f"one exchange per emulator, got {sorted(exchanges)}")
        self.exchange: str = exchanges.pop()
        self.venue = make_venue(self.exchange, captures)
        self.tape = merge_frames(captures)
        self.speed = speed
        self.faults = faults
        self.host = host
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be greater than 0, not {rate}")
        if passes is not None and passes < 1:
            raise ValueError(f"passes must be at least 1, not {passes}")
        self.rate = rate
        self.autostart = autostart
        self.loop = loop or (passes is not None and passes > 1)
        self.passes = passes if self.loop else 1
        self.period = 0.0
        if self.loop:
            # before anything plays: the venue learns the recording's first state
            self.period = self.venue.prepare_loop(self.tape)
        self.pass_number = 0
        self.played = 0
        self.play_started: float | None = None  # trio time the tape started
        self.connections: set[_Connection] = set()
        self._keys_changed = trio.Event()  # set, and replaced, after each client frame
        self.started = trio.Event()
        self.finished = trio.Event()
        self.position = 0
        self.sent = 0
        self.connections_total = 0
        self.address: EmulatorAddress | None = None
        self._deliver = self.venue.deliver

    def _text_for(self, conn: _Connection, key: str, text: str) -> str | None:
        """What ``conn`` gets of a frame routed to ``key`` (``None``: nothing)."""
        return self._deliver(conn.path, conn.keys, key, text)

    async def serve(self, *, task_status: trio.TaskStatus[EmulatorAddress] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve REST and WebSocket on ``host`` (ports picked by the system)."""
        async with trio.open_nursery() as nursery:
            rest_port = await nursery.start(serve_http, self.venue.rest, self.host, 0)
            listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0,
                                                    host=self.host))
            ws_port = listeners[0].socket.getsockname()[1]
            self.address = EmulatorAddress(
                exchange=self.exchange,
                rest_url=f"http://{self.host}:{rest_port}",
                ws_url=f"ws://{self.host}:{ws_port}",
            )
            nursery.start_soon(self._play)
            task_status.started(self.address)

    async def _handle(self, stream: trio.SocketStream) -> None:
        ws = ServerConnection(stream, MAX_MESSAGE_SIZE)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                handshake = await ws.receive_handshake()
            await ws.accept()
        except (ConnectionClosed, trio.TooSlowError):
            await stream.aclose()
            return
        path = handshake.target  # with its query: Binance's /stream?streams=...
        send, receive = trio.open_memory_channel[str](CONNECTION_QUEUE)
        conn = _Connection(ws=ws, keys=self.venue.open(path), send=send, path=path)
        self.connections.add(conn)
        self.connections_total += 1
        self._keys_changed.set()  # keys from the path (Binance's streams)
        self._keys_changed = trio.Event()
        try:
            with conn.scope:
                await self._serve_connection(conn, receive, path)
        except* ConnectionClosed:
            pass
        finally:
            conn.closed = True
            self.connections.discard(conn)
            receive.close()  # a tape blocked on this connection moves on
            try:
                await stream.aclose()
            finally:
                conn.ended.set()

    async def _serve_connection(self, conn: _Connection, receive: trio.MemoryReceiveChannel[str],
                                path: str) -> None:
        send, ws = conn.send, conn.ws
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, conn, receive)
            for text in self.venue.greeting(path):  # e.g. Kraken's systemStatus
                await send.send(text)
            if conn.keys and self.autostart:
                self.started.set()
            while True:
                text = await ws.get_message()
                async with conn.lock:
                    for reply in self.venue.on_client_message(conn.keys, text):
                        await send.send(reply)
                self._keys_changed.set()
                self._keys_changed = trio.Event()
                if conn.keys and self.autostart:
                    self.started.set()

    def subscribed_keys(self) -> set[str]:
        """The routing keys the open connections hold, together."""
        return set().union(*(conn.keys for conn in self.connections if not conn.closed))

    async def wait_keys(self, wanted: set[str]) -> None:
        """Return once the open connections together hold every key in ``wanted``."""
        while not wanted <= self.subscribed_keys():
            await self._keys_changed.wait()

    async def _write(self, conn: _Connection, receive: trio.MemoryReceiveChannel[str]) -> None:
        """Send what is queued for ``conn``: the frames queued meanwhile (at most
        ``WRITE_BATCH``) leave in one write, as an exchange's server streams them."""
        try:
            async for text in receive:
                frames = [text_frame(text.encode())]
                while len(frames) < WRITE_BATCH:
                    try:
                        frames.append(text_frame(receive.receive_nowait().encode()))
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await conn.ws.send_frames(b"".join(frames))
        except ConnectionClosed:
            pass

    async def _play(self) -> None:
        await self.started.wait()
        if not self.tape:
            self.finished.set()
            return
        first = self.tape[0].ts
        start = self.play_started = trio.current_time()
        passes = itertools.count() if self.passes is None else range(self.passes)
        for pass_number in passes:
            self.pass_number = pass_number
            faults = self.faults if pass_number == 0 else NO_FAULTS
            offset = pass_number * self.period
            for number, frame in enumerate(self.tape, 1):
                self.position = number
                if self.rate is not None:
                    await trio.sleep_until(start + self.played / self.rate)
                elif self.speed is not None:
                    await trio.sleep_until(start + (offset + frame.ts - first) / self.speed)
                self.played += 1
                if number in faults.stall:
                    await trio.sleep(faults.stall[number])
                    start += faults.stall[number]
                if pass_number == 0:
                    await self._play_frame(number, frame, faults)
                else:
                    shifted_ts = frame.ts + offset
                    for text in self.venue.shift(frame, pass_number):
                        await self._play_frame(number, Received(shifted_ts, text), NO_FAULTS)
                if self.speed is None and self.rate is None and not number % MAX_SPEED_BURST:
                    await trio.lowlevel.checkpoint()
            log.info(
                "emulator %s: pass %d finished, %d frames", self.exchange, pass_number + 1,
                len(self.tape),
            )
        self.finished.set()
        log.info("emulator %s: replay finished, %d frames", self.exchange, self.played)

    async def _play_frame(self, number: int, frame: Received, faults: Faults) -> None:
        """Advance the venue by one frame and send it to its connections."""
        key = self.venue.route(frame)
        if key is None:
            return
        targets = [
            c for c in self.connections
            if not c.closed and self._text_for(c, key, frame.text) is not None
        ]
        if number in faults.close:
            for conn in targets:
                conn.closed = True
                # the close frame; the tape waits for the client's answer, at most 2 s
                await conn.ws.close(1001, "emulator: fault injected")
                conn.scope.deadline = min(conn.scope.deadline, trio.current_time() + 2)
                await conn.ended.wait()
            return
        if number in faults.drop:
            return
        recorded = frame.text
        if number in faults.corrupt_checksum:
            recorded = self.venue.corrupt_checksum(recorded)
        plain = number not in faults.malformed and number not in faults.repeat
        for conn in targets:
            try:
                if plain and not conn.lock.locked():
                    # no reply is being queued: the frame goes in now, without a
                    # schedule point, so that at full speed frames leave in bursts
                    text = self._text_for(conn, key, recorded)
                    if text is None:
                        continue
                    try:
                        conn.send.send_nowait(text)
                    except trio.WouldBlock:
                        pass  # the connection's queue is full: wait below
                    else:
                        self.sent += 1
                        continue
                async with conn.lock:
                    text = self._text_for(conn, key, recorded)
                    if text is None:
                        continue  # unsubscribed while the tape waited
                    if number in faults.malformed:
                        text = text[: len(text) // 2]
                    await conn.send.send(text)
                    if number in faults.repeat:
                        await conn.send.send(text)
                self.sent += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                conn.closed = True

    def statistics(self) -> EmulatorStatistics:
        """Where the tape is and what was sent."""
        return EmulatorStatistics(
            exchange=self.exchange, position=self.position, frames=len(self.tape),
            pass_number=self.pass_number, played=self.played, sent=self.sent,
            connections=len(self.connections), finished=self.finished.is_set(),
        )
