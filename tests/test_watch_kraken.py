"""Kraken through ccxt.pro (``kraken``, mode ``watch``): ccxt.pro speaks WebSocket
v2, the captures are v1, so the emulator translates (``daemon.replay.venues.kraken``,
rules 7-8). First the translation, checked against references computed here from
the raw v1 frames (the v2 checksum rule re-implemented from Kraken's docs); then
real ccxt.pro on the emulator beside the native collector on the same capture."""

from __future__ import annotations

import json
import zlib
from collections import Counter
from decimal import Decimal
from pathlib import Path

import attrs
import trio

from daemon.collectors.watch import WatchCollector
from daemon.config import AdminConfig, ExchangeConfig, ReconnectConfig
from daemon.events import BookSnapshot, BookUpdate, Gap, Ticker, Trade
from daemon.replay.capture import read_capture
from daemon.replay.emulator import Emulator
from daemon.replay.run import start_when_subscribed
from daemon.replay.tape import NO_FAULTS, Faults, merge_frames
from daemon.replay.venues.kraken import KrakenVenue, rfc3339, v2_symbol
from tests.helpers import as_plain, final_books
from tests.test_watch import fast_config, replay_and_collect

KRAKEN = ("KRAKEN.0", "KRAKEN.ws.48.0", "KRAKEN.ws.49.0", "KRAKEN.ws.50.0")
V2 = "/ws.kraken.com/v2"
DEPTH = 1000


def kraken_tape(captures: Path):
    captures_ = [read_capture(captures / f) for f in KRAKEN]
    return captures_, merge_frames(captures_)


async def start_watch(nursery: trio.Nursery, captures_: list, faults: Faults = NO_FAULTS):
    """The Kraken emulator (its tape started once every ccxt subscription is in) and
    a watch collector on it, its events into an unbounded-enough channel:
    ``(emulator, collector, receive)``. ``rateLimit`` 20 ms paces ccxt's requests
    faster than Kraken's REST limit would."""
    emulator = Emulator(captures_, speed=None, autostart=False, faults=faults)
    address = await nursery.start(emulator.serve)
    symbols, channels = emulator.venue.subscriptions(captures_)
    send, receive = trio.open_memory_channel(100_000)
    cfg = ExchangeConfig(symbols=symbols, channels=channels, mode="watch", depth=DEPTH,
                         rest_url=address.rest_url, ws_url=address.ws_url)
    collector = WatchCollector("kraken", cfg, ReconnectConfig(base=0.05, cap=0.2), send,
                               ccxt_config={"rateLimit": 20})
    nursery.start_soon(collector.run)
    nursery.start_soon(start_when_subscribed, emulator, collector)
    return emulator, collector, receive


def v1_reference(tape) -> tuple[dict[str, tuple[dict, dict]], list, dict[str, dict]]:
    """From the raw v1 frames: final books (``{pair: (bids, asks)}`` normalized, each
    side cut to ``DEPTH`` after every message), trades ``(pair, price, volume, time,
    side)`` in order, and the last ticker payload by pair."""
    books: dict[str, dict[str, dict[Decimal, tuple[str, str]]]] = {}
    trades, tickers = [], {}
    for frame in tape:
        m = json.loads(frame.text)
        if not isinstance(m, list):
            continue
        name, pair = m[-2], m[-1]
        if name.startswith("book"):
            if "as" in m[1] or "bs" in m[1]:
                books[pair] = {"a": {}, "b": {}}
            for part in m[1:-2]:
                for key, levels in part.items():
                    if key == "c":
                        continue
                    side = books[pair][key[0]]
                    for price, volume, *_ in levels:
                        if Decimal(volume) == 0:
                            side.pop(Decimal(price), None)
                        else:
                            side[Decimal(price)] = (price, volume)
            for key, side in books[pair].items():
                for price in sorted(side, reverse=key == "b")[DEPTH:]:
                    del side[price]
        elif name == "trade":
            trades += [(pair, t[0], t[1], t[2], t[3]) for t in m[1]]
        elif name == "ticker":
            tickers[pair] = m[1]
    final = {pair: (as_plain(b["b"].values()), as_plain(b["a"].values()))
             for pair, b in books.items()}
    return final, trades, tickers


