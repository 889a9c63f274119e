"""The Coinbase feed protocol on the recorded traffic (``COINBASE.ws.28.0``, 2021-04-17).

Expected values are computed independently here, from the raw frames with the
standard ``json`` module and plain dicts, never from the protocol's own code.
"""

from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal
from pathlib import Path

import attrs
import pytest

from daemon.book import L2Book
from daemon.events import BookSnapshot, BookUpdate, FeedState, Ticker, Trade
from daemon.exchanges.base import Malformed, Send
from daemon.exchanges.coinbase import MARKETS_TARGET, CoinbaseFeed, parse_markets, parse_time
from daemon.replay.capture import read_capture

ALL_CHANNELS = ["trades", "book", "ticker"]


@attrs.frozen
class Recorded:
    opened: float
    frames: tuple[tuple[float, str], ...]  # (recv_ts, text) as received
    products: tuple[str, ...]  # product ids the recorder subscribed
    markets: dict[str, str]

    def messages(self, *types: str) -> list[dict]:
        decoded = (json.loads(text) for _, text in self.frames)
        return [m for m in decoded if m["type"] in types]

    def index(self, type_: str, product: str | None = None, nth: int = 0) -> int:
        """Position in ``frames`` of the ``nth`` frame of that type (and product)."""
        hits = [
            i
            for i, (_, text) in enumerate(self.frames)
            if (m := json.loads(text))["type"] == type_
            and (product is None or m["product_id"] == product)
        ]
        return hits[nth]


@pytest.fixture(scope="module")
def rec(captures: Path) -> Recorded:
    conn = read_capture(captures / "COINBASE.ws.28.0").connections[0]
    (rest,) = read_capture(captures / "COINBASE.0").rest
    assert rest.target == MARKETS_TARGET
    products = json.loads(conn.sent[0][1])["product_ids"]
    return Recorded(
        opened=conn.opened,
        frames=tuple((r.ts, r.text) for r in conn.received),
        products=tuple(products),
        markets=parse_markets(rest.body),
    )


def new_feed(rec: Recorded, **kwargs) -> CoinbaseFeed:
    symbols = [rec.markets[p] for p in rec.products]
    feed = CoinbaseFeed(symbols, ALL_CHANNELS, rec.markets, **kwargs)
    feed.on_open(rec.opened)
    return feed


def feed_frames(feed: CoinbaseFeed, frames) -> list:
    out: list = []
    for ts, text in frames:
        out += feed.on_message(text, ts)
    return out


def of_type(outputs: list, cls: type) -> list:
    return [o for o in outputs if isinstance(o, cls)]


def sent(outputs: list) -> list[dict]:
    return [json.loads(o.text) for o in of_type(outputs, Send)]


def with_field(text: str, **changes) -> str:
    msg = json.loads(text)
    msg.update(changes)
    return json.dumps(msg)


def plain_books(rec: Recorded) -> dict[str, tuple[dict, dict]]:
    """Snapshot then changes, with plain dicts keyed by Decimal price."""
    books: dict[str, tuple[dict, dict]] = {}
    for m in rec.messages("snapshot", "l2update"):
        if m["type"] == "snapshot":
            books[m["product_id"]] = (
                {Decimal(p): s for p, s in m["bids"]},
                {Decimal(p): s for p, s in m["asks"]},
            )
            continue
        bids, asks = books[m["product_id"]]
        for side, price, size in m["changes"]:
            levels = bids if side == "buy" else asks
            if Decimal(size) == 0:
                levels.pop(Decimal(price), None)
            else:
                levels[Decimal(price)] = size
    return books


def as_dicts(book: L2Book) -> tuple[dict, dict]:
    bids, asks = book.levels()
    return {Decimal(p): s for p, s in bids}, {Decimal(p): s for p, s in asks}


# -- markets ----------------------------------------------------------------------


