"""Faults injected by the emulator, end to end over real sockets: each must end in
exact books and exact trade delivery."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import attrs
import trio
import trio_websocket

from daemon.config import Config, ReconnectConfig
from daemon.exchanges.kraken import parse_markets
from daemon.replay.capture import read_capture
from daemon.replay.run import serve_replay
from daemon.replay.tape import Faults, merge_frames
from tests.helpers import as_plain, messages, request
from tests.test_replay_kraken import _reference

KRAKEN = ("KRAKEN.0", "KRAKEN.ws.48.0", "KRAKEN.ws.49.0", "KRAKEN.ws.50.0")
COINBASE = ("COINBASE.0", "COINBASE.ws.28.0")


def fast_config(**reconnect: float) -> Config:
    config = Config()
    return attrs.evolve(
        config,
        server=attrs.evolve(config.server, listen="127.0.0.1:0"),
        reconnect=ReconnectConfig(base=0.05, cap=0.2, **reconnect),
    )


async def settle(replay, exchange: str) -> None:
    """Until the tape is over and the collector and dispatcher hold nothing more."""
    collector = replay.app.collectors[exchange]
    with trio.fail_after(60):
        await replay.wait_finished()
        last = -1
        while True:
            frames = collector.frames
            stats = replay.app.dispatcher.statistics()
            if frames == last and stats.buffer_used == 0 and collector.state == "subscribed":
                books = collector.feed.books if exchange == "binance" else {}
                if all(sync.synced for sync in books.values()):
                    return
            last = frames
            await trio.sleep(0.2)


async def served_books(port: int, exchange: str) -> dict[str, tuple[dict, dict]]:
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}") as ws:
        await ws.get_message()
        await request(ws, {"op": "subscribe", "id": 1, "channels": ["book"],
                           "symbols": [f"{exchange}:*"]})
        books: dict[str, tuple[dict, dict]] = {}
        with trio.move_on_after(2):
            while True:
                for m in messages(await ws.get_message()):
                    if m["type"] == "book_snapshot":
                        books[m["symbol"]] = (as_plain(m["bids"]), as_plain(m["asks"]))
        return books


def kraken_expected(captures: Path) -> dict[str, tuple[dict, dict]]:
    markets = parse_markets(read_capture(captures / "KRAKEN.0").rest[0].body)
    tape = merge_frames([read_capture(captures / f) for f in KRAKEN])
    return {
        markets[pair]: (as_plain(book.pairs_of("bs")), as_plain(book.pairs_of("as")))
        for pair, book in _reference(tape).items()
    }


def kraken_book_frames(captures: Path) -> list[int]:
    """Tape numbers (1-based) of Kraken book updates that carry a checksum."""
    tape = merge_frames([read_capture(captures / f) for f in KRAKEN])
    return [n for n, f in enumerate(tape, 1) if '"c":"' in f.text and "book-" in f.text]


def kraken_top_changing_frames(captures: Path) -> list[int]:
    """Tape numbers of Kraken book updates that change one of the top 10 levels (the
    ones the checksum covers), each followed by another update of the same pair."""
    from tests.test_replay_kraken import RefBook, _data

    tape = merge_frames([read_capture(captures / f) for f in KRAKEN])
    books: dict[str, RefBook] = {}
    found: list[tuple[int, str]] = []
    last_of_pair: dict[str, int] = {}
    for number, frame in enumerate(tape, 1):
        message = _data(frame.text)
        if message is None or not message[-2].startswith("book"):
            continue
        pair = message[-1]
        parts = message[1:-2]
        if "as" in parts[0] or "bs" in parts[0]:
            books[pair] = RefBook()
        else:
            book = books[pair]
            for part in parts:
                for key, side in (("a", "as"), ("b", "bs")):
                    top = {level[0] for level in book.top(side, 10)}
                    if any(level[0] in top for level in part.get(key, [])):
                        found.append((number, pair))
                        break
        books[pair].message(parts)
        last_of_pair[pair] = number
    return [n for n, pair in found if n < last_of_pair[pair]]


async def kraken_run(captures: Path, faults: Faults, config: Config | None = None):
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(partial(
            serve_replay, [captures / f for f in KRAKEN], config or fast_config(), None,
            {"kraken": faults}))
        await settle(replay, "kraken")
        collector = replay.app.collectors["kraken"]
        books = await served_books(replay.app.port, "kraken")
        nursery.cancel_scope.cancel()
    return replay, collector, books


async def test_kraken_corrupted_checksum_resyncs_that_pair(captures: Path) -> None:
    number = kraken_book_frames(captures)[100]
    replay, collector, books = await kraken_run(captures, Faults(corrupt_checksum=frozenset({number})))
    stats = collector.feed.stats
    assert stats.checksum_mismatch == 1 and stats.resyncs == 1
    assert stats.checksum_ok >= 4200
    assert replay.emulators["kraken"].connections_total == 1  # only the pair resubscribed
    assert books == kraken_expected(captures)


async def test_kraken_dropped_book_message_is_caught_by_the_checksum(captures: Path) -> None:
    number = kraken_top_changing_frames(captures)[200]
    replay, collector, books = await kraken_run(captures, Faults(drop=frozenset({number})))
    stats = collector.feed.stats
    assert stats.checksum_mismatch >= 1 and stats.resyncs == stats.checksum_mismatch
    assert books == kraken_expected(captures)


async def test_kraken_connection_closed_mid_stream_reconnects_and_resyncs(captures: Path) -> None:
    number = kraken_book_frames(captures)[1500]
    replay, collector, books = await kraken_run(captures, Faults(close=frozenset({number})))
    assert replay.emulators["kraken"].connections_total == 2
    assert collector.state_counts["reconnecting"] == 1
    assert collector.feed.stats.checksum_mismatch == 0
    assert books == kraken_expected(captures)


async def test_kraken_malformed_book_frame_is_skipped_and_the_pair_resynced(captures: Path) -> None:
    number = kraken_book_frames(captures)[300]
    replay, collector, books = await kraken_run(captures, Faults(malformed=frozenset({number})))
    stats = collector.feed.stats
    assert stats.malformed == 1
    assert books == kraken_expected(captures)


async def test_a_stalled_kraken_feed_is_reconnected_by_the_watchdog(captures: Path) -> None:
    number = kraken_book_frames(captures)[2000]
    config = fast_config(stale_after=0.5)
    replay, collector, books = await kraken_run(
        captures, Faults(stall={number: 2.0}), config)
    assert collector.state_counts["stale"] >= 1
    assert replay.emulators["kraken"].connections_total >= 2
    assert books == kraken_expected(captures)


async def coinbase_run(captures: Path, faults: Faults):
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(partial(
            serve_replay, [captures / f for f in COINBASE], fast_config(), 20.0,
            {"coinbase": faults}))
        trades: list[dict] = []
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{replay.app.port}") as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades"],
                               "symbols": ["coinbase:*"], "history": 1000})

            async def read() -> None:
                while True:
                    trades.extend(m for m in messages(await ws.get_message()) if m["type"] == "trade")

            async with trio.open_nursery() as inner:
                inner.start_soon(read)
                await settle(replay, "coinbase")
                inner.cancel_scope.cancel()
        collector = replay.app.collectors["coinbase"]
        books = await served_books(replay.app.port, "coinbase")
        nursery.cancel_scope.cancel()
    return replay, collector, books, trades


def coinbase_recorded(captures: Path):
    tape = merge_frames([read_capture(captures / f) for f in COINBASE])
    decoded = [json.loads(f.text) for f in tape]
    books: dict[str, tuple[dict, dict]] = {}
    for m in decoded:
        if m["type"] == "snapshot":
            books[m["product_id"]] = (as_plain(m["bids"]), as_plain(m["asks"]))
        elif m["type"] == "l2update":
            bids, asks = books[m["product_id"]]
            for side, price, size in m["changes"]:
                (bids if side == "buy" else asks).update(as_plain([[price, size]]))
                if float(size) == 0:
                    (bids if side == "buy" else asks).pop(next(iter(as_plain([[price, "1"]]))), None)
    matches = [m for m in decoded if m["type"] in ("match", "last_match")]
    return decoded, books, matches


async def test_coinbase_repeated_match_is_delivered_once(captures: Path) -> None:
    decoded, expected, matches = coinbase_recorded(captures)
    number = next(n for n, m in enumerate(decoded, 1) if m["type"] == "match")
    replay, collector, books, trades = await coinbase_run(captures, Faults(repeat=frozenset({number})))
    assert collector.feed.stats.duplicates == 1
    assert sorted(t["id"] for t in trades) == sorted(str(m["trade_id"]) for m in matches)
    assert books == expected


async def test_coinbase_malformed_l2update_resyncs_that_book(captures: Path) -> None:
    decoded, expected, matches = coinbase_recorded(captures)
    updates = [n for n, m in enumerate(decoded, 1) if m["type"] == "l2update"]
    replay, collector, books, trades = await coinbase_run(
        captures, Faults(malformed=frozenset({updates[500]})))
    assert collector.feed.stats.malformed == 1 and collector.feed.stats.resyncs == 1
    assert books == expected
    assert len(trades) == len(matches)


async def test_coinbase_connection_closed_mid_stream_rebuilds_books(captures: Path) -> None:
    decoded, expected, matches = coinbase_recorded(captures)
    updates = [n for n, m in enumerate(decoded, 1) if m["type"] == "l2update"]
    replay, collector, books, trades = await coinbase_run(
        captures, Faults(close=frozenset({updates[3000]})))
    assert replay.emulators["coinbase"].connections_total == 2
    assert books == expected
    # the trades that passed while disconnected came from the REST history: every
    # recorded trade exactly once, in id order per product
    assert sorted(t["id"] for t in trades) == sorted(str(m["trade_id"]) for m in matches)
    for product in {t["symbol"] for t in trades}:
        ids = [int(t["id"]) for t in trades if t["symbol"] == product]
        assert ids == sorted(ids)


BINANCE = ("BINANCE.0", "BINANCE.ws.1.0", "BINANCE.http.0.0")


async def test_binance_trade_missed_while_disconnected_is_recovered_once(captures: Path) -> None:
    """The connection is closed at the frame of the LRC-BTC trade: that trade never
    arrives live. After the reconnect the collector fetches the REST aggTrades the
    exchange (the emulator) has seen, and the client gets both recorded trades, each
    once, with contiguous seq; the books resync and end exact."""
    from tests.test_binance_protocol import independent_books
    from tests.test_replay_binance import recorded

    frames, snapshots = recorded(captures)
    tape = merge_frames([read_capture(captures / f) for f in BINANCE])
    lrc = next(n for n, f in enumerate(tape, 1) if "lrcbtc@aggTrade" in f.text)
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(partial(
            serve_replay, [captures / f for f in BINANCE], fast_config(), 20.0,
            {"binance": Faults(close=frozenset({lrc}))}))
        got: list[dict] = []
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{replay.app.port}") as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades", "system"],
                               "symbols": ["binance:*"], "history": 1000})

            async def read() -> None:
                while True:
                    got.extend(messages(await ws.get_message()))

            async with trio.open_nursery() as inner:
                inner.start_soon(read)
                await settle(replay, "binance")
                inner.cancel_scope.cancel()
        collector = replay.app.collectors["binance"]
        books = await served_books(replay.app.port, "binance")
        nursery.cancel_scope.cancel()
    assert replay.emulators["binance"].connections_total == 2
    trades = [m for m in got if m["type"] == "trade"]
    recorded_ids = [str(json.loads(f.text)["data"]["a"]) for f in frames if "@aggTrade" in f.text]
    assert sorted(t["id"] for t in trades) == sorted(recorded_ids)
    for symbol in ("NKN-USDT", "LRC-BTC"):
        assert [t["seq"] for t in trades if t["symbol"] == symbol] == [1]
    assert not [m for m in got if m["type"] == "gap"]
    assert books == independent_books(frames, snapshots)
    assert collector.state_counts["reconnecting"] == 1


async def start_feed_down(nursery: trio.Nursery, captures: Path, mode: str):
    """The Binance emulator with its whole tape played (its REST knows every trade)
    and a daemon whose `mode` feed of NKN-USDT and LRC-BTC points its WebSocket at a
    port where nothing answers, with a 0.5 s polling fallback. Returns the started
    daemon and the emulator's address."""
    from daemon.app import App
    from daemon.config import ExchangeConfig
    from daemon.replay.emulator import Emulator

    emulator = Emulator([read_capture(captures / f) for f in BINANCE], speed=None)
    address = await nursery.start(emulator.serve)
    emulator.started.set()  # the tape plays for REST even with no stream client
    with trio.fail_after(10):
        await emulator.finished.wait()
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))  # a port where nothing answers
    dead_port = listener.getsockname()[1]
    listener.close()
    config = attrs.evolve(fast_config(), exchanges={"binance": ExchangeConfig(
        symbols=["NKN-USDT", "LRC-BTC"], channels=["trades", "ticker"], mode=mode,
        rest_url=address.rest_url, ws_url=f"ws://127.0.0.1:{dead_port}",
        interval=0.1, fallback_after=0.5)})
    app = App(config)
    await nursery.start(app.run)
    return app, address


