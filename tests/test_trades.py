"""The trade tracker (daemon.trades) on real trades: the Binance aggTrades, Coinbase
matches and Kraken trades of the recorded captures, as the feeds parse them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.events import Gap, Trade
from daemon.exchanges.base import FeedCounters, FetchTrades
from daemon.exchanges.binance import TRADE_RULES as BINANCE
from daemon.exchanges.coinbase import TRADE_RULES as COINBASE
from daemon.exchanges.coinbase import CoinbaseFeed
from daemon.exchanges.coinbase import parse_markets as coinbase_markets
from daemon.exchanges.kraken import TRADE_RULES as KRAKEN
from daemon.exchanges.kraken import KrakenFeed
from daemon.exchanges.kraken import parse_markets as kraken_markets
from daemon.replay.capture import read_capture
from daemon.trades import TradeTracker


def _trades(feed, frames) -> list[Trade]:
    feed.on_open(0.0)
    return [o for f in frames for o in feed.on_message(f.text, f.ts) if isinstance(o, Trade)]


@pytest.fixture(scope="module")
def coinbase_trades(captures: Path) -> list[Trade]:
    """The matches (last_match included) of the capture's busiest product."""
    conn = read_capture(captures / "COINBASE.ws.28.0").connections[0]
    markets = coinbase_markets(read_capture(captures / "COINBASE.0").rest[0].body)
    products = json.loads(conn.sent[0][1])["product_ids"]
    trades = _trades(CoinbaseFeed([markets[p] for p in products], ["trades"], markets),
                     conn.received)
    counts: dict[str, int] = {}
    for t in trades:
        counts[t.symbol] = counts.get(t.symbol, 0) + 1
    busiest = max(counts, key=counts.__getitem__)
    return [t for t in trades if t.symbol == busiest]


@pytest.fixture(scope="module")
def kraken_trades(captures: Path) -> list[Trade]:
    markets = kraken_markets(read_capture(captures / "KRAKEN.0").rest[0].body)
    (conn,) = read_capture(captures / "KRAKEN.ws.48.0").connections
    pairs = json.loads(conn.sent[0][1])["pair"]
    feed = KrakenFeed([markets[p] for p in pairs], ["trades"], markets)
    trades = _trades(feed, conn.received)
    assert trades
    return trades


def tracker(trades: list[Trade], rules, history=None) -> TradeTracker:
    return TradeTracker(trades[0].exchange, trades[0].symbol, 1000, FeedCounters(),
                        rules=rules, history=history)


def test_each_trade_once_in_the_order_received(coinbase_trades) -> None:
    trades = coinbase_trades
    t = tracker(trades, BINANCE)  # Binance's rules are Coinbase's: contiguous integer ids
    assert t.live(trades, 1.0) == trades
    assert t.live(trades[-3:], 2.0) == []  # received again: dropped
    assert (t.stats.trades, t.stats.duplicates) == (len(trades), 3)
    assert t.last_key == int(trades[-1].id) and t.last_id == trades[-1].id


def test_a_jump_in_contiguous_ids_opens_a_recovery_and_holds_live_trades(coinbase_trades) -> None:
    trades = coinbase_trades
    assert [int(t.id) for t in trades] == list(range(int(trades[0].id), int(trades[-1].id) + 1))
    asked: list[str] = []

    def history(tr: TradeTracker) -> FetchTrades:
        asked.append(str(tr.last_key))
        return FetchTrades(tr.symbol, f"/history?after={tr.last_key}")

    t = tracker(trades, COINBASE, history)
    assert t.live(trades[:3], 1.0) == trades[:3]
    # trades[3:6] are lost: trades[6] jumps, opens the window and is held
    assert t.live([trades[6]], 2.0) == [FetchTrades(trades[0].symbol, f"/history?after={trades[2].id}")]
    assert t.recovering and t.stats.gaps == 1
    assert t.live(trades[7:9], 2.1) == []  # held
    # the history, newest first, backward: kept until the window closes
    assert t.recovered(reversed(trades[:8]), 3.0, keep=True) == []
    assert t.finish(3.0) == trades[3:9]
    # trades[6], trades[7]: live and recovered, delivered once, counted
    assert t.stats.duplicates == 2 and t.stats.trades == 9 and not t.recovering


