"""``tickwire replay --loop`` and ``--rate``: the tapes of the three venues played
several times, each pass continuing the last.

Sans-IO first (each venue's ``shift`` feeding the exchange's own protocol code, as
a collector would over one connection), then the Coinbase capture through the real
daemon to a client. Expected values come from the recorded frames, decoded here
with the standard ``json`` module.
"""

from __future__ import annotations

import json
from collections import defaultdict
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_websocket

from daemon.config import Config
from daemon.events import BookSnapshot, Gap, Ticker, Trade
from daemon.exchanges.base import FetchSnapshot, FetchTrades, Malformed, Send
from daemon.replay.capture import Received, read_capture
from daemon.replay.emulator import Emulator, make_venue
from daemon.replay.run import serve_replay
from daemon.replay.tape import merge_frames
from tests.helpers import as_plain, messages, request

COINBASE = ["COINBASE.0", "COINBASE.ws.28.0"]
KRAKEN = ["KRAKEN.0", "KRAKEN.ws.48.0", "KRAKEN.ws.49.0", "KRAKEN.ws.50.0"]
BINANCE = ["BINANCE.0", "BINANCE.ws.1.0", "BINANCE.http.0.0"]
PASSES = 3

Book = tuple[dict[str, str], dict[str, str]]  # normalized plain bids, asks


def recorded(captures: Path, names: list[str]) -> list[dict[str, Any]]:
    """The tape's frames, json-decoded, in tape order."""
    tape = merge_frames([read_capture(captures / name) for name in names])
    return [json.loads(frame.text) for frame in tape]


def coinbase_final_books(frames: list[dict[str, Any]]) -> dict[str, Book]:
    """Every Coinbase book at the end of the recording, computed from the frames."""
    books: dict[str, Book] = {}
    for m in frames:
        if m["type"] == "snapshot":
            books[m["product_id"]] = (as_plain(m["bids"]), as_plain(m["asks"]))
        elif m["type"] == "l2update" and m["product_id"] in books:
            bids, asks = books[m["product_id"]]
            for side, price, size in m["changes"]:
                levels = bids if side == "buy" else asks
                key = str(Decimal(price).normalize())
                if Decimal(size) == 0:
                    levels.pop(key, None)
                else:
                    levels[key] = str(Decimal(size).normalize())
    return books


def plain(levels: Any) -> Book:
    bids, asks = levels
    return as_plain(bids), as_plain(asks)


# -- sans-IO: a venue's passes into the exchange's protocol ---------------------------


class Wire:
    """One collector connection to a venue, in memory: the feed's requests are
    answered by the venue (WebSocket frames and REST), and the tape is played
    ``passes`` times through ``shift``, as the emulator plays it."""

    def __init__(self, captures: Path, names: list[str], exchange: str) -> None:
        self.files = [read_capture(captures / name) for name in names]
        self.tape = merge_frames(self.files)
        self.venue: Any = make_venue(exchange, self.files)
        self.period = self.venue.prepare_loop(self.tape)
        symbols, channels = self.venue.subscriptions(self.files)
        self.feed = _feed(exchange, self.venue, symbols, channels)
        self.keys = self.venue.open(self.feed.url(""))
        self.events: list[Any] = []
        self.malformed: list[Malformed] = []
        self.deliver(self.feed.on_open(0.0), 0.0)

    def deliver(self, outputs: list, now: float) -> None:
        for output in outputs:
            if isinstance(output, Send):
                for reply in self.venue.on_client_message(self.keys, output.text):
                    self.deliver(self.feed.on_message(reply, now), now)
            elif isinstance(output, FetchSnapshot):
                _, body = self.venue.rest(output.target)
                self.deliver(self.feed.on_snapshot(output.symbol, body, now), now)
            elif isinstance(output, FetchTrades):
                _, body = self.venue.rest(output.target)
                self.deliver(self.feed.on_trades(output.symbol, body, now), now)
            elif isinstance(output, Malformed):
                self.malformed.append(output)
            else:
                self.events.append(output)

    def play(self, passes: int) -> None:
        for k in range(passes):
            for frame in self.tape:
                for text in [frame.text] if k == 0 else self.venue.shift(frame, k):
                    played = Received(frame.ts + k * self.period, text)
                    if self.venue.route(played) in self.keys:
                        self.deliver(self.feed.on_message(text, played.ts), played.ts)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def _feed(exchange: str, venue: Any, symbols: list[str], channels: list[str]) -> Any:
    if exchange == "coinbase":
        from daemon.exchanges.coinbase import CoinbaseFeed, parse_markets

        return CoinbaseFeed(symbols, channels, parse_markets(venue.products_body))
    if exchange == "kraken":
        from daemon.exchanges.kraken import KrakenFeed, parse_markets

        markets = parse_markets(venue.static["/0/public/AssetPairs"].decode())
        return KrakenFeed(symbols, channels, markets, depth=venue.recorded_depth)
    from daemon.exchanges.binance import BinanceFeed, parse_markets

    return BinanceFeed(symbols, channels, parse_markets(venue.static["/api/v3/exchangeInfo"]))