def test_parse_markets_holds_every_recorded_product(rec: Recorded) -> None:
    assert len(rec.products) == 10
    for product in rec.products:
        assert rec.markets[product] == product  # Coinbase ids already are BASE-QUOTE
    assert rec.markets["BTC-GBP"] == "BTC-GBP"


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        '{"message": "NotFound"}',
        '[{"id": "BTC-USD"}]',
        "[1]",
        '[{"id": 1, "base_currency": "BTC", "quote_currency": "USD"}]',
    ],
)
def test_parse_markets_rejects_other_bodies(body: str) -> None:
    with pytest.raises(ValueError):
        parse_markets(body)


def test_unknown_symbol_or_channel_is_refused(rec: Recorded) -> None:
    with pytest.raises(ValueError):
        CoinbaseFeed(["NOPE-USD"], ["trades"], rec.markets)
    with pytest.raises(ValueError):
        CoinbaseFeed(["SKL-USD"], ["candles"], rec.markets)


def test_parse_time() -> None:
    assert parse_time("2021-04-17T16:43:37.071893Z") == pytest.approx(1618677817.071893)
    assert parse_time("2021-04-17T16:43:37Z") == 1618677817.0


# -- open and subscribe -------------------------------------------------------------


def test_on_open_subscribes_and_marks_books_resyncing(rec: Recorded) -> None:
    feed = CoinbaseFeed([rec.markets[p] for p in rec.products], ALL_CHANNELS, rec.markets)
    assert feed.url("wss://ws-feed.exchange.coinbase.com") == "wss://ws-feed.exchange.coinbase.com"
    out = feed.on_open(rec.opened)
    assert sent(out) == [
        {
            "type": "subscribe",
            "product_ids": list(rec.products),
            "channels": ["matches", "level2", "ticker"],
        }
    ]
    states = of_type(out, FeedState)
    assert [s.symbol for s in states] == list(rec.products)
    assert {s.state for s in states} == {"resyncing"}
    assert all(feed.book(s) is None for s in rec.products)


# -- the clean capture ----------------------------------------------------------------


@pytest.fixture(scope="module")
def replay(rec: Recorded) -> tuple[CoinbaseFeed, list]:
    feed = new_feed(rec)
    return feed, feed_frames(feed, rec.frames)


def test_every_trade_once(rec: Recorded, replay) -> None:
    feed, out = replay
    counts = Counter(m["type"] for m in rec.messages("match", "last_match"))
    assert counts == {"match": 97, "last_match": 10}
    trades = of_type(out, Trade)
    assert len(trades) == sum(counts.values()) == feed.stats.trades
    assert len({(t.symbol, t.id) for t in trades}) == len(trades)
    first = rec.messages("match")[0]
    (t,) = [t for t in trades if t.id == str(first["trade_id"])]
    assert (t.symbol, t.price, t.size) == (first["product_id"], first["price"], first["size"])
    assert t.ts == pytest.approx(parse_time(first["time"]))


def test_trade_side_is_the_taker_side(rec: Recorded, replay) -> None:
    # the ticker's side is the taker's; the match's is the maker's
    taker = {(m["product_id"], str(m["trade_id"])): m["side"] for m in rec.messages("ticker")}
    trades = of_type(replay[1], Trade)
    assert {(t.symbol, t.id) for t in trades} == set(taker)
    assert all(t.side == taker[t.symbol, t.id] for t in trades)


def test_every_ticker(rec: Recorded, replay) -> None:
    feed, out = replay
    raw = rec.messages("ticker")
    tickers = of_type(out, Ticker)
    assert len(tickers) == len(raw) == feed.stats.tickers == 107
    # the 2021 feed sent no best_bid_size / best_ask_size: they stay ""
    assert not any("best_bid_size" in m or "best_ask_size" in m for m in raw)
    assert [(t.symbol, t.bid, t.ask, t.bid_size, t.ask_size) for t in tickers] == [
        (m["product_id"], m["best_bid"], m["best_ask"], "", "") for m in raw
    ]


