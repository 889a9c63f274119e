"""One write pass of the fan-out against the bare system calls it makes.

    python benchmarks/writepass.py                       # 100 clients, 3,000 passes
    python benchmarks/writepass.py --clients 10,100 --passes 5000

In one process: a dispatcher and the broadcast server (``server.max_write_delay_ms
= 0``: every publish is written at once) on 127.0.0.1, and ``--clients`` raw
WebSocket clients (plain sockets, read between passes, not timed) subscribed to
every trade. Each pass publishes one Coinbase trade from the vendored capture
(``Source.publish``: numbering, encoding, delivery to every session, each of
which writes it as it is delivered: one ``os.write`` per client), then two
trades in one step (both queued, then written as one batch per client by
``Coalescer._write``); then the same sockets are written a frame of the one
trade's size by a bare loop of ``os.write``, the floor of that pass. Times are
``perf_counter_ns`` around each step; the minimum and the 10th percentile say
what the code costs (what the machine's noise adds is in the median). A
script, not a test: it asserts nothing but that every client is connected.

What it is for: the per-client cost of the write path (the fan-out's latency at
100 clients is mostly that cost times the client's place in the pass); issue 17.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import socket
import sys
import time
from pathlib import Path

import attrs
import orjson
import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wsconn import text_frame  # noqa: E402

from daemon.broadcast.server import BroadcastServer  # noqa: E402
from daemon.config import ServerConfig  # noqa: E402
from daemon.dispatch import Dispatcher, Retention  # noqa: E402
from daemon.events import Trade  # noqa: E402
from daemon.exchanges.coinbase import CoinbaseFeed, parse_markets  # noqa: E402
from daemon.replay.capture import read_capture  # noqa: E402

HELLO = {"type": "welcome", "server": "tickwire", "version": "bench", "epoch": "bench"}


def capture_trades(captures: Path) -> list[Trade]:
    """The Coinbase capture's trades, through the real protocol."""
    markets = parse_markets(read_capture(captures / "COINBASE.0").rest[0].body)
    conn = read_capture(captures / "COINBASE.ws.28.0").connections[0]
    products = orjson.loads(conn.sent[0][1])["product_ids"]
    feed = CoinbaseFeed([markets[p] for p in products], ["trades"], markets)
    feed.on_open(0.0)
    trades: list[Trade] = []
    for frame in conn.received:
        trades += [o for o in feed.on_message(frame.text, frame.ts) if isinstance(o, Trade)]
    return trades


def connect(port: int) -> socket.socket:
    """A client that sent its opening handshake (the server answers meanwhile)."""
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
    sock.setblocking(False)
    return sock


def subscribe(sock: socket.socket) -> None:
    """After the server's 101 (RFC 6455 4.1: no frame before it): every trade."""
    sock.recv(1 << 16)  # the 101 and the welcome
    sock.sendall(text_frame(orjson.dumps(
        {"op": "subscribe", "channels": ["trades"], "symbols": ["coinbase:*"]})))


def drain(clients: list[socket.socket]) -> None:
    for sock in clients:
        try:
            while sock.recv(1 << 20):
                pass
        except BlockingIOError:
            pass


def summary(name: str, samples: list[int], clients: int) -> str:
    samples = sorted(samples)
    at = lambda q: samples[int(len(samples) * q)] / 1000  # noqa: E731
    return (f"| {name} | {clients} | {samples[0] / 1000:.0f} | {at(0.1):.0f} | {at(0.5):.0f} "
            f"| {at(0.1) / clients:.2f} |")


async def measure(clients_n: int, passes: int, trades: list[Trade], no_gc: bool) -> list[str]:
    async with trio.open_nursery() as nursery:
        dispatcher = Dispatcher(256, {"trades": Retention(1000, 3600)})
        server = BroadcastServer(dispatcher, ServerConfig(
            listen="127.0.0.1:0", max_write_delay_ms=0.0, client_queue=100_000), HELLO)
        await nursery.start(dispatcher.serve)
        port = await nursery.start(server.serve)
        clients = [connect(port) for _ in range(clients_n)]
        await trio.sleep(0.5)  # the handshakes
        for sock in clients:
            subscribe(sock)
        for _ in range(600):  # at most 30 s: every client connected and subscribed
            if len(server.sessions) == clients_n and all(
                    s.writer is not None and dispatcher.subscriptions.get(s.queue)
                    for s in server.sessions):
                break
            await trio.sleep(0.05)
        await trio.sleep(0.2)  # the subscriptions' acks
        drain(clients)
        fds = [session.writer.fd for session in server.sessions]  # type: ignore[union-attr]
        assert len(fds) == clients_n
        publish_ns: list[int] = []
        batch_ns: list[int] = []
        bare_ns: list[int] = []
        if no_gc:
            gc.disable()
        async with dispatcher.open_source() as source:
            now = time.time()
            for n in range(passes):
                trade = attrs.evolve(trades[n % len(trades)], id=f"bench-{n}", recv_ts=now)
                started = time.perf_counter_ns()
                await source.publish([trade])
                publish_ns.append(time.perf_counter_ns() - started)
                frame = dispatcher.streams[f"trades:coinbase:{trade.symbol}"].history[-1].frame
                drain(clients)
                pair = [attrs.evolve(trade, id=f"bench-{n}-{k}") for k in (1, 2)]
                started = time.perf_counter_ns()
                await source.publish(pair)
                batch_ns.append(time.perf_counter_ns() - started)
                drain(clients)
                data = b"x" * len(frame or b"")
                started = time.perf_counter_ns()
                for fd in fds:
                    os.write(fd, data)
                bare_ns.append(time.perf_counter_ns() - started)
                drain(clients)
                if n % 100 == 0:
                    await trio.lowlevel.checkpoint()
        gc.enable()
        for sock in clients:
            sock.close()
        nursery.cancel_scope.cancel()
    return [summary("publish one trade (dispatch, each client written as delivered)",
                    publish_ns, clients_n),
            summary("publish two trades in one step (queued, one batch per client)",
                    batch_ns, clients_n),
            summary("bare os.write, same sockets and size", bare_ns, clients_n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.environ.get("TICKWIRE_CAPTURES") or str(REPO / "tests/captures")
    parser.add_argument("--clients", default="100", help="comma separated")
    parser.add_argument("--passes", type=int, default=3000)
    parser.add_argument("--no-gc", action="store_true", help="gc.disable() while measuring")
    parser.add_argument("--captures", type=Path, default=Path(default))
    args = parser.parse_args()
    trades = capture_trades(args.captures)
    rows = ["| step | clients | min us | p10 us | median us | p10 us per client |",
            "| --- | --- | --- | --- | --- | --- |"]
    for n in [int(x) for x in args.clients.split(",")]:
        rows += trio.run(measure, n, args.passes, trades, args.no_gc)
    print(f"Command: `python benchmarks/writepass.py {' '.join(sys.argv[1:])}`\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
