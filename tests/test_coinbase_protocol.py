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
from daemon.events import BookSnapshot, BookUpdate, FeedState, Gap, Ticker, Trade
from daemon.exchanges import coinbase
from daemon.exchanges.base import FetchTrades, Malformed, Send
from daemon.exchanges.coinbase import MARKETS_TARGET, CoinbaseFeed, parse_markets, parse_time
from daemon.replay.capture import read_capture
from daemon.replay.venues.coinbase import CoinbaseVenue
from tests.helpers import consumer_books

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
            "channels": ["matches", "level2", "ticker", "heartbeat"],
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
    from_events = consumer_books(out)
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
    out = feed_frames(feed, frames)
    assert feed.stats.out_of_order == 1
    dropped = str(json.loads(frames[j][1])["trade_id"])
    assert dropped not in {t.id for t in of_type(out, Trade) if t.symbol == "SKL-USD"}
    # the later trade jumped an id: SKL-USD recovers from the REST history, holding
    # its live trades meanwhile; the other products go on
    assert of_type(out, FetchTrades) == [
        FetchTrades("SKL-USD", "/products/SKL-USD/trades?limit=1000")
    ]
    assert feed.recovering == {"SKL-USD"} and feed.stats.gaps == 1
    assert len(of_type(out, Trade)) == 107 - 53 + 1  # SKL-USD: only its last_match


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
        {"type": "subscribe", "product_ids": ["SKL-USD"],
         "channels": ["level2_batch", "heartbeat"]}
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
        assert not of_type(out, Trade), name
        # an unreadable frame may have been a book update (l2update has no sequence to
        # reveal the loss later): the books it may belong to are rebuilt, nothing else
        for message in sent(out):
            assert message["channels"] == ["level2"], name


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


def test_crossing_is_judged_at_the_end_of_an_update(rec: Recorded) -> None:
    # only new levels can cross a book, but the check is on the book the whole
    # update leaves: a new bid through the asks that the same update takes back
    # crosses nothing
    feed = CoinbaseFeed(["SKL-USD"], ["book"], rec.markets)
    feed.on_open(0.0)
    recorded = rec.frames[rec.index("snapshot", "SKL-USD")][1]
    feed.on_message(with_field(recorded, bids=[["1", "1"]], asks=[["2", "1"]]), 1.0)

    def update(*changes: list[str]) -> str:
        return json.dumps({"type": "l2update", "product_id": "SKL-USD", "changes": changes})

    (event,) = feed.on_message(update(["buy", "3", "1"], ["buy", "3", "0"]), 2.0)
    assert (event.bids, event.asks) == ((("3", "1"), ("3", "0")), ())
    (event,) = feed.on_message(update(["buy", "2.5", "4"], ["sell", "2", "0"]), 3.0)
    assert (event.bids, event.asks) == ((("2.5", "4"),), (("2", "0"),))
    assert feed.book("SKL-USD").levels() == ((("2.5", "4"), ("1", "1")), ())
    out = feed.on_message(update(["sell", "2.5", "1"]), 4.0)  # at the best bid: crossed
    assert not of_type(out, BookUpdate) and feed.stats.resyncs == 1
    assert [e.detail for e in of_type(out, FeedState)] == ["crossed book"]


def test_a_crossed_snapshot_book_that_uncrossed_resyncs_when_crossed_again(
    rec: Recorded,
) -> None:
    feed = CoinbaseFeed(["SKL-USD"], ["book"], rec.markets)
    feed.on_open(0.0)
    recorded = rec.frames[rec.index("snapshot", "SKL-USD")][1]
    feed.on_message(with_field(recorded, bids=[["2", "1"]], asks=[["1", "1"], ["3", "1"]]), 1.0)
    remove = '{"type": "l2update", "product_id": "SKL-USD", "changes": [["sell", "1", "0"]]}'
    assert of_type(feed.on_message(remove, 2.0), BookUpdate)  # no longer crossed
    assert not feed.book("SKL-USD").is_crossed()
    cross = '{"type": "l2update", "product_id": "SKL-USD", "changes": [["buy", "3", "1"]]}'
    out = feed.on_message(cross, 3.0)
    assert not of_type(out, BookUpdate) and feed.stats.resyncs == 1