async def test_the_polling_fallback_engages_while_the_feed_is_down_and_hands_back(
    captures: Path,
) -> None:
    """The emulator's WebSocket refuses the collector (the exchange's stream is
    down, its REST is up): after `fallback_after` the ccxt poller serves the
    symbols (both recorded trades arrive, from REST); when the stream is back the
    breaker closes and the poller stops."""
    async with trio.open_nursery() as nursery:
        app, address = await start_feed_down(nursery, captures, "native")
        got: list[dict] = []
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{app.port}") as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades", "system"],
                               "symbols": ["binance:*"], "history": 100})
            fallback = app.fallbacks["binance"]
            with trio.fail_after(20):
                while len([m for m in got if m["type"] == "trade"]) < 2:
                    got.extend(messages(await ws.get_message()))
            assert fallback.state == "open" and fallback.transitions["open"] == 1
            # the stream comes back: point the collector at the emulator again
            app.collectors["binance"].ws_url = address.ws_url
            with trio.fail_after(20):
                while not any(m.get("state") == "native" for m in got):
                    got.extend(messages(await ws.get_message()))
            assert fallback.state == "closed" and fallback.transitions["closed"] == 1
        nursery.cancel_scope.cancel()
    states = [m["state"] for m in got if m["type"] == "feed_state"]
    assert "fallback" in states and states.index("fallback") < states.index("native")
    trades = [m for m in got if m["type"] == "trade"]
    assert sorted(t["id"] for t in trades) == ["15683430", "9213679"]
    assert fallback.poller is None