def assert_clean(wire: Wire) -> None:
    stats = wire.feed.stats
    assert wire.malformed == []
    assert (stats.resyncs, stats.gaps, stats.duplicates, stats.out_of_order) == (0, 0, 0, 0)
    assert stats.checksum_mismatch == 0
    assert wire.of(Gap) == []


def assert_trades_continue(wire: Wire) -> None:
    """Trade ids unique per symbol; trade times never go back."""
    by_symbol: dict[str, list[Trade]] = defaultdict(list)
    for trade in wire.of(Trade):
        by_symbol[trade.symbol].append(trade)
    for symbol, trades in by_symbol.items():
        ids = [t.id for t in trades]
        assert len(ids) == len(set(ids)), symbol
        assert all(a.ts <= b.ts for a, b in zip(trades, trades[1:], strict=False)), symbol


def test_coinbase_passes_continue(captures: Path) -> None:
    frames = recorded(captures, COINBASE)
    matches = [m for m in frames if m["type"] == "match"]
    last_matches = [m for m in frames if m["type"] == "last_match"]
    wire = Wire(captures, COINBASE, "coinbase")
    wire.play(PASSES)
    assert_clean(wire)
    assert_trades_continue(wire)
    # pass 0 delivers the last_match frames too; later passes only the live matches
    trades = wire.of(Trade)
    assert len(trades) == len(matches) + len(last_matches) + (PASSES - 1) * len(matches)
    by_symbol: dict[str, list[int]] = defaultdict(list)
    for trade in trades:
        by_symbol[trade.symbol].append(int(trade.id))
    for symbol, ids in by_symbol.items():  # contiguous ids: a pass follows the last one
        assert ids == list(range(ids[0], ids[0] + len(ids))), symbol
    # the books: one snapshot each (pass 0), then only updates; final as recorded
    assert len(wire.of(BookSnapshot)) == 10
    for symbol, book in coinbase_final_books(frames).items():
        assert plain(wire.feed.book(symbol).levels()) == book, symbol
        assert plain(wire.venue.books[symbol].levels()) == book, symbol


def test_coinbase_sequences_and_times_shift_by_whole_passes(captures: Path) -> None:
    wire = Wire(captures, COINBASE, "coinbase")
    frame = next(f for f in wire.tape if '"type":"match"' in f.text)
    (shifted,) = wire.venue.shift(frame, 2)
    before, after = json.loads(frame.text), json.loads(shifted)
    spans = wire.venue._spans[before["product_id"]]
    assert after["trade_id"] == before["trade_id"] + 2 * spans.trade_ids
    assert after["sequence"] == before["sequence"] + 2 * spans.sequences
    assert len(after["time"]) == len(before["time"])
    moved = (Decimal(str(_epoch(after["time"]))) - Decimal(str(_epoch(before["time"]))))
    assert abs(moved - Decimal(str(2 * wire.period))) < Decimal("0.000002")
    assert {k: v for k, v in after.items() if k not in ("trade_id", "sequence", "time")} == \
        {k: v for k, v in before.items() if k not in ("trade_id", "sequence", "time")}
    # answers to the subscription are not played again
    assert all(wire.venue.shift(f, 1) == [] for f in wire.tape if '"last_match"' in f.text)


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def test_kraken_passes_continue_with_valid_checksums(captures: Path) -> None:
    frames = recorded(captures, KRAKEN)
    updates = sum(
        1 for m in frames
        if isinstance(m, list) and m[-2].startswith("book") and "c" in m[-3]
    )
    trades = sum(len(m[1]) for m in frames if isinstance(m, list) and m[-2] == "trade")
    wire = Wire(captures, KRAKEN, "kraken")
    wire.play(PASSES)
    assert_clean(wire)
    assert_trades_continue(wire)
    assert len(wire.of(Trade)) == PASSES * trades
    books = len(wire.venue.books)
    # every recorded update checked in every pass, plus one update per book and pass
    # that brings it back to the recorded snapshot
    assert wire.feed.stats.checksum_ok == PASSES * updates + (PASSES - 1) * books
    assert len(wire.of(BookSnapshot)) == books
    once = Wire(captures, KRAKEN, "kraken")
    once.play(1)
    for symbol in once.feed._books:
        assert once.feed.book(symbol).levels() == wire.feed.book(symbol).levels(), symbol


