"""The ccxt.pro collector (mode ``watch``): pure normalization, then end to end
through the real emulator on 127.0.0.1 and real ccxt.pro (no mock of ccxt):
books equal to the native collector's, every trade once, faults, shutdown,
backpressure, fallback. Real sockets and threads: real time, every wait bounded."""

from __future__ import annotations

import gc
import json
import logging
import signal
import threading
import warnings
from functools import partial
from pathlib import Path

import attrs
import orjson
import pytest
import trio
import trio_websocket

from daemon.book import L2Book
from daemon.collectors.ccxt.books import BookTracker, side_delta, side_levels
from daemon.collectors.ccxt.bridge import THREAD_PREFIX
from daemon.collectors.ccxt.overrides import rebase_urls
from daemon.collectors.watch import WatchCollector
from daemon.config import (
    AdminConfig,
    Config,
    ConfigError,
    ExchangeConfig,
    ReconnectConfig,
    structure_config,
)
from daemon.events import BookSnapshot, BookUpdate, FeedState, Gap, Ticker, Trade
from daemon.exchanges.base import FeedCounters
from daemon.replay.capture import read_capture
from daemon.replay.emulator import Emulator
from daemon.replay.run import serve_replay, start_when_subscribed
from daemon.replay.tape import Faults, merge_frames
from daemon.replay.venues.binance import BinanceVenue, trade_from_agg_trade
from tests.daemon_process import reaped
from tests.helpers import as_plain, final_books, messages, request

BINANCE = ("BINANCE.0", "BINANCE.ws.1.0", "BINANCE.http.0.0")
SYMBOLS = {"NKN-USDT", "BLZ-ETH", "LRC-BTC", "RUNE-EUR"}


# -- pure: no threads, no sockets ---------------------------------------------------------


def test_side_delta_is_complete_and_best_first() -> None:
    old = {0.5: 1.0, 0.4: 2.0, 0.3: 3.0}
    new = {0.5: 1.0, 0.4: 2.5, 0.35: 1e-05}
    assert side_delta(old, new, True) == (("0.4", "2.5"), ("0.35", "0.00001"), ("0.3", "0"))
    assert side_delta(new, new, True) == ()
    assert side_delta({}, {1.1: 2.0, 1.0: 3.0}, False) == (("1.0", "3.0"), ("1.1", "2.0"))
    assert side_levels({0.1: 5.0, 0.2: 6.0}, True) == (("0.2", "6.0"), ("0.1", "5.0"))


def test_book_tracker_snapshot_then_deltas_then_resync() -> None:
    stats = FeedCounters()
    book = BookTracker("binance", "NKN-USDT", stats)
    first = book.book({0.35: 10.0}, {0.36: 5.0}, 1.0, 2.0)
    assert isinstance(first[0], BookSnapshot) and first[0].bids == (("0.35", "10.0"),)
    assert isinstance(first[1], FeedState) and first[1].state == "synced"
    update = book.book({0.35: 10.0, 0.34: 1.0}, {}, 1.1, 2.1)
    assert len(update) == 1 and isinstance(update[0], BookUpdate)
    assert update[0].bids == (("0.34", "1.0"),) and update[0].asks == (("0.36", "0"),)
    assert book.book({0.35: 10.0, 0.34: 1.0}, {}, 1.2, 2.2) == []  # nothing changed
    lost = book.lost(True, "gap", 3.0)
    assert [e.state for e in lost] == ["resyncing"]
    assert book.lost(False, "again", 3.1) == []  # announced once
    again = book.book({0.33: 1.0}, {0.37: 2.0}, 1.3, 3.2)
    assert isinstance(again[0], BookSnapshot)
    assert (stats.snapshots, stats.book_updates, stats.gaps, stats.resyncs) == (2, 1, 1, 1)
    # applying what went out gives the last copy
    l2 = L2Book()
    l2.load(first[0].bids, first[0].asks)
    l2.apply(update[0].bids, update[0].asks)
    assert l2.levels() == ((("0.35", "10.0"), ("0.34", "1.0")), ())


