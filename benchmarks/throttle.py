"""What one client's throttles cost the daemon: a broadcast server in this
process, ``--streams`` books (``--levels`` a side) or tickers, each updated
``--rate`` times a second, and one client in a child process subscribed to all of
them, unthrottled or at ``throttle_ms`` (the floor, 50, by default). Prints the
server process's CPU (the client's is its own process) for no client, the
unthrottled client and the throttled one. It measured the figures of
docs/protocol.md "Throttle":

    python benchmarks/throttle.py                  # 100 books of 200 levels a side
    python benchmarks/throttle.py --channel ticker
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import orjson
import trio
import trio_websocket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.events import BookSnapshot, BookUpdate, Ticker  # noqa: E402
from tests.broadcast_server import start  # noqa: E402


async def client(url: str, channel: str, throttle_ms: int) -> None:
    """Read everything of ``channel`` (the child process)."""
    async with trio_websocket.open_websocket_url(url, max_message_size=1 << 26) as ws:
        await ws.get_message()
        request = {"op": "subscribe", "id": 1, "channels": [channel], "symbols": ["*"]}
        if throttle_ms:
            request["throttle_ms"] = throttle_ms
        await ws.send_message(orjson.dumps(request).decode())
        while True:
            await ws.get_message()


async def measure(args: argparse.Namespace, throttle_ms: int | None) -> str:
    """CPU of this process while it serves ``args``'s load to no client
    (``throttle_ms`` None) or to one."""
    symbols = [f"S{i}-USD" for i in range(args.streams)]
    levels = tuple((f"{1000 - j / 100:.2f}", "1.5") for j in range(args.levels))
    async with trio.open_nursery() as nursery:
        running = await start(nursery, max_throttled=args.streams)
        async with running.dispatcher.open_source() as source:
            for symbol in symbols:
                await source.send(BookSnapshot(exchange="x", symbol=symbol, ts=1.0,
                                               recv_ts=time.time(), bids=levels, asks=levels))
            process = None
            if throttle_ms is not None:
                process = await trio.lowlevel.open_process(
                    [sys.executable, __file__, "--client", running.url, "--channel", args.channel,
                     "--throttle-ms", str(throttle_ms)])
            await trio.sleep(0.5)
            start_time, start_cpu, events = time.monotonic(), time.process_time(), 0
            while time.monotonic() - start_time < args.seconds:
                for symbol in symbols:
                    price, size = levels[random.randrange(args.levels)][0], str(random.randint(1, 9))
                    if args.channel == "ticker":
                        await source.send(Ticker(exchange="x", symbol=symbol, ts=1.0,
                                                 recv_ts=time.time(), bid=price, bid_size=size,
                                                 ask="2000", ask_size="1"))
                    else:
                        await source.send(BookUpdate(exchange="x", symbol=symbol, ts=1.0,
                                                     recv_ts=time.time(), bids=((price, size),),
                                                     asks=()))
                    events += 1
                await trio.sleep(1 / args.rate)
            elapsed = time.monotonic() - start_time
            cpu = (time.process_time() - start_cpu) / elapsed
            if process is not None:
                process.kill()
                await process.wait()
        nursery.cancel_scope.cancel()
    who = ("no client" if throttle_ms is None else
           f"throttle_ms {throttle_ms}" if throttle_ms else "unthrottled")
    return f"{who:>16}: {events / elapsed:,.0f} events/s, server CPU {cpu:.2f} of a core"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channel", choices=("book", "ticker"), default="book")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--levels", type=int, default=200)
    parser.add_argument("--rate", type=float, default=60.0,
                        help="rounds of one update per stream a second (at most)")
    parser.add_argument("--throttle-ms", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        trio.run(client, args.client, args.channel, args.throttle_ms)
        return
    for throttle_ms in (None, 0, args.throttle_ms):
        print(trio.run(measure, args, throttle_ms), flush=True)


if __name__ == "__main__":
    main()