def test_binance_passes_continue_with_contiguous_update_ids(captures: Path) -> None:
    frames = recorded(captures, BINANCE)
    agg = [m["data"] for m in frames if m.get("stream", "").endswith("@aggTrade")]
    wire = Wire(captures, BINANCE, "binance")
    wire.play(PASSES)
    assert_clean(wire)
    assert_trades_continue(wire)
    assert len(wire.of(Trade)) == PASSES * len(agg)
    assert len(wire.of(BookSnapshot)) == 4  # the REST snapshots of pass 0, no resync
    assert len(wire.of(Ticker)) == PASSES * sum(
        1 for m in frames if m.get("stream", "").endswith("@bookTicker")
    )
    once = Wire(captures, BINANCE, "binance")
    once.play(1)
    for native, state in wire.venue.books.items():
        assert state.book.levels() == once.venue.books[native].book.levels(), native
        symbol = wire.feed.symbols[native]
        assert wire.feed.books[symbol].book.levels() == state.book.levels(), native
    # the emulated REST depth follows the shifted ids
    status, body = wire.venue.rest("/api/v3/depth?symbol=NKNUSDT&limit=5")
    last_u = max(m["data"]["u"] for m in frames if m.get("stream") == "nknusdt@depth@100ms")
    assert status == 200
    assert json.loads(body)["lastUpdateId"] == last_u + (PASSES - 1) * wire.venue._update_span[
        "NKNUSDT"]


# -- end to end, with sockets ---------------------------------------------------------


def local_config() -> Config:
    config = Config()
    return attrs.evolve(config, server=attrs.evolve(config.server, listen="127.0.0.1:0"))


