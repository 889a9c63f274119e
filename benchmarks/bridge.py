"""The ccxt.pro bridge (``watch`` mode): events per second through it, and the
latency it adds.

    python benchmarks/bridge.py                       # both runs, about 30 s
    python benchmarks/bridge.py --seconds 5 --rate 500,2000

Needs the recorded traffic (``--captures``, default ``$TICKWIRE_CAPTURES`` or
``../shared/captures`` beside the repository). The Binance emulator runs in a
process of its own (this script with ``--emulate``), looping the Binance capture
(ids, times and books continued pass after pass). The measured process holds
what the daemon runs live: a ``WatchCollector`` (real ccxt.pro in its worker
thread, real sockets on 127.0.0.1) and a real ``Dispatcher`` serving its input
channel. Nothing is subscribed to the dispatcher: this measures the bridge and
the collector, not the fan-out (``benchmarks/fanout.py`` does that).

- **max**: the emulator plays as fast as ccxt reads (``speed=None``). Reported:
  items that crossed the bridge per second (ccxt may return several frames'
  worth in one result: a book that moved twice is one item), and events the
  dispatcher published per second.
- **rate N**: the emulator sends N exchange frames per second (``--rate``). For
  every market event the dispatcher publishes, the latency is ``time.time()`` at
  publish minus the event's ``recv_ts``, which the worker thread stamps the
  moment ccxt's ``watch_*`` call returns with the data (ccxt's receipt, after
  its own parsing): the hand-off through the bounded channel, the copy's
  normalization in trio (float formatting, book diff) and the dispatcher's
  queue. p50 / p99 / max in microseconds (HdrHistogram).

- **hand-off alone**: a plain thread hands ``--handoff`` small items to trio
  through the bridge's ``HandOff`` (a slot of the bound, then ``run_sync_soon``
  of the channel's ``send_nowait``), as the worker does, and trio takes them: the
  ceiling of the mechanism itself, without ccxt, sockets or normalization; and,
  for comparison, through ``trio.from_thread.run(send.send, item)`` (a round trip
  per item, the bridge's first hand-off).

Counting starts after ``--warmup`` seconds (markets, snapshots, connections).
CPU of the measured process (user + system over the window, 100 % = one core,
both threads) from ``os.times()``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import trio
from hdrh.histogram import HdrHistogram

from daemon.collectors.watch import BRIDGE_BUFFER, HandOff, WatchCollector
from daemon.config import ExchangeConfig, ReconnectConfig
from daemon.dispatch import Dispatcher
from daemon.events import BookSnapshot, BookUpdate, Ticker, Trade
from daemon.replay.capture import read_capture
from daemon.replay.emulator import Emulator

BINANCE = ("BINANCE.0", "BINANCE.ws.1.0", "BINANCE.http.0.0")
MARKET = (Trade, BookSnapshot, BookUpdate, Ticker)


class TimedDispatcher(Dispatcher):
    """The dispatcher, recording each market event's latency since ``recv_ts``."""

    def __init__(self) -> None:
        super().__init__(1024, {})
        self.latency = HdrHistogram(1, 60_000_000, 3)  # us
        self.counting = False

    def publish(self, event) -> None:  # type: ignore[override]
        if self.counting and isinstance(event, MARKET):
            self.latency.record_value(max(1, int((time.time() - event.recv_ts) * 1e6)))
        super().publish(event)


async def emulate(captures: Path, rate: float | None) -> None:
    """The looping emulator alone; prints its URLs and symbols as one JSON line."""
    async with trio.open_nursery() as nursery:
        emulator = Emulator(emulator_captures(captures), speed=None, loop=True, rate=rate)
        address = await nursery.start(emulator.serve)
        symbols, channels = emulator.venue.subscriptions(emulator_captures(captures))
        print(json.dumps({"rest_url": address.rest_url, "ws_url": address.ws_url,
                          "symbols": symbols, "channels": channels}), flush=True)


async def handoff(count: int, buffer: int, round_trip: bool = False) -> float:
    """Items per second through the bridge's ``HandOff`` (or, ``round_trip``, through
    ``trio.from_thread.run(send.send, ...)``, a round trip between the threads per
    item, as the bridge did before)."""
    send, receive = trio.open_memory_channel[tuple](buffer)
    token = trio.lowlevel.current_trio_token()
    hand_off = HandOff(send, buffer)

    def worker() -> None:
        for n in range(count):
            if round_trip:
                trio.from_thread.run(send.send, ("book", n), trio_token=token)
            else:
                hand_off(("book", n))
        trio.from_thread.run_sync(send.close, trio_token=token)

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.to_thread.run_sync, worker))
        async for _ in receive:
            if not round_trip:
                hand_off.taken()
    return count / (time.monotonic() - started)