def test_heartbeat_and_subscriptions(rec: Recorded) -> None:
    feed = new_feed(rec)
    beat = (
        '{"type": "heartbeat", "sequence": 90, "last_trade_id": 20, "product_id": "SKL-USD",'
        ' "time": "2021-04-17T16:43:40.000000Z"}'
    )
    assert feed.on_message(beat, 5.0) == [] and feed.last_heartbeat == 5.0
    assert feed.on_message(rec.frames[0][1], 6.0) == []  # the subscriptions answer
    assert feed.stats.malformed == 0


# -- trade recovery: reconnects and jumps in trade ids ----------------------------------
#
# The venue of the emulator plays the whole tape (``route`` of every frame, as the
# emulator does), so its REST history ``/products/<id>/trades`` holds exactly what
# was played; the feed misses some of the frames, as over a dropped connection.


@attrs.frozen
class Tape:
    captures: tuple  # the Capture objects the venue is built on
    frames: tuple  # every Received frame of the recorded connection
    opened: float
    symbols: tuple[str, ...]  # the recorded products, as tickwire symbols
    markets: dict[str, str]

    def feed(self, channels=("trades",)) -> CoinbaseFeed:
        return CoinbaseFeed(list(self.symbols), list(channels), self.markets)

    def venue(self) -> CoinbaseVenue:
        return CoinbaseVenue(list(self.captures))

    def matches(self, indexes=None) -> list[tuple[str, int]]:
        """``(product, trade_id)`` of the match/last_match frames, in tape order."""
        out = []
        for i, frame in enumerate(self.frames):
            m = json.loads(frame.text)
            if m["type"] in ("match", "last_match") and (indexes is None or i in indexes):
                out.append((m["product_id"], m["trade_id"]))
        return out

    def nth_match(self, n: int, product: str | None = None) -> int:
        """Index in ``frames`` of the ``n``th ``match`` frame (of ``product``)."""
        hits = [
            i for i, f in enumerate(self.frames)
            if (m := json.loads(f.text))["type"] == "match"
            and (product is None or m["product_id"] == product)
        ]
        return hits[n]


@pytest.fixture(scope="module")
def tape(captures: Path, rec: Recorded) -> Tape:
    recorded = (read_capture(captures / "COINBASE.0"), read_capture(captures / "COINBASE.ws.28.0"))
    (conn,) = recorded[1].connections
    symbols = tuple(rec.markets[p] for p in rec.products)
    return Tape(recorded, conn.received, conn.opened, symbols, rec.markets)


@attrs.define
class Player:
    """Plays the tape through a venue and a feed; answers ``FetchTrades`` from the
    venue's REST history. ``recovered`` are the trades ``on_trades`` delivered."""

    feed: CoinbaseFeed
    venue: CoinbaseVenue
    out: list = attrs.Factory(list)
    pending: list = attrs.Factory(list)
    fetched: list = attrs.Factory(list)
    recovered: list = attrs.Factory(list)

    def take(self, outputs: list) -> None:
        self.pending += of_type(outputs, FetchTrades)
        self.fetched += of_type(outputs, FetchTrades)
        self.out += [o for o in outputs if not isinstance(o, FetchTrades)]

    def answer(self, ts: float, bodies: dict | None = None) -> None:
        """Answer every pending fetch (and the next pages they ask for); ``bodies``
        replaces the venue's answer for some symbols (used once each)."""
        bodies = dict(bodies or {})
        while self.pending:
            fetch = self.pending.pop(0)
            body = bodies.pop(fetch.symbol, None)
            if body is None:
                status, body = self.venue.rest(fetch.target)
                assert status == 200, (fetch, body)
            got = self.feed.on_trades(fetch.symbol, body, ts)
            self.recovered += of_type(got, Trade)
            self.take(got)


def play(
    tape: Tape,
    *,
    lost: range = range(0),
    reconnect: bool = True,
    answer_at: int | None = None,
    bodies: dict | None = None,
) -> Player:
    """Every frame goes through the venue; the feed misses ``lost`` (the connection
    drops at ``lost.start`` and, if ``reconnect``, comes back at ``lost.stop``).
    Pending fetches are answered after each frame from ``answer_at`` on (default:
    the reconnect), with ``bodies`` instead of the venue's answer for some symbols."""
    feed = tape.feed()
    player = Player(feed, tape.venue())
    player.take(feed.on_open(tape.opened))
    answer_at = lost.stop if answer_at is None else answer_at
    for i, frame in enumerate(tape.frames):
        if reconnect and lost and i == lost.stop:
            player.take(feed.on_open(frame.ts))
        player.venue.route(frame)
        if i in lost:
            continue
        player.take(feed.on_message(frame.text, frame.ts))
        if i >= answer_at:
            player.answer(frame.ts, bodies)
    player.answer(tape.frames[-1].ts)
    return player