def test_what_the_history_does_not_hold_is_a_gap_with_its_ids(coinbase_trades) -> None:
    trades = coinbase_trades
    t = tracker(trades, COINBASE, lambda tr: FetchTrades(tr.symbol, "/history"))
    t.live(trades[:2], 1.0)
    t.live([trades[8]], 2.0)
    t.recovered([trades[3], trades[2]], 3.0, keep=True)  # 4..7 are missing
    out = t.finish(3.0)
    gap = out[2]
    assert out[:2] == trades[2:4] and out[3:] == [trades[8]]
    assert isinstance(gap, Gap) and gap.stream == "trades"
    assert (gap.from_id, gap.to_id) == (trades[4].id, trades[7].id)
    assert t.stats.gaps == 1  # the jump; its Gap is not counted twice


def test_forward_pages_are_delivered_at_once_and_their_overlap_is_not_a_duplicate(
    kraken_trades,
) -> None:
    trades = [t for t in kraken_trades if t.symbol == kraken_trades[0].symbol]
    t = tracker(trades, KRAKEN, lambda tr: FetchTrades(tr.symbol, "/0/public/Trades"))
    t.live(trades[:1], 1.0)
    assert t.recover() == [FetchTrades(trades[0].symbol, "/0/public/Trades")]
    t.live(trades[1:], 2.0)  # held
    # a page from a microsecond before the last delivered trade: it starts with it
    assert t.recovered(trades, 3.0) == trades[1:]
    assert t.stats.duplicates == 0
    assert t.finish(4.0) == []  # every held trade was recovered
    assert t.stats.duplicates == len(trades) - 1


def test_a_reconnect_abandons_the_window_and_hands_back_the_held_trades(coinbase_trades) -> None:
    trades = coinbase_trades
    t = tracker(trades, COINBASE, lambda tr: FetchTrades(tr.symbol, "/history"))
    t.live(trades[:1], 1.0)
    t.recover()
    t.live(trades[1:3], 2.0)
    assert t.abandon() == trades[1:3] and not t.recovering
    assert t.recover() and t.recovering


def test_a_jump_with_nothing_to_recover_from_is_delivered_after_its_gap(coinbase_trades) -> None:
    trades = coinbase_trades
    t = tracker(trades, COINBASE, lambda tr: None)
    assert t.recover() == [] and not t.recovering
    t.live(trades[:1], 1.0)
    out = t.live([trades[2]], 2.0)
    assert isinstance(out[0], Gap) and (out[0].from_id, out[0].to_id) == (trades[1].id, trades[1].id)
    assert out[1:] == [trades[2]] and t.stats.gaps == 1


def test_a_resumed_feed_recovers_after_the_previous_owners_last_trade(
        captures: Path, coinbase_trades) -> None:
    """``ExchangeFeed.resume`` (a cluster's new feed owner): seeded with the
    capture's 20th trade of its busiest product, a new Coinbase feed asks the
    REST history for the trades after it on its first ``on_open``, and delivers
    none of those at or before it again."""
    conn = read_capture(captures / "COINBASE.ws.28.0").connections[0]
    markets = coinbase_markets(read_capture(captures / "COINBASE.0").rest[0].body)
    products = json.loads(conn.sent[0][1])["product_ids"]
    symbols = [markets[p] for p in products]
    last = coinbase_trades[19]
    fresh = CoinbaseFeed(symbols, ["trades"], markets)
    assert not [o for o in fresh.on_open(0.0) if isinstance(o, FetchTrades)]
    resumed = CoinbaseFeed(symbols, ["trades"], markets)
    resumed.resume([last])
    fetches = [o for o in resumed.on_open(0.0) if isinstance(o, FetchTrades)]
    assert [f.symbol for f in fetches] == [last.symbol]
    seeded = tracker([last], COINBASE)
    seeded.seed(last)
    out = seeded.deliver(coinbase_trades, 0.0)
    assert [t.id for t in out if isinstance(t, Trade)] == [t.id for t in coinbase_trades[20:]]