async def measure(address: dict, seconds: float, warmup: float, buffer: int) -> dict:
    async with trio.open_nursery() as nursery:
        dispatcher = TimedDispatcher()
        await nursery.start(dispatcher.serve)
        cfg = ExchangeConfig(symbols=address["symbols"], channels=address["channels"],
                             mode="watch", depth=1000, rest_url=address["rest_url"],
                             ws_url=address["ws_url"])
        collector = WatchCollector("binance", cfg, ReconnectConfig(), dispatcher.open_source(),
                                   buffer=buffer)
        nursery.start_soon(collector.run)
        while collector.state != "subscribed":
            await collector.wait_state_change()
        await trio.sleep(warmup)
        start = (time.monotonic(), os.times(), collector.items, dispatcher.events)
        dispatcher.counting = True
        await trio.sleep(seconds)
        dispatcher.counting = False
        end = (time.monotonic(), os.times(), collector.items, dispatcher.events)
        stats = collector.statistics()
        nursery.cancel_scope.cancel()
    elapsed = end[0] - start[0]
    cpu = (end[1].user + end[1].system - start[1].user - start[1].system) / elapsed
    histogram = dispatcher.latency
    return {
        "items/s": (end[2] - start[2]) / elapsed,
        "events/s": (end[3] - start[3]) / elapsed,
        "p50": histogram.get_value_at_percentile(50),
        "p99": histogram.get_value_at_percentile(99),
        "max": histogram.get_max_value(),
        "cpu": cpu * 100,
        "resyncs": stats.counters.resyncs,
        "peak": stats.bridge.peak_buffer,
    }


def emulator_captures(captures: Path) -> list:
    return [read_capture(captures / f) for f in BINANCE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.environ.get("TICKWIRE_CAPTURES") or str(
        Path(__file__).resolve().parent.parent.parent / "shared" / "captures")
    parser.add_argument("--captures", type=Path, default=Path(default))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rate", default="500,2000",
                        help="comma-separated exchange frames per second for latency runs")
    parser.add_argument("--buffer", type=int, default=BRIDGE_BUFFER, help="the bridge's bound")
    parser.add_argument("--no-max", action="store_true", help="skip the throughput run")
    parser.add_argument("--handoff", type=int, default=50_000,
                        help="items for the hand-off-alone run (0: skip it)")
    parser.add_argument("--emulate", metavar="RATE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.emulate is not None:  # the emulator's own process
        trio.run(emulate, args.captures, None if args.emulate == "max" else float(args.emulate))
        return
    runs = ([] if args.no_max else ["max"]) + [r for r in args.rate.split(",") if r]
    rows = []
    for rate in runs:
        emulator = subprocess.Popen(
            [sys.executable, __file__, "--captures", str(args.captures), "--emulate", rate],
            stdout=subprocess.PIPE, text=True)
        try:
            address = json.loads(emulator.stdout.readline())
            row = trio.run(measure, address, args.seconds, args.warmup, args.buffer)
        finally:
            emulator.terminate()
            emulator.wait(10)
        rows.append({"mode": "max" if rate == "max" else f"rate {rate}/s", **row})
    print(f"bridge buffer {args.buffer}, {args.seconds:g} s per run after {args.warmup:g} s")
    if args.handoff:
        rate = trio.run(handoff, args.handoff, args.buffer)
        print(f"hand-off alone: {rate:,.0f} items/s ({1e6 / rate:.1f} us per item)")
        rate = trio.run(handoff, args.handoff, args.buffer, True)
        print(f"hand-off alone, a round trip per item (trio.from_thread.run): {rate:,.0f} "
              f"items/s ({1e6 / rate:.1f} us per item)")
    print("| emulator | bridge items/s | events/s | latency p50 | p99 | max | CPU | resyncs "
          "| peak buffer |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['items/s']:,.0f} | {r['events/s']:,.0f} | "
              f"{r['p50']} us | {r['p99']} us | {r['max']} us | {r['cpu']:.0f} % | "
              f"{r['resyncs']} | {r['peak']} |")


if __name__ == "__main__":
    main()
