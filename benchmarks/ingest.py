"""Ingest benchmark (issue 17): what tickwire spends per exchange frame before fan-out.

    python benchmarks/ingest.py                       # everything, about 2 minutes
    python benchmarks/ingest.py --parts protocols     # (a) only
    python benchmarks/ingest.py --parts daemon,profile --clients 0 --seconds 5
    python benchmarks/ingest.py --no-cryptofeed       # (a) without the cryptofeed column
    python benchmarks/ingest.py --markdown out.md     # also write the tables to a file

It is a script, not a test: it asserts nothing and prints tables. The captures are
the vendored ones (``tests/captures``; ``--captures`` or ``$TICKWIRE_CAPTURES``
for another folder with the same files). Three parts (``--parts``):

**(a) protocols**: each exchange protocol alone, no socket, on each recorded
connection: ``BINANCE.ws.1.0`` (with the ``BINANCE.http.0.0`` depth snapshots),
``COINBASE.ws.28.0``, and Kraken's three connections ``KRAKEN.ws.50.0`` (book,
depth 1000, CRC32 checksums), ``.48.0`` (trades), ``.49.0`` (ticker), then the
three together. Per case, microseconds per received frame, best of ``--repeat``
passes (a pass replays the connection, a new protocol object each time, until
``--min-pass-seconds`` were spent; timed: the frames, with ``on_open`` and the
snapshots it asks for; not timed: making the object), taken in ``--repeat``
rounds that alternate the readers (a round: one pass of every case by tickwire
and by ``orjson.loads``, then one by cryptofeed), so that on a shared machine
both sides meet the same moments, for three readers of the
same frames (``(recv_ts, text)`` as recorded, ``str``, in order; Binance's
``kline_1m`` frames, a stream neither side subscribes to live, are left out):

- ``orjson.loads`` of each frame: a floor, the JSON parse alone;
- tickwire: the public protocol contract (``daemon.exchanges.base``):
  ``feed.on_open(opened)``, then ``feed.on_message(text, recv_ts)`` per frame
  with its outputs looked at once as a collector would (a ``FetchSnapshot``,
  Binance's, answered at once with the recorded body through
  ``feed.on_snapshot``); the counters come from ``feed.statistics()``;
- cryptofeed 2.3.2 (the last release that reads the 2021 Coinbase and Kraken
  formats), in a virtual environment of its own that this script makes or reuses
  (``--cryptofeed-venv``, default ``.bench/cryptofeed-venv``, git-ignored:
  ``python -m venv`` then ``pip install cryptofeed==2.3.2``, about 30 s once; it
  builds a C extension, so it needs a C compiler, and its pinned aiohttp 3.8.4
  has wheels up to Python 3.11: ``--cryptofeed-python`` picks the interpreter). The
  frames go to ``benchmarks/ingest_cryptofeed.py`` run by that venv's Python,
  which feeds them to cryptofeed's own ``Binance``/``Coinbase``/``Kraken``
  classes' ``message_handler(msg, conn, timestamp)`` (see that file). The ratio
  is tickwire's us per frame over cryptofeed's: below 1, tickwire is faster.

Binance's 263 frames come with four REST snapshots of 1,000 levels a side, which
cost more than all the frames: the case runs again with the snapshots loaded
before the clock starts ("snapshots not timed", both sides), the steady state.

Both sides do the same job on the same frames: parse, keep every L2 book (Kraken
depth 1000, Binance from the REST snapshot then ``U``/``u``), verify Kraken's
checksums, produce trades, tickers and book deltas. What differs (the "work done"
table shows the counts of both):

- tickwire checks more: decimal strings, Coinbase sequence numbers per product
  and channel (duplicates and reordering dropped), trade ids (gaps, duplicates),
  and a Coinbase update that crosses the book resyncs it. cryptofeed's own check
  of that, ``cross_check=True``, is off by default: its Coinbase case runs as a
  user runs it (the ratio issue 17's target reads), and again with that check on
  (a row of its own). tickwire cuts Kraken books to the subscribed depth after
  every message and makes ``FeedState`` events; its events are immutable
  ``attrs`` objects with prices as strings;
- cryptofeed keeps prices and sizes as ``Decimal`` (its JSON parser makes them)
  in its ``order_book`` C extension, hands its one mutable ``OrderBook`` (with
  the delta) to the book callback rather than an event per update, and verifies a
  Kraken checksum only when it is in the update's first object (2.3.2 reads
  ``msg[0]['c']``; an update of asks and bids in two objects carries it in the
  second), so it checks fewer of them: the table counts both;
- cryptofeed's callbacks here only count; tickwire's outputs are looked at once.

**(b) daemon**: the daemon end to end at full speed, as fanout.py starts it:
``python -m daemon.cli replay COINBASE.0 COINBASE.ws.28.0 --loop --speed max
--listen 127.0.0.1:PORT --config TMP/max.toml --emulators process`` (the
emulator in a child process, as the exchange is elsewhere; the config quiets the
log, puts the admin socket in TMP and raises ``client_queue``), for each N in
``--clients`` (default 0 and 1; a client subscribes to ``trades``, ``book``,
``ticker``, ``system`` on ``*`` and reads everything: fanout.py's load client, C
when ``cc`` is found). After ``--warmup`` seconds, over ``--seconds``: exchange
frames the daemon received (its own counter, the feeds' ``messages`` in the
admin socket's ``{"op":"status"}``, as ``tickwire status --json`` shows it) per
second, events the dispatcher published per second, the daemon process's CPU
(``/proc/PID/stat``, user + system, 100 % = one core) and CPU microseconds per
exchange frame, the client's deliveries per second and sequence gaps, and, as
fanout.py does: "wait %" (the daemon's main thread runnable but waiting for a
CPU, ``/proc/PID/schedstat``), the emulator's and the client's CPU, and "other
CPU" (the rest of the machine, from ``/proc/stat``, steal time included: other
engineers' test suites; well above 0 means the run was disturbed).

**(c) profile**: where the daemon's time goes, in the same daemon right after
(b)'s window: ``py-spy record`` (the ``bench`` extra installs it) attached to the
daemon's process for ``--profile-seconds``: samples of the main thread's Python
stack (where trio runs every task; idle waits are not sampled, a wait for a CPU
is), summed by file and by function: own time (the innermost Python frame; C
calls such as ``orjson.loads`` count for the function that calls them) and
cumulative (every sample with the function on the stack, leaving out what is
under nearly everything, ``trio.run``, and wrappers that spend nearly all their
time in one callee, a supervisor's loop). Without py-spy (or with ``--profiler
cprofile``) the daemon is started again under ``python -m cProfile`` for that
long instead (which slows it down about twofold: shares, not times).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

CRYPTOFEED = "cryptofeed==2.3.2"
HELPER = HERE / "ingest_cryptofeed.py"
COINBASE_FILES = ("COINBASE.0", "COINBASE.ws.28.0")
#: the counters of ``FeedStatistics`` the "work done" table shows for tickwire
TICKWIRE_COUNTS = ("trades", "tickers", "snapshots", "book_updates", "checksum_ok",
                   "checksum_mismatch", "resyncs", "malformed")
#: (c): a function on the stack of this share of the samples or more is left out of
#: the cumulative table (the process's entry, ``trio.run``, the run loop)
EVERYWHERE = 0.9
#: (c): ... and so is a function whose time goes through one callee for this share
WRAPPER = 0.97
#: the name suffix of the case cryptofeed runs again with ``cross_check=True``
CROSS_CHECK = ", cryptofeed cross_check=True"


def _fanout() -> Any:
    """fanout.py, for its load client and its /proc readers."""
    return importlib.import_module("fanout")


# -- (a) the protocols alone ------------------------------------------------------------


class Case:
    """One recorded connection and how to build tickwire's protocol for it."""

    def __init__(self, name: str, capture: str, exchange: str, channels: list[str],
                 natives: list[str], markets_body: str, frames: list[tuple[float, str]],
                 opened: float, new_feed: Callable[[], Any],
                 snapshots: dict[str, str] | None = None, depth: int | None = None) -> None:
        self.name, self.capture, self.exchange = name, capture, exchange
        self.channels, self.natives, self.markets_body = channels, natives, markets_body
        self.frames, self.opened, self.new_feed = frames, opened, new_feed
        self.snapshots = snapshots or {}  # tickwire symbol -> REST body (Binance)
        self.native_snapshots: dict[str, str] = {}  # exchange symbol -> body (cryptofeed)
        self.depth = depth
        #: Binance: the REST snapshots loaded before the clock starts (steady state)
        self.untimed_snapshots = False

    def spec(self, cross_check: bool = False) -> dict[str, Any]:
        """What the cryptofeed helper gets (plain JSON)."""
        return {"name": self.name + (CROSS_CHECK if cross_check else ""),
                "exchange": self.exchange, "channels": self.channels,
                "symbols": self.natives, "markets": self.markets_body, "depth": self.depth,
                "snapshots": self.native_snapshots, "messages": self.frames,
                "cross_check": cross_check, "untimed_snapshots": self.untimed_snapshots}


