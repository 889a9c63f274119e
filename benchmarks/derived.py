"""Derived streams benchmark (issue 18): what bars, whales and depth-N views cost.

    python benchmarks/derived.py                     # every part, about 3 minutes
    python benchmarks/derived.py --parts alone,task  # (a) and (c) only
    python benchmarks/derived.py --parts daemon --seconds 10 --rounds 2
    python benchmarks/derived.py --against 17df7c8 --configs base,whales+bars --rounds 3

A script, not a test: it asserts nothing and prints tables (Markdown).

**(a) alone**: each computation without the daemon, on the Coinbase capture's
events (``tests/captures/COINBASE.*``, through the real protocol), best of
``--repeat`` passes, microseconds per input event: ``BarsComputation.take`` per
trade (intervals 1s, 1m, 5m: three bars per trade) and its ``tick``;
``take`` and then ``due`` per trade (what the derived task does for each input:
the next time it must wake), also with each trade under ten symbol names (100
symbols, 300 series); ``WhalesComputation.take`` per trade and per ticker; a depth-10 view's build per
book event (``Views.build`` after each event: the top 10 levels read from the
book, compared, a ``BookView`` made when they changed), beside the dispatcher's
own ``publish`` of the same book event.

**(c) task**: whales and bars as the daemon runs them, without the rest of it:
a dispatcher and the two ``DerivedStream`` tasks in one trio run, fed the
capture's trades and tickers one at a time, ``--task-gap`` ms apart (each one
wakes the tasks, as at Coinbase's rate live), ``--task-loops`` passes with
exchange times shifted by the capture's span per pass (as ``--loop`` does), best
of ``--repeat`` runs: each task's ``busy`` per input, and the wall time per call
of the computation's ``take``, ``due`` and ``tick`` there (``time.perf_counter``
around each call).

**(b) daemon**: ``tickwire replay COINBASE.* --loop --speed max --emulators
process`` (the emulator in a child process, so the daemon's CPU is its own),
configurations run one after the other, ``--rounds`` times interleaved, each
``--seconds`` after ``--warmup``: the daemon's CPU (``/proc``) per exchange frame
and per event, and the load client's deliveries:

- ``base``: no derived stream, no client;
- ``whales+bars``: whales (threshold 1,000 USD) and bars 1s, 1m, 5m, no client;
- ``100 full books``: no derived stream, 100 clients of ``book *``;
- ``100 depth-10 views``: the same 100 clients with ``"depth": 10``;
- ``100 depth-10 views, 100 ms``: with ``"throttle_ms": 100``.

At Coinbase's trade rate (107 trades in 9,946 frames) the whales and bars cost is
below the run-to-run spread of the daemon's CPU per frame, so the daemon also
reports what each derived task spent itself (``busy`` in ``tickwire status``:
``time.thread_time``, CPU time, around decoding its inputs and computing,
publishing not included): "derived us per input" is that over its input messages (trades and
tickers taken by whales and bars; book readings by the views), and "derived
share" that time over the daemon's CPU. The 100 clients run in one load client
process (``fanout.py``'s), whose CPU is not the daemon's. ``--configs`` runs only
some of them.

**--against REV**: the same measurements of the daemon of git revision ``REV``
(a copy made with ``git archive`` in a temporary directory): (a) runs this
script's (a) on that copy's ``daemon`` in a child process (``--tree``), (b) runs
each configuration with both daemons, one after the other in every round
(interleaved), the copy's rows named ``CONFIG @ REV``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

COINBASE_FILES = ("COINBASE.0", "COINBASE.ws.28.0")


def fanout() -> Any:
    return importlib.import_module("fanout")


def ingest() -> Any:
    return importlib.import_module("ingest")


# -- (a) the computations alone ----------------------------------------------------------


def coinbase_events(captures: Path) -> list[Any]:
    from daemon.events import BookSnapshot, BookUpdate, Ticker, Trade
    from daemon.exchanges.coinbase import CoinbaseFeed, parse_markets
    from daemon.replay.capture import read_capture

    markets = parse_markets(read_capture(captures / "COINBASE.0").rest[0].body)
    conn = read_capture(captures / "COINBASE.ws.28.0").connections[0]
    products = orjson.loads(conn.sent[0][1])["product_ids"]
    feed = CoinbaseFeed([markets[p] for p in products], ["trades", "book", "ticker"], markets)
    feed.on_open(0.0)
    events = []
    for frame in conn.received:
        events += [o for o in feed.on_message(frame.text, frame.ts)
                   if isinstance(o, Trade | Ticker | BookSnapshot | BookUpdate)]
    return events


def best(run: Callable[[], float], repeat: int) -> float:
    return min(run() for _ in range(repeat))


def alone(args: argparse.Namespace) -> str:
    from daemon.derived.bars import BarsComputation
    from daemon.derived.views import Views
    from daemon.derived.whales import WhalesComputation
    from daemon.dispatch import Dispatcher, Message, Retention
    from daemon.events import BookSnapshot, BookUpdate

    events = coinbase_events(args.captures)
    dispatcher = Dispatcher(64, {"trades": Retention(1000, 3600.0), "book": Retention(10, 60.0),
                                 "ticker": Retention(10, 60.0)})
    messages: list[Message] = []

    class Keep:
        def deliver(self, message: Message) -> None:
            messages.append(message)

    dispatcher.subscribe(Keep(), ["trades", "ticker"], ["*"])
    books: list[Any] = []
    for event in events:
        dispatcher.publish(event)
        if isinstance(event, BookSnapshot | BookUpdate):
            books.append(event)
    trades = [(m.stream, orjson.loads(m.payload)) for m in messages if m.stream.channel == "trades"]
    tickers = [(m.stream, orjson.loads(m.payload)) for m in messages if m.stream.channel == "ticker"]
    rows = []

    def per(inputs: list[Any], make: Callable[[], Any], method: str) -> float:
        def once() -> float:
            computation = make()
            call = getattr(computation, method)
            passes = max(1, 20_000 // len(inputs))
            started = time.perf_counter()
            for _ in range(passes):
                for n, (stream, payload) in enumerate(inputs):
                    call(stream, payload, float(n))
            return (time.perf_counter() - started) / (passes * len(inputs)) * 1e6
        return best(once, args.repeat)

    def bars() -> Any:
        return BarsComputation(["1s", "1m", "5m"], 1.0, "carry", 1000, ["*"])

    def whales() -> Any:
        return WhalesComputation(Decimal(1000), {}, ["*"])

    rows.append(("bars 1s+1m+5m: `take`, per trade", per(trades, bars, "take"), len(trades)))

    def take_due() -> float:  # the derived task's step for one input: take, then due
        computation = bars()
        passes = max(1, 20_000 // len(trades))
        started = time.perf_counter()
        for _ in range(passes):
            for n, (stream, payload) in enumerate(trades):
                computation.take(stream, payload, float(n))
                computation.due()
        return (time.perf_counter() - started) / (passes * len(trades)) * 1e6
    rows.append(("bars 1s+1m+5m: `take` then `due`, per trade", best(take_due, args.repeat),
                 len(trades)))
    # the same trades under ten names per symbol (SKL0-USD ... SKL9-USD): 300 series
    import attrs
    many: list[Any] = []
    for stream, payload in trades:
        base, quote = stream.symbol.split("-")
        for k in range(10):
            symbol = f"{base}{k}-{quote}"
            many.append((attrs.evolve(stream, key=f"trades:{stream.exchange}:{symbol}",
                                      symbol=symbol), {**payload, "symbol": symbol}))

    def take_due_many() -> float:
        computation = bars()
        started = time.perf_counter()
        for _ in range(20):
            for n, (stream, payload) in enumerate(many):
                computation.take(stream, payload, n / 10)
                computation.due()
        return (time.perf_counter() - started) / (20 * len(many)) * 1e6
    rows.append(("bars 1s+1m+5m, 100 symbols: `take` then `due`, per trade",
                 best(take_due_many, args.repeat), len(many)))
    rows.append(("whales: `take`, per trade", per(trades, whales, "take"), len(trades)))
    rows.append(("whales: `take`, per ticker", per(tickers, whales, "take"), len(tickers)))

    def tick() -> float:
        computation = bars()
        for n, (stream, payload) in enumerate(trades):
            computation.take(stream, payload, float(n))
        started = time.perf_counter()
        count = 2000
        for k in range(count):  # every series' due bars and partials, once a second
            computation.tick(float(len(trades) + k))
        return (time.perf_counter() - started) / count * 1e6
    rows.append(("bars: `tick` (10 symbols x 3 intervals)", best(tick, args.repeat), 1))

    # a depth-10 view of every book, built after each book event
    from daemon.derived.views import View

    def views_once() -> float:
        d = Dispatcher(64, {"book": Retention(10, 60.0)})
        v = Views(d, None)  # type: ignore[arg-type]  # build() is sans-IO
        v.demand.add(("book", 10, 0, "*"))
        total = 0.0
        for event in books:
            d.publish(event)
            stream = d.streams[f"book:{event.exchange}:{event.symbol}"]
            view = v.views.get((stream, "book", 10, 0))
            if view is None:
                view = v.views[(stream, "book", 10, 0)] = View(stream, "book", 10, 0)
            v.dirty.add(view)
            started = time.perf_counter()
            v.build(0.0)
            total += time.perf_counter() - started
        return total / len(books) * 1e6

    def publish_once() -> float:
        d = Dispatcher(64, {"book": Retention(10, 60.0)})
        started = time.perf_counter()
        for event in books:
            d.publish(event)
        return (time.perf_counter() - started) / len(books) * 1e6

    rows.append(("depth-10 view: build per book event", best(views_once, args.repeat),
                 len(books)))
    rows.append(("(the dispatcher's `publish` of a book event)", best(publish_once, args.repeat),
                 len(books)))
    lines = ["| computation | us per input event | inputs |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {us:.2f} | {n:,} |" for name, us, n in rows]
    return "\n".join(lines)


# -- (c) the derived tasks on a dispatcher -------------------------------------------------


def task_part(args: argparse.Namespace) -> str:
    import attrs
    import trio

    from daemon.derived.bars import BarsComputation
    from daemon.derived.runner import DerivedStream
    from daemon.derived.whales import WhalesComputation
    from daemon.dispatch import Dispatcher, Retention
    from daemon.events import Ticker, Trade

    events = [e for e in coinbase_events(args.captures) if isinstance(e, Trade | Ticker)]
    span = events[-1].ts - events[0].ts + 1.0

    def once() -> dict[str, float]:
        spent: dict[str, float] = {}
        calls: dict[str, int] = {}

        def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
            def call(*a: Any) -> Any:
                started = time.perf_counter()
                try:
                    return method(*a)
                finally:
                    spent[name] = spent.get(name, 0.0) + time.perf_counter() - started
                    calls[name] = calls.get(name, 0) + 1
            return call

        async def run() -> list[Any]:
            dispatcher = Dispatcher(1024, {name: Retention(1000, 3600.0) for name in
                                           ("trades", "ticker", "bars", "whales")})
            computations = [WhalesComputation(Decimal(1000), {}, ["*"]),
                            BarsComputation(["1s", "1m", "5m"], 1.0, "carry", 1000, ["*"])]
            async with trio.open_nursery() as nursery:
                await nursery.start(dispatcher.serve)
                tasks = []
                for computation in computations:
                    for method in ("take", "due", "tick"):
                        setattr(computation, method, timed(
                            f"{computation.name} `{method}`", getattr(computation, method)))
                    task = DerivedStream(computation, dispatcher, dispatcher.open_source(),
                                         100_000)
                    await nursery.start(task.run)
                    tasks.append(task)
                async with dispatcher.open_source() as source:
                    for k in range(args.task_loops):
                        for event in events:
                            shifted = {"ts": event.ts + k * span}
                            if isinstance(event, Trade):
                                shifted["id"] = f"{event.id}.{k}"
                            await source.send(attrs.evolve(event, **shifted))
                            await trio.sleep(args.task_gap / 1000)
                await trio.sleep(0.5)
                nursery.cancel_scope.cancel()
            return tasks

        tasks = trio.run(run)
        figures = {f"{name}, per call": spent[name] / calls[name] * 1e6 for name in spent}
        for task in tasks:
            stats = task.statistics()
            figures[f"{stats.name} task: `busy` per input"] = stats.busy / stats.received * 1e6
        return figures

    runs = [once() for _ in range(args.repeat)]
    lines = ["| figure (wall us; whales and bars 1s+1m+5m, carry) | best | median |",
             "| --- | ---: | ---: |"]
    for name in sorted(runs[0]):
        values = [r[name] for r in runs]
        lines.append(f"| {name} | {min(values):.2f} | {statistics.median(values):.2f} |")
    return "\n".join(lines)


# -- (b) the daemon ---------------------------------------------------------------------


CONFIGS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "base": ("", None),
    "whales+bars": ('[derived.whales]\nenabled = true\nthreshold = 1000\n'
                    '[derived.bars]\nintervals = ["1s", "1m", "5m"]\n', None),
    "100 full books": ("", {"op": "subscribe", "id": 1, "channels": ["book"],
                            "symbols": ["*"]}),
    "100 depth-10 views": ("", {"op": "subscribe", "id": 1, "channels": ["book"],
                                "symbols": ["*"], "depth": 10}),
    "100 depth-10 views, 100 ms": ("", {"op": "subscribe", "id": 1, "channels": ["book"],
                                        "symbols": ["*"], "depth": 10, "throttle_ms": 100}),
}


def client_process(port: int, count: int, subscribe: bytes, control: Any) -> None:
    """fanout.py's load client with this benchmark's subscribe request."""
    module = fanout()
    module.SUBSCRIBE = subscribe
    module.client_process(port, count, True, control)


@contextlib.contextmanager
def replay(args: argparse.Namespace, workdir: Path, extra: str, tree: Path = REPO
           ) -> Iterator[tuple[Any, int, Path]]:
    """``tickwire replay`` of the Coinbase capture, the daemon from ``tree`` (this
    repository, or ``--against``'s copy)."""
    base = fanout().tickwire_config(workdir, True)
    config = workdir / "derived.toml"
    config.write_text(base.read_text() + "\n" + extra)
    port = fanout().free_port()
    files = [str(args.captures / name) for name in COINBASE_FILES]
    command = [sys.executable, "-m", "daemon.cli", "replay", *files, "--loop", "--speed", "max",
               "--listen", f"127.0.0.1:{port}", "--config", str(config),
               "--emulators", "process"]
    log = (workdir / "daemon.log").open("wb")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen(command, cwd=tree, stdout=subprocess.DEVNULL, stderr=log, env=env)
    admin = workdir / "admin.sock"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError((workdir / "daemon.log").read_text()[-2000:])
            with contextlib.suppress(OSError, ValueError):
                if ingest().daemon_counters(admin)[0] > 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start within 60 s")
            time.sleep(0.2)
        yield proc, port, admin
    finally:
        fanout().stop(proc)
        log.close()


def measure(name: str, args: argparse.Namespace, workdir: Path, tree: Path = REPO
            ) -> dict[str, Any]:
    extra, subscribe = CONFIGS[name]
    module = fanout()
    with replay(args, workdir, extra, tree) as (proc, port, admin):
        clients: list[tuple[Any, Any]] = []
        if subscribe is not None:
            parent, child = mp.get_context("fork").Pipe()
            worker = mp.get_context("fork").Process(
                target=client_process, args=(port, args.clients, orjson.dumps(subscribe), child),
                daemon=True)
            worker.start()
            clients = [(worker, parent)]
            for expected in ("connected", "ready"):
                if not parent.poll(120):
                    raise RuntimeError(f"the load client was not {expected} in time")
                status = parent.recv()
                if status[0] != expected:
                    raise RuntimeError(f"load client: {status[1]}")
                if expected == "connected":
                    parent.send("subscribe")
        try:
            time.sleep(args.warmup)
            for _, pipe in clients:
                pipe.send("start")

            def sample() -> dict[str, float]:
                components = ingest().admin_status(admin, 60.0).get("components", [])
                frames = sum(int((c.get("figures") or {}).get("messages") or 0)
                             for c in components if c.get("kind") == "feed")
                events = sum(int((c.get("figures") or {}).get("events") or 0)
                             for c in components if c.get("kind") == "dispatcher")
                derived = {c["name"]: c.get("figures", {})
                           for c in components if c.get("kind") == "derived"}
                return {"t": time.monotonic(), "frames": frames, "events": events,
                        "cpu": module.cpu_seconds(proc.pid),
                        "busy": sum(f.get("busy", 0.0) for f in derived.values()),
                        "inputs": sum(f.get("received", 0) for f in derived.values()
                                      if f.get("name") != "views"),
                        "builds": sum(f.get("figures", {}).get("builds", 0)
                                      for f in derived.values() if f.get("name") == "views")}

            a = sample()
            time.sleep(args.seconds)
            b = sample()
            deliveries = 0
            for _, pipe in clients:
                pipe.send("stop")
                if not pipe.poll(60):
                    raise RuntimeError("the load client did not answer")
                deliveries += pipe.recv()[1]
        finally:
            for worker, pipe in clients:
                with contextlib.suppress(OSError):
                    pipe.send("quit")
                worker.join(5)
                if worker.is_alive():
                    worker.kill()
    d = {k: b[k] - a[k] for k in a}
    work = d["inputs"] + d["builds"]
    return {"name": name, "frames_s": d["frames"] / d["t"], "events_s": d["events"] / d["t"],
            "us_frame": d["cpu"] / d["frames"] * 1e6 if d["frames"] else math.nan,
            "cpu": d["cpu"] / d["t"] * 100, "deliveries_s": deliveries / d["t"],
            "derived_us": d["busy"] / work * 1e6 if work else math.nan,
            "derived_inputs_s": work / d["t"], "derived_share": d["busy"] / d["cpu"] * 100}


def daemon_part(args: argparse.Namespace, workdir: Path, against: Path | None) -> str:
    names = [n for n in CONFIGS if n in args.configs.split(",")] if args.configs else list(CONFIGS)
    trees = [(name, REPO) for name in names]
    if against is not None:
        trees = [(label, tree) for name in names
                 for label, tree in ((name, REPO), (f"{name} @ {args.against}", against))]
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in trees}
    for _ in range(args.rounds):
        for label, tree in trees:
            results[label].append(measure(label.split(" @ ")[0], args, workdir, tree))
    trades_per_frame = 107 / 9946  # the capture's (it loops)
    lines = ["| configuration | frames/s | daemon CPU % | us CPU per frame (median; each run) | "
             "deliveries/s | derived inputs/s | derived us per input | derived share of CPU % |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    del trades_per_frame
    for name, rows in results.items():
        us = statistics.median(r["us_frame"] for r in rows)
        each = ", ".join(f"{r['us_frame']:.2f}" for r in rows)
        derived = statistics.median(r["derived_us"] for r in rows)
        lines.append(
            f"| {name} | {statistics.median(r['frames_s'] for r in rows):,.0f} | "
            f"{statistics.median(r['cpu'] for r in rows):.0f} | {us:.2f} ({each}) | "
            f"{statistics.median(r['deliveries_s'] for r in rows):,.0f} | "
            f"{statistics.median(r['derived_inputs_s'] for r in rows):,.0f} | "
            + (f"{derived:.2f} | " if not math.isnan(derived) else "| ")
            + f"{statistics.median(r['derived_share'] for r in rows):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="alone,task,daemon")
    parser.add_argument("--task-loops", type=int, default=10)
    parser.add_argument("--task-gap", type=float, default=0.5, help="ms between inputs in (c)")
    parser.add_argument("--captures", type=Path, default=REPO / "tests" / "captures")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--configs", default="", help="(b)'s configurations, comma-separated")
    parser.add_argument("--against", default="", help="a git revision to measure too")
    parser.add_argument("--tree", type=Path, help="(a) on the daemon package of this tree")
    args = parser.parse_args(argv)
    if args.tree is not None:
        sys.path.insert(0, str(args.tree))
    parts = set(args.parts.split(","))
    print(f"# benchmarks/derived.py on {platform.node()}, Python {platform.python_version()}, "
          f"`{' '.join(['python', 'benchmarks/derived.py', *(argv or sys.argv[1:])])}`\n")
    with contextlib.ExitStack() as stack:
        against = stack.enter_context(revision(args.against)) if args.against else None
        if "alone" in parts:
            print("## (a) the computations alone\n")
            print(alone(args) + "\n")
            if against is not None:
                print(f"## (a) the computations alone @ {args.against}\n")
                print(subprocess.run(
                    [sys.executable, __file__, "--parts", "alone", "--tree", str(against),
                     "--repeat", str(args.repeat), "--captures", str(args.captures)],
                    cwd=against, check=True, capture_output=True, text=True,
                ).stdout.split("## (a) the computations alone\n", 1)[-1])
        if "task" in parts:
            print("## (c) the derived tasks on a dispatcher\n")
            print(task_part(args) + "\n")
            if against is not None:
                print(f"## (c) the derived tasks on a dispatcher @ {args.against}\n")
                print(subprocess.run(
                    [sys.executable, __file__, "--parts", "task", "--tree", str(against),
                     "--repeat", str(args.repeat), "--captures", str(args.captures),
                     "--task-loops", str(args.task_loops), "--task-gap", str(args.task_gap)],
                    cwd=against, check=True, capture_output=True, text=True,
                ).stdout.split("## (c) the derived tasks on a dispatcher\n", 1)[-1])
        if "daemon" in parts:
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            print("## (b) in the replay daemon\n")
            print(daemon_part(args, Path(tmp), against) + "\n")


@contextlib.contextmanager
def revision(rev: str) -> Iterator[Path]:
    """A copy of this repository at git revision ``rev`` (``git archive``), removed
    afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", rev], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp)


if __name__ == "__main__":
    main()
