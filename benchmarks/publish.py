"""Publish benchmark: the desk's own streams into tickwire, against a minimal
``websockets.broadcast`` peer with an HTTP publish endpoint (issue 15).

    python benchmarks/publish.py                          # the whole table (~80 s)
    python benchmarks/publish.py --transports http1 --loads max --seconds 3
    python benchmarks/publish.py --markdown results.md    # also write the tables

Needs the ``bench`` extra (``pip install -e '.[bench]'``: ``websockets``, for the
peer). No captures: nothing but the published messages flows.

What runs, for each N in ``--clients``, each transport, each load and each server:

- **tickwire**: ``tickwire run --config TMP/publish.toml``, a config with no
  exchange, the broadcast server on ``[server] listen`` and the HTTP publish
  listener on ``[publish] listen`` with ``allow_loopback_anonymous = true`` (no
  token on loopback; WebSocket clients on loopback may publish too).
- **peer**: this script's ``peer`` command, a minimal asyncio server: a
  ``websockets`` server that sends every message to every subscribed connection
  with ``websockets.broadcast``, and beside it an HTTP/1.1 keep-alive endpoint on
  asyncio streams (``POST /api/publish`` and ``/api/publish/batch``, the head read
  up to its blank line, the body by its ``Content-Length``). A publish, by HTTP or
  by a ``{"op":"publish"}`` WebSocket message, is parsed (orjson), checked a
  little (a known channel, ``source`` and ``key`` strings, ``data`` an object),
  numbered per stream (``channel:source:key``), encoded once as tickwire encodes
  it (``type``, ``channel``, ``source``, ``key``, ``data``, ``ts``, ``recv_ts``,
  ``seq``), broadcast, and answered with tickwire's answer (``{"ok":true,"seq":N,
  "epoch":...}``, a WebSocket ``ack``). It does less than tickwire: no retention,
  no idempotency window, no subscription matching, no authorization, no metrics.
  ``websockets.broadcast`` has no backpressure: the peer waits before it takes a
  publish while a subscriber has more than 1 MiB unsent (else its buffers grow
  without bound, as in ``fanout.py``). tickwire gets no such help: a lossless
  channel closes a client that falls ``client_queue`` messages behind with 4008
  (raised to 100,000 in max runs, as in ``fanout.py``).
- **subscribers**: ``--client-procs`` processes share the N WebSocket
  connections (``fanout.py``'s handshake), each subscribed to ``signals`` on
  ``*``; every message is parsed (orjson), its ``seq`` checked per stream (a hole
  or a repeat is a gap), and its latency recorded: ``time.time()`` at receipt
  minus the ``ts`` the publisher stamped just before it wrote the request (one
  machine, one clock), in 1 us buckets then an HdrHistogram. Pings are answered.
- **publisher**: one process, the transport's connections on one ``selectors``
  loop, each publish ``{"channel":"signals","source":"bench","key":"BTC-USD",
  "data":{"n":N,"side":"buy","confidence":0.8},"ts":...}``:
  ``http1`` one keep-alive HTTP connection (``POST /api/publish``, the next
  request when the answer came), ``http10`` ten of them, ``ws`` one WebSocket
  connection with up to ``--window`` publishes awaiting their ``ack``, ``batch``
  (not in the default list) one HTTP connection posting ``--batch`` messages at
  a time to ``/api/publish/batch``. Load
  ``max``: as fast as the answers come; ``rate``: ``--rate`` publishes per second
  in all (latency). The publisher counts the accepted answers and the round trip
  of each (send to answer: "ack p50/p99").

Sequence of a run: the server starts, the subscribers connect and subscribe (every
``ack`` in), the publisher starts, ``--warmup`` seconds, then the window of
``--seconds``. Then the publisher stops, waits for its answers, and says the last
``seq`` it was given; each subscriber reads until every connection has it (at most
20 s) and counts the messages a connection never got ("missing": the last seq
minus the messages received, over every connection). "drain s": from the end of
the window to the last message a subscriber read, the backlog at the end (it
includes the few tens of ms the subscribers spend summing their window).

CPU from ``/proc/<pid>/stat`` (100 % = one core) as in ``fanout.py``: the
server's, the publisher's, the subscribers' ("clients' CPU"), and "other CPU",
what the rest of the machine used meanwhile (anything above a few % means the
figures were disturbed); "wait %": the server's main thread ready to run but
waiting for a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import selectors
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from fanout import (
    REPO,
    _connect,
    cpu_seconds,
    free_port,
    machine,
    machine_busy_seconds,
    rss_bytes,
    runqueue_seconds,
    stop,
    wait_listening,
)
from hdrh.histogram import HdrHistogram
from wsconn import ServerStream, text_frame

CHANNEL, SOURCE, KEY = "signals", "bench", "BTC-USD"
SUBSCRIBE = orjson.dumps({"op": "subscribe", "id": 1, "channels": [CHANNEL], "symbols": ["*"]})
#: the peer's message ``type`` per channel (tickwire's defaults)
TYPES = {"signals": "signal", "executions": "execution", "portfolio": "portfolio",
         "trading_state": "trading_state"}
HDR_MAX_US = 3_600_000_000
PEER_HIGH_WATER = 1 << 20  # bytes unsent on one subscriber before the peer waits
DRAIN = 20.0  # seconds the subscribers wait for the last seq
#: ``--transports``: HTTP connections (``batch``: one, ``POST /api/publish/batch``),
#: or 0 for one WebSocket connection
TRANSPORTS = {"http1": 1, "http10": 10, "ws": 0, "batch": 1}
HTTP_HEAD = (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n")


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, HDR_MAX_US, 3)


def _publish_message(n: int) -> dict[str, Any]:
    """The ``n``-th publish (its ``ts`` is set when it is written)."""
    return {"channel": CHANNEL, "source": SOURCE, "key": KEY,
            "data": {"n": n, "side": "buy", "confidence": 0.8}}


# -- the subscribers (one process, many connections) ------------------------------------


class _Sub:
    __slots__ = ("sock", "stream", "rest", "seqs", "received", "last", "last_at", "acked",
                 "closed")

    def __init__(self, port: int) -> None:
        conn = _connect(port)
        self.sock: socket.socket = conn.sock
        self.stream = ServerStream(conn.sock)
        self.rest = conn.rest  # bytes that came with the handshake's answer
        self.seqs: dict[tuple[str, str, str], int] = {}
        self.received = 0  # messages with a seq since the subscription
        self.last = 0  # the last seq
        self.last_at = 0.0  # when a message with a seq last came (epoch s)
        self.acked = False  # the subscription was answered
        self.closed = False


class _Tally:
    """What the subscribers of one process saw in the window."""

    def __init__(self) -> None:
        self.deliveries = 0
        self.frames = 0
        self.gaps = 0
        self.latency: dict[int, int] = {}  # us -> messages (a dict: quick to read out)

    def histogram(self) -> HdrHistogram:
        hist = _histogram()
        for us, count in self.latency.items():
            hist.record_value(min(max(us, 1), HDR_MAX_US), count)
        return hist


def _receive(sub: _Sub, data: bytes, tally: _Tally, measuring: bool) -> None:
    now = time.time()
    latency = tally.latency
    if sub.rest:
        data, sub.rest = sub.rest + data, b""
    for payload in sub.stream.messages(data):
        if payload is None:
            sub.closed = True
            return
        parsed = orjson.loads(payload)
        sub.last_at = now
        if measuring:
            tally.frames += 1
        for m in parsed if type(parsed) is list else (parsed,):
            seq = m.get("seq")
            if seq is None:
                if m.get("type") == "ack" and m.get("op", "subscribe") == "subscribe":
                    sub.acked = True
                continue
            stream = (m["channel"], m["source"], m["key"])
            last = sub.seqs.get(stream)
            sub.seqs[stream] = sub.last = seq
            sub.received += 1
            if last is not None and seq != last + 1:
                tally.gaps += 1
            if measuring:
                tally.deliveries += 1
                us = int((now - m["ts"]) * 1e6)
                latency[us] = latency.get(us, 0) + 1


def subscriber_process(port: int, count: int, control: Any) -> None:
    """Hold ``count`` subscribed connections; obey ``subscribe``, ``start``,
    ``stop``, ``("final", seq)`` and ``quit`` on ``control``."""
    try:
        subs = [_Sub(port) for _ in range(count)]
        control.send(("connected", count))
        if control.recv() != "subscribe":
            return
        for sub in subs:
            sub.sock.sendall(text_frame(SUBSCRIBE))
            sub.sock.setblocking(False)
    except OSError as exc:
        control.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ, None)
    for sub in subs:
        selector.register(sub.sock, selectors.EVENT_READ, sub)
    tally = _Tally()
    measuring = ready = False
    final: int | None = None
    final_at = deadline = time.monotonic() + DRAIN
    stopped_at = 0.0
    receive_buffer = bytearray(1 << 18)
    receive_view = memoryview(receive_buffer)
    while True:
        if not ready and (all(s.acked or s.closed for s in subs) or time.monotonic() > deadline):
            ready = True
            control.send(("ready", sum(s.acked for s in subs)))
        if final is not None and (all(s.closed or s.last >= final for s in subs)
                                  or time.monotonic() > final_at + DRAIN):
            missing = sum(max(0, final - s.received) for s in subs)
            last = max((s.last_at for s in subs if s.received), default=stopped_at)
            control.send(("drained", missing, max(0.0, last - stopped_at),
                          sum(s.closed for s in subs)))
            final = None
        for key, _ in selector.select(timeout=0.05):
            sub = key.data
            if sub is None:
                command = control.recv()
                if command == "start":
                    tally, measuring = _Tally(), True
                elif command == "stop":
                    measuring, stopped_at = False, time.time()
                    control.send(("result", tally.deliveries, tally.frames, tally.gaps,
                                  tally.histogram().encode()))
                elif command == "quit":
                    for s in subs:
                        s.sock.close()
                    return
                elif command[0] == "final":
                    final, final_at = command[1], time.monotonic()
                continue
            try:
                n = sub.sock.recv_into(receive_buffer)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if n:
                _receive(sub, bytes(receive_view[:n]), tally, measuring)
            else:
                sub.closed = True
            if sub.closed:
                selector.unregister(sub.sock)


# -- the publisher ---------------------------------------------------------------------


class _Link:
    """One publishing connection: HTTP (one request at a time) or WebSocket (up to
    ``window`` publishes awaiting their ack)."""

    __slots__ = ("sock", "buf", "stream", "ws", "window", "batch", "sent", "closed")

    def __init__(self, ws_port: int, http_port: int, ws: bool, window: int, batch: int) -> None:
        self.ws, self.window, self.batch = ws, (window if ws else 1), batch
        self.sent: dict[int, float] = {}  # publish id (HTTP: 0) -> when it was written
        self.closed = False
        if ws:
            conn = _connect(ws_port)
            self.sock, self.buf = conn.sock, bytearray(conn.rest)
            self.stream = ServerStream(conn.sock)
        else:
            self.sock = socket.create_connection(("127.0.0.1", http_port), timeout=30)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = bytearray()

    def send(self, n: int) -> None:
        """Publish message ``n`` (a batch: ``n`` to ``n + batch - 1``)."""
        self.sent[n if self.ws else 0] = now = time.time()
        if self.batch:
            batch = [_publish_message(i) for i in range(n, n + self.batch)]
            for message in batch:
                message["ts"] = now
            body = orjson.dumps(batch)
            data = HTTP_HEAD % (b"/api/publish/batch", len(body)) + body
        else:
            message = _publish_message(n)
            if self.ws:
                message["op"], message["id"] = "publish", n
            message["ts"] = now
            body = orjson.dumps(message)
            data = (text_frame(body) if self.ws
                    else HTTP_HEAD % (b"/api/publish", len(body)) + body)
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)

    def answers(self) -> list[tuple[float | None, int | None, str]]:
        """Answers complete in ``buf``: (when their publish was written or None,
        seq or None, error text)."""
        if self.ws:
            out = []
            data, self.buf = bytes(self.buf), bytearray()
            for payload in self.stream.messages(data):
                if payload is None:
                    self.closed = True
                    break
                parsed = orjson.loads(payload)
                for m in parsed if type(parsed) is list else (parsed,):
                    kind = m.get("type")
                    if kind == "ack" and m.get("op") == "publish":
                        out.append((self.sent.pop(m["id"], None), m.get("seq"), ""))
                    elif kind == "error":
                        out.append((self.sent.pop(m.get("id"), None), None,
                                    f"{m.get('code')}: {m.get('message')}"))
            return out
        out = []
        buf = self.buf
        while (blank := buf.find(b"\r\n\r\n")) >= 0:
            head = bytes(buf[:blank]).lower()
            at = head.find(b"content-length:")
            if at < 0:
                raise RuntimeError(f"an HTTP answer without Content-Length: {head[:200]!r}")
            length = int(head[at + 15:].split(b"\r\n", 1)[0])
            if len(buf) < blank + 4 + length:
                break
            body = bytes(buf[blank + 4:blank + 4 + length])
            del buf[:blank + 4 + length]
            status = int(head[9:12])
            try:
                answer = orjson.loads(body)
            except orjson.JSONDecodeError:
                answer = {}
            sent = self.sent.pop(0, None)
            if status == 200 and isinstance(answer, list):  # a batch's
                out += [(sent, item.get("seq"), "") if item.get("ok") else
                        (sent, None, f"{item.get('code')}: {item.get('message')}")
                        for item in answer]
            elif status == 200 and isinstance(answer, dict) and answer.get("ok"):
                out.append((sent, answer.get("seq"), ""))
            else:
                out.append((sent, None, f"HTTP {status}: {body[:200].decode(errors='replace')}"))
        return out


def publisher_process(transport: str, ws_port: int, http_port: int, window: int,
                      batch: int, control: Any) -> None:
    """Publish on ``transport``'s connections; obey ``("go", rate)``, ``start``,
    ``stop`` (then answer with the figures) and ``quit`` on ``control``."""
    try:
        links = [_Link(ws_port, http_port, TRANSPORTS[transport] == 0, window,
                       batch if transport == "batch" else 0)
                 for _ in range(TRANSPORTS[transport] or 1)]
        step = batch if transport == "batch" else 1  # messages a send publishes
        for link in links:
            link.sock.setblocking(False)
    except OSError as exc:
        control.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    control.send(("connected", len(links)))
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ, None)
    for link in links:
        selector.register(link.sock, selectors.EVENT_READ, link)
    rate: float | None = None
    sending = measuring = False
    n = 0
    next_at = 0.0
    accepted = errors = 0
    first_error = ""
    last_seq = 0
    rtt = _histogram()
    window_start = 0.0
    stopping_since: float | None = None
    while True:
        # write what the load allows on the links with room
        if sending:
            now = time.monotonic()
            if rate is not None and next_at < now - 0.1:
                next_at = now  # behind by more than 0.1 s: the publisher cannot keep up
            for link in links:
                while not link.closed and len(link.sent) < link.window and (
                        rate is None or next_at <= now):
                    try:
                        link.send(n + 1)
                    except OSError as exc:
                        link.closed = True
                        first_error = first_error or f"{type(exc).__name__}: {exc}"
                    n += step
                    next_at += step / rate if rate else 0
        if stopping_since is not None and (
                not any(link.sent for link in links if not link.closed)
                or time.monotonic() > stopping_since + 10):
            control.send(("stopped", last_seq, errors, first_error))
            stopping_since = None
        timeout = 0.05
        if sending and rate is not None and any(
                len(link.sent) < link.window and not link.closed for link in links):
            timeout = min(timeout, max(0.0, next_at - time.monotonic()))
        for key, _ in selector.select(timeout):
            link = key.data
            if link is None:
                command = control.recv()
                if command == "start":
                    accepted, rtt = 0, _histogram()  # errors: over the whole run
                    measuring, window_start = True, time.monotonic()
                elif command == "stop":
                    window = time.monotonic() - window_start
                    measuring = sending = False
                    control.send(("result", accepted, window, errors, rtt.encode()))
                    stopping_since = time.monotonic()
                elif command == "quit":
                    for each in links:
                        each.sock.close()
                    return
                elif command[0] == "go":
                    rate, sending, next_at = command[1], True, time.monotonic()
                continue
            try:
                data = link.sock.recv(1 << 18)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                link.closed = True
                selector.unregister(link.sock)
                first_error = first_error or "the server closed a publishing connection"
                continue
            link.buf += data
            now_epoch = time.time()
            for sent, seq, error in link.answers():
                if seq is not None:
                    last_seq = max(last_seq, seq)
                    if measuring:
                        accepted += 1
                        if sent is not None:
                            rtt.record_value(max(1, min(int((now_epoch - sent) * 1e6),
                                                        HDR_MAX_US)))
                else:
                    errors += 1
                    first_error = first_error or error
            if link.closed:
                selector.unregister(link.sock)


# -- the peer: websockets.broadcast and an HTTP endpoint --------------------------------


async def _peer(port: int, http_port: int) -> None:
    import websockets
    from websockets.asyncio.server import broadcast, serve

    epoch = f"{int(time.time())}-{os.urandom(4).hex()}"
    seqs: dict[tuple[str, str, str], int] = {}
    subscribed: set[Any] = set()

    async def room() -> None:
        # websockets.broadcast has no backpressure; websockets no "drained" event
        while any(ws.transport.get_write_buffer_size() > PEER_HIGH_WATER  # noqa: ASYNC110
                  for ws in subscribed):
            await asyncio.sleep(0.0005)

    def publish(obj: Any, recv_ts: float) -> dict[str, Any]:
        if not (isinstance(obj, dict) and obj.get("channel") in TYPES
                and isinstance(obj.get("source"), str) and isinstance(obj.get("key"), str)
                and isinstance(obj.get("data"), dict)):
            return {"ok": False, "code": "invalid_field", "message": "not a publish message"}
        channel, source, key = obj["channel"], obj["source"], obj["key"]
        stream = (channel, source, key)
        seq = seqs[stream] = seqs.get(stream, 0) + 1
        broadcast(subscribed, orjson.dumps({
            "type": TYPES[channel], "channel": channel, "source": source, "key": key,
            "data": obj["data"], "ts": obj.get("ts"), "recv_ts": recv_ts, "seq": seq,
        }), text=True)
        return {"ok": True, "seq": seq, "epoch": epoch}

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                recv_ts = time.time()
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                path = head.split(b" ", 2)[1]
                await room()
                try:
                    obj = orjson.loads(body)
                except orjson.JSONDecodeError:
                    status, answer = b"400 Bad Request", {"ok": False, "code": "invalid_json"}
                else:
                    status = b"200 OK"
                    if path == b"/api/publish":
                        answer = publish(obj, recv_ts)
                    elif path == b"/api/publish/batch" and isinstance(obj, list):
                        answer = [publish(item, recv_ts) for item in obj]
                    else:
                        status, answer = b"404 Not Found", {"ok": False, "code": "not_found"}
                payload = orjson.dumps(answer)
                writer.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (status, len(payload), payload))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def handler(ws: Any) -> None:
        try:
            async for text in ws:
                recv_ts = time.time()
                request = orjson.loads(text)
                op, rid = request.pop("op", None), request.pop("id", None)
                if op == "subscribe":
                    subscribed.add(ws)
                    await ws.send(orjson.dumps({"type": "ack", "id": rid, "op": "subscribe"}),
                                  text=True)
                elif op == "publish":
                    await room()
                    answer = publish(request, recv_ts)
                    if answer["ok"]:
                        reply = {"type": "ack", "id": rid, "op": "publish", "seq": answer["seq"],
                                 "epoch": epoch}
                    else:
                        reply = {"type": "error", "id": rid, "code": answer["code"],
                                 "message": answer["message"]}
                    await ws.send(orjson.dumps(reply), text=True)
        finally:
            subscribed.discard(ws)

    http_server = await asyncio.start_server(http, "127.0.0.1", http_port)
    async with http_server, serve(handler, "127.0.0.1", port, compression=None, max_queue=16,
                                  ping_interval=20, ping_timeout=20) as server:
        print(f"peer listening on {port} and {http_port} (websockets {websockets.__version__})",
              flush=True)
        await server.serve_forever()


# -- one run ----------------------------------------------------------------------------


def tickwire_config(directory: Path, ws_port: int, http_port: int, max_mode: bool) -> Path:
    """No exchange; publishing over HTTP on loopback without a token; limits above
    the bench's load."""
    lines = ['log_level = "warning"', "", "[server]", f'listen = "127.0.0.1:{ws_port}"',
             f"client_queue = {100_000 if max_mode else 4096}",
             "max_messages_per_second = 1000000.0",  # the WebSocket publisher's requests
             "", "[admin]", f'socket = "{directory / "admin.sock"}"',
             "", "[publish]", f'listen = "127.0.0.1:{http_port}"',
             "allow_loopback_anonymous = true"]
    path = directory / "publish.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_server(kind: str, ws_port: int, http_port: int, max_mode: bool,
                 workdir: Path) -> tuple[subprocess.Popen, list[str]]:
    if kind == "tickwire":
        config = tickwire_config(workdir, ws_port, http_port, max_mode)
        command = [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "peer", "--port", str(ws_port),
                   "--http-port", str(http_port)]
    with open(workdir / "server.log", "wb") as log:  # a file: a pipe could fill up
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    return proc, command


