"""Fan-out benchmark: tickwire against a minimal ``websockets.broadcast`` server.

    python benchmarks/fanout.py                          # the whole table (~5 min)
    python benchmarks/fanout.py --clients 1,10,100 --seconds 5
    python benchmarks/fanout.py --markdown results.md    # also write the tables

Needs the ``bench`` extra (``pip install -e '.[bench]'``: the ``websockets``
library, for the peer) and the recorded traffic (``--captures``, default
``$TICKWIRE_CAPTURES`` or ``../shared/captures`` beside the repository).

What runs, for each N in ``--clients`` and each server:

- **tickwire**: ``tickwire replay COINBASE.0 COINBASE.ws.28.0 --loop
  --emulators process`` as a subprocess, at ``--rate`` exchange frames per second
  (latency run) or ``--speed max`` (throughput run). The exchange emulator runs in
  a child process of the daemon's, as the exchange runs elsewhere: the daemon's
  process does what it does live (collector, dispatcher, broadcast server); the
  emulator's CPU is shown apart. ``--emulator inside`` keeps the emulator in the
  daemon's process (``tickwire replay``'s default), sharing its one core.
- **peer**: this script's ``peer`` command, a minimal asyncio server written with
  ``websockets`` that sends every event to every connection with
  ``websockets.broadcast``. It is fed the same events: it loops the same capture
  through the same venue code (``CoinbaseVenue.shift``/``route``) and the same
  protocol parser (``CoinbaseFeed.on_message``, stamping ``recv_ts`` when it takes
  the frame), numbers each stream and encodes each event once exactly as the
  dispatcher does, at the same frame rate. It does less than tickwire: no
  WebSocket hop between an emulator and a collector, no retention, no
  subscriptions. Throughput run: it broadcasts as fast as it can but waits while
  any connection has more than 1 MiB unsent (``websockets.broadcast`` has no
  backpressure; without this its buffers grow without bound). tickwire gets no
  such help: its clients' queues are raised (``client_queue``) so that the
  throughput run measures the write path rather than the slow-consumer policy.
- **load clients**: ``--client-procs`` processes sharing the N connections, each
  a raw non-blocking WebSocket client that subscribes to everything, checks
  ``seq`` per stream (a hole is a gap), answers pings, and records, for every
  message carrying ``recv_ts``, the latency ``time.time()`` at receipt minus
  ``recv_ts`` (same machine, same clock), in 10 us buckets. ``--client c`` (the
  default when a C compiler ``cc`` is found) runs ``benchmarks/loadclient.c``,
  compiled once per run into the temporary directory: one epoll loop per process
  doing exactly what the Python client does (same handshake and subscription,
  frames of any length, fragments, pongs, the same seq and latency rules; the
  JSON is walked for ``type``, ``exchange``, ``symbol``, ``seq`` and ``recv_ts``,
  not parsed), at a fraction of its CPU, so that the clients take less of the
  machine from the servers. ``--client python`` runs ``client_process`` (on
  ``selectors``, about 12 us of CPU per delivery), the fallback without ``cc``.
  Counting starts once every client has caught up (has had an
  event less than 0.5 s old: after its initial books, which tickwire sends and
  the peer does not; at most 20 s, "caught up" tells how many did), then
  ``--warmup`` seconds, and lasts ``--seconds``.

- **floors** (``--servers ...,floor,floor-work,floor-sender``, latency run only):
  ``benchmarks/floor.py``, stand-ins that make small events themselves and do
  nothing else: what this machine allows a sender at all (see that file).

Server CPU comes from ``/proc/<pid>/stat`` (user + system over the window, 100 %
= one core; a floor's sender process counts as the floor's; "clients' CPU" is the
load clients' total; "other CPU" is what the rest of the machine used meanwhile,
from ``/proc/stat``, steal time included: anything above a few % means the
figures were disturbed) and RSS from ``/proc/<pid>/status``. "wait %" is the time
the server's main thread was ready to run but waited for a CPU
(``/proc/<pid>/schedstat``): what the other processes on the two cores cost it.
``--pin`` binds the server to CPU 0 and the load clients and tickwire's emulator
to the other CPUs (for every server alike). "RSS/conn" is (RSS with the N
clients - RSS before they connected) / N. The idle run connects ``--idle``
connections that never subscribe.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import multiprocessing as mp
import os
import platform
import select
import selectors
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wsconn import ServerStream, text_frame  # noqa: E402  (needs REPO on the path)

CAPTURE_FILES = ("COINBASE.0", "COINBASE.ws.28.0")
BUCKET_US = 10  # latency histogram resolution
BUCKETS = 200_000  # 0 .. 2 s; later ones go to the last bucket
#: ``--servers`` names of ``benchmarks/floor.py``'s modes (latency run only)
FLOORS = {"floor": "send", "floor-work": "work", "floor-sender": "sender"}
PEER_HIGH_WATER = 1 << 20  # bytes unsent on one connection before the peer waits
#: ``--pin``: the CPUs of the load clients and of tickwire's emulator (the server has 0)
OTHER_CPUS = set(range(1, os.cpu_count() or 2))
IDLE_RATE = 10.0  # exchange frames per second during the idle run
LIVE = 0.5  # seconds: a client whose events are this fresh has caught up
CATCH_UP = 20.0  # seconds a client waits for that before the window anyway
CHANNEL = {"trade": "trades", "book_snapshot": "book", "book_update": "book",
           "ticker": "ticker", "feed_state": "system", "gap": "system"}
SUBSCRIBE = orjson.dumps({"op": "subscribe", "id": 1, "channels": ["trades", "book", "ticker",
                                                                  "system"], "symbols": ["*"]})


# -- the load client (one process, many connections) ----------------------------------


class _Conn:
    __slots__ = ("sock", "stream", "rest", "seqs", "closed", "live")

    def __init__(self, sock: socket.socket, rest: bytes) -> None:
        self.sock = sock
        self.stream = ServerStream(sock)
        self.rest = rest  # bytes that came with the handshake's answer
        self.seqs: dict[tuple[str, str, str], int] = {}
        self.closed = False
        self.live = False  # has had an event less than LIVE seconds old


def _connect(port: int) -> _Conn:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    status, _, rest = head.partition(b"\r\n\r\n")
    if b" 101 " not in status.split(b"\r\n")[0] + b" ":
        raise ConnectionError(f"handshake refused: {status[:80]!r}")
    return _Conn(sock, rest)


class _Counts:
    def __init__(self) -> None:
        self.deliveries = 0
        self.gaps = 0
        self.frames = 0
        self.closed = 0
        self.hist = array("q", bytes(8 * BUCKETS))


def _consume(conn: _Conn, data: bytes, now: float, counts: _Counts, measuring: bool) -> None:
    """Handle every message that ``data`` (one read) completes."""
    for message in conn.stream.messages(data):
        if message is None:
            conn.closed = True
            counts.closed += 1
            break
        _message(conn, message, now, counts, measuring)


def _message(conn: _Conn, text: str | bytes, now: float, counts: _Counts, measuring: bool) -> None:
    parsed = orjson.loads(text)
    seqs = conn.seqs
    hist = counts.hist
    if measuring:
        counts.frames += 1
    for m in parsed if isinstance(parsed, list) else (parsed,):
        seq = m.get("seq")
        if seq is None:
            continue
        key = (CHANNEL.get(m["type"], m["type"]), m["exchange"], m["symbol"])
        last = seqs.get(key)
        seqs[key] = seq
        if last is not None and seq != last + 1 and not (
            m["type"] == "book_snapshot" and seq == last
        ):
            counts.gaps += 1
        if measuring:
            counts.deliveries += 1
            bucket = int((now - m["recv_ts"]) * (1_000_000 / BUCKET_US))
            hist[min(max(bucket, 0), BUCKETS - 1)] += 1
        elif not conn.live and now - m["recv_ts"] < LIVE:
            conn.live = True


def client_process(port: int, count: int, subscribe: bool, control: Any) -> None:
    """Hold ``count`` connections; obey ``start``/``stop``/``quit`` on ``control``."""
    # every connection of every process first, then the subscriptions (on the
    # parent's word): a server streaming to some clients may starve the handshakes
    # of the others
    try:
        conns = [_connect(port) for _ in range(count)]
        control.send(("connected", count))
        if control.recv() != "subscribe":
            return
        for conn in conns:
            if subscribe:
                conn.sock.sendall(text_frame(SUBSCRIBE))
            conn.sock.setblocking(False)
    except OSError as exc:
        control.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    selector = selectors.DefaultSelector()
    for conn in conns:
        selector.register(conn.sock, selectors.EVENT_READ, conn)
    counts = _Counts()
    measuring = False
    receive_buffer = bytearray(1 << 18)
    receive_view = memoryview(receive_buffer)
    # ready once every connection has caught up with the stream (its initial
    # books and history read), or after CATCH_UP seconds
    deadline = time.monotonic() + CATCH_UP
    ready = not subscribe
    if ready:
        control.send(("ready", count))
    while True:
        if not ready and (time.monotonic() > deadline or all(c.live for c in conns)):
            ready = True
            control.send(("ready", sum(c.live for c in conns)))
        if control.poll():
            command = control.recv()
            if command == "start":
                counts = _Counts()
                for conn in conns:  # gaps are counted from here on
                    conn.seqs.clear()
                measuring = True
            elif command == "stop":
                measuring = False
                hist = {i: n for i, n in enumerate(counts.hist) if n}
                control.send(("result", counts.deliveries, counts.gaps, counts.frames,
                              counts.closed, hist))
            elif command == "quit":
                break
        for key, _ in selector.select(timeout=0.02):
            conn = key.data
            try:
                # into one reused buffer: recv(256 KiB) would allocate (mmap) and
                # free 256 KiB per call, which costs more than the read itself
                n = conn.sock.recv_into(receive_buffer)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if not n:
                if not conn.closed:
                    conn.closed = True
                    counts.closed += 1
                selector.unregister(conn.sock)
                continue
            data = bytes(receive_view[:n])
            if conn.rest:
                data, conn.rest = conn.rest + data, b""
            _consume(conn, data, time.time(), counts, measuring)
    for conn in conns:
        conn.sock.close()


class CClient:
    """The load client in C (``benchmarks/loadclient.c``) as a subprocess, behind the
    interface ``run()`` uses for a Python client's Pipe: ``poll``/``recv``/``send``,
    and ``pid``/``join``/``is_alive``/``kill`` for the process."""

    def __init__(self, binary: Path, port: int, count: int, subscribe: bool) -> None:
        self.proc = subprocess.Popen([str(binary), str(port), str(count), str(int(subscribe))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buffer = b""
        self._eof = False

    def _read(self, timeout: float | None) -> bool:
        """Read what is there (waiting up to ``timeout``); False if nothing came."""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return False
        chunk = os.read(self._fd, 1 << 20)
        self._eof = not chunk
        self._buffer += chunk
        return True

    def _line(self) -> bytes:
        while b"\n" not in self._buffer:
            if self._eof:
                raise EOFError(f"the C load client exited ({self.proc.poll()})")
            self._read(None)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def poll(self, timeout: float = 0.0) -> bool:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer and not self._eof:
            if not self._read(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def recv(self) -> tuple[Any, ...]:
        word, _, rest = self._line().decode().partition(" ")
        if word in ("connected", "ready"):
            return (word, int(rest))
        if word == "result":
            d, g, f, c = (int(x) for x in rest.split())
            hist = dict(tuple(int(x) for x in item.split(":"))  # type: ignore[misc]
                        for item in self._line().decode().split()[1:])
            return ("result", d, g, f, c, hist)
        return ("error", rest if word == "error" else f"unexpected: {word} {rest}")

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]


def c_client_binary(workdir: Path) -> Path:
    """``benchmarks/loadclient.c`` compiled into ``workdir`` (once per run of the
    script: the temporary directory is the script's)."""
    binary = workdir / "loadclient"
    if not binary.exists():
        source = Path(__file__).resolve().parent / "loadclient.c"
        subprocess.run(["cc", "-O2", "-o", str(binary), str(source)], check=True)
    return binary


# -- the peer: websockets.broadcast -----------------------------------------------------


async def _peer(port: int, captures: Path, rate: float | None) -> None:
    import websockets
    from websockets.asyncio.server import broadcast, serve

    from daemon.events import Event
    from daemon.exchanges.base import Send
    from daemon.exchanges.coinbase import CoinbaseFeed, parse_markets
    from daemon.replay.capture import Received, read_capture
    from daemon.replay.tape import merge_frames
    from daemon.replay.venues.coinbase import CoinbaseVenue
    from daemon.wire import event_dict

    files = [read_capture(captures / name) for name in CAPTURE_FILES]
    tape = merge_frames(files)
    venue = CoinbaseVenue(files)
    period = venue.prepare_loop(tape)
    symbols, channels = venue.subscriptions(files)
    feed = CoinbaseFeed(symbols, channels, parse_markets(venue.products_body))
    keys = venue.open("/")
    for output in feed.on_open(time.time()):
        if isinstance(output, Send):
            for reply in venue.on_client_message(keys, output.text):
                feed.on_message(reply, time.time())
    seqs: dict[tuple[str, str, str], int] = {}

    subscribed: set[Any] = set()

    async def handler(ws: Any) -> None:
        try:
            async for _ in ws:  # any request subscribes the connection to everything
                subscribed.add(ws)
        finally:
            subscribed.discard(ws)

    async with serve(handler, "127.0.0.1", port, compression=None, max_queue=16,
                     ping_interval=20, ping_timeout=20):
        print(f"peer listening on {port} (websockets {websockets.__version__})", flush=True)
        loop = asyncio.get_running_loop()
        start = loop.time()
        played = 0
        for k in itertools.count():
            for frame in tape:
                if rate is not None:
                    delay = start + played / rate - loop.time()
                    if delay > 0 or played % 8 == 0:  # behind time, still serve the loop
                        await asyncio.sleep(max(delay, 0))
                elif played % 8 == 0:
                    await asyncio.sleep(0)
                    # polls the buffers: websockets has no event for "drained below"
                    while any(c.transport.get_write_buffer_size() > PEER_HIGH_WATER  # noqa: ASYNC110
                              for c in subscribed):
                        await asyncio.sleep(0.0005)
                played += 1
                for text in [frame.text] if k == 0 else venue.shift(frame, k):
                    if venue.route(Received(frame.ts + k * period, text)) not in keys:
                        continue
                    for output in feed.on_message(text, time.time()):
                        if not isinstance(output, Event):
                            continue
                        stream = (output.CHANNEL, output.exchange, output.symbol)
                        seq = seqs[stream] = seqs.get(stream, 0) + 1
                        broadcast(subscribed, orjson.dumps(event_dict(output, seq)), text=True)


# -- measuring a server process -----------------------------------------------------------


def pin(pid: int, cpus: set[int]) -> None:
    """Bind every thread of ``pid`` to ``cpus`` (``--pin``)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cpus)


def runqueue_seconds(pid: int) -> float:
    """Seconds ``pid``'s main thread has spent runnable but waiting for a CPU
    (``/proc/<pid>/schedstat``, second field, in ns)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            _connect(port).sock.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not listen in time")


def tickwire_config(directory: Path, max_mode: bool, write_delay_ms: float | None = None) -> Path:
    """A config for the bench: quiet logs, limits above the bench's load."""
    import attrs

    from daemon.config import Config, ServerConfig

    fields = attrs.fields_dict(ServerConfig)
    server: dict[str, Any] = {"client_queue": 100_000 if max_mode else 4096}
    if write_delay_ms is not None:  # else the daemon's default
        server["max_write_delay_ms"] = write_delay_ms
    for name, value in (("max_connections", 20_000), ("max_connections_per_ip", 20_000)):
        if name in fields:
            server[name] = value
    lines = ['log_level = "warning"', "", "[server]"]
    lines += [f"{name} = {value}" for name, value in server.items()]
    if "admin" in attrs.fields_dict(Config):  # a socket of its own, whatever else runs
        lines += ["", "[admin]", f'socket = "{directory / "admin.sock"}"']
    path = directory / ("max.toml" if max_mode else "rate.toml")
    path.write_text("\n".join(lines) + "\n")
    return path


def start_server(kind: str, port: int, rate: float | None, args: argparse.Namespace,
                 workdir: Path) -> tuple[subprocess.Popen, list[str]]:
    files = [str(args.captures / name) for name in CAPTURE_FILES]
    timing = ["--rate", f"{rate:g}"] if rate else ["--speed", "max"]
    if kind == "tickwire":
        config = tickwire_config(workdir, rate is None, args.max_write_delay_ms)
        command = [sys.executable, "-m", "daemon.cli", "replay", *files, "--loop",
                   *timing, "--listen", f"127.0.0.1:{port}", "--config", str(config),
                   "--emulators", args.emulator]
    elif kind in FLOORS:
        command = [sys.executable, str(Path(__file__).resolve().parent / "floor.py"),
                   "--port", str(port), "--rate", f"{rate:g}", "--mode", FLOORS[kind]]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "peer", "--port", str(port),
                   "--captures", str(args.captures)] + (["--rate", f"{rate:g}"] if rate else [])
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE if kind == "tickwire" else subprocess.DEVNULL)
    return proc, command


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the daemon's emulator children)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    children.append(int(entry.name))
    return children


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentile(hist: dict[int, int], q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank, seen = q * total, 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return (bucket + 0.5) * BUCKET_US / 1000  # ms
    return None


def run(kind: str, n: int, rate: float | None, args: argparse.Namespace, workdir: Path,
        subscribe: bool = True) -> dict[str, Any]:
    """One server, N clients, one window; the figures."""
    port = free_port()
    proc, command = start_server(kind, port, rate, args, workdir)
    clients: list[tuple[Any, Any]] = []
    try:
        wait_listening(port, proc)
        # tickwire's children are its emulators, shown apart; a floor's sender is its own
        children = child_pids(proc.pid)
        emulators = children if kind == "tickwire" else []
        own = [proc.pid] + ([] if kind == "tickwire" else children)
        if args.pin:
            pin(proc.pid, {0})
            for pid in emulators:
                pin(pid, OTHER_CPUS)
        time.sleep(args.warmup)
        rss_before = rss_bytes(proc.pid)
        procs = max(1, min(args.client_procs or (1 if args.client == "c" else 2), n))
        shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        context = mp.get_context("fork")
        for share in shares:
            if args.client == "c":  # one object: the process and its control pipe
                worker = CClient(c_client_binary(workdir), port, share, subscribe)
                clients.append((worker, worker))
                if args.pin:
                    pin(worker.pid, OTHER_CPUS)
                continue
            parent, child = context.Pipe()
            worker = context.Process(target=client_process, args=(port, share, subscribe, child),
                                     daemon=True)
            worker.start()
            if args.pin:
                pin(worker.pid, OTHER_CPUS)
            clients.append((worker, parent))
        caught_up = 0
        for expected in ("connected", "ready"):
            for _, pipe in clients:
                if not pipe.poll(120):
                    raise RuntimeError(f"a load client was not {expected} in time")
                status = pipe.recv()
                if status[0] != expected:
                    raise RuntimeError(f"load client: {status[1]}")
                caught_up += status[1] if expected == "ready" else 0
            if expected == "connected":
                for _, pipe in clients:
                    pipe.send("subscribe")
        time.sleep(args.warmup)
        client_cpu0 = sum(cpu_seconds(worker.pid) for worker, _ in clients)
        emu0 = sum(map(cpu_seconds, emulators))
        busy0 = machine_busy_seconds()
        cpu0, t0 = sum(map(cpu_seconds, own)), time.monotonic()
        wait0 = runqueue_seconds(proc.pid)
        for _, pipe in clients:
            pipe.send("start")
        time.sleep(args.seconds)
        for _, pipe in clients:
            pipe.send("stop")
        cpu1, t1 = sum(map(cpu_seconds, own)), time.monotonic()
        wait1 = runqueue_seconds(proc.pid)
        client_cpu1 = sum(cpu_seconds(worker.pid) for worker, _ in clients)
        emu1 = sum(map(cpu_seconds, emulators))
        busy1 = machine_busy_seconds()
        rss_after = rss_bytes(proc.pid)
        deliveries = gaps = frames = closed = 0
        hist: dict[int, int] = {}
        for _, pipe in clients:
            if not pipe.poll(60):
                raise RuntimeError("a load client did not answer")
            _, d, g, f, c, h = pipe.recv()
            deliveries, gaps, frames, closed = deliveries + d, gaps + g, frames + f, closed + c
            for bucket, count in h.items():
                hist[bucket] = hist.get(bucket, 0) + count
        window = t1 - t0
        if proc.poll() is not None:
            closed = max(closed, n)  # the server died
        return {
            "server": kind, "clients": n, "mode": f"{rate:g}/s" if rate else "max",
            "events": deliveries / window / n, "deliveries": deliveries / window,
            "frames": frames / window, "gaps": gaps, "closed": closed,
            "p50": percentile(hist, 0.50), "p99": percentile(hist, 0.99),
            "p999": percentile(hist, 0.999), "cpu": (cpu1 - cpu0) / window * 100,
            "wait": (wait1 - wait0) / window * 100,
            "client_cpu": (client_cpu1 - client_cpu0) / window * 100,
            "emulator_cpu": (emu1 - emu0) / window * 100 if emulators else None,
            "other_cpu": max(0.0, ((busy1 - busy0) - (cpu1 - cpu0) - (client_cpu1 - client_cpu0)
                                   - (emu1 - emu0)) / window * 100),
            "rss": rss_after, "rss_conn": (rss_after - rss_before) / n,
            "command": shlex.join(command).replace(str(port), "PORT").replace(
                str(workdir), "TMP"),
            "caught_up": caught_up,
        }
    finally:
        for worker, pipe in clients:
            with contextlib.suppress(OSError):
                pipe.send("quit")
            worker.join(5)
            if worker.is_alive():
                worker.kill()
        stop(proc)


# -- reporting ------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"> {BUCKETS * BUCKET_US // 1000}" if value >= BUCKETS * BUCKET_US / 1000 - 0.01 else (
        f"{value:.2f}")


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| server | N | caught up | mode | events/s per client | deliveries/s | gaps | "
            "closed | p50 ms | p99 ms | p999 ms | CPU % | wait % | RSS MiB | RSS/conn KiB | "
            "clients' CPU % | emulator CPU % | other CPU % |")
    lines = [head, "|" + " --- |" * 18]
    for r in rows:  # RSS/conn means little below 100 connections
        per_conn = f"{r['rss_conn'] / 1024:.1f}" if r["clients"] >= 100 else "-"
        lines.append(
            f"| {r['server']} | {r['clients']} | {r['caught_up']} | {r['mode']} | "
            f"{r['events']:,.0f} | "
            f"{r['deliveries']:,.0f} | {r['gaps']} | {r['closed']} | {_ms(r['p50'])} | "
            f"{_ms(r['p99'])} | {_ms(r['p999'])} | {r['cpu']:.0f} | {r['wait']:.1f} | "
            f"{r['rss'] / 2**20:.1f} | {per_conn} | {r['client_cpu']:.0f} | "
            f"{'-' if r['emulator_cpu'] is None else format(r['emulator_cpu'], '.0f')} | "
            f"{r['other_cpu']:.0f} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> str:
    by = {(r["server"], r["clients"], r["mode"]): r for r in rows}
    lines = ["| N | mode | deliveries/s tickwire / peer | p99 tickwire / peer |",
             "| --- | --- | --- | --- |"]
    for (server, n, mode), r in by.items():
        peer = by.get(("peer", n, mode))
        if server != "tickwire" or peer is None:
            continue
        speed = f"{r['deliveries'] / peer['deliveries']:.2f}x" if peer["deliveries"] else "-"
        p99 = (f"{r['p99'] / peer['p99']:.2f}" if r["p99"] and peer["p99"] else "-")
        lines.append(f"| {n} | {mode} | {speed} | {p99} |")
    return "\n".join(lines)


def machine() -> str:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                      if line.startswith("Model name")), "")
    except OSError:
        pass
    try:
        import websockets
        peer = f"websockets {websockets.__version__}"
    except ImportError:
        peer = "websockets not installed"
    return (f"{os.cpu_count()} CPUs ({model or platform.processor()}), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"{peer}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    peer = sub.add_parser("peer", help="run the websockets.broadcast peer server")
    peer.add_argument("--port", type=int, required=True)
    peer.add_argument("--captures", type=Path, required=True)
    peer.add_argument("--rate", type=float, default=None)
    default_captures = os.environ.get("TICKWIRE_CAPTURES") or str(REPO.parent / "shared/captures")
    parser.add_argument("--clients", default="1,10,100,1000",
                        help="numbers of client connections, comma separated")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="exchange frames per second of the latency run (~events/s)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring window")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--client-procs", type=int, default=None,
                        help="load client processes sharing the connections (default: 1 "
                             "with the C client, whose one epoll loop wakes less often than "
                             "two would; 2 with the Python one)")
    parser.add_argument("--idle", type=int, default=1000,
                        help="idle connections for the RSS run (0: skip)")
    parser.add_argument("--servers", default="tickwire,peer",
                        help="tickwire, peer, and floors for the latency run "
                             "(benchmarks/floor.py): floor (each event sent alone at once), "
                             "floor-work (300 us of CPU per event, batched when idle), "
                             "floor-sender (floor-work with a sender process)")
    parser.add_argument("--client", choices=("c", "python"),
                        default="c" if shutil.which("cc") else "python",
                        help="load client: c (benchmarks/loadclient.c, compiled with `cc` at "
                             "start; the default when `cc` is found) or python")
    parser.add_argument("--emulator", choices=("process", "inside"), default="process",
                        help="process: `tickwire replay --emulators process` (the emulator "
                             "in a child process of the daemon's: the daemon then spends what "
                             "it does live, as the exchange is elsewhere); inside: the "
                             "emulator in the daemon's process")
    parser.add_argument("--max-write-delay-ms", type=float, default=None,
                        help="tickwire's longest coalescing window "
                             "(server.max_write_delay_ms; default: the daemon's, 5 ms)")
    parser.add_argument("--modes", default="rate,max", help="rate, max or both")
    parser.add_argument("--pin", action="store_true",
                        help="bind the server's process to CPU 0 and the load clients and "
                             "tickwire's emulator to the others, so that the server does not "
                             "wait for a CPU they hold (a floor's sender process is not bound)")
    parser.add_argument("--captures", type=Path, default=Path(default_captures))
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write the result tables to this file")
    args = parser.parse_args(argv)
    if args.command == "peer":
        asyncio.run(_peer(args.port, args.captures, args.rate))
        return
    if args.client == "python" and not shutil.which("cc"):
        print("note: no C compiler (`cc`): the load clients are the Python ones", flush=True)
    if not all((args.captures / name).is_file() for name in CAPTURE_FILES):
        parser.error(f"no Coinbase capture in {args.captures} (use --captures)")
    servers = args.servers.split(",")
    modes = [args.rate if m == "rate" else None for m in args.modes.split(",")]
    rows: list[dict[str, Any]] = []
    idle: list[dict[str, Any]] = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.clients.split(",")]:
            for rate in modes:
                for kind in servers:
                    if kind in FLOORS and rate is None:
                        continue  # a floor is for the latency run: it has no backpressure
                    row = run(kind, n, rate, args, Path(tmp))
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
        if args.idle:
            for kind in [k for k in servers if k not in FLOORS]:  # RSS: the servers only
                # a slow feed, so that RSS moves with connections only
                row = run(kind, args.idle, IDLE_RATE, args, Path(tmp), subscribe=False)
                row["mode"] = "idle"
                idle.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    command = shlex.join([Path(sys.executable).name, "benchmarks/fanout.py",
                          *(argv if argv is not None else sys.argv[1:])])
    report = "\n\n".join([
        f"Command: `{command}` ({time.time() - started:.0f} s)",
        f"Machine: {machine()}",
        table(rows),
        "Ratios (tickwire / peer, same run):\n\n" + ratios(rows),
        *(["Idle connections (connected, not subscribed):\n\n" + table(idle)] if idle else []),
        "Commands:\n\n" + "\n".join(f"- `{c}`" for c in
                                    dict.fromkeys(r["command"] for r in rows + idle)),
    ])
    print()
    print(report)
    if args.markdown:
        args.markdown.write_text(report + "\n")


if __name__ == "__main__":
    main()