def v2_checksum(asks: list[tuple[str, str]], bids: list[tuple[str, str]]) -> int:
    """Kraken's v2 book checksum (docs.kraken.com, "Book checksum (WebSocket v2)"):
    top 10 asks low to high, then top 10 bids high to low; each price and quantity
    as written, ``.`` removed, leading zeros stripped; CRC32 of the concatenation."""
    def text(value: str) -> str:
        return value.replace(".", "").lstrip("0")

    return zlib.crc32("".join(text(p) + text(q) for p, q in [*asks[:10], *bids[:10]]).encode())


def test_the_v2_dialect_carries_the_recording(captures: Path) -> None:
    """A v2 connection subscribed to every book and trade before the tape: every
    message checks against the reference (books, checksums by the v2 rule, equal to
    the recorded v1 ``c`` on every update that had one), trade ids equal the REST
    history's, and the books end as the v1 reference."""
    captures_, tape = kraken_tape(captures)
    venue = KrakenVenue(captures_)
    expected, trades, _ = v1_reference(tape)
    pairs = sorted(expected)
    symbols = [v2_symbol(p) for p in pairs]
    assert "BTC/CHF" in symbols and not [s for s in symbols if "XBT" in s]
    keys: set[str] = set()
    assert json.loads(venue.greeting_for(V2)[0])["channel"] == "status"
    acks = [json.loads(r) for r in venue.on_client_message(keys, json.dumps(
        {"method": "subscribe", "params": {"channel": "book", "symbol": symbols,
                                            "depth": DEPTH}, "req_id": 7}))]
    acks += [json.loads(r) for r in venue.on_client_message(keys, json.dumps(
        {"method": "subscribe", "params": {"channel": "trade", "symbol": symbols}}))]
    assert [a["success"] for a in acks] == [True] * 2 * len(pairs)
    assert acks[0]["req_id"] == 7 and acks[0]["result"]["depth"] == DEPTH
    refused = json.loads(venue.on_client_message(keys, json.dumps(
        {"method": "subscribe", "params": {"channel": "book", "symbol": ["BTC/CHF"],
                                            "depth": 10}}))[0])
    assert refused["success"] is False and "depth" in refused["error"]
    pong = json.loads(venue.on_client_message(keys, '{"method":"ping","req_id":3}')[0])
    assert (pong["method"], pong["req_id"]) == ("pong", 3)

    books: dict[str, dict[str, dict[Decimal, tuple[str, str]]]] = {}
    checked = recorded_checked = 0
    trade_ids: dict[str, list[int]] = {}
    got_trades = []
    for frame in tape:
        key = venue.route(frame)
        if key is None:
            continue
        text = venue.deliver(V2, keys, key, frame.text)
        if text is None:
            continue
        assert venue.deliver("/", keys, key, frame.text) == frame.text  # v1 as recorded
        m = json.loads(text, parse_float=str)  # numbers as written
        if m["channel"] == "book":
            (data,) = m["data"]
            symbol = data["symbol"]
            if m["type"] == "snapshot":
                books[symbol] = {"asks": {}, "bids": {}}
            for side in ("asks", "bids"):
                for level in data[side]:
                    if Decimal(level["qty"]) == 0:
                        books[symbol][side].pop(Decimal(level["price"]), None)
                    else:
                        books[symbol][side][Decimal(level["price"])] = (level["price"],
                                                                        level["qty"])
                for price in sorted(books[symbol][side], reverse=side == "bids")[DEPTH:]:
                    del books[symbol][side][price]
            top = {side: [books[symbol][side][p] for p in sorted(
                books[symbol][side], reverse=side == "bids")] for side in ("asks", "bids")}
            assert data["checksum"] == v2_checksum(top["asks"], top["bids"])
            checked += 1
            recorded = json.loads(frame.text)
            if isinstance(recorded, list) and any("c" in p for p in recorded[1:-2]):
                c = next(p["c"] for p in recorded[1:-2] if "c" in p)
                assert data["checksum"] == int(c)
                recorded_checked += 1
        elif m["channel"] == "trade":
            for t in m["data"]:
                trade_ids.setdefault(t["symbol"], []).append(t["trade_id"])
                got_trades.append((t["symbol"], t["price"], t["qty"], t["timestamp"], t["side"]))
    assert checked > recorded_checked == 4269  # every recorded checksum, and snapshots
    assert {s: (as_plain(b["bids"].values()), as_plain(b["asks"].values()))
            for s, b in books.items()} == {v2_symbol(p): book for p, book in expected.items()}
    assert got_trades == [(v2_symbol(p), price, volume, rfc3339(time),
                           {"b": "buy", "s": "sell"}[side])
                          for p, price, volume, time, side in trades]
    for pair in {p for p, *_ in trades}:  # the ids the REST history gives the same trades
        rest_name = venue.pairs[pair].altname
        _, body = venue.rest(f"/0/public/Trades?pair={rest_name}")
        rows = next(v for k, v in json.loads(body)["result"].items() if k != "last")
        assert [row[6] for row in rows] == trade_ids[v2_symbol(pair)]
    assert rfc3339("1618678134.5606") == "2021-04-17T16:48:54.560600Z"
    print(f"\nkraken v2: {checked} book messages checksummed, {recorded_checked} equal to "
          f"the recorded v1 checksum, {len(got_trades)} trades")