def by_product(pairs) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for product, trade_id in pairs:
        out.setdefault(product, []).append(str(trade_id))
    return out


def assert_every_trade_once_in_order(tape: Tape, trades: list[Trade]) -> None:
    recorded = by_product(tape.matches())
    assert by_product((t.symbol, t.id) for t in trades) == recorded
    assert all(ids == sorted(ids, key=int) for ids in recorded.values())
    # and each is the recorded trade (the REST history has the same fields)
    fields = {
        (m["product_id"], str(m["trade_id"])): (m["price"], m["size"], m["side"], m["time"])
        for f in tape.frames
        if (m := json.loads(f.text))["type"] in ("match", "last_match")
    }
    for t in trades:
        price, size, maker_side, time = fields[t.symbol, t.id]
        assert (t.price, t.size, t.ts) == (price, size, parse_time(time))
        assert t.side == {"buy": "sell", "sell": "buy"}[maker_side]


@pytest.mark.parametrize("limit", [1000, 4])
def test_trades_missed_while_disconnected_come_from_the_rest_history(
    tape: Tape, limit: int, monkeypatch
) -> None:
    monkeypatch.setattr(coinbase, "TRADES_LIMIT", limit)
    lost = range(tape.nth_match(20), tape.nth_match(60))
    # live frames keep coming (held) while the REST answers are awaited
    answer_at = tape.nth_match(66)
    player = play(tape, lost=lost, answer_at=answer_at)
    trades = of_type(player.out, Trade)
    assert_every_trade_once_in_order(tape, trades)
    missed = {(p, str(i)) for p, i in tape.matches(lost)}
    held = {(p, str(i)) for p, i in tape.matches(range(lost.stop, answer_at + 1))}
    assert len(missed) == 40 and len(held) == 7
    recovered = {(t.symbol, t.id) for t in player.recovered}
    assert missed <= recovered <= missed | held
    # every held live trade was also in the history: delivered once, counted
    assert player.feed.stats.duplicates == len(held & recovered) == len(held)
    assert not of_type(player.out, Gap) and player.feed.stats.gaps == 0
    # one fetch per product at the reconnect (each had its last_match), then older pages
    first = [f for f in player.fetched if "after=" not in f.target]
    assert sorted(f.symbol for f in first) == sorted(tape.symbols)
    assert all(f.target == f"/products/{f.symbol}/trades?limit={limit}" for f in first)
    pages = [f for f in player.fetched if "after=" in f.target]
    assert bool(pages) == (limit == 4)
    assert not player.feed.recovering


def test_a_rest_answer_older_than_the_live_stream_is_read_again(tape: Tape) -> None:
    """The REST answer was taken before trades that the live stream, starting later,
    did not see either: the newest page is read once more and covers them."""
    lost = range(tape.nth_match(20), tape.nth_match(40))
    silent = range(lost.stop, tape.nth_match(50))  # not yet subscribed again
    feed, venue = tape.feed(), tape.venue()
    player = Player(feed, venue)
    player.take(feed.on_open(tape.opened))
    early: dict[str, bytes] = {}
    answer_at = tape.nth_match(55)
    for i, frame in enumerate(tape.frames):
        if i == lost.stop:
            player.take(feed.on_open(frame.ts))
            early = {f.symbol: venue.rest(f.target)[1] for f in player.pending}
        venue.route(frame)
        if i in lost or i in silent:
            continue
        player.take(feed.on_message(frame.text, frame.ts))
        if i == answer_at:
            player.answer(frame.ts, early)  # answers taken at the reconnect
    player.answer(tape.frames[-1].ts)
    assert_every_trade_once_in_order(tape, of_type(player.out, Trade))
    assert not of_type(player.out, Gap)
    again = [f for f in player.fetched[10:] if "after=" not in f.target]
    hidden = {p for p, _ in tape.matches(silent)}
    live = {p for p, _ in tape.matches(range(silent.stop, answer_at + 1))}
    assert {f.symbol for f in again} == hidden & live != set()


