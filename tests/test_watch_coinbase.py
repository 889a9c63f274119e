"""Coinbase Exchange through ccxt.pro (``coinbaseexchange``, mode ``watch``) on the
emulator, end to end to a real WebSocket client, beside the native collector on
the same capture (``COINBASE.0``, ``COINBASE.ws.28.0``). Real ccxt, real sockets
on 127.0.0.1; expected values computed here from the raw frames."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import trio

from daemon.collectors.ccxt.adapter import make_pro_exchange
from daemon.collectors.ccxt.common import watch_ticker_event
from daemon.config import AdminConfig
from daemon.replay.capture import read_capture
from daemon.replay.run import VIA_CCXT
from daemon.replay.tape import Faults, merge_frames
from daemon.replay.venues.coinbase import CoinbaseVenue
from tests.helpers import apply_levels, as_plain
from tests.test_watch import check_contiguous, fast_config, replay_and_collect

COINBASE = ("COINBASE.0", "COINBASE.ws.28.0")


def recorded_coinbase(captures: Path):
    """``(decoded tape, final books, trade keys, last ticker by product)`` of the
    capture: trades are ``match`` and ``last_match`` frames, keyed ``(product, id)``."""
    tape = merge_frames([read_capture(captures / f) for f in COINBASE])
    decoded = [json.loads(frame.text) for frame in tape]
    books: dict[str, tuple[dict, dict]] = {}
    trades: set[tuple[str, str]] = set()
    tickers: dict[str, dict] = {}
    for m in decoded:
        kind, product = m["type"], m.get("product_id")
        if kind == "snapshot":
            books[product] = (as_plain(m["bids"]), as_plain(m["asks"]))
        elif kind == "l2update" and product in books:
            bids, asks = books[product]
            for side, price, size in m["changes"]:
                apply_levels(bids if side == "buy" else asks, [(price, size)])
        elif kind in ("match", "last_match"):
            trades.add((product, str(m["trade_id"])))
        elif kind == "ticker":
            tickers[product] = m
    return decoded, books, trades, tickers


def test_the_venue_names_the_keys_ccxt_subscribes(captures: Path) -> None:
    venue = CoinbaseVenue([read_capture(captures / f) for f in COINBASE])
    assert venue.watch_keys(["SKL-GBP", "BAND-BTC"], ["trades", "book", "ticker"]) == {
        "matches:SKL-GBP", "level2:SKL-GBP", "ticker:SKL-GBP",
        "matches:BAND-BTC", "level2:BAND-BTC", "ticker:BAND-BTC"}
    assert "coinbase" in VIA_CCXT


def test_placeholder_credentials_only_on_overridden_urls() -> None:
    """ccxt.pro signs Coinbase level2 subscriptions: pointed at the emulator it
    gets placeholders; on the real URLs, nothing; other exchanges never."""
    async def make(exchange_id: str, url: str):
        api = make_pro_exchange(exchange_id, url, url.replace("http", "ws"))
        await api.close()
        return api

    async def main() -> None:
        emulated = await make("coinbaseexchange", "http://127.0.0.1:1")
        assert emulated.apiKey and emulated.secret and emulated.password
        emulated.authenticate()  # a valid signature of the placeholder secret
        assert type(emulated).__name__ == "CoinbaseExchange"
        real = await make("coinbaseexchange", "")
        assert not real.apiKey and not real.secret
        assert real.urls["api"]["ws"] == "wss://ws-feed.exchange.coinbase.com"
        binance = await make("binance", "http://127.0.0.1:1")
        assert not binance.apiKey

    import asyncio

    asyncio.run(main())


def test_a_ticker_without_sizes_keeps_empty_sizes() -> None:
    info = {"best_bid": "14.7550", "best_ask": "14.8060"}
    ticker = {"bid": 14.755, "ask": 14.806, "bidVolume": None, "askVolume": None,
              "timestamp": 1618677810244, "info": info}
    event = watch_ticker_event("coinbase", "BAND-GBP", ticker, 2.0)
    assert event is not None
    assert (event.bid, event.bid_size, event.ask, event.ask_size) == ("14.7550", "", "14.8060", "")
    assert watch_ticker_event("coinbase", "BAND-GBP", {**ticker, "bid": None}, 2.0) is None


async def test_coinbase_through_ccxt_pro_equals_the_native_collector(
    captures: Path, tmp_path: Path,
) -> None:
    """Both paths side by side: every recorded trade once (``last_match`` too) with
    contiguous seq, tickers ending on the recorded best bid/offer, and final books
    equal to each other and to the recording."""
    decoded, expected, trade_keys, last_tickers = recorded_coinbase(captures)
    results: dict[str, tuple] = {}

    async def run(via: str) -> None:
        config = attrs.evolve(fast_config(), admin=AdminConfig(socket=str(tmp_path / via)))
        results[via] = await replay_and_collect(captures, via, config=config, speed=None,
                                                files=COINBASE, exchange="coinbase")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "ccxt")
        nursery.start_soon(run, "native")
    replay, got, books = results["ccxt"]
    collector = replay.app.collectors["coinbase"]
    assert type(collector).__name__ == "WatchCollector"
    assert collector.ccxt_id == "coinbaseexchange"
    events = [m for m in got if m["type"] != "ack"]
    check_contiguous(events)
    trades = [m for m in events if m["type"] == "trade"]
    keys = [(t["symbol"], t["id"]) for t in trades]
    assert len(keys) == len(set(keys)) == len(trade_keys) == 107
    assert set(keys) == trade_keys
    native_trades = {(m["symbol"], m["id"]): m for m in results["native"][1]
                     if m["type"] == "trade"}
    for t in trades:  # the same trade as the native collector's (ccxt's time: ms)
        n = native_trades[t["symbol"], t["id"]]
        assert (t["price"], t["size"], t["side"]) == (n["price"], n["size"], n["side"])
        assert abs(t["ts"] - n["ts"]) < 0.001
    assert not [m for m in events if m["type"] == "gap"]
    tickers = [m for m in events if m["type"] == "ticker"]
    assert {t["symbol"] for t in tickers} == set(last_tickers)
    for product, recorded in last_tickers.items():
        last = [t for t in tickers if t["symbol"] == product][-1]
        assert (last["bid"], last["bid_size"], last["ask"], last["ask_size"]) == (
            recorded["best_bid"], "", recorded["best_ask"], "")
    snapshots = [m for m in events if m["type"] == "book_snapshot"]
    updates = [m for m in events if m["type"] == "book_update"]
    assert {m["symbol"] for m in snapshots} == set(expected) and len(snapshots) == len(expected)
    assert len(updates) == collector.stats.book_updates > 0
    native_books = results["native"][2]
    assert books == native_books == expected
    stats = collector.statistics()
    assert stats.counters.resyncs == 0
    print(f"\ncoinbase watch: {len(trades)} trades, {len(updates)} book updates, "
          f"{len(snapshots)} snapshots, {len(tickers)} tickers, {stats.frames} bridge items, "
          f"{stats.counters.resyncs} resyncs")


async def test_a_closed_coinbase_connection_recovers_trades_by_id(captures: Path) -> None:
    """The emulator closes the connection at a match (it never arrives live): ccxt
    watches again after the backoff, the missed trades come back from the REST
    history once, deduplicated by id; the books rebuild exact."""
    decoded, expected, trade_keys, _ = recorded_coinbase(captures)
    matches = [n for n, m in enumerate(decoded, 1) if m["type"] == "match"]
    replay, got, books = await replay_and_collect(
        captures, "ccxt", Faults(close=frozenset({matches[len(matches) // 2]})), speed=None,
        files=COINBASE, exchange="coinbase")
    collector = replay.app.collectors["coinbase"]
    trades = [m for m in got if m["type"] == "trade"]
    keys = [(t["symbol"], t["id"]) for t in trades]
    assert len(keys) == len(set(keys)) and set(keys) == trade_keys
    assert not [m for m in got if m["type"] == "gap"]
    assert collector.state_counts["reconnecting"] >= 1
    assert replay.emulators["coinbase"].connections_total >= 2
    assert books == expected
    check_contiguous([m for m in got if m["type"] != "ack"])
    print(f"\ncoinbase watch close: {len(trades)} trades, "
          f"{collector.state_counts['reconnecting']} reconnecting, "
          f"{collector.stats.resyncs} resyncs, {collector.stats.book_updates} book updates")


def test_credentials_come_from_the_environment_never_the_file(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """``credentials_env`` names environment variables: missing ones are a config
    error naming the key; present ones reach ccxt.pro (instead of the emulator's
    placeholders) and appear in no repr or log line."""
    from daemon.config import ConfigError, load_config

    path = tmp_path / "tickwire.toml"
    path.write_text('[exchanges.coinbase]\nmode = "watch"\nsymbols = ["BTC-USD"]\n'
                    'credentials_env = "TW_TEST_COINBASE"\n')
    for name in ("APIKEY", "SECRET", "PASSWORD"):
        monkeypatch.delenv(f"TW_TEST_COINBASE_{name}", raising=False)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == ("TW_TEST_COINBASE_APIKEY and "
                                  "TW_TEST_COINBASE_SECRET not set in the environment "
                                  "@ exchanges.coinbase.credentials_env")

    secret = "c2VjcmV0LW9mLXRoZS10ZXN0"  # base64, as Coinbase's secrets are
    monkeypatch.setenv("TW_TEST_COINBASE_APIKEY", "key-of-the-test")
    monkeypatch.setenv("TW_TEST_COINBASE_SECRET", secret)
    monkeypatch.setenv("TW_TEST_COINBASE_PASSWORD", "passphrase-of-the-test")
    exchange = load_config(path).exchanges["coinbase"]
    credentials = exchange.credentials()
    assert credentials == {"apiKey": "key-of-the-test", "secret": secret,
                           "password": "passphrase-of-the-test"}
    assert secret not in repr(exchange)

    async def main() -> None:
        api = make_pro_exchange("coinbaseexchange", "http://127.0.0.1:1", "ws://127.0.0.1:1",
                                config=credentials)
        await api.close()
        assert (api.apiKey, api.secret, api.password) == (
            "key-of-the-test", secret, "passphrase-of-the-test")  # not the placeholders

    import asyncio

    asyncio.run(main())
    assert secret not in caplog.text
