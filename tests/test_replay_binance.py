"""End to end over real sockets on 127.0.0.1: the Binance capture replayed by the
emulator, collected by the native collector, served to real WebSocket clients."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import attrs
import orjson
import trio
import trio_websocket

from daemon.config import Config
from daemon.replay.run import serve_replay
from daemon.replay.tape import Faults
from tests.helpers import as_plain, receive_until, request
from tests.test_binance_protocol import independent_books

FILES = ("BINANCE.0", "BINANCE.ws.1.0", "BINANCE.http.0.0")
SYMBOLS = {"NKN-USDT", "BLZ-ETH", "LRC-BTC", "RUNE-EUR"}


def replay_config() -> Config:
    config = Config()
    return attrs.evolve(config, server=attrs.evolve(config.server, listen="127.0.0.1:0"))


def recorded(captures: Path):
    from daemon.replay.capture import read_capture
    from tests.test_binance_protocol import parse_markets

    markets = parse_markets(read_capture(captures / "BINANCE.0").rest[0].body)
    snapshots = {}
    for response in read_capture(captures / "BINANCE.http.0.0").rest:
        native = response.url.split("symbol=")[1].split("&")[0]
        snapshots[markets[native]] = response.body
    frames = read_capture(captures / "BINANCE.ws.1.0").connections[0].received
    return frames, snapshots


async def collect_until_finished(ws, replay, expect) -> list[dict]:
    """Everything ``ws`` receives until the tape is over and ``expect(got)`` holds."""
    got: list[dict] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async def read() -> None:
                while True:
                    frame = orjson.loads(await ws.get_message())
                    got.extend(frame if isinstance(frame, list) else [frame])

            nursery.start_soon(read)
            await replay.wait_finished()
            while not expect(got):
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    return got


def check_contiguous(events: list[dict]) -> dict[str, list[int]]:
    streams: dict[str, list[int]] = {}
    for event in events:
        key = f"{event['type']}:{event['exchange']}:{event['symbol']}"
        key = key.replace("book_snapshot:", "book:").replace("book_update:", "book:")
        streams.setdefault(key, []).append(event["seq"])
    for key, seqs in streams.items():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), key
    return streams


async def test_binance_capture_end_to_end(captures: Path) -> None:
    frames, snapshots = recorded(captures)
    recorded_trades = [orjson.loads(f.text)["data"] for f in frames if "@aggTrade" in f.text]
    recorded_tickers = sum("@bookTicker" in f.text for f in frames)
    paths = [captures / name for name in FILES]
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(partial(serve_replay, paths, replay_config(), 20.0))
        url = f"ws://127.0.0.1:{replay.app.port}"
        async with trio_websocket.open_websocket_url(url) as ws:
            welcome = orjson.loads(await ws.get_message())
            assert welcome["type"] == "welcome" and welcome["epoch"] == replay.app.epoch
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades", "book", "ticker"],
                               "symbols": ["*"], "history": 100})
            collector = replay.app.collectors["binance"]

            emulator = replay.emulators["binance"]

            def complete(got: list[dict]) -> bool:
                stats = collector.feed.stats if collector.feed else None
                return (
                    stats is not None
                    and stats.messages == emulator.sent
                    and sum(m["type"] == "book_update" for m in got) == stats.book_updates
                    and sum(m["type"] == "ticker" for m in got) == recorded_tickers
                )

            got = await collect_until_finished(ws, replay, complete)
        assert got[0] == {"type": "ack", "id": 1, "op": "subscribe",
                          "channels": ["trades", "book", "ticker"], "symbols": ["*"]}
        events = [m for m in got if m["type"] in ("trade", "book_snapshot", "book_update", "ticker")]
        streams = check_contiguous(events)
        trades = [m for m in events if m["type"] == "trade"]
        assert sorted(t["id"] for t in trades) == sorted(str(d["a"]) for d in recorded_trades)
        assert all(streams[f"trade:binance:{s}"][0] == 1 for s in ("NKN-USDT", "LRC-BTC"))
        snapshots_seen = [m for m in events if m["type"] == "book_snapshot"]
        assert {m["symbol"] for m in snapshots_seen} == SYMBOLS
        for symbol in SYMBOLS:  # each book stream opens with its snapshot
            first = next(m for m in events if m["symbol"] == symbol and m["type"].startswith("book"))
            assert first["type"] == "book_snapshot"
        tickers = [m for m in events if m["type"] == "ticker"]
        assert len(tickers) == recorded_tickers
        updates = [m for m in events if m["type"] == "book_update"]
        assert len(updates) == collector.feed.stats.book_updates > 150
        for event in events:  # decimal strings on the wire, times in epoch seconds
            for field in ("price", "size", "bid", "bid_size", "ask", "ask_size"):
                if field in event:
                    assert isinstance(event[field], str)
            assert 1.6e9 < event["ts"] < 2e10 and event["recv_ts"] > 1.7e9

        # a fresh subscriber after the replay gets books equal to the final books
        expected = independent_books(frames, snapshots)
        async with trio_websocket.open_websocket_url(url) as late:
            await late.get_message()
            await request(late, {"op": "subscribe", "id": "late", "channels": ["book"],
                                 "symbols": ["binance:*"]})
            books: dict[str, dict] = {}

            def all_books(m: dict) -> bool:
                if m["type"] == "book_snapshot":
                    books[m["symbol"]] = m
                return len(books) == len(SYMBOLS)

            await receive_until(late, all_books)
            assert set(books) == SYMBOLS
            for symbol, book in books.items():
                assert (as_plain(book["bids"]), as_plain(book["asks"])) == expected[symbol]
                assert book["seq"] == streams[f"book:binance:{symbol}"][-1]
        nursery.cancel_scope.cancel()
    print(f"\nend to end: {len(trades)} trades, {len(updates)} book updates, "
          f"{len(snapshots_seen)} book snapshots, {len(tickers)} tickers")


async def test_a_dropped_depth_message_is_resynced_end_to_end(captures: Path) -> None:
    """The emulator drops one NKN-USDT depth event: the collector sees the U/u gap,
    fetches a fresh snapshot (the emulator's book at that moment), clients get a new
    book_snapshot with seq continuing, and the final book is exact."""
    frames, snapshots = recorded(captures)
    depth = [n for n, f in enumerate(frames, 1) if "nknusdt@depth" in f.text]
    faults = {"binance": Faults(drop=frozenset({depth[60]}))}
    paths = [captures / name for name in FILES]
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(partial(serve_replay, paths, replay_config(), 20.0, faults))
        url = f"ws://127.0.0.1:{replay.app.port}"
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["book", "system"],
                               "symbols": ["binance:NKN-USDT"]})
            collector = replay.app.collectors["binance"]

            def complete(got: list[dict]) -> bool:
                stats = collector.feed.stats if collector.feed else None
                return stats is not None and stats.resyncs == 1 and sum(
                    m["type"] == "book_snapshot" for m in got) == 2

            got = await collect_until_finished(ws, replay, complete)
        assert collector.feed.stats.gaps == 1
        book = [m for m in got if m["type"] in ("book_snapshot", "book_update")]
        check_contiguous(book)
        assert [m["type"] for m in book].count("book_snapshot") == 2
        states = [m["state"] for m in got if m["type"] == "feed_state"]
        assert states[-2:] == ["resyncing", "synced"]
        expected = independent_books(frames, snapshots)["NKN-USDT"]
        final = collector.feed.book("NKN-USDT").levels()
        assert (as_plain(final[0]), as_plain(final[1])) == expected
        nursery.cancel_scope.cancel()
