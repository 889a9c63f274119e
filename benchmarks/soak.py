"""Soak: clients connecting, subscribing, reading and leaving for a long time, the
daemon's resident memory sampled every 10 s. Does RSS plateau under churn?

The daemon runs ``tickwire replay`` on the vendored captures (``--loop``, at
``--rate`` events per second), so there is live data on every stream. ``--clients``
client tasks (trio-websocket, in this process) each loop: connect, subscribe to a
random mix of channels and symbol patterns (sometimes with ``history`` or a
``throttle_ms``), read for a random 0.2 to 2 s, and leave (half close cleanly, a
quarter drop the TCP connection, a quarter stop reading first and are left to the
slow-consumer rule); then connect again. Every 10 s the daemon's RSS
(``/proc/PID/status`` VmRSS), its descriptors (``/proc/PID/fd``), its clients and
the connections made so far are printed, one line each.

    python benchmarks/soak.py --minutes 10 --clients 50

Results: docs/benchmarks.md, with the command.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson
import trio
import trio_websocket

REPO = Path(__file__).resolve().parent.parent
CAPTURES = ("BINANCE.0", "BINANCE.ws.1.0", "BINANCE.http.0.0", "COINBASE.0", "COINBASE.ws.28.0",
            "KRAKEN.0", "KRAKEN.ws.48.0", "KRAKEN.ws.49.0", "KRAKEN.ws.50.0")
CHANNELS = (["trades"], ["book"], ["ticker"], ["trades", "book", "ticker"], ["book", "ticker"])
PATTERNS = (["*"], ["binance:*"], ["coinbase:*"], ["kraken:*"], ["coinbase:*", "kraken:*"])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Figures:
    def __init__(self) -> None:
        self.connections = 0
        self.messages = 0
        self.errors: dict[str, int] = {}
        self.live = 0


async def client(url: str, figures: Figures, rng: random.Random, until: float) -> None:
    """One client's life, again and again until ``until``."""
    while trio.current_time() < until:
        try:
            await visit(url, figures, rng)
        except Exception as exc:  # a client's failure is counted; the soak goes on
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            name = type(exc).__name__
            figures.errors[name] = figures.errors.get(name, 0) + 1
            await trio.sleep(0.1)


async def visit(url: str, figures: Figures, rng: random.Random) -> None:
    ending = rng.choice(("close", "close", "drop", "stall"))
    stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
    if ending == "stall":  # a small receive buffer: it fills soon once not read
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    figures.connections += 1
    figures.live += 1
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", "/")
            await ws.get_message()
            body: dict[str, object] = {"op": "subscribe", "id": 1,
                                       "channels": rng.choice(CHANNELS),
                                       "symbols": rng.choice(PATTERNS)}
            if rng.random() < 0.3:
                body["history"] = rng.choice((10, 100))
            if rng.random() < 0.2 and "trades" not in body["channels"]:  # type: ignore[operator]
                body["throttle_ms"] = rng.choice((100, 250))
            await ws.send_message(orjson.dumps(body).decode())
            with trio.move_on_after(rng.uniform(0.2, 2.0)):
                while True:
                    await ws.get_message()
                    figures.messages += 1
            if ending == "close":
                with trio.move_on_after(2):
                    await ws.aclose()
            elif ending == "stall":
                await trio.sleep(rng.uniform(1.0, 3.0))  # reads nothing, then leaves
            nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()
        figures.live -= 1


async def soak(args: argparse.Namespace, proc: subprocess.Popen[bytes], port: int) -> None:
    url = f"ws://127.0.0.1:{port}"
    with trio.fail_after(60):
        while True:
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                break
            except OSError:
                await trio.sleep(0.2)
    figures = Figures()
    started = trio.current_time()
    until = started + args.minutes * 60
    print(f"soak: {args.clients} clients for {args.minutes:g} min on {url}, "
          f"replay at {args.rate:g} events/s (pid {proc.pid})", flush=True)
    print("| minute | RSS MiB | descriptors | clients now | connections | messages | "
          "errors |", flush=True)
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    async with trio.open_nursery() as nursery:
        rng = random.Random(args.seed)
        for _ in range(args.clients):
            nursery.start_soon(client, url, figures, random.Random(rng.random()), until)
        while trio.current_time() < until:
            await trio.sleep(10)
            minute = (trio.current_time() - started) / 60
            print(f"| {minute:.2f} | {rss_kib(proc.pid) / 1024:.1f} | "
                  f"{descriptors(proc.pid)} | {figures.live} | {figures.connections} | "
                  f"{figures.messages} | {sum(figures.errors.values())} |", flush=True)
        nursery.cancel_scope.deadline = trio.current_time() + 10
    print(f"client errors by type: {figures.errors or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rate", type=float, default=2000.0, help="replayed events per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--captures", default=os.environ.get(
        "TICKWIRE_CAPTURES", str(REPO / "tests" / "captures")))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    port = free_port()
    config = workdir / "soak.toml"
    config.write_text('log_level = "warning"\n[server]\nstall_timeout = 2.0\n'
                      f'[admin]\nsocket = "{workdir / "admin.sock"}"\n')
    captures = Path(args.captures)
    command = [sys.executable, "-m", "daemon.cli", "replay",
               *(str(captures / name) for name in CAPTURES), "--loop", "--rate",
               f"{args.rate:g}", "--listen", f"127.0.0.1:{port}", "--config", str(config)]
    with open(workdir / "daemon.log", "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        try:
            trio.run(soak, args, proc, port)
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"\ncommand: {' '.join(command)}\ndaemon log: {workdir / 'daemon.log'}")


if __name__ == "__main__":
    main()