def load_cases(captures: Path) -> list[Case]:
    from daemon.exchanges import binance, coinbase, kraken
    from daemon.replay.capture import read_capture

    cases = []
    # Binance: the combined stream names its streams in the URL
    markets_body = read_capture(captures / "BINANCE.0").rest[0].body
    markets = binance.parse_markets(markets_body)
    (conn,) = read_capture(captures / "BINANCE.ws.1.0").connections
    streams = parse_qs(urlsplit(conn.url).query)["streams"][0].split("/")
    kinds = {"depth": "book", "bookTicker": "ticker", "aggTrade": "trades"}
    natives = list(dict.fromkeys(s.split("@")[0].upper() for s in streams))
    channels = list(dict.fromkeys(kinds[k] for s in streams
                                  if (k := s.split("@")[1]) in kinds))
    frames = [(r.ts, r.text) for r in conn.received
              if orjson.loads(r.text)["stream"].split("@")[1] in kinds]
    case = Case("binance", "BINANCE.ws.1.0 (+ .http.0.0)", "binance", channels, natives,
                markets_body, frames, conn.opened,
                partial(binance.BinanceFeed, [markets[n] for n in natives], channels, markets))
    for response in read_capture(captures / "BINANCE.http.0.0").rest:
        native = parse_qs(urlsplit(response.url).query)["symbol"][0]
        case.native_snapshots[native] = response.body
        case.snapshots[markets[native]] = response.body
    cases.append(case)
    steady = copy.copy(case)
    steady.name, steady.untimed_snapshots = "binance, snapshots not timed", True
    cases.append(steady)

    # Coinbase: one connection, a subscribe frame per channel
    markets_body = read_capture(captures / "COINBASE.0").rest[0].body
    markets = coinbase.parse_markets(markets_body)
    (conn,) = read_capture(captures / "COINBASE.ws.28.0").connections
    by_name = {"level2": "book", "level2_batch": "book", "ticker": "ticker", "matches": "trades"}
    natives, channels = [], []
    for _, text in conn.sent:
        sent = orjson.loads(text)
        natives += [p for p in sent["product_ids"] if p not in natives]
        channels += [by_name[c] for c in sent["channels"] if by_name[c] not in channels]
    cases.append(Case("coinbase", "COINBASE.ws.28.0", "coinbase", channels, natives,
                      markets_body, [(r.ts, r.text) for r in conn.received], conn.opened,
                      partial(coinbase.CoinbaseFeed, [markets[n] for n in natives], channels,
                              markets)))

    # Kraken: a connection per channel
    markets_body = read_capture(captures / "KRAKEN.0").rest[0].body
    markets = kraken.parse_markets(markets_body)
    by_name = {"book": "book", "trade": "trades", "ticker": "ticker"}
    for number, label in (("50", "book"), ("48", "trades"), ("49", "ticker")):
        (conn,) = read_capture(captures / f"KRAKEN.ws.{number}.0").connections
        sent = orjson.loads(conn.sent[0][1])
        natives = sent["pair"]
        channels = [by_name[sent["subscription"]["name"]]]
        depth = sent["subscription"].get("depth")
        cases.append(Case(f"kraken {label}", f"KRAKEN.ws.{number}.0", "kraken", channels,
                          natives, markets_body, [(r.ts, r.text) for r in conn.received],
                          conn.opened,
                          partial(kraken.KrakenFeed, [markets[n] for n in natives], channels,
                                  markets, **({"depth": depth} if depth else {}))))
    return cases