def test_urls_are_rebased_with_the_exchange_host_kept_in_the_ws_path() -> None:
    urls = {"public": "https://api.binance.com/api/v3",
            "ws": {"spot": "wss://stream.binance.com:9443/ws", "x": "wss://ws.kraken.com"}}
    rebased = rebase_urls(urls, "http://127.0.0.1:1", "ws://127.0.0.1:2")
    assert rebased == {"public": "http://127.0.0.1:1/api/v3",
                       "ws": {"spot": "ws://127.0.0.1:2/stream.binance.com/ws",
                              "x": "ws://127.0.0.1:2/ws.kraken.com"}}


def test_the_emulator_hook_is_the_only_place_that_bends_ccxt_and_only_for_overridden_urls() -> None:
    """``overrides.override_urls`` rebases URLs and gives placeholder credentials to
    an exchange whose ccxt.pro signs public subscriptions, only when a WebSocket URL
    is overridden; on the exchange's own URLs it changes nothing. No ccxt module
    but ``overrides`` names the emulator's placeholders, and ``watch`` does not
    import ``poll``."""
    import ast

    import ccxt

    import daemon.collectors.ccxt as package
    from daemon.collectors.ccxt.overrides import PLACEHOLDER_SECRET, override_urls

    own = ccxt.coinbaseexchange()
    before = repr(own.urls["api"])
    override_urls(own, "coinbaseexchange")
    assert repr(own.urls["api"]) == before and not own.apiKey
    rest_only = ccxt.coinbaseexchange()
    override_urls(rest_only, "coinbaseexchange", "http://127.0.0.1:1")
    assert "127.0.0.1:1" in repr(rest_only.urls["api"]) and not rest_only.apiKey
    emulated = ccxt.coinbaseexchange()
    override_urls(emulated, "coinbaseexchange", "http://127.0.0.1:1", "ws://127.0.0.1:2")
    assert emulated.secret == PLACEHOLDER_SECRET and emulated.apiKey
    other = ccxt.binance()
    override_urls(other, "binance", "http://127.0.0.1:1", "ws://127.0.0.1:2")
    assert not other.apiKey and not other.secret

    folder = Path(package.__file__).parent
    for path in [*folder.glob("*.py"), folder.parent / "watch.py"]:
        text = path.read_text()
        if path.name != "overrides.py":
            assert "PLACEHOLDER" not in text and "SIGNS_PUBLIC" not in text, path
        imported = {node.module for node in ast.walk(ast.parse(text))
                    if isinstance(node, ast.ImportFrom)}
        assert "daemon.collectors.poll" not in imported, path


def test_config_takes_watch_mode_for_ccxt_pro_exchanges_only() -> None:
    config = structure_config({"exchanges": {"okx": {"symbols": ["BTC-USDT"], "mode": "watch"}}})
    assert config.exchanges["okx"].mode == "watch"
    with pytest.raises(ConfigError, match="ccxt.pro streams no exchange 'nope'"):
        structure_config({"exchanges": {"nope": {"symbols": ["BTC-USDT"], "mode": "watch"}}})