def test_assets_are_derived_for_ccxt_load_markets(captures: Path) -> None:
    captures_, _ = kraken_tape(captures)
    status, body = KrakenVenue(captures_).rest("/0/public/Assets")
    assets = json.loads(body)["result"]
    assert status == 200 and assets["XXBT"]["altname"] == "XBT"
    assert assets["ZUSD"]["altname"] == "USD"


async def test_kraken_through_ccxt_pro_v2_equals_the_native_collector(
    captures: Path, tmp_path: Path,
) -> None:
    """Real ccxt.pro on the emulator's v2 dialect, beside the native collector (v1)
    on the same capture: every recorded trade once, the last ticker of each pair,
    and final books equal to the native collector's and to the recording.

    ccxt.pro paces WebSocket subscribe requests like REST calls (Kraken: one a
    second, 21 requests here): the watch collector gets ``rateLimit`` 20 ms."""
    captures_, tape = kraken_tape(captures)
    expected_v1, recorded_trades, last_tickers = v1_reference(tape)
    from daemon.exchanges.kraken import parse_markets

    markets = parse_markets(captures_[0].rest[0].body)
    expected = {markets[pair]: book for pair, book in expected_v1.items()}
    native: dict[str, tuple] = {}
    native_done = trio.Event()
    events: list = []

    async def run_native() -> None:
        config = attrs.evolve(fast_config(), admin=AdminConfig(socket=str(tmp_path / "n")))
        native["result"] = await replay_and_collect(captures, "native", config=config,
                                                    speed=None, files=KRAKEN,
                                                    exchange="kraken")
        native_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_native)
        emulator, collector, receive = await start_watch(nursery, captures_)
        with trio.fail_after(30):
            await emulator.finished.wait()
            while not all(b.synced for b in collector.books.values()):  # noqa: ASYNC110
                await trio.sleep(0.05)
            last = None
            while last != collector.items:
                last = collector.items
                await trio.sleep(0.3)
            await native_done.wait()  # the two replays run side by side
        paths = {c.path for c in emulator.connections}
        stats = collector.statistics()
        while True:
            try:
                events.append(receive.receive_nowait())
            except trio.WouldBlock:
                break
        nursery.cancel_scope.cancel()

    assert paths == {V2}
    watch_books = final_books(events)
    native_replay, native_got, native_books = native["result"]
    assert watch_books == native_books == expected

    def key(symbol: str, price: str, size: str, ts: float, side: str) -> tuple:
        # ccxt's times are whole ms (truncated)
        return (symbol, Decimal(price), Decimal(size), int(Decimal(repr(ts)) * 1000), side)

    trades = [e for e in events if isinstance(e, Trade)]
    ids = {(t.symbol, t.id) for t in trades}  # ids count per pair (the REST history's)
    assert len(ids) == len(trades) == len(recorded_trades) == 10
    native_trades = [m for m in native_got if m["type"] == "trade"]
    mine = Counter(key(t.symbol, t.price, t.size, t.ts, t.side) for t in trades)
    theirs = Counter(key(m["symbol"], m["price"], m["size"], m["ts"], m["side"])
                     for m in native_trades)
    assert mine == theirs, (mine - theirs, theirs - mine)
    assert not [e for e in events if isinstance(e, Gap)]
    tickers = [e for e in events if isinstance(e, Ticker)]
    assert {t.symbol for t in tickers} == {markets[p] for p in last_tickers}
    for pair, recorded in last_tickers.items():
        last_ticker = [t for t in tickers if t.symbol == markets[pair]][-1]
        assert tuple(map(Decimal, (last_ticker.bid, last_ticker.bid_size, last_ticker.ask,
                                   last_ticker.ask_size))) == tuple(map(Decimal, (
            recorded["b"][0], recorded["b"][2], recorded["a"][0], recorded["a"][2])))
    updates = sum(isinstance(e, BookUpdate) for e in events)
    assert stats.counters.resyncs == 0 and updates == stats.counters.book_updates
    print(f"\nkraken watch (v2): {len(trades)} trades, {updates} book updates, "
          f"{sum(isinstance(e, BookSnapshot) for e in events)} snapshots, {len(tickers)} "
          f"tickers, {stats.frames} bridge items, {stats.counters.resyncs} resyncs")