def test_books_match_an_independent_replay(rec: Recorded, replay) -> None:
    feed, out = replay
    expected = plain_books(rec)
    assert sorted(expected) == sorted(rec.products)
    from_events: dict[str, L2Book] = {}
    for event in out:
        if isinstance(event, BookSnapshot):
            from_events[event.symbol] = L2Book()
            from_events[event.symbol].load(event.bids, event.asks)
        elif isinstance(event, BookUpdate):
            from_events[event.symbol].apply(event.bids, event.asks)
    for product in rec.products:
        book = feed.book(product)
        assert book is not None and not book.is_crossed()
        assert as_dicts(book) == expected[product]
        assert from_events[product].levels() == book.levels()


def test_clean_capture_counters(rec: Recorded, replay) -> None:
    feed, out = replay
    types = Counter(json.loads(text)["type"] for _, text in rec.frames)
    s = feed.stats
    assert s.messages == len(rec.frames)
    assert s.snapshots == types["snapshot"] == len(of_type(out, BookSnapshot)) == 10
    assert s.book_updates == types["l2update"] == len(of_type(out, BookUpdate)) == 9719
    assert (s.resyncs, s.malformed, s.duplicates, s.out_of_order, s.gaps) == (0, 0, 0, 0, 0)
    assert not of_type(out, Malformed) and not of_type(out, Send)
    synced = [e for e in of_type(out, FeedState) if e.state == "synced"]
    assert sorted(e.symbol for e in synced) == sorted(rec.products)


# -- duplicates and order ------------------------------------------------------------


def test_repeated_match_frame_is_dropped(rec: Recorded) -> None:
    i = rec.index("match")
    frames = list(rec.frames)
    frames.insert(i + 1, frames[i])
    feed = new_feed(rec)
    trades = of_type(feed_frames(feed, frames), Trade)
    assert feed.stats.duplicates == 1
    assert len(trades) == 107
    assert len({(t.symbol, t.id) for t in trades}) == 107


def test_repeated_trade_id_with_new_sequence_is_dropped(rec: Recorded) -> None:
    i = rec.index("match")
    frames = list(rec.frames)
    seq = json.loads(frames[i][1])["sequence"]
    frames.insert(i + 1, (frames[i][0], with_field(frames[i][1], sequence=seq + 1)))
    feed = new_feed(rec)
    assert len(of_type(feed_frames(feed, frames), Trade)) == 107
    assert feed.stats.duplicates == 1


def test_decreasing_sequence_is_dropped(rec: Recorded) -> None:
    i, j = rec.index("match", "SKL-USD", 0), rec.index("match", "SKL-USD", 1)
    frames = list(rec.frames)
    frames[i], frames[j] = frames[j], frames[i]  # the later trade arrives first
    feed = new_feed(rec)
    trades = of_type(feed_frames(feed, frames), Trade)
    assert feed.stats.out_of_order == 1
    assert len(trades) == 106
    dropped = str(json.loads(frames[j][1])["trade_id"])
    assert dropped not in {t.id for t in trades if t.symbol == "SKL-USD"}


def test_repeated_ticker_is_dropped(rec: Recorded) -> None:
    i = rec.index("ticker")
    frames = list(rec.frames)
    frames.insert(i + 1, frames[i])
    feed = new_feed(rec)
    assert len(of_type(feed_frames(feed, frames), Ticker)) == 107
    assert feed.stats.duplicates == 1


# -- resyncs ---------------------------------------------------------------------------