def test_the_emulator_serves_raw_streams_and_trade_from_agg_trade(captures: Path) -> None:
    venue = BinanceVenue([read_capture(captures / f) for f in BINANCE])
    assert venue.open("/stream.binance.com/ws/0") == set()
    keys = {"nknusdt@trade", "nknusdt@depth@100ms"}
    frames = read_capture(captures / "BINANCE.ws.1.0").connections[0].received
    agg = next(f.text for f in frames if "nknusdt@aggTrade" in f.text)
    depth = next(f.text for f in frames if "nknusdt@depth" in f.text)
    raw = "/stream.binance.com/ws/0"
    trade = orjson.loads(venue.deliver(raw, keys, "nknusdt@aggTrade", agg))
    recorded = orjson.loads(agg)["data"]
    assert trade == trade_from_agg_trade(recorded)
    assert (trade["e"], trade["t"], trade["p"], trade["q"]) == (
        "trade", recorded["a"], recorded["p"], recorded["q"])
    assert orjson.loads(venue.deliver(raw, keys, "nknusdt@depth@100ms", depth)) == orjson.loads(
        depth)["data"]
    combined = "/stream?streams=nknusdt@trade"
    wrapped = orjson.loads(venue.deliver(combined, {"nknusdt@trade"}, "nknusdt@aggTrade", agg))
    assert wrapped["stream"] == "nknusdt@trade" and wrapped["data"]["t"] == recorded["a"]
    assert venue.deliver(raw, {"blzeth@trade"}, "nknusdt@aggTrade", agg) is None
    # the native collector's combined stream gets the frames as recorded
    assert venue.deliver("/stream?streams=nknusdt@aggTrade", {"nknusdt@aggTrade"},
                         "nknusdt@aggTrade", agg) == agg


# -- end to end ---------------------------------------------------------------------------


def fast_config(**reconnect: float) -> Config:
    config = Config()
    return attrs.evolve(
        config,
        server=attrs.evolve(config.server, listen="127.0.0.1:0"),
        reconnect=ReconnectConfig(base=0.05, cap=0.2, **reconnect),
    )


def recorded_binance(captures: Path):
    from tests.test_binance_protocol import independent_books
    from tests.test_replay_binance import recorded

    frames, snapshots = recorded(captures)
    trade_ids = sorted(str(json.loads(f.text)["data"]["a"]) for f in frames
                       if "@aggTrade" in f.text)
    tickers = {}
    for f in frames:
        if "@bookTicker" in f.text:
            d = json.loads(f.text)["data"]
            tickers[d["s"]] = d
    return frames, independent_books(frames, snapshots), trade_ids, tickers


async def settle(replay, exchange: str = "binance", reconnects: int = 0) -> None:
    """Until the tape is over, the collector has been ``reconnecting`` at least
    ``reconnects`` times (a closed connection reaches it through ccxt's thread,
    possibly after the tape's end), every book synced, and nothing moves for 0.3 s."""
    collector = replay.app.collectors[exchange]
    with trio.fail_after(30):
        await replay.wait_finished()
        last = None
        while True:
            stats = replay.app.dispatcher.statistics()
            now = (collector.statistics().frames, stats.events, collector.state)
            if hasattr(collector, "books"):  # watch mode
                synced = all(book.synced for book in collector.books.values())
            else:
                synced = all(collector.feed.book(s) is not None for s in collector.cfg.symbols)
            if (now == last and stats.buffer_used == 0 and collector.state == "subscribed"
                    and synced and collector.state_counts["reconnecting"] >= reconnects):
                return
            last = now
            await trio.sleep(0.3)


async def served_books(port: int, exchange: str = "binance",
                       count: int = len(SYMBOLS)) -> dict[str, tuple[dict, dict]]:
    """The ``count`` books a new subscriber to ``exchange:*`` gets."""
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}") as ws:
        await ws.get_message()
        await request(ws, {"op": "subscribe", "id": 1, "channels": ["book"],
                           "symbols": [f"{exchange}:*"]})
        books: dict[str, tuple[dict, dict]] = {}
        with trio.fail_after(10):
            while len(books) < count:
                for m in messages(await ws.get_message()):
                    if m["type"] == "book_snapshot":
                        books[m["symbol"]] = (as_plain(m["bids"]), as_plain(m["asks"]))
        return books