async def test_coinbase_loop_through_the_daemon(captures: Path) -> None:
    """Two passes of the Coinbase capture, as fast as the daemon reads, to a client
    subscribed to everything: every trade once with its own id, every stream's
    ``seq`` contiguous, nothing counted wrong by the collector, and the books at
    the end are the recording's final books."""
    frames = recorded(captures, COINBASE)
    expected_books = coinbase_final_books(frames)
    n_matches = sum(1 for m in frames if m["type"] == "match")
    passes = 2  # about 15 s: the daemon's pipeline sets the pace
    n_trades = n_matches + sum(1 for m in frames if m["type"] == "last_match") + (
        passes - 1) * n_matches
    got: list[dict[str, Any]] = []
    all_trades = trio.Event()

    async def collect(ws: trio_websocket.WebSocketConnection) -> None:
        count = 0
        while True:
            batch = messages(await ws.get_message())
            got.extend(batch)
            count += sum(1 for m in batch if m["type"] == "trade")
            if count >= n_trades:
                all_trades.set()

    paths = [captures / name for name in COINBASE]
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(partial(
            serve_replay, paths, local_config(), speed=None, loop=True, passes=passes,
        ))
        url = f"ws://127.0.0.1:{replay.app.port}"
        with trio.fail_after(60):
            async with (
                trio_websocket.open_websocket_url(url) as ws,
                trio.open_nursery() as client,
            ):
                await request(ws, {"op": "subscribe", "id": 1,
                                   "channels": ["trades", "book", "ticker", "system"],
                                   "symbols": ["coinbase:*"], "history": 1000})
                client.start_soon(collect, ws)
                await replay.wait_finished()
                await all_trades.wait()
                # the tape is played; let the daemon drain what it still holds
                with trio.move_on_after(0.5):
                    while True:
                        count = len(got)
                        await trio.sleep(0.1)
                        if len(got) == count:
                            break
                client.cancel_scope.cancel()
        emulator = replay.emulators["coinbase"]
        stats = replay.app.collectors["coinbase"].feed.stats
        dispatcher = replay.app.dispatcher.statistics()
        nursery.cancel_scope.cancel()

    assert emulator.pass_number == passes - 1 and emulator.finished.is_set()
    assert emulator.played == passes * len(frames)
    assert (stats.resyncs, stats.malformed, stats.out_of_order, stats.gaps) == (0, 0, 0, 0)
    assert dispatcher.rejected == 0
    trades = [m for m in got if m["type"] == "trade"]
    keys = [(t["symbol"], t["id"]) for t in trades]
    assert len(keys) == len(set(keys)) == n_trades
    # seq contiguous per stream, from the first message the client saw of it
    seqs: dict[tuple[str, str], list[int]] = defaultdict(list)
    for m in got:
        if "seq" in m:
            kind = "book" if m["type"].startswith("book") else m["type"]
            seqs[kind, m["symbol"]].append(m["seq"])
    for stream, numbers in seqs.items():
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), stream
    # the client's books, from its snapshot and every update after it
    books: dict[str, Book] = {}
    for m in got:
        if m["type"] == "book_snapshot":
            books[m["symbol"]] = plain((m["bids"], m["asks"]))
        elif m["type"] == "book_update":
            bids, asks = books[m["symbol"]]
            for side, levels in ((bids, m["bids"]), (asks, m["asks"])):
                for price, size in levels:
                    key = str(Decimal(price).normalize())
                    if Decimal(size) == 0:
                        side.pop(key, None)
                    else:
                        side[key] = str(Decimal(size).normalize())
    assert books == expected_books
    # each book resynced once, when the collector connected (retained system events)
    resyncing = [m["symbol"] for m in got
                 if m["type"] == "feed_state" and m["state"] == "resyncing"]
    assert len(resyncing) == len(set(resyncing)) <= len(expected_books)


async def test_rate_overrides_the_recorded_timing(captures: Path) -> None:
    """The Binance tape (265 frames, 31 s recorded) four times at 2,000 frames/s:
    about 0.53 s."""
    files = [read_capture(captures / name) for name in BINANCE]
    emulator = Emulator(files, speed=1.0, loop=True, passes=4, rate=2000)
    frames = 4 * len(emulator.tape)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(emulator.serve)
        async with trio_websocket.open_websocket_url(
            f"{address.ws_url}/stream?streams=nknusdt@depth@100ms/nknusdt@bookTicker"
        ) as ws:
            async def drain() -> None:
                while True:
                    await ws.get_message()

            async with trio.open_nursery() as reader:
                reader.start_soon(drain)
                with trio.fail_after(10):
                    await emulator.finished.wait()
                elapsed = trio.current_time() - emulator.play_started
                reader.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    assert emulator.played == frames
    assert 0.8 * frames / 2000 <= elapsed <= 3 * frames / 2000


def test_rate_and_passes_are_checked(captures: Path) -> None:
    files = [read_capture(captures / name) for name in COINBASE]
    for bad in ({"rate": 0}, {"rate": -1.0}, {"loop": True, "passes": 0}):
        with pytest.raises(ValueError):
            Emulator(files, **bad)


def test_cli_replay_takes_loop_and_rate(captures: Path) -> None:
    from click.testing import CliRunner

    from daemon.cli import main

    result = CliRunner().invoke(main, ["replay", "--help"])
    assert result.exit_code == 0
    assert "--loop" in result.output and "--rate" in result.output
    capture = str(captures / "COINBASE.ws.28.0")
    result = CliRunner().invoke(main, ["replay", capture, "--loop", "--rate", "0"])
    assert result.exit_code == 2 and "--rate" in result.output