def test_crossed_book_resyncs_that_product_only(rec: Recorded) -> None:
    product = "SKL-USD"
    snap = rec.index("snapshot", product)
    cut = rec.index("l2update", product, 50)
    feed = new_feed(rec)
    feed_frames(feed, rec.frames[: cut + 1])
    book = feed.book(product)
    best_ask = Decimal(book.best_ask()[0])
    ts, text = rec.frames[cut]
    bad = with_field(text, changes=[["buy", str(best_ask + Decimal("0.0001")), "5"]])
    out = feed.on_message(bad, ts)

    assert feed.stats.resyncs == 1
    assert [(e.symbol, e.state) for e in of_type(out, FeedState)] == [(product, "resyncing")]
    assert sent(out) == [
        {"type": "unsubscribe", "product_ids": [product], "channels": ["level2"]},
        {"type": "subscribe", "product_ids": [product], "channels": ["level2"]},
    ]
    assert not of_type(out, BookUpdate)  # the crossing update is never published
    assert feed.book(product) is None

    # its updates are ignored until a new snapshot; other books go on
    later = feed_frames(feed, rec.frames[cut + 1 : cut + 400])
    updated = {e.symbol for e in of_type(later, BookUpdate)}
    assert product not in updated and updated
    assert any(
        json.loads(t)["product_id"] == product
        for _, t in rec.frames[cut + 1 : cut + 400]
        if '"l2update"' in t
    )

    # the resubscription's answer: a snapshot (the recorded one stands in for it)
    out = feed.on_message(rec.frames[snap][1], rec.frames[cut + 400][0])
    (snapshot,) = of_type(out, BookSnapshot)
    assert snapshot.symbol == product
    assert [(e.symbol, e.state) for e in of_type(out, FeedState)] == [(product, "synced")]
    assert feed.book(product) is not None and not feed.book(product).is_crossed()
    ts, text = next(f for f in rec.frames[cut + 401 :] if '"l2update"' in f[1] and product in f[1])
    assert of_type(feed.on_message(text, ts), BookUpdate)


def test_reconnect_rebuilds_books_and_repeats_no_trade(rec: Recorded) -> None:
    feed = new_feed(rec)
    feed_frames(feed, rec.frames)
    trades_before = feed.stats.trades
    out = feed.on_open(rec.frames[-1][0] + 1)
    assert [e.state for e in of_type(out, FeedState)] == ["resyncing"] * 10
    assert all(feed.book(p) is None for p in rec.products)
    ts = rec.frames[-1][0] + 2
    upd = rec.frames[rec.index("l2update", "SKL-USD", 0)][1]
    assert feed.on_message(upd, ts) == []  # no book before the new snapshot
    # Coinbase resends the product's last match on subscribe: not a new trade
    last = [t for _, t in rec.frames if '"SKL-USD"' in t and '"match"' in t][-1]
    assert feed.on_message(with_field(last, type="last_match"), ts) == []
    assert feed.stats.trades == trades_before and feed.stats.duplicates == 1
    out = feed.on_message(rec.frames[rec.index("snapshot", "SKL-USD")][1], ts)
    assert of_type(out, BookSnapshot) and feed.book("SKL-USD") is not None


def test_level2_batch_channel(rec: Recorded) -> None:
    feed = CoinbaseFeed(["SKL-USD"], ["book"], rec.markets, book_channel="level2_batch")
    assert sent(feed.on_open(0.0)) == [
        {"type": "subscribe", "product_ids": ["SKL-USD"], "channels": ["level2_batch"]}
    ]
    feed.on_message(rec.frames[rec.index("snapshot", "SKL-USD")][1], 1.0)
    assert sent(feed.resync("SKL-USD", "asked")) == [
        {"type": "unsubscribe", "product_ids": ["SKL-USD"], "channels": ["level2_batch"]},
        {"type": "subscribe", "product_ids": ["SKL-USD"], "channels": ["level2_batch"]},
    ]
    assert feed.stats.resyncs == 1 and feed.book("SKL-USD") is None


# -- today's ticker form ------------------------------------------------------------


def test_ticker_with_sizes(rec: Recorded) -> None:
    feed = new_feed(rec)
    text = with_field(rec.frames[rec.index("ticker")][1], best_bid_size="1.5", best_ask_size="2.25")
    (ticker,) = feed.on_message(text, 1.0)
    assert (ticker.bid_size, ticker.ask_size) == ("1.5", "2.25")