async def replay_and_collect(captures: Path, via: str, faults: Faults | None = None,
                             speed: float | None = 10.0, config: Config | None = None,
                             files: tuple[str, ...] = BINANCE, exchange: str = "binance"):
    """Replay ``files`` (default: the Binance capture) through ``via`` with a client
    subscribed to everything of ``exchange``; returns the replay, what the client
    got, and the served books."""
    got: list[dict] = []
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(partial(
            serve_replay, [captures / f for f in files], config or fast_config(), speed,
            {exchange: faults} if faults else None, via=via))
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{replay.app.port}") as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1,
                               "channels": ["trades", "book", "ticker", "system"],
                               "symbols": [f"{exchange}:*"], "history": 1000})

            async def read() -> None:
                while True:
                    got.extend(messages(await ws.get_message()))

            async with trio.open_nursery() as inner:
                inner.start_soon(read)
                await settle(replay, exchange, 1 if faults and faults.close else 0)
                await trio.sleep(0.2)
                inner.cancel_scope.cancel()
        collector = replay.app.collectors[exchange]
        books = await served_books(replay.app.port, exchange, len(collector.cfg.symbols))
        nursery.cancel_scope.cancel()
    return replay, got, books


def check_contiguous(events: list[dict]) -> dict[str, list[int]]:
    streams: dict[str, list[int]] = {}
    for event in events:
        channel = {"book_snapshot": "book", "book_update": "book", "trade": "trades",
                   "ticker": "ticker"}.get(event["type"], "system")
        streams.setdefault(f"{channel}:{event['symbol']}", []).append(event["seq"])
    for key, seqs in streams.items():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), key
    return streams


async def test_watch_mode_end_to_end_equals_the_native_collector(
    captures: Path, tmp_path: Path,
) -> None:
    """The same capture through ccxt.pro and through the native collector, side by
    side: every trade once with contiguous seq, tickers ending on the recorded
    best bid/offer, and final books equal to each other and to the recording."""
    frames, expected, trade_ids, last_tickers = recorded_binance(captures)
    results: dict[str, tuple] = {}

    async def run(via: str) -> None:  # two daemons in one process: an admin socket each
        config = attrs.evolve(fast_config(), admin=AdminConfig(socket=str(tmp_path / via)))
        results[via] = await replay_and_collect(captures, via, config=config)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "ccxt")
        nursery.start_soon(run, "native")
    replay, got, books = results["ccxt"]
    collector = replay.app.collectors["binance"]
    assert type(collector).__name__ == "WatchCollector"
    events = [m for m in got if m["type"] != "ack"]
    check_contiguous(events)
    trades = [m for m in events if m["type"] == "trade"]
    assert sorted(t["id"] for t in trades) == trade_ids
    assert all(t["seq"] == 1 for t in trades)  # one trade per symbol in this capture
    tickers = [m for m in events if m["type"] == "ticker"]
    assert {t["symbol"] for t in tickers} == {"NKN-USDT", "LRC-BTC", "BLZ-ETH"}  # as recorded
    for symbol in ("NKN-USDT", "LRC-BTC", "BLZ-ETH"):
        last = [t for t in tickers if t["symbol"] == symbol][-1]
        recorded = last_tickers[symbol.replace("-", "")]
        assert (last["bid"], last["bid_size"], last["ask"], last["ask_size"]) == (
            recorded["b"], recorded["B"], recorded["a"], recorded["A"])
    snapshots = [m for m in events if m["type"] == "book_snapshot"]
    updates = [m for m in events if m["type"] == "book_update"]
    assert {m["symbol"] for m in snapshots} == SYMBOLS and len(snapshots) == len(SYMBOLS)
    assert len(updates) == collector.stats.book_updates > 0
    for event in events:
        for field in ("price", "size", "bid", "bid_size", "ask", "ask_size"):
            if field in event:
                assert isinstance(event[field], str)
        assert 1.6e9 < event["ts"] < 2e10
    native_books = results["native"][2]
    assert books == native_books == expected
    stats = collector.statistics()
    assert stats.mode == "watch" and stats.counters.resyncs == 0
    print(f"\nwatch end to end: {len(trades)} trades, {len(updates)} book updates, "
          f"{len(snapshots)} snapshots, {len(tickers)} tickers, {stats.frames} bridge items")