def wait_tcp(port: int, proc: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on {port} in time")


def _expect(pipe: Any, word: str, seconds: float) -> tuple[Any, ...]:
    if not pipe.poll(seconds):
        raise RuntimeError(f"a helper process was not {word} in time")
    answer = pipe.recv()
    if answer[0] != word:
        raise RuntimeError(f"expected {word}, got {answer!r}")
    return answer


def run(kind: str, n: int, transport: str, rate: float | None, args: argparse.Namespace,
        workdir: Path) -> dict[str, Any]:
    """One server, N subscribers, one publisher, one window; the figures."""
    ws_port, http_port = free_port(), free_port()
    proc, command = start_server(kind, ws_port, http_port, rate is None, workdir)
    context = mp.get_context("fork")
    helpers: list[tuple[Any, Any]] = []  # (process, pipe)
    try:
        wait_listening(ws_port, proc)
        wait_tcp(http_port, proc)
        rss_before = rss_bytes(proc.pid)
        procs = max(1, min(args.client_procs, n))
        for i in range(procs):
            parent, child = context.Pipe()
            share = n // procs + (1 if i < n % procs else 0)
            worker = context.Process(target=subscriber_process, args=(ws_port, share, child),
                                     daemon=True)
            worker.start()
            helpers.append((worker, parent))
        subscribers = list(helpers)
        for _, pipe in subscribers:
            _expect(pipe, "connected", 60)
        for _, pipe in subscribers:
            pipe.send("subscribe")
        subscribed = sum(_expect(pipe, "ready", 60)[1] for _, pipe in subscribers)
        parent, child = context.Pipe()
        publisher = context.Process(target=publisher_process,
                                    args=(transport, ws_port, http_port, args.window,
                                          args.batch, child),
                                    daemon=True)
        publisher.start()
        helpers.append((publisher, parent))
        pub = parent
        _expect(pub, "connected", 30)
        pub.send(("go", rate))
        time.sleep(args.warmup)
        clients = [worker.pid for worker, _ in subscribers]
        client0, pub0 = sum(map(cpu_seconds, clients)), cpu_seconds(publisher.pid)
        busy0, wait0 = machine_busy_seconds(), runqueue_seconds(proc.pid)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        pub.send("start")
        for _, pipe in subscribers:
            pipe.send("start")
        time.sleep(args.seconds)
        pub.send("stop")
        for _, pipe in subscribers:
            pipe.send("stop")
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        client1, pub1 = sum(map(cpu_seconds, clients)), cpu_seconds(publisher.pid)
        busy1, wait1 = machine_busy_seconds(), runqueue_seconds(proc.pid)
        rss_after = rss_bytes(proc.pid)
        _, accepted, pub_window, _, rtt_encoded = _expect(pub, "result", 30)
        deliveries = frames = gaps = 0
        latency = _histogram()
        for _, pipe in subscribers:
            _, d, f, g, encoded = _expect(pipe, "result", 60)
            deliveries, frames, gaps = deliveries + d, frames + f, gaps + g
            latency.add(HdrHistogram.decode(encoded))
        _, last_seq, errors_total, first_error = _expect(pub, "stopped", 30)
        for _, pipe in subscribers:
            pipe.send(("final", last_seq))
        missing = closed = 0
        drain = 0.0
        for _, pipe in subscribers:
            _, m, seconds, c = _expect(pipe, "drained", DRAIN + 30)
            missing, closed, drain = missing + m, closed + c, max(drain, seconds)
        window = t1 - t0
        rtt = HdrHistogram.decode(rtt_encoded)
        if proc.poll() is not None:
            first_error = first_error or f"the server exited with {proc.returncode}"
        own = (cpu1 - cpu0) + (client1 - client0) + (pub1 - pub0)
        return {
            "server": kind, "clients": n, "subscribed": subscribed, "transport": transport,
            "load": f"{rate:g}/s" if rate else "max",
            "publishes": accepted / pub_window if pub_window else 0.0,
            "deliveries": deliveries / window, "frames": frames / window, "gaps": gaps,
            "missing": missing, "closed": closed, "drain": drain, "errors": errors_total,
            "first_error": first_error,
            "ack_p50": _pct(rtt, 50), "ack_p99": _pct(rtt, 99),
            "p50": _pct(latency, 50), "p99": _pct(latency, 99), "p999": _pct(latency, 99.9),
            "max": latency.get_max_value() / 1000 if latency.get_total_count() else None,
            "cpu": (cpu1 - cpu0) / window * 100, "wait": (wait1 - wait0) / window * 100,
            "rss": rss_after, "rss_before": rss_before,
            "publisher_cpu": (pub1 - pub0) / window * 100,
            "client_cpu": (client1 - client0) / window * 100,
            "other_cpu": max(0.0, ((busy1 - busy0) - own) / window * 100),
            "command": shlex.join(["python", *command[1:]]).replace(
                str(Path(__file__).resolve()), "benchmarks/publish.py").replace(
                str(ws_port), "PORT").replace(str(http_port), "HTTP_PORT").replace(
                str(workdir), "TMP"),
        }
    finally:
        for _, pipe in helpers:
            with contextlib.suppress(OSError):
                pipe.send("quit")
        for worker, _ in helpers:
            worker.join(5)
            if worker.is_alive():
                worker.kill()
        stop(proc)
        log = (workdir / "server.log").read_text(errors="replace").strip()
        if kind == "tickwire" and log:
            print(f"tickwire's stderr: {log[-2000:]}", file=sys.stderr, flush=True)


def _pct(hist: HdrHistogram, q: float) -> float | None:
    """Percentile ``q`` of a histogram of microseconds, in ms."""
    return hist.get_value_at_percentile(q) / 1000 if hist.get_total_count() else None


# -- reporting ---------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


COLUMNS = ("server", "N", "transport", "load", "publishes/s", "deliveries/s",
           "deliveries per frame", "gaps", "missing", "closed", "drain s", "errors",
           "ack p50 ms", "ack p99 ms", "p50 ms", "p99 ms", "p999 ms", "max ms", "CPU %",
           "CPU us/publish", "wait %", "RSS MiB", "publisher CPU %", "clients' CPU %", "other CPU %")


def _per_publish(row: dict[str, Any]) -> str:
    """The server's CPU time per accepted publish, us (its fan-out included)."""
    if not row["publishes"]:
        return "-"
    return f"{row['cpu'] / 100 / row['publishes'] * 1e6:,.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        per_frame = f"{r['deliveries'] / r['frames']:.1f}" if r["frames"] else "-"
        cells = [
            r["server"], str(r["clients"]) + ("" if r["subscribed"] == r["clients"]
                                              else f" ({r['subscribed']} subscribed)"),
            r["transport"], r["load"], f"{r['publishes']:,.0f}", f"{r['deliveries']:,.0f}",
            per_frame, str(r["gaps"]), str(r["missing"]), str(r["closed"]),
            f"{r['drain']:.2f}", str(r["errors"]), _ms(r["ack_p50"]), _ms(r["ack_p99"]),
            _ms(r["p50"]), _ms(r["p99"]), _ms(r["p999"]), _ms(r["max"]), f"{r['cpu']:.0f}",
            _per_publish(r), f"{r['wait']:.1f}", f"{r['rss'] / 2**20:.1f}", f"{r['publisher_cpu']:.0f}",
            f"{r['client_cpu']:.0f}", f"{r['other_cpu']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> str:
    by = {(r["server"], r["clients"], r["transport"], r["load"]): r for r in rows}
    lines = ["| N | transport | load | publishes/s tickwire / peer | CPU per publish tickwire "
             "/ peer | p50 tickwire / peer | p99 tickwire / peer |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (server, n, transport, load), r in by.items():
        peer = by.get(("peer", n, transport, load))
        if server != "tickwire" or peer is None:
            continue
        speed = f"{r['publishes'] / peer['publishes']:.2f}x" if peer["publishes"] else "-"
        cost = "-"
        if r["publishes"] and peer["publishes"] and peer["cpu"]:
            cost = f"{(r['cpu'] / r['publishes']) / (peer['cpu'] / peer['publishes']):.2f}"
        p50 = f"{r['p50'] / peer['p50']:.2f}" if r["p50"] and peer["p50"] else "-"
        p99 = f"{r['p99'] / peer['p99']:.2f}" if r["p99"] and peer["p99"] else "-"
        lines.append(f"| {n} | {transport} | {load} | {speed} | {cost} | {p50} | {p99} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    peer = sub.add_parser("peer", help="run the websockets.broadcast peer server")
    peer.add_argument("--port", type=int, required=True, help="its WebSocket port")
    peer.add_argument("--http-port", type=int, required=True, help="its HTTP publish port")
    parser.add_argument("--clients", default="100",
                        help="numbers of subscribed WebSocket connections, comma separated")
    parser.add_argument("--transports", default="http1,http10,ws",
                        help="http1 (one keep-alive connection), http10 (ten), ws (one "
                             "WebSocket connection, --window publishes in flight), batch "
                             "(one connection, --batch messages a request)")
    parser.add_argument("--loads", default="max,rate",
                        help="max (as fast as the answers come), rate (--rate publishes/s)")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="publishes per second in all, in the rate runs (latency)")
    parser.add_argument("--batch", type=int, default=10,
                        help="messages per request of the batch transport")
    parser.add_argument("--window", type=int, default=16,
                        help="publishes awaiting their ack on the WebSocket publisher")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring window")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of publishing before the window")
    parser.add_argument("--client-procs", type=int, default=2,
                        help="subscriber processes sharing the connections")
    parser.add_argument("--servers", default="tickwire,peer", help="tickwire, peer or both")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write the result tables to this file")
    args = parser.parse_args(argv)
    if args.command == "peer":
        asyncio.run(_peer(args.port, args.http_port))
        return
    for transport in args.transports.split(","):
        if transport not in TRANSPORTS:
            parser.error(f"unknown transport {transport!r} (http1, http10, ws, batch)")
    rows: list[dict[str, Any]] = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.clients.split(",")]:
            for transport in args.transports.split(","):
                for load in args.loads.split(","):
                    rate = args.rate if load == "rate" else None
                    for kind in args.servers.split(","):
                        row = run(kind, n, transport, rate, args, Path(tmp))
                        rows.append(row)
                        print(table([row]).splitlines()[-1], flush=True)
                        if row["first_error"]:
                            print(f"  first error: {row['first_error']}", flush=True)
    command = shlex.join([Path(sys.executable).name, "benchmarks/publish.py",
                          *(argv if argv is not None else sys.argv[1:])])
    errors = [f"- {r['server']} {r['transport']} {r['load']}: {r['first_error']}"
              for r in rows if r["first_error"]]
    report = "\n\n".join([
        f"Command: `{command}` ({time.time() - started:.0f} s)",
        f"Machine: {machine()}",
        table(rows),
        "Ratios (tickwire / peer, same run):\n\n" + ratios(rows),
        *(["First errors:\n\n" + "\n".join(errors)] if errors else []),
        "Commands:\n\n" + "\n".join(f"- `{c}`" for c in dict.fromkeys(r["command"]
                                                                       for r in rows)),
    ])
    print()
    print(report)
    if args.markdown:
        args.markdown.write_text(report + "\n")


if __name__ == "__main__":
    main()