def tickwire_replay(case: Case, feed: Any = None) -> tuple[float, Any]:
    """One replay on a new protocol object (or on ``feed``, made by
    ``case.new_feed``): seconds spent, and its statistics."""
    from daemon.exchanges.base import FetchSnapshot

    if feed is None:
        feed = case.new_feed()
    snapshots = case.snapshots

    def answer(outputs: Any, ts: float) -> None:
        for output in outputs:
            if output.__class__ is FetchSnapshot:
                answer(feed.on_snapshot(output.symbol, snapshots[output.symbol], ts), ts)

    on_message = feed.on_message
    clock = time.perf_counter
    if case.untimed_snapshots:
        answer(feed.on_open(case.opened), case.opened)
    start = clock()
    if not case.untimed_snapshots:
        answer(feed.on_open(case.opened), case.opened)
    for ts, text in case.frames:
        for output in on_message(text, ts):
            if output.__class__ is FetchSnapshot:
                answer([output], ts)
    elapsed = clock() - start
    return elapsed, feed.statistics()


def orjson_replay(case: Case) -> tuple[float, None]:
    loads = orjson.loads
    clock = time.perf_counter
    start = clock()
    for _, text in case.frames:
        loads(text)
    return clock() - start, None


def best_of(replay: Callable[[Case], tuple[float, Any]], case: Case, repeat: int,
            min_seconds: float) -> tuple[float, list[float], Any]:
    """us per frame: the best of ``repeat`` passes, each replaying until it has
    spent ``min_seconds``; the passes; the last replay's result."""
    passes, result = [], None
    for _ in range(repeat):
        gc.collect()
        spent, replays = 0.0, 0
        while spent < min_seconds or replays == 0:
            elapsed, result = replay(case)
            spent, replays = spent + elapsed, replays + 1
        passes.append(spent / (replays * len(case.frames)) * 1e6)
    return min(passes), passes, result