async def test_a_dropped_depth_message_is_resynced_through_ccxt(captures: Path) -> None:
    """ccxt.pro raises on the U/u gap; the collector watches again (fresh snapshot),
    clients get one new book_snapshot, and the final book is exact."""
    frames, expected, _, _ = recorded_binance(captures)
    tape = merge_frames([read_capture(captures / f) for f in BINANCE])
    depth = [n for n, f in enumerate(tape, 1) if "nknusdt@depth" in f.text]
    replay, got, books = await replay_and_collect(
        captures, "ccxt", Faults(drop=frozenset({depth[60]})))
    collector = replay.app.collectors["binance"]
    assert collector.stats.resyncs == 1 and collector.stats.gaps == 1
    nkn = [m for m in got if m.get("symbol") == "NKN-USDT"]
    book = [m for m in nkn if m["type"] in ("book_snapshot", "book_update")]
    check_contiguous(book)
    assert [m["type"] for m in book].count("book_snapshot") == 2
    states = [m["state"] for m in nkn if m["type"] == "feed_state"]
    assert states == ["synced", "resyncing", "synced"]
    assert books == expected
    print(f"\nwatch drop: {collector.stats.resyncs} resync, "
          f"{sum(m['type'] == 'book_update' for m in book)} NKN book updates")


async def test_closed_connections_are_watched_again_with_no_duplicate_trade(
    captures: Path,
) -> None:
    """The emulator closes the connection of the NKN trade at that trade (it never
    arrives live) and, later, the NKN book's connection: both are watched again
    after the backoff, the trade is recovered from REST once, the book rebuilt."""
    frames, expected, trade_ids, _ = recorded_binance(captures)
    tape = merge_frames([read_capture(captures / f) for f in BINANCE])
    trade = next(n for n, f in enumerate(tape, 1) if "nknusdt@aggTrade" in f.text)
    depth = [n for n, f in enumerate(tape, 1) if "nknusdt@depth" in f.text]
    replay, got, books = await replay_and_collect(
        captures, "ccxt", Faults(close=frozenset({trade, depth[100]})))
    collector = replay.app.collectors["binance"]
    emulator = replay.emulators["binance"]
    trades = [m for m in got if m["type"] == "trade"]
    assert sorted(t["id"] for t in trades) == trade_ids  # each once
    assert not [m for m in got if m["type"] == "gap"]
    assert collector.state_counts["reconnecting"] >= 1
    assert emulator.connections_total >= 2 + len(collector.books) * 2 + 1  # re-watches
    assert books == expected
    assert replay.app.dispatcher.duplicates == 0
    print(f"\nwatch close: {emulator.connections_total} connections, "
          f"{collector.state_counts['reconnecting']} reconnecting, {len(trades)} trades")


async def test_a_malformed_frame_kills_a_ccxt_connection_that_is_watched_again(
    captures: Path,
) -> None:
    """ccxt cannot parse the frame and its receive loop for that connection dies:
    it is counted, the keepalive (stale_after / 2) finds the connection dead, and
    the book is watched again and ends exact."""
    frames, expected, _, _ = recorded_binance(captures)
    tape = merge_frames([read_capture(captures / f) for f in BINANCE])
    depth = [n for n, f in enumerate(tape, 1) if "nknusdt@depth" in f.text]
    replay, got, books = await replay_and_collect(
        captures, "ccxt", Faults(malformed=frozenset({depth[40]})),
        config=fast_config(stale_after=0.6))
    collector = replay.app.collectors["binance"]
    assert collector.stats.malformed == 1
    assert collector.state_counts["reconnecting"] >= 1
    assert books == expected


# -- shutdown, backpressure, fallback ------------------------------------------------------


def watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


async def test_cancelling_the_collector_leaves_no_thread_and_no_resource_warning(
    captures: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    before = set(threading.enumerate())
    gc.collect()  # what earlier tests left is collected (and warned about) before this one
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with trio.open_nursery() as nursery:
            emulator = Emulator([read_capture(captures / f) for f in BINANCE], speed=5.0,
                                autostart=False)
            address = await nursery.start(emulator.serve)
            send, receive = trio.open_memory_channel(1000)
            cfg = ExchangeConfig(symbols=sorted(SYMBOLS), mode="watch", depth=1000,
                                 rest_url=address.rest_url, ws_url=address.ws_url)
            collector = WatchCollector("binance", cfg, ReconnectConfig(), send)
            nursery.start_soon(start_when_subscribed, emulator, collector)
            got: list = []

            async def drain() -> None:
                async for event in receive:
                    got.append(event)

            nursery.start_soon(drain)
            scope = trio.CancelScope()
            nursery.start_soon(_run_in, scope, collector.run)
            with trio.fail_after(15):
                while sum(isinstance(e, BookUpdate) for e in got) < 3:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert len(watch_threads()) == 1
            assert collector.statistics().bridge.thread_alive
            with trio.fail_after(5):
                scope.cancel()
                while collector.bridge.thread.is_alive():  # noqa: ASYNC110
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        gc.collect()
    assert watch_threads() == []
    leftover = [t for t in set(threading.enumerate()) - before
                if not t.name.startswith("Trio thread")]  # trio's idle thread cache
    assert leftover == []
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert not [r for r in caplog.records if "nclosed" in r.getMessage()
                or "release all resources" in r.getMessage()]


async def _run_in(scope: trio.CancelScope, fn) -> None:
    with scope:
        await fn()


async def test_sigterm_while_streaming_through_ccxt_exits_0_within_5s(captures: Path) -> None:
    from tests.test_cli import start_replay

    process, port, _ = await start_replay(captures, "--speed", "1", "--via", "ccxt")
    async with reaped(process), trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}") as ws:
        await ws.get_message()
        await request(ws, {"op": "subscribe", "id": 1, "channels": ["book"],
                           "symbols": ["binance:NKN-USDT"]})
        with trio.fail_after(30):
            while not any(m["type"] == "book_update" for m in messages(await ws.get_message())):
                pass
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await process.wait() == 0