async def test_a_closed_kraken_v2_connection_recovers_the_trade_by_rest_id(
    captures: Path,
) -> None:
    """The emulator closes ccxt's v2 connection at a trade frame (its trade never
    arrives live): ccxt.pro watches again, the trade comes back from the REST
    history, whose ids are the v2 ``trade_id``s, so every trade is delivered once;
    the books rebuild from new snapshots and end as recorded."""
    from daemon.exchanges.kraken import parse_markets

    captures_, tape = kraken_tape(captures)
    expected_v1, recorded_trades, _ = v1_reference(tape)
    markets = parse_markets(captures_[0].rest[0].body)
    trade_frames = [n for n, f in enumerate(tape, 1) if '"trade"' in f.text
                    and isinstance(json.loads(f.text), list)]
    events: list = []
    async with trio.open_nursery() as nursery:
        emulator, collector, receive = await start_watch(
            nursery, captures_, Faults(close=frozenset({trade_frames[3]})))
        with trio.fail_after(30):
            await emulator.finished.wait()
            # the close reaches the collector through ccxt's thread: wait for it
            while not (collector.state_counts["reconnecting"] and collector.state == "subscribed"
                       and all(b.synced for b in collector.books.values())):
                await trio.sleep(0.05)
            last = None
            while last != collector.items:
                last = collector.items
                await trio.sleep(0.3)
        connections = emulator.connections_total
        nursery.cancel_scope.cancel()
    collector.out.close()  # the collector's end of the event channel
    events = [e async for e in receive]
    trades = [e for e in events if isinstance(e, Trade)]
    assert len({(t.symbol, t.id) for t in trades}) == len(trades) == len(recorded_trades)
    assert sorted((t.symbol, Decimal(t.price), Decimal(t.size)) for t in trades) == sorted(
        (markets[p], Decimal(price), Decimal(size)) for p, price, size, *_ in recorded_trades)
    assert not [e for e in events if isinstance(e, Gap)]
    assert connections >= 2 and collector.state_counts["reconnecting"] >= 1
    assert final_books(events) == {markets[p]: book for p, book in expected_v1.items()}
    print(f"\nkraken watch close: {len(trades)} trades, {connections} connections, "
          f"{sum(isinstance(e, BookSnapshot) for e in events)} snapshots, "
          f"{collector.stats.book_updates} book updates")