def test_ids_the_history_does_not_hold_are_a_gap(tape: Tape) -> None:
    lost = range(tape.nth_match(20), tape.nth_match(60))
    skl = [i for p, i in tape.matches(lost) if p == "SKL-USD"]
    assert len(skl) > 3
    # the history answered for SKL-USD lacks the two oldest missed trades
    venue = tape.venue()
    for frame in tape.frames[: lost.stop]:
        venue.route(frame)
    page = json.loads(venue.rest("/products/SKL-USD/trades?limit=1000")[1])
    short = json.dumps([t for t in page if t["trade_id"] not in skl[:2]])
    player = play(tape, lost=lost, bodies={"SKL-USD": short})
    gaps = of_type(player.out, Gap)
    assert [(g.symbol, g.stream, g.from_id, g.to_id) for g in gaps] == [
        ("SKL-USD", "trades", str(skl[0]), str(skl[1]))
    ]
    skl_out = [o for o in player.out if isinstance(o, Trade | Gap) and o.symbol == "SKL-USD"]
    gap_at = skl_out.index(gaps[0])
    assert skl_out[gap_at + 1].id == str(skl[2])  # the gap sits where the ids are missing
    trades = of_type(player.out, Trade)
    delivered = by_product((t.symbol, t.id) for t in trades)
    recorded = by_product(tape.matches())
    assert delivered["SKL-USD"] == [i for i in recorded["SKL-USD"] if int(i) not in skl[:2]]
    assert {p: ids for p, ids in delivered.items() if p != "SKL-USD"} == {
        p: ids for p, ids in recorded.items() if p != "SKL-USD"
    }


def test_a_jump_in_live_trade_ids_is_recovered(tape: Tape) -> None:
    dropped = tape.nth_match(3, "SKL-USD")
    player = play(tape, lost=range(dropped, dropped + 1), reconnect=False)
    assert_every_trade_once_in_order(tape, of_type(player.out, Trade))
    (product, trade_id), = tape.matches(range(dropped, dropped + 1))
    # the history also holds the live trade that showed the jump (the venue played
    # it before the feed got it): it goes out once
    assert [(t.symbol, t.id) for t in player.recovered] == [
        (product, str(trade_id)), (product, str(trade_id + 1))
    ]
    assert player.fetched == [FetchTrades(product, f"/products/{product}/trades?limit=1000")]
    assert player.feed.stats.gaps == 1 and not of_type(player.out, Gap)
    assert player.feed.stats.duplicates == 1


def test_an_unusable_page_ends_the_recovery_with_a_gap(rec: Recorded) -> None:
    feed = new_feed(rec)
    last = rec.frames[rec.index("match", "SKL-USD", 0)]
    feed.on_message(last[1], last[0])
    later = json.loads(rec.frames[rec.index("match", "SKL-USD", 3)][1])
    out = feed.on_message(json.dumps(later), 5.0)  # ids in between were missed
    assert out == [FetchTrades("SKL-USD", "/products/SKL-USD/trades?limit=1000")]
    out = feed.on_trades("SKL-USD", b'{"message":"Internal server error"}', 6.0)
    first_missing = json.loads(last[1])["trade_id"] + 1
    assert [type(o) for o in out] == [Malformed, Gap, Trade]
    assert (out[1].from_id, out[1].to_id) == (str(first_missing), str(later["trade_id"] - 1))
    assert out[2].id == str(later["trade_id"]) and not feed.recovering
    assert feed.on_trades("SKL-USD", b"[]", 7.0) == []  # nothing asked for: ignored


def test_heartbeat_channel_is_subscribed_and_the_venue_accepts_it(rec: Recorded, tape) -> None:
    feed, venue = tape.feed(ALL_CHANNELS), tape.venue()
    keys: set[str] = set()
    replies = [json.loads(r) for s in of_type(feed.on_open(0.0), Send)
               for r in venue.on_client_message(keys, s.text)]
    assert [r["type"] for r in replies] == ["subscriptions"]
    (beats,) = [c for c in replies[0]["channels"] if c["name"] == "heartbeat"]
    assert sorted(beats["product_ids"]) == sorted(rec.products)
    assert {f"heartbeat:{p}" for p in rec.products} <= keys
    beat = json.dumps({"type": "heartbeat", "sequence": 1, "last_trade_id": 1568300,
                       "product_id": "SKL-USD", "time": "2021-04-17T16:43:40.000000Z"})
    assert feed.on_message(beat, 9.0) == [] and feed.last_heartbeat == 9.0
