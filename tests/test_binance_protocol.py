"""The Binance protocol on the recorded Binance traffic, with no socket."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import attrs
import orjson
import pytest

from daemon.events import BookSnapshot, BookUpdate, FeedState, Gap, Ticker, Trade
from daemon.exchanges.base import FeedStatistics, FetchSnapshot, FetchTrades, Malformed
from daemon.exchanges.binance import BinanceFeed, parse_markets
from daemon.replay.capture import read_capture
from daemon.replay.venues.binance import BinanceVenue
from tests.helpers import apply_levels, as_plain, consumer_books

SYMBOLS = ["NKN-USDT", "BLZ-ETH", "LRC-BTC", "RUNE-EUR"]


@pytest.fixture(scope="module")
def recorded(captures: Path):
    markets = parse_markets(read_capture(captures / "BINANCE.0").rest[0].body)
    snapshots = {}
    for response in read_capture(captures / "BINANCE.http.0.0").rest:
        native = parse_qs(urlsplit(response.url).query)["symbol"][0]
        snapshots[markets[native]] = response.body
    frames = read_capture(captures / "BINANCE.ws.1.0").connections[0].received
    return markets, snapshots, frames


def play(feed: BinanceFeed, frames, snapshots) -> list:
    """Feed frames; answer each FetchSnapshot with the recorded REST snapshot at once."""
    events: list = []
    pending = list(feed.on_open(0.0))
    for frame in [None, *frames]:
        if frame is not None:
            pending = feed.on_message(frame.text, frame.ts)
        for output in pending:
            events.append(output)
            if isinstance(output, FetchSnapshot):
                ts = frame.ts if frame is not None else 0.0
                events.extend(feed.on_snapshot(output.symbol, snapshots[output.symbol], ts))
    return events


def independent_books(frames, snapshots) -> dict[str, tuple[dict, dict]]:
    """Binance's documented procedure, written plainly: snapshot, then every event
    with u > lastUpdateId in stream order."""
    books = {}
    for symbol, body in snapshots.items():
        snap = orjson.loads(body)
        books[symbol] = [as_plain(snap["bids"]), as_plain(snap["asks"]), snap["lastUpdateId"]]
    for frame in frames:
        message = orjson.loads(frame.text)
        if "@depth" not in message["stream"]:
            continue
        data = message["data"]
        symbol = {"NKNUSDT": "NKN-USDT", "BLZETH": "BLZ-ETH", "LRCBTC": "LRC-BTC",
                  "RUNEEUR": "RUNE-EUR"}[data["s"]]
        bids, asks, last = books[symbol]
        if data["u"] <= last:
            continue
        apply_levels(bids, data["b"])
        apply_levels(asks, data["a"])
        books[symbol][2] = data["u"]
    return {symbol: (bids, asks) for symbol, (bids, asks, _) in books.items()}


def test_markets_normalize_to_base_quote(recorded) -> None:
    markets, _, _ = recorded
    assert markets["NKNUSDT"] == "NKN-USDT"
    assert markets["ETHBTC"] == "ETH-BTC"
    assert len(markets) == 1695


def test_every_agg_trade_becomes_one_trade(recorded) -> None:
    markets, snapshots, frames = recorded
    feed = BinanceFeed(SYMBOLS, ["trades", "book", "ticker"], markets)
    events = play(feed, frames, snapshots)
    recorded_trades = [orjson.loads(f.text)["data"] for f in frames if "@aggTrade" in f.text]
    trades = [e for e in events if isinstance(e, Trade)]
    assert len(recorded_trades) == 2
    assert [(t.id, t.price, t.size) for t in trades] == [
        (str(d["a"]), d["p"], d["q"]) for d in recorded_trades
    ]
    nkn = trades[0]
    assert nkn.symbol == "NKN-USDT" and nkn.side == "buy" and nkn.ts == 1633998523.963
    tickers = [e for e in events if isinstance(e, Ticker)]
    assert len(tickers) == sum("@bookTicker" in f.text for f in frames) == 84


def test_final_books_equal_an_independent_application(recorded) -> None:
    markets, snapshots, frames = recorded
    feed = BinanceFeed(SYMBOLS, ["book"], markets)
    events = play(feed, frames, snapshots)
    expected = independent_books(frames, snapshots)
    consumer = consumer_books(events)
    assert set(consumer) == set(SYMBOLS)
    for symbol in SYMBOLS:
        bids, asks = feed.book(symbol).levels()
        assert (as_plain(bids), as_plain(asks)) == expected[symbol], symbol
        bids, asks = consumer[symbol].levels()
        assert (as_plain(bids), as_plain(asks)) == expected[symbol], symbol
    assert feed.stats.gaps == 0 and feed.stats.resyncs == 0
    assert feed.stats.snapshots == 4


def test_a_gap_triggers_a_resync_from_a_fresh_snapshot(captures: Path, recorded) -> None:
    """A capture edited to lose one depth event: the gap is detected, the book is
    resynced from a fresh snapshot (the emulator's book at that moment, as Binance
    would answer), and the final book is exact again."""
    markets, snapshots, frames = recorded
    depth = [i for i, f in enumerate(frames) if "nknusdt@depth" in f.text]
    lost = depth[40]
    edited = frames[:lost] + frames[lost + 1 :]
    venue = BinanceVenue([read_capture(captures / "BINANCE.http.0.0")])
    feed = BinanceFeed(SYMBOLS, ["book"], markets)
    events: list = []
    fetches = []
    pending = feed.on_open(0.0)
    for i, frame in enumerate([None, *frames], -1):
        if frame is not None:
            venue.route(frame)  # the exchange's own book moves on, lost event included
            if i == lost:
                continue
            pending = feed.on_message(frame.text, frame.ts)
        for output in pending:
            events.append(output)
            if isinstance(output, FetchSnapshot):
                fetches.append(output.symbol)
                status, body = venue.rest(output.target)
                assert status == 200
                events.extend(feed.on_snapshot(output.symbol, body, frame.ts if frame else 0.0))
    assert len(edited) == len(frames) - 1
    assert feed.stats.gaps == 1 and feed.stats.resyncs == 1
    assert fetches.count("NKN-USDT") == 2  # at connect, and after the gap
    gap = next(e for e in events if isinstance(e, FeedState) and "gap" in e.detail)
    assert gap.symbol == "NKN-USDT" and gap.state == "resyncing"
    after_gap = events[events.index(gap) + 1 :]
    first_nkn = next(
        e for e in after_gap if isinstance(e, BookSnapshot | BookUpdate) and e.symbol == "NKN-USDT"
    )
    assert isinstance(first_nkn, BookSnapshot)  # clients get the new book whole
    expected = independent_books(frames, snapshots)
    for symbol in SYMBOLS:
        bids, asks = feed.book(symbol).levels()
        assert (as_plain(bids), as_plain(asks)) == expected[symbol], symbol


def test_malformed_frames_are_counted_and_skipped(recorded) -> None:
    markets, snapshots, frames = recorded
    feed = BinanceFeed(SYMBOLS, ["trades", "book", "ticker"], markets)
    play(feed, frames, snapshots)
    bad = [
        "not json",
        '{"stream":"nknusdt@aggTrade"}',
        '{"stream":"nknusdt@aggTrade","data":{"a":99999999,"p":0.35,"q":"1","T":1,"m":true}}',
        '{"stream":"xxxyyy@aggTrade","data":{}}',
        '{"stream":"nknusdt@bookTicker","data":{"b":"1"}}',
    ]
    for text in bad:
        outputs = feed.on_message(text, 1.0)
        assert any(isinstance(o, Malformed) for o in outputs), text
    assert feed.stats.malformed == len(bad)
    # a malformed depth event of a synced book resyncs that book only
    outputs = feed.on_message('{"stream":"nknusdt@depth@100ms","data":{"U":"x"}}', 1.0)
    assert any(isinstance(o, FetchSnapshot) and o.symbol == "NKN-USDT" for o in outputs)
    assert feed.book("NKN-USDT") is None and feed.book("LRC-BTC") is not None


def test_trades_missed_while_disconnected_are_recovered_once(recorded) -> None:
    """Reconnect between the two recorded trades: the missed LRC-BTC trade comes
    from the REST history (by exchange time, as no LRC trade was seen before), and
    when the same trade also arrives live it is not delivered twice."""
    markets, snapshots, frames = recorded
    feed = BinanceFeed(SYMBOLS, ["trades"], markets)
    feed.on_open(0.0)
    lrc_at = next(i for i, f in enumerate(frames) if "lrcbtc@aggTrade" in f.text)
    delivered = []
    for frame in frames[:lrc_at]:
        delivered += [o for o in feed.on_message(frame.text, frame.ts) if isinstance(o, Trade)]
    assert [t.symbol for t in delivered] == ["NKN-USDT"]
    outputs = feed.on_open(1.0)  # the reconnect
    fetches = {o.symbol: o.target for o in outputs if isinstance(o, FetchTrades)}
    assert fetches["NKN-USDT"] == "/api/v3/aggTrades?symbol=NKNUSDT&fromId=15683431&limit=1000"
    assert fetches["LRC-BTC"].startswith("/api/v3/aggTrades?symbol=LRCBTC&startTime=16339985")
    lrc = orjson.loads(frames[lrc_at].text)["data"]
    page = orjson.dumps([{k: lrc[k] for k in ("a", "p", "q", "f", "l", "T", "m", "M")}])
    recovered = feed.on_trades("LRC-BTC", page, 2.0)
    assert [(t.symbol, t.id, t.price) for t in recovered] == [("LRC-BTC", str(lrc["a"]), lrc["p"])]
    assert feed.on_trades("NKN-USDT", b"[]", 2.0) == []
    assert feed.on_message(frames[lrc_at].text, 3.0) == []  # the same trade, live: dropped
    assert feed.stats.duplicates == 1 and feed.stats.trades == 2


def test_a_jump_in_trade_ids_is_recovered_and_what_is_missing_is_a_gap(recorded) -> None:
    markets, _, frames = recorded
    feed = BinanceFeed(SYMBOLS, ["trades"], markets)
    feed.on_open(0.0)
    nkn = next(f for f in frames if "nknusdt@aggTrade" in f.text)
    feed.on_message(nkn.text, nkn.ts)
    data = orjson.loads(nkn.text)

    def frame(agg_id: int) -> str:
        return orjson.dumps({**data, "data": {**data["data"], "a": agg_id}}).decode()

    base = data["data"]["a"]
    outputs = feed.on_message(frame(base + 5), 1.0)  # ids base+1..base+4 missing
    assert outputs == [FetchTrades("NKN-USDT", f"/api/v3/aggTrades?symbol=NKNUSDT&fromId={base + 1}&limit=1000")]
    assert feed.on_message(frame(base + 6), 1.1) == []  # held until recovery is done
    page = orjson.dumps([{**data["data"], "a": base + 1}, {**data["data"], "a": base + 2}])
    outputs = feed.on_trades("NKN-USDT", page, 2.0)
    assert [o.id if isinstance(o, Trade) else (o.from_id, o.to_id) for o in outputs] == [
        str(base + 1), str(base + 2), (str(base + 3), str(base + 4)), str(base + 5), str(base + 6)]
    assert isinstance(outputs[2], Gap) and outputs[2].stream == "trades"
    assert feed.stats.gaps == 1


def test_statistics_is_a_frozen_copy_of_the_counters(recorded) -> None:
    markets, snapshots, frames = recorded
    feed = BinanceFeed(SYMBOLS, ["book", "trades", "ticker"], markets)
    play(feed, frames, snapshots)
    stats = feed.statistics()
    assert stats == FeedStatistics(**attrs.asdict(feed.stats))
    assert stats.messages == len(frames) and stats.snapshots == 4 and stats.trades == 2
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.messages = 0  # type: ignore[misc]
    feed.on_message(frames[0].text, frames[0].ts)
    assert stats.messages == len(frames)  # a copy: the feed counts on
    assert feed.statistics().messages == len(frames) + 1