def cryptofeed_python(args: argparse.Namespace) -> Path | None:
    """The cryptofeed venv's interpreter, made (or completed) if need be; None, with
    a note, when it cannot be had."""
    venv: Path = args.cryptofeed_venv
    python = venv / "bin" / "python"
    check = [str(python), "-c", "from importlib.metadata import version; "
             "import cryptofeed.exchanges; print(version('cryptofeed'))"]
    found = subprocess.run(check, capture_output=True, text=True, check=False) \
        if python.exists() else None
    if found is not None and found.returncode == 0 and found.stdout.strip() == "2.3.2":
        return python
    log = venv.parent / "cryptofeed-install.log"
    print(f"making {venv} ({CRYPTOFEED}; log: {log}) ...", flush=True)
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            if not python.exists():
                subprocess.run([args.cryptofeed_python, "-m", "venv", str(venv)], check=True,
                               stdout=out, stderr=subprocess.STDOUT)
            subprocess.run([str(python), "-m", "pip", "install", CRYPTOFEED], check=True,
                           stdout=out, stderr=subprocess.STDOUT)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"note: no cryptofeed column: installing {CRYPTOFEED} failed ({exc}); "
              f"see {log}", flush=True)
        return None
    return python


def run_cryptofeed(python: Path, cases: list[Case], args: argparse.Namespace,
                   workdir: Path, repeat: int) -> dict[str, Any] | None:
    spec = workdir / "cases.json"
    spec.write_bytes(orjson.dumps({"repeat": repeat, "min_seconds": args.min_pass_seconds,
                                   "cases": [c.spec() for c in cases] + [
                                       c.spec(cross_check=True) for c in cases
                                       if c.exchange == "coinbase"]}))
    done = subprocess.run([str(python), str(HELPER), str(spec)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        print(f"note: the cryptofeed helper failed:\n{done.stderr[-3000:]}", flush=True)
        return None
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def protocols(args: argparse.Namespace, workdir: Path) -> tuple[str, dict[str, Any]]:
    """(a): ``--repeat`` rounds, each one pass of every case by tickwire and
    ``orjson.loads`` then one by cryptofeed (its helper run once per round), so
    that both sides meet the same moments of a shared machine; per case and
    side, the best pass."""
    cases = load_cases(args.captures)
    python = None if args.no_cryptofeed else cryptofeed_python(args)
    busy0, own0, t0 = machine_busy_seconds(), own_cpu_seconds(), time.monotonic()
    rows: dict[str, dict[str, Any]] = {
        case.name: {"passes": [], "orjson_passes": []} for case in cases}
    crypto: dict[str, Any] | None = None
    for _ in range(args.repeat):
        for case in cases:
            _, passes, stats = best_of(tickwire_replay, case, 1, args.min_pass_seconds)
            _, floors, _ = best_of(orjson_replay, case, 1, args.min_pass_seconds)
            row = rows[case.name]
            row["passes"] += passes
            row["orjson_passes"] += floors
            row["stats"] = stats
        got = run_cryptofeed(python, cases, args, workdir, repeat=1) if python else None
        if got is None:
            python, crypto = None, None  # no cryptofeed column (the note says why)
            continue
        if crypto is None:
            crypto = got
            continue
        for name, result in got["results"].items():
            kept = crypto["results"][name]
            kept["passes"] += result["passes"]
            kept["us_per_message"] = min(kept["passes"])
    for case in cases:
        row = rows[case.name]
        row["tickwire"], row["orjson"] = min(row["passes"]), min(row["orjson_passes"])
        print(f"  {case.name}: tickwire {row['tickwire']:.2f} us/frame, "
              f"orjson.loads {row['orjson']:.2f}", flush=True)
    window = time.monotonic() - t0
    other = max(0.0, (machine_busy_seconds() - busy0) - (own_cpu_seconds() - own0)) / window * 100
    return report_protocols(cases, rows, crypto, other, window), {"rows": rows, "crypto": crypto}


def _combined(cases: list[Case], rows: dict[str, Any], crypto: dict[str, Any] | None,
              prefix: str) -> dict[str, float | None]:
    """The cases named ``prefix ...`` as one: total time over total frames."""
    chosen = [c for c in cases if c.name.startswith(prefix + " ")]
    frames = sum(len(c.frames) for c in chosen)
    out: dict[str, float | None] = {}
    for key in ("tickwire", "orjson"):
        out[key] = sum(rows[c.name][key] * len(c.frames) for c in chosen) / frames
    results = (crypto or {}).get("results", {})
    if all(c.name in results for c in chosen) and chosen:
        out["cryptofeed"] = sum(results[c.name]["us_per_message"] * len(c.frames)
                                for c in chosen) / frames
    else:
        out["cryptofeed"] = None
    out["frames"] = frames
    return out


def report_protocols(cases: list[Case], rows: dict[str, Any], crypto: dict[str, Any] | None,
                     other_cpu: float, window: float) -> str:
    results = (crypto or {}).get("results", {})
    version = (crypto or {}).get("cryptofeed", "-")
    head = ("| case | capture | frames | orjson.loads us/frame | tickwire us/frame | "
            f"cryptofeed {version} us/frame | tickwire / cryptofeed | tickwire / orjson |")
    lines = [head, "|" + " --- |" * 8]

    def line(name: str, capture: str, frames: int, floor: float, ours: float,
             theirs: float | None) -> str:
        ratio = f"{ours / theirs:.2f}x" if theirs else "-"
        return (f"| {name} | {capture} | {frames:,} | {floor:.2f} | {ours:.2f} | "
                f"{'-' if theirs is None else format(theirs, '.2f')} | {ratio} | "
                f"{ours / floor:.1f}x |")

    for case in cases:
        row = rows[case.name]
        theirs = results.get(case.name, {}).get("us_per_message")
        lines.append(line(case.name, f"`{case.capture}`", len(case.frames), row["orjson"],
                          row["tickwire"], theirs))
        if case.name + CROSS_CHECK in results:
            lines.append(line(case.name + CROSS_CHECK, f"`{case.capture}`", len(case.frames),
                              row["orjson"], row["tickwire"],
                              results[case.name + CROSS_CHECK]["us_per_message"]))
    kraken = _combined(cases, rows, crypto, "kraken")
    lines.append(line("kraken (all three)", "`KRAKEN.ws.48-50.0`", int(kraken["frames"] or 0),
                      kraken["orjson"] or 0.0, kraken["tickwire"] or 0.0, kraken["cryptofeed"]))

    work = ["| case | side | " + " | ".join(TICKWIRE_COUNTS) + " |", "|" + " --- |" * 10]
    for case in cases:
        stats = rows[case.name]["stats"]
        work.append(f"| {case.name} | tickwire | " + " | ".join(
            str(getattr(stats, name, "-")) for name in TICKWIRE_COUNTS) + " |")
        counts = results.get(case.name, {}).get("counts")
        if counts is not None:
            mapped = {"trades": counts.get("trades", 0), "tickers": counts.get("tickers", 0),
                      "snapshots": counts.get("book_snapshots", 0),
                      "book_updates": counts.get("book_updates", 0),
                      "checksum_ok": counts.get("checksums_verified", 0),
                      "checksum_mismatch": 0, "resyncs": "-", "malformed": "-"}
            work.append(f"| {case.name} | cryptofeed | " + " | ".join(
                str(mapped[name]) for name in TICKWIRE_COUNTS) + " |")
    spread = ["| case | tickwire passes us/frame | cryptofeed passes us/frame |",
              "| --- | --- | --- |"]
    for case in cases:
        theirs = results.get(case.name, {}).get("passes")
        spread.append(f"| {case.name} | {' '.join(f'{p:.2f}' for p in rows[case.name]['passes'])}"
                      f" | {' '.join(f'{p:.2f}' for p in theirs) if theirs else '-'} |")
    note = ("" if crypto else "\n\n(no cryptofeed column: see the note above)")
    return ("Protocols alone, best of the passes (other CPU during this part: "
            f"{other_cpu:.0f} %, {window:.0f} s):\n\n" + "\n".join(lines) + note
            + "\n\nWork done (tickwire: `feed.statistics()`; cryptofeed: its callbacks; "
            "cryptofeed's checksum_ok: the updates whose checksum it verified, where "
            "a mismatch would have raised BadChecksum):\n\n" + "\n".join(work)
            + "\n\nEvery pass:\n\n" + "\n".join(spread))


# -- (b) the daemon end to end, (c) its profile -------------------------------------------


def machine_busy_seconds() -> float:
    return float(_fanout().machine_busy_seconds())


def own_cpu_seconds() -> float:
    """This process and its waited-for children (the cryptofeed helper)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def admin_status(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """``{"op":"status"}`` on the admin socket (what ``tickwire status --json`` prints)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(b'{"op":"status","id":1}\n')
        buffer = b""
        while b"\n" not in buffer:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the daemon closed the admin connection")
            buffer += chunk
    reply: dict[str, Any] = orjson.loads(buffer.split(b"\n", 1)[0])
    return reply


def daemon_counters(path: Path) -> tuple[int, int]:
    """Exchange frames received (every feed's ``messages``) and events published
    (the dispatcher's ``events``), from the daemon's status."""
    status = admin_status(path)
    frames = events = 0
    for component in status.get("components", []):
        figures = component.get("figures") or {}
        if component.get("kind") == "feed":
            frames += int(figures.get("messages") or 0)
        elif component.get("kind") == "dispatcher":
            events += int(figures.get("events") or 0)
    return frames, events


@contextlib.contextmanager
def daemon(args: argparse.Namespace, workdir: Path,
           wrapper: list[str] | None = None) -> Iterator[tuple[subprocess.Popen[bytes], int, Path,
                                                               list[str]]]:
    """The replay daemon at full speed (module doc, (b)); yields the process, its
    port, its admin socket and its command."""
    fanout = _fanout()
    port = fanout.free_port()
    config = fanout.tickwire_config(workdir, True)
    admin = workdir / "admin.sock"
    files = [str(args.captures / name) for name in COINBASE_FILES]
    command = [sys.executable, *(wrapper or []), "-m", "daemon.cli", "replay", *files, "--loop",
               "--speed", "max", "--listen", f"127.0.0.1:{port}", "--config", str(config),
               "--emulators", "process"]
    log = (workdir / "daemon.log").open("wb")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:  # up when the feed counts frames
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode}: "
                                   f"{(workdir / 'daemon.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError, ValueError):
                if daemon_counters(admin)[0] > 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start receiving frames within 60 s")
            time.sleep(0.2)
        shown = shlex.join(["python", *command[1:]]).replace(str(port), "PORT")
        yield proc, port, admin, [shown.replace(str(workdir), "TMP").replace(
            str(args.captures) + "/", "")]
    finally:
        fanout.stop(proc)
        log.close()


def open_clients(n: int, port: int, args: argparse.Namespace,
                 workdir: Path) -> list[tuple[Any, Any]]:
    """``n`` connections subscribed to everything, in one load client process
    (fanout.py's), once they have caught up."""
    if n == 0:
        return []
    fanout = _fanout()
    if args.client == "c":
        worker = fanout.CClient(fanout.c_client_binary(workdir), port, n, True)
        clients = [(worker, worker)]
    else:
        import multiprocessing as mp

        parent, child = mp.get_context("fork").Pipe()
        process = mp.get_context("fork").Process(target=fanout.client_process,
                                                 args=(port, n, True, child), daemon=True)
        process.start()
        clients = [(process, parent)]
    for expected in ("connected", "ready"):
        for _, pipe in clients:
            if not pipe.poll(120):
                raise RuntimeError(f"the load client was not {expected} in time")
            status = pipe.recv()
            if status[0] != expected:
                raise RuntimeError(f"load client: {status[1]}")
        if expected == "connected":
            for _, pipe in clients:
                pipe.send("subscribe")
    return clients


def close_clients(clients: list[tuple[Any, Any]]) -> None:
    for worker, pipe in clients:
        with contextlib.suppress(OSError):
            pipe.send("quit")
        worker.join(5)
        if worker.is_alive():
            worker.kill()


def measure_daemon(n: int, args: argparse.Namespace, workdir: Path,
                   profile: bool) -> dict[str, Any]:
    fanout = _fanout()
    with daemon(args, workdir) as (proc, port, admin, command):
        clients = open_clients(n, port, args, workdir)
        try:
            time.sleep(args.warmup)
            pid = proc.pid
            emulators = fanout.child_pids(pid)
            client_pids = [worker.pid for worker, _ in clients]

            def sample() -> dict[str, float]:
                frames, events = daemon_counters(admin)
                return {"t": time.monotonic(), "frames": frames, "events": events,
                        "cpu": fanout.cpu_seconds(pid), "wait": fanout.runqueue_seconds(pid),
                        "emulator": sum(map(fanout.cpu_seconds, emulators)),
                        "clients": sum(map(fanout.cpu_seconds, client_pids)),
                        "busy": fanout.machine_busy_seconds()}

            for _, pipe in clients:
                pipe.send("start")
            a = sample()
            time.sleep(args.seconds)
            b = sample()
            for _, pipe in clients:
                pipe.send("stop")
            deliveries = gaps = closed = 0
            for _, pipe in clients:
                if not pipe.poll(60):
                    raise RuntimeError("the load client did not answer")
                _, d, g, _, c, _ = pipe.recv()
                deliveries, gaps, closed = deliveries + d, gaps + g, closed + c
            d = {key: b[key] - a[key] for key in a}
            window = d["t"]
            row = {
                "clients": n, "frames_s": d["frames"] / window, "events_s": d["events"] / window,
                "cpu": d["cpu"] / window * 100,
                "us_frame": d["cpu"] / d["frames"] * 1e6 if d["frames"] else float("nan"),
                "deliveries_s": deliveries / window if clients else None,
                "gaps": gaps if clients else None, "closed": closed if clients else None,
                "wait": d["wait"] / window * 100, "emulator_cpu": d["emulator"] / window * 100,
                "client_cpu": d["clients"] / window * 100 if clients else None,
                "other_cpu": max(0.0, d["busy"] - d["cpu"] - d["emulator"] - d["clients"])
                / window * 100,
                "window": window, "command": command[0], "profile": None,
            }
            if profile and args.profiler == "py-spy":
                row["profile"] = pyspy_profile(proc.pid, args, workdir / f"pyspy-{n}.txt")
        finally:
            close_clients(clients)
    if profile and args.profiler == "cprofile":
        row["profile"] = cprofile_profile(n, args, workdir)
    return row


def _pyspy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def pyspy_profile(pid: int, args: argparse.Namespace, out: Path) -> dict[str, Any] | None:
    binary = _pyspy()
    assert binary is not None
    command = [binary, "record", "--pid", str(pid), "--duration", f"{args.profile_seconds:g}",
               "--rate", "250", "--format", "raw", "--function", "--threads", "--output",
               str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.exists():
        print(f"note: py-spy failed ({done.returncode}): {done.stderr.strip()[-500:]}",
              flush=True)
        return None
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    files: Counter[str] = Counter()
    through: defaultdict[str, Counter[str]] = defaultdict(Counter)
    total = others = 0
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, *frames = [f for f in stack.split(";") if f.strip()]
        if not thread.endswith(": MainThread"):  # trio's idle worker threads
            others += count
            continue
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        files[_file_of(frames[-1])] += count
        for frame in set(frames):
            cumulative[frame] += count
        for outer, inner in set(zip(frames, frames[1:], strict=False)):
            through[outer][inner] += count
    # a frame whose time nearly all goes through one callee is a wrapper (a
    # supervisor's retry loop, a nursery): the cumulative table shows the callee
    wrappers = {frame for frame, callees in through.items()
                if callees and max(callees.values()) >= WRAPPER * cumulative[frame]}
    for frame in wrappers:
        del cumulative[frame]
    return {"tool": "py-spy: samples of the main thread, where trio runs every task, when "
                    "not idle (runnable but waiting for a CPU counts)",
            "total": total, "own": own, "cumulative": cumulative, "files": files,
            "others": others,
            "command": shlex.join(["py-spy", *command[1:3], "PID", *command[4:-1], "OUT"])}


def _file_of(frame: str) -> str:
    """``function (path/file.py:12)`` -> ``path/file.py``."""
    inside = frame.rpartition("(")[2].rstrip(")")
    return inside.rpartition(":")[0] or inside


def _short(frame: str) -> str:
    """``function (…/site-packages/trio/_core/_run.py:12)`` -> ``trio/_core/_run.py:12
    function``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{where} {name}"


def cprofile_profile(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any] | None:
    import pstats

    out = workdir / f"cprofile-{n}.prof"
    with daemon(args, workdir, ["-m", "cProfile", "-o", str(out)]) as (_, port, _, _):
        clients = open_clients(n, port, args, workdir)
        try:
            time.sleep(args.profile_seconds)
        finally:
            close_clients(clients)
    if not out.exists():
        print("note: cProfile wrote no profile", flush=True)
        return None
    stats = pstats.Stats(str(out))
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    files: Counter[str] = Counter()
    for (path, line, name), (_, _, tottime, cumtime, _) in stats.stats.items():
        key = f"{name} ({path}:{line})"
        own[key] += int(tottime * 1e6)
        cumulative[key] += int(cumtime * 1e6)
        files[path] += int(tottime * 1e6)
    return {"tool": "cProfile, microseconds under the profiler, start-up and idle epoll "
                    "waits included", "total": sum(own.values()),
            "own": own, "cumulative": cumulative, "files": files,
            "command": "python -m cProfile -o OUT -m daemon.cli replay ... (as above)"}


def daemon_table(rows: list[dict[str, Any]]) -> list[str]:
    head = ("| clients | exchange frames/s | daemon CPU % | CPU us/frame | events/s | "
            "deliveries/s | gaps | wait % | emulator CPU % | client CPU % | other CPU % |")
    lines = [head, "|" + " --- |" * 11]
    for r in rows:
        def opt(value: Any, spec: str) -> str:
            return "-" if value is None else format(value, spec)
        lines.append(
            f"| {r['clients']} | {r['frames_s']:,.0f} | {r['cpu']:.0f} | {r['us_frame']:.1f} | "
            f"{r['events_s']:,.0f} | {opt(r['deliveries_s'], ',.0f')} | {opt(r['gaps'], 'd')} | "
            f"{r['wait']:.1f} | {r['emulator_cpu']:.0f} | {opt(r['client_cpu'], '.0f')} | "
            f"{r['other_cpu']:.0f} |")
    return lines


def report_daemon(rows: list[dict[str, Any]], top: int) -> str:
    lines = daemon_table(rows)
    parts = [f"Daemon end to end, {rows[0]['window']:.0f} s windows:\n\n" + "\n".join(lines)]
    profiled = [r for r in rows if r["profile"]]
    if profiled:
        parts.append(report_profile(profiled, top))
    return "\n\n".join(parts)


def report_profile(rows: list[dict[str, Any]], top: int) -> str:
    tool = rows[0]["profile"]["tool"]
    names = [f"{r['clients']} client{'s' if r['clients'] != 1 else ''}" for r in rows]

    def table(title: str, key: str, label: Callable[[str], str], n: int) -> str:
        ranked: Counter[str] = Counter()
        for r in rows:
            p = r["profile"]
            for k, v in p[key].items():
                ranked[k] = max(ranked[k], v / p["total"])
        if key == "cumulative":  # not the frames under everything (main, trio.run, ...)
            ranked = Counter({k: v for k, v in ranked.items() if v < EVERYWHERE})
        head = f"| {title} | " + " | ".join(f"% ({name})" for name in names) + " |"
        lines = [head, "|" + " --- |" * (1 + len(rows))]
        for k, _ in ranked.most_common(n):
            shares = [r["profile"][key].get(k, 0) / r["profile"]["total"] * 100 for r in rows]
            lines.append(f"| `{label(k)}` | " + " | ".join(f"{s:.1f}" for s in shares) + " |")
        return "\n".join(lines)

    def file_label(path: str) -> str:
        return _short(f"x ({path}:0)").rsplit(":", 1)[0]

    samples = ", ".join(
        f"{name}: {r['profile']['total']:,}"
        + (f" (+ {r['profile']['others']:,} in other threads, left out)"
           if r["profile"].get("others") else "")
        for name, r in zip(names, rows, strict=True))
    return "\n\n".join([
        f"Profile of the daemon's process ({tool}; {samples}; `{rows[0]['profile']['command']}`)."
        " Own time by file:",
        table("file", "files", file_label, top),
        "Own time by function (the innermost Python frame):",
        table("function", "own", _short, top),
        f"Cumulative (the function anywhere on the stack; those in more than "
        f"{EVERYWHERE:.0%} of the samples, such as trio's run loop, and those that spend "
        f"{WRAPPER:.0%} of theirs in one callee, such as a supervisor's loop, left out):",
        table("function", "cumulative", _short, top),
    ])


# -- the report ---------------------------------------------------------------------------


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                      if line.startswith("Model name")), "")
    versions = []
    for name in ("trio", "trio-websocket", "wsproto", "orjson"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version
            versions.append(f"{name} {version(name)}")
    return (f"{os.cpu_count()} CPUs ({model or platform.processor()}), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}; "
            + ", ".join(versions))


def commit() -> str:
    def git(*words: str) -> str:
        done = subprocess.run(["git", *words], cwd=REPO, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "?"
    return head + (" with uncommitted changes" if git("status", "--porcelain", "--", "daemon")
                   else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    default_captures = os.environ.get("TICKWIRE_CAPTURES") or str(REPO / "tests" / "captures")
    parser.add_argument("--captures", type=Path, default=Path(default_captures))
    parser.add_argument("--parts", default="protocols,daemon,profile",
                        help="protocols (a), daemon (b), profile (c), comma separated")
    parser.add_argument("--repeat", type=int, default=5,
                        help="(a): rounds, one pass per case and reader each; the best")
    parser.add_argument("--min-pass-seconds", type=float, default=0.2,
                        help="(a): a pass replays its case until it has spent this long")
    parser.add_argument("--no-cryptofeed", action="store_true",
                        help="(a) without cryptofeed (no venv made)")
    parser.add_argument("--cryptofeed-venv", type=Path, default=REPO / ".bench" / "cryptofeed-venv",
                        help="the virtual environment of cryptofeed 2.3.2 (made if missing)")
    parser.add_argument("--cryptofeed-python", default=sys.executable,
                        help="the interpreter that makes that venv (cryptofeed 2.3.2 pins "
                             "aiohttp 3.8.4, which has wheels up to Python 3.11)")
    parser.add_argument("--clients", default="0,1", help="(b): clients subscribed to everything")
    parser.add_argument("--seconds", type=float, default=10.0, help="(b): measuring window")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="(b): seconds between the first frames (or the client's catching "
                             "up) and the window")
    parser.add_argument("--client", choices=("c", "python"),
                        default="c" if shutil.which("cc") else "python",
                        help="(b): fanout.py's load client, C (compiled with `cc`) or Python")
    parser.add_argument("--profiler", choices=("auto", "py-spy", "cprofile"), default="auto",
                        help="(c): auto is py-spy when installed, else cProfile")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=12, help="(c): rows per profile table")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write the tables to this file")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if args.profiler == "auto":
        args.profiler = "py-spy" if _pyspy() else "cprofile"
    if not (args.captures / "COINBASE.ws.28.0").is_file():
        parser.error(f"no captures in {args.captures} (use --captures)")
    started = time.time()
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        commands = []
        if "protocols" in parts:
            print("(a) protocols ...", flush=True)
            text, _ = protocols(args, workdir)
            sections.append(text)
            venv = args.cryptofeed_venv
            shown = venv.relative_to(REPO) if venv.is_relative_to(REPO) else venv
            commands.append(f"{shown}/bin/python benchmarks/ingest_cryptofeed.py TMP/cases.json")
        if parts & {"daemon", "profile"}:
            rows = []
            for n in [int(x) for x in args.clients.split(",")]:
                print(f"(b) daemon, {n} client(s) ...", flush=True)
                rows.append(measure_daemon(n, args, workdir, "profile" in parts))
                print(daemon_table(rows[-1:])[-1], flush=True)
            sections.append(report_daemon(rows, args.top))
            commands.append(rows[0]["command"])
            commands += [r["profile"]["command"] for r in rows[:1] if r["profile"]]
    command = shlex.join(["python", "benchmarks/ingest.py",
                          *(argv if argv is not None else sys.argv[1:])])
    report = "\n\n".join([
        f"Command: `{command}` ({time.time() - started:.0f} s), commit {commit()}",
        f"Machine: {machine()}",
        *sections,
        "Commands:\n\n" + "\n".join(f"- `{c}`" for c in commands),
    ])
    print()
    print(report)
    if args.markdown:
        args.markdown.write_text(report + "\n")


if __name__ == "__main__":
    main()