# -- malformed frames -----------------------------------------------------------------


def _bad_frames(rec: Recorded) -> dict[str, str]:
    match = json.loads(rec.frames[rec.index("match")][1])
    del match["price"]
    return {
        "not json": "{not json",
        "not an object": "[1, 2]",
        "unknown type": '{"type": "surprise", "product_id": "SKL-USD"}',
        "match without price": json.dumps(match),
        "match of unknown product": with_field(
            rec.frames[rec.index("match")][1], product_id="BTC-USD"
        ),
        "ticker with bad bid": with_field(rec.frames[rec.index("ticker")][1], best_bid="x"),
        "unhashable product": '{"type": "match", "product_id": ["SKL-USD"]}',
        "exchange error": '{"type": "error", "message": "Failed to subscribe"}',
    }


def test_malformed_frames_are_counted_not_raised(rec: Recorded) -> None:
    for name, text in _bad_frames(rec).items():
        feed = new_feed(rec)
        feed_frames(feed, rec.frames[:200])
        before = feed.stats.malformed
        out = feed.on_message(text, 1.0)
        assert len(of_type(out, Malformed)) == 1, name
        assert feed.stats.malformed == before + 1, name
        assert not of_type(out, Trade) and not of_type(out, Send), name


@pytest.mark.parametrize("kind", ["l2update", "snapshot"])
def test_bad_book_frame_resyncs_that_book(rec: Recorded, kind: str) -> None:
    product = "SKL-USD"
    cut = rec.index("l2update", product, 10)
    feed = new_feed(rec)
    feed_frames(feed, rec.frames[: cut + 1])
    if kind == "l2update":
        bad = with_field(rec.frames[cut][1], changes=[["buy", "abc", "1"]])
    else:
        bad = with_field(rec.frames[rec.index("snapshot", product)][1], bids=[["abc", "1"]])
    out = feed.on_message(bad, 1.0)
    assert isinstance(out[0], Malformed) and feed.stats.malformed == 1
    assert [(e.symbol, e.state) for e in of_type(out, FeedState)] == [(product, "resyncing")]
    assert [m["type"] for m in sent(out)] == ["unsubscribe", "subscribe"]
    assert feed.stats.resyncs == 1 and feed.book(product) is None
    assert all(feed.book(p) is not None for p in rec.products if p != product)


def test_crossed_snapshot_is_accepted_not_looped(rec: Recorded) -> None:
    # resubscribing cannot fix a book the exchange itself sends crossed (an auction)
    feed = CoinbaseFeed(["SKL-USD"], ["book"], rec.markets)
    feed.on_open(0.0)
    recorded = rec.frames[rec.index("snapshot", "SKL-USD")][1]
    snapshot = with_field(recorded, bids=[["2", "1"]], asks=[["1", "1"]])
    out = feed.on_message(snapshot, 1.0)
    assert of_type(out, BookSnapshot) and not of_type(out, Send)
    (state,) = of_type(out, FeedState)
    assert (state.state, state.detail) == ("synced", "level2 snapshot (crossed)")
    update = '{"type": "l2update", "product_id": "SKL-USD", "changes": [["buy", "1.5", "1"]]}'
    assert of_type(feed.on_message(update, 2.0), BookUpdate)
    assert feed.stats.resyncs == 0


def test_heartbeat_and_subscriptions(rec: Recorded) -> None:
    feed = new_feed(rec)
    beat = (
        '{"type": "heartbeat", "sequence": 90, "last_trade_id": 20, "product_id": "SKL-USD",'
        ' "time": "2021-04-17T16:43:40.000000Z"}'
    )
    assert feed.on_message(beat, 5.0) == [] and feed.last_heartbeat == 5.0
    assert feed.on_message(rec.frames[0][1], 6.0) == []  # the subscriptions answer
    assert feed.stats.malformed == 0