async def test_backpressure_holds_the_bridge_at_its_bound_and_drops_nothing(
    captures: Path,
) -> None:
    """The dispatcher is stalled: the bridge's channel fills to its bound and stays
    there, the worker waits (and with it ccxt); once the dispatcher runs again,
    every event arrives and the books end exact."""
    from daemon.dispatch import Dispatcher

    frames, expected, trade_ids, _ = recorded_binance(captures)
    bound = 8
    dispatcher = Dispatcher(4, {})
    running = trio.Event()
    running.set()
    async with trio.open_nursery() as nursery:
        # paced: at full speed ccxt folds what piles up between two returns of a watch
        # into one result (22-29 results from this tape in three runs, 30 in three paced ones), and a
        # burst can leave fewer than it takes to fill the bridge (a full run timed out
        # here once)
        emulator = Emulator([read_capture(captures / f) for f in BINANCE], speed=None,
                            rate=500, autostart=False)
        address = await nursery.start(emulator.serve)
        send, receive = trio.open_memory_channel(4)  # the dispatcher's bounded input
        cfg = ExchangeConfig(symbols=sorted(SYMBOLS), mode="watch", depth=1000,
                             rest_url=address.rest_url, ws_url=address.ws_url)
        collector = WatchCollector("binance", cfg, ReconnectConfig(), send, buffer=bound)

        async def dispatch() -> None:  # Dispatcher.serve, with a switch to stall it
            async for event in receive:
                await running.wait()
                dispatcher.publish(event)

        nursery.start_soon(dispatch)
        nursery.start_soon(collector.run)
        with trio.fail_after(15):
            while collector.state != "subscribed":
                await collector.wait_state_change()
        running = trio.Event()  # stalled from the next event on
        emulator.started.set()
        with trio.fail_after(15):
            # full, and the worker blocked on its next hand-off
            while (collector.channel.statistics().current_buffer_used < bound
                   or not collector.statistics().bridge.waiting):  # noqa: ASYNC110
                await trio.sleep(0.02)
        items_while_stalled = collector.items
        samples = []
        for _ in range(10):  # stalled: full, the worker waiting, nothing taken
            bridge = collector.statistics().bridge
            samples.append((bridge.buffer_used, bridge.waiting, collector.items))
            await trio.sleep(0.05)
        assert samples == [(bound, 1, items_while_stalled)] * 10
        running.set()
        with trio.fail_after(20):
            await emulator.finished.wait()
            last = None
            while (collector.items, dispatcher.events) != last:
                last = (collector.items, dispatcher.events)
                await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    assert collector.statistics().bridge.peak_buffer == bound
    assert collector.items > items_while_stalled + bound
    assert collector.stats.resyncs == 0 and dispatcher.rejected == 0
    books = {s: dispatcher.streams[f"book:binance:{s}"].book.levels() for s in SYMBOLS}
    assert {s: (as_plain(b), as_plain(a)) for s, (b, a) in books.items()} == expected
    trades = [i for key, stream in dispatcher.streams.items() if key.startswith("trades:")
              for i in stream.trade_ids]
    assert sorted(trades) == trade_ids
    print(f"\nwatch backpressure: {collector.items} bridge items, bound {bound}, "
          f"{dispatcher.events} events")


async def test_binanceus_through_ccxt_pro(captures: Path) -> None:
    """ccxt.pro's ``binanceus`` on the emulated exchange: its own URLs
    (``stream.binance.us``) rebased, the same protocol, the same books."""
    frames, expected, trade_ids, _ = recorded_binance(captures)
    async with trio.open_nursery() as nursery:
        emulator = Emulator([read_capture(captures / f) for f in BINANCE], speed=None,
                            autostart=False)
        address = await nursery.start(emulator.serve)
        send, receive = trio.open_memory_channel(100_000)
        cfg = ExchangeConfig(symbols=sorted(SYMBOLS), channels=["book", "trades"],
                             mode="watch", depth=1000, rest_url=address.rest_url,
                             ws_url=address.ws_url)
        collector = WatchCollector("binanceus", cfg, ReconnectConfig(), send)
        nursery.start_soon(collector.run)
        nursery.start_soon(start_when_subscribed, emulator, collector)
        with trio.fail_after(20):
            await emulator.finished.wait()
            while not all(b.synced for b in collector.books.values()):  # noqa: ASYNC110
                await trio.sleep(0.05)
            await trio.sleep(0.3)
        paths = [c.path for c in emulator.connections]
        nursery.cancel_scope.cancel()
    send.close()
    events = [e async for e in receive]
    assert final_books(events) == expected
    assert all(e.exchange == "binanceus" for e in events)
    assert not [e for e in events if isinstance(e, Ticker | Gap)]
    assert paths and all(path.startswith("/stream.binance.us/ws/") for path in paths)
    assert sorted(e.id for e in events if isinstance(e, Trade)) == trade_ids


