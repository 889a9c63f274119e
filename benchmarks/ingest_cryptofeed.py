"""The cryptofeed side of ``benchmarks/ingest.py``: cryptofeed 2.3.2's own exchange
classes fed recorded frames, without network, timed per message.

Runs inside cryptofeed's virtual environment (``ingest.py`` makes it and runs
this file there; it imports nothing of tickwire, whose dependencies that venv
does not have):

    .bench/cryptofeed-venv/bin/python benchmarks/ingest_cryptofeed.py CASES.json

``CASES.json`` (written by ``ingest.py``) holds, for each case, the exchange, the
channels and exchange symbols subscribed, the REST bodies (the market list; for
Binance the depth snapshots by symbol) and the frames ``(recv_ts, text)`` exactly
as tickwire's protocol gets them. One JSON object goes to stdout: per case the
best pass (us per message) and what cryptofeed produced.

What runs is cryptofeed's own code path for a received frame,
``Feed.message_handler(msg, conn, timestamp)``: ``yapic.json`` parse with
``Decimal`` floats, its exchange's handlers, its ``OrderBook`` (the ``order_book``
C extension) kept per symbol, ``Trade``/``Ticker`` objects, ``book_callback`` and
the callbacks, here ``async`` functions that count. No asyncio loop turns: the
handlers never wait (the REST stub answers at once), so each frame is one
``await`` chain driven to its end by ``coroutine.send(None)``, as tickwire's
protocol is one synchronous call.

- Symbols: ``Symbols.set`` from the recorded market list through the exchange's
  own ``_parse_symbol_data`` (what ``symbol_mapping`` would fetch).
- Binance: the depth snapshot cryptofeed GETs on a symbol's first depth event
  (``http_conn.read``) is answered with the recorded body of that symbol; with
  ``"untimed_snapshots": true`` its ``_snapshot(symbol)`` is called for each
  symbol before the clock starts, as tickwire's ``on_snapshot`` then is.
- Kraken: ``checksum_validation=True`` (a mismatch raises ``BadChecksum``, which
  would end the run), ``max_depth=1000`` as subscribed.
- Coinbase: cryptofeed's defaults, as a user runs it; a case with
  ``"cross_check": true`` turns on its check that the book is not crossed (best
  bid against best ask after every book message), the check tickwire's Coinbase
  protocol makes (level2 has no sequence numbers), which costs cryptofeed more
  than the rest of its work (``order_book``'s ``index(0)``).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections import Counter
from importlib.metadata import version
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptofeed.defines import L2_BOOK, TICKER, TRADES
from cryptofeed.exchanges import Binance, Coinbase, Kraken
from cryptofeed.symbols import Symbols
from yapic import json as yjson  # cryptofeed's own JSON parser

CLASSES = {"binance": Binance, "coinbase": Coinbase, "kraken": Kraken}
CHANNELS = {"trades": TRADES, "book": L2_BOOK, "ticker": TICKER}


class StubConnection:
    """What ``message_handler`` is given as ``conn`` (the data handlers do not use it)."""

    def __init__(self, subscription: dict[str, list[str]]) -> None:
        self.subscription = subscription
        self.uuid = "bench"
        self.id = "bench"


class RecordedRest:
    """Stands for ``Feed.http_conn``: a GET of a depth snapshot answered with the
    recorded body of that symbol."""

    def __init__(self, snapshots: dict[str, str]) -> None:
        self.snapshots = snapshots
        self.reads = 0

    async def read(self, address: str, **_: Any) -> str:
        self.reads += 1
        return self.snapshots[parse_qs(urlsplit(address).query)["symbol"][0]]

    async def close(self) -> None:
        pass


def drive(coroutine: Any) -> None:
    """Run a coroutine that never waits to its end."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("a cryptofeed handler waited: it would need an event loop")


def make_feed(case: dict[str, Any], counts: Counter[str]) -> tuple[Any, Any, RecordedRest]:
    cls = CLASSES[case["exchange"]]
    if not Symbols.populated(cls.id):
        Symbols.set(cls.id, *cls._parse_symbol_data(yjson.loads(case["markets"])))
    mapping = {native: std for std, native in Symbols.get(cls.id)[0].items()}
    symbols = [mapping[native] for native in case["symbols"]]

    async def trade(obj: Any, receipt: float) -> None:
        counts["trades"] += 1

    async def ticker(obj: Any, receipt: float) -> None:
        counts["tickers"] += 1

    async def book(obj: Any, receipt: float) -> None:
        if obj.delta is None:
            counts["book_snapshots"] += 1
        else:
            counts["book_updates"] += 1
            if obj.checksum is not None:  # verified: a mismatch raises BadChecksum
                counts["checksums_verified"] += 1

    options: dict[str, Any] = {}
    if case["exchange"] == "kraken":
        options = {"checksum_validation": True, "max_depth": case.get("depth") or 1000}
    if case.get("cross_check"):
        options["cross_check"] = True
    feed = cls(symbols=symbols, channels=[CHANNELS[c] for c in case["channels"]],
               callbacks={TRADES: trade, TICKER: ticker, L2_BOOK: book}, **options)
    rest = RecordedRest(case.get("snapshots") or {})
    feed.http_conn = rest
    conn = StubConnection({feed.std_channel_to_exchange(CHANNELS[c]): list(case["symbols"])
                           for c in case["channels"]})
    return feed, conn, rest


def replay(case: dict[str, Any], made: tuple[Any, Any, RecordedRest] | None = None,
           ) -> tuple[float, Counter[str]]:
    """One replay of the case's frames on a new feed (or on ``made``, from
    ``make_feed``: its counts are the ones given there): seconds spent in the
    handler."""
    counts: Counter[str] = Counter()
    feed, conn, rest = made if made is not None else make_feed(case, counts)
    handler = feed.message_handler
    messages = case["messages"]
    if case.get("untimed_snapshots"):  # what its first depth event of each would GET
        for native in case["symbols"]:
            drive(feed._snapshot(native))
    clock = time.perf_counter
    start = clock()
    for ts, text in messages:
        drive(handler(text, conn, ts))
    elapsed = clock() - start
    counts["snapshots_fetched"] = rest.reads
    return elapsed, counts


def measure(case: dict[str, Any], repeat: int, min_seconds: float) -> dict[str, Any]:
    """Best of ``repeat`` passes; a pass replays the case (a new feed each time)
    until it has spent ``min_seconds`` in the handler."""
    n = len(case["messages"])
    passes = []
    counts: Counter[str] = Counter()
    for _ in range(repeat):
        gc.collect()
        spent, replays = 0.0, 0
        while spent < min_seconds or replays == 0:
            elapsed, counts = replay(case)
            spent += elapsed
            replays += 1
        passes.append(spent / (replays * n) * 1e6)
    return {"us_per_message": min(passes), "passes": passes, "messages": n,
            "counts": dict(counts)}


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    results = {case["name"]: measure(case, spec["repeat"], spec["min_seconds"])
               for case in spec["cases"]}
    json.dump({"cryptofeed": version("cryptofeed"), "python": sys.version.split()[0],
               "results": results}, sys.stdout)


if __name__ == "__main__":
    main()