async def test_the_polling_fallback_serves_a_watch_feed_that_is_down(captures: Path) -> None:
    """ccxt.pro cannot reach the stream (its REST is up): after ``fallback_after``
    the poller serves the symbols' trades."""
    from tests.test_faults import start_feed_down

    async with trio.open_nursery() as nursery:
        app, _ = await start_feed_down(nursery, captures, "watch")
        got: list[dict] = []
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{app.port}") as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades", "system"],
                               "symbols": ["binance:*"], "history": 100})
            with trio.fail_after(20):
                while len([m for m in got if m["type"] == "trade"]) < 2:
                    got.extend(messages(await ws.get_message()))
        fallback = app.fallbacks["binance"]
        assert fallback.state == "open"
        assert app.collectors["binance"].state == "reconnecting"
        nursery.cancel_scope.cancel()
    states = [m["state"] for m in got if m["type"] == "feed_state"]
    assert "reconnecting" in states and "fallback" in states
    assert sorted(t["id"] for t in got if t["type"] == "trade") == ["15683430", "9213679"]


async def test_replay_via_ccxt_serves_every_emulated_exchange(captures: Path) -> None:
    from daemon.replay.run import VIA_CCXT

    assert set(VIA_CCXT) == {"binance", "binanceus", "coinbase", "kraken"}
    with pytest.raises(ValueError, match="via must be 'native' or 'ccxt'"):
        await serve_replay([captures / "KRAKEN.0"], fast_config(), via="ws")


def test_replay_help_offers_via(captures: Path) -> None:
    from tests.test_cli import run_cli

    result = run_cli("replay", "--help")
    assert result.returncode == 0 and "--via [native|ccxt]" in result.stdout


async def test_the_hand_off_keeps_order_holds_its_bound_and_frees_a_waiting_worker() -> None:
    """The bridge's hand-off, with a plain thread: items arrive in order; with
    trio taking none, the worker stops at the bound, waiting; ``close`` frees it
    with ``ClosedResourceError``."""
    import threading

    from daemon.collectors.ccxt.bridge import HandOff

    bound = 4
    send, receive = trio.open_memory_channel[tuple](bound)
    hand_off = HandOff(send, bound)
    handed: list[int] = []
    ended: list[BaseException] = []

    def worker() -> None:
        try:
            for n in range(100):
                hand_off(("item", n))
                handed.append(n)
        except BaseException as exc:  # noqa: BLE001 - what ended it is the point
            ended.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        with trio.fail_after(10):
            while not hand_off.waiting:  # noqa: ASYNC110 - a thread, not a trio task
                await trio.sleep(0.01)
        assert len(handed) == bound and receive.statistics().current_buffer_used == bound
        got = []
        with trio.fail_after(10):
            while len(got) < 50:
                got.append((await receive.receive())[1])
                hand_off.taken()
        assert got == list(range(50))
        with trio.fail_after(10):
            while not hand_off.waiting or receive.statistics().current_buffer_used < bound:  # noqa: ASYNC110
                await trio.sleep(0.01)
        hand_off.close()
    finally:
        await trio.to_thread.run_sync(thread.join, 10)
    assert not thread.is_alive()
    assert len(ended) == 1 and isinstance(ended[0], trio.ClosedResourceError)
    assert handed == list(range(50 + bound))


async def test_an_unreachable_exchange_is_failed_with_its_cause_as_the_last_error() -> None:
    """Nothing listens on the exchange's port: ccxt.pro's market load fails, the
    feed is ``failed`` and its statistics name the cause (the refused connection),
    as the native collector's do."""
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    cfg = ExchangeConfig(symbols=["NKN-USDT"], mode="watch", rest_url=f"http://127.0.0.1:{port}",
                         ws_url=f"ws://127.0.0.1:{port}")
    send, receive = trio.open_memory_channel(100)
    collector = WatchCollector("binance", cfg, ReconnectConfig(base=0.05, cap=0.2), send)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collector.run)
        with trio.fail_after(20):
            while collector.state_counts["failed"] < 2:
                await collector.wait_state_change()
        nursery.cancel_scope.cancel()
    stats = collector.statistics()
    assert stats.state == "failed" and stats.last_error is not None
    assert stats.last_error.startswith("ConnectionRefusedError: ")
    assert stats.last_error_age is not None and stats.last_error_age >= 0
    assert not stats.bridge.thread_alive
