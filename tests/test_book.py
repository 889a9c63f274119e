"""The L2 book (``daemon.book``) against a plain-dict book, the positional event
makers (``daemon.exchanges.base.event_maker``), and Kraken's checksum kept from
update to update against the checksum of the whole book.

Random but seeded: prices from a small range so that levels collide, spelled
several ways (``"7"``, ``"7.0"``, ``"7.50"``), zero sizes, depths, and chunks of
two levels so that the chunked order is split and emptied all the time.
"""

from __future__ import annotations

import json
import random
from decimal import Decimal

import pytest

import daemon.book
from daemon.book import BookError, L2Book
from daemon.events import BookUpdate, FeedState, Ticker, Trade
from daemon.exchanges.base import event_maker, new_book_update, new_ticker, new_trade
from daemon.exchanges.kraken import CHECKSUM_LEVELS, KrakenFeed, checksum


class PlainBook:
    """``{Decimal: (price, size)}`` per side, sorted when read: the reference."""

    def __init__(self, depth: int | None = None) -> None:
        self.bids: dict[Decimal, tuple[str, str]] = {}
        self.asks: dict[Decimal, tuple[str, str]] = {}
        self.depth = depth

    def apply(self, bids, asks) -> None:
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for price, size in levels:
                if Decimal(size) == 0:
                    side.pop(Decimal(price), None)
                else:
                    side[Decimal(price)] = (price, size)
        if self.depth is not None:
            for key in sorted(self.bids, reverse=True)[self.depth:]:
                del self.bids[key]
            for key in sorted(self.asks)[self.depth:]:
                del self.asks[key]

    def load(self, bids, asks) -> None:
        self.bids, self.asks = {}, {}
        self.apply(bids, asks)

    def levels(self):
        return (tuple(self.bids[k] for k in sorted(self.bids, reverse=True)),
                tuple(self.asks[k] for k in sorted(self.asks)))


def _price(rnd: random.Random) -> str:
    return rnd.choice(["{}", "{}.0", "{}.00", "{}.5", "{}.50"]).format(rnd.randint(0, 60))


def _levels(rnd: random.Random, most: int) -> list[tuple[str, str]]:
    sizes = ["0", "0.000", "1", "2.5", "3.10"]
    return [(_price(rnd), rnd.choice(sizes)) for _ in range(rnd.randint(0, most))]


def _same(book: L2Book, plain: PlainBook) -> None:
    assert book.levels() == plain.levels()
    assert book.bids == plain.bids and book.asks == plain.asks
    assert len(book) == len(plain.bids) + len(plain.asks)
    for n in (0, 1, 3, 10):
        assert book.top(n) == (plain.levels()[0][:n], plain.levels()[1][:n])
    crossed = bool(plain.bids and plain.asks and max(plain.bids) >= min(plain.asks))
    assert book.is_crossed() == crossed
    assert book.best_bid() == (plain.levels()[0][0] if plain.bids else None)
    assert book.best_ask() == (plain.levels()[1][0] if plain.asks else None)
    for side in (book.bid_side, book.ask_side):  # the chunks agree with each other
        assert all(side.prices) and side.maxes == [keys[-1] for keys in side.keys]
        assert [Decimal(p) for p in side.ascending()] == [k for keys in side.keys for k in keys]


@pytest.mark.parametrize("chunk", [2, 3, daemon.book.CHUNK])
def test_book_equals_a_plain_dict_book(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(daemon.book, "CHUNK", chunk)
    rnd = random.Random(chunk)
    for _ in range(150):
        depth = rnd.choice([None, None, 1, 3, 8])
        book, plain = L2Book(depth), PlainBook(depth)
        bids, asks = _levels(rnd, 30), _levels(rnd, 30)
        assert book.load(bids, asks) == book.levels()
        plain.load(bids, asks)
        _same(book, plain)
        for _ in range(30):
            bids, asks = _levels(rnd, 5), _levels(rnd, 5)
            book.apply(bids, asks)
            plain.apply(bids, asks)
            _same(book, plain)


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_snapshot_in_any_order(monkeypatch: pytest.MonkeyPatch, order: str) -> None:
    monkeypatch.setattr(daemon.book, "CHUNK", 4)
    rnd = random.Random(order)
    for _ in range(50):
        prices = sorted({Decimal(rnd.randint(1, 500)) / 100 for _ in range(rnd.randint(0, 40))})
        levels = [(str(p), "1") for p in prices]
        if order == "descending":
            levels.reverse()
        elif order == "shuffled":
            rnd.shuffle(levels)
        book, plain = L2Book(), PlainBook()
        book.load(levels, levels[::-1])
        plain.load(levels, levels[::-1])
        _same(book, plain)


def test_truncate_returns_the_levels_cut_best_first() -> None:
    book = L2Book()
    book.load([(str(p), "1") for p in range(1, 8)], [(str(p), "1") for p in range(10, 17)])
    cut_bids, cut_asks = book.truncate(3)
    assert cut_bids == [("4", "1"), ("3", "1"), ("2", "1"), ("1", "1")]
    assert cut_asks == [("13", "1"), ("14", "1"), ("15", "1"), ("16", "1")]
    assert book.levels() == ((("7", "1"), ("6", "1"), ("5", "1")),
                             (("10", "1"), ("11", "1"), ("12", "1")))


def test_a_price_spelled_anew_takes_the_new_spelling() -> None:
    book = L2Book()
    book.load([("1.5", "1")], [("2.50", "1")])
    book.apply([("1.50", "2")], [("2.5", "0")])
    assert book.levels() == ((("1.50", "2"),), ())
    assert book.bid_side.respelled == 1 and book.ask_side.respelled == 1


@pytest.mark.parametrize("bad", ["abc", "NaN", "Infinity", "", None, [1]])
def test_a_level_that_is_not_a_decimal_is_refused(bad: object) -> None:
    for level in ((bad, "1"), ("1", bad)):
        book = L2Book()
        with pytest.raises(BookError):
            book.load([level], [])
        assert len(book) == 0
        book.load([("2", "1")], [])
        with pytest.raises(BookError):
            book.apply([level], [])
        assert book.levels() == ((("2", "1"),), ())


@pytest.mark.parametrize("sizes", [
    ["1", "2.5", "0.010"], [".5", "5.", "007"], ["1", "0.000", "2"], ["1", "1e1", "+2"],
    ["1", "٣", "2"], ["1", "00", "."], ["1", "1.2.3"], ["1,5", "2"], ["1", ""],
])
def test_snapshot_sizes_are_read_as_decimal_reads_them(sizes: list[str]) -> None:
    # a snapshot's plain sizes are checked in bulk, the others one by one as Decimal
    levels = [(str(n), size) for n, size in enumerate(sizes, start=1)]
    try:
        for _, size in levels:
            assert Decimal(size).is_finite()
    except (ArithmeticError, AssertionError):
        with pytest.raises(BookError):
            L2Book().load(levels, [])
        return
    book, plain = L2Book(), PlainBook()
    book.load(levels, [])
    plain.load(levels, [])
    _same(book, plain)

def test_event_makers_make_what_the_classes_make() -> None:
    assert new_trade("x", "A-B", 1.0, 2.0, "7", "1.5", "2", "buy") == Trade(
        exchange="x", symbol="A-B", ts=1.0, recv_ts=2.0, id="7", price="1.5", size="2",
        side="buy")
    assert new_ticker("x", "A-B", 1.0, 2.0, "1", "2", "3", "4") == Ticker(
        exchange="x", symbol="A-B", ts=1.0, recv_ts=2.0, bid="1", bid_size="2", ask="3",
        ask_size="4")
    update = new_book_update("x", "A-B", 1.0, 2.0, (("1", "2"),), ())
    assert update == BookUpdate(exchange="x", symbol="A-B", ts=1.0, recv_ts=2.0,
                                bids=(("1", "2"),), asks=())
    assert hash(update) == hash(BookUpdate(exchange="x", symbol="A-B", ts=1.0, recv_ts=2.0,
                                           bids=(("1", "2"),), asks=()))
    with pytest.raises(AttributeError):
        update.ts = 3.0  # type: ignore[misc]
    assert event_maker(FeedState)("x", "*", 1.0, 1.0, "synced", "") == FeedState(
        exchange="x", symbol="*", ts=1.0, recv_ts=1.0, state="synced")


def test_kraken_checksum_kept_across_updates_equals_the_whole_books() -> None:
    """Random updates of a depth-10 book (levels entering and leaving the top 10 and
    the depth, sizes changing, some updates without a checksum): the feed verifies
    every checksum the whole book gives, and publishes updates that rebuild it."""
    markets = {"XBT/USD": "BTC-USD"}
    feed = KrakenFeed(["BTC-USD"], ["book"], markets, depth=10)
    feed.on_open(0.0)
    feed.on_message(json.dumps({"event": "subscriptionStatus", "status": "subscribed",
                                "channelID": 7, "pair": "XBT/USD",
                                "subscription": {"name": "book", "depth": 10}}), 0.0)
    rnd = random.Random(17)
    plain = PlainBook(10)
    asks = [(f"{p}.0", "1.00") for p in range(101, 115)]
    bids = [(f"{p}.0", "1.00") for p in range(99, 85, -1)]
    snapshot = {"as": [[p, v, "1.0"] for p, v in asks], "bs": [[p, v, "1.0"] for p, v in bids]}
    feed.on_message(json.dumps([7, snapshot, "book-10", "XBT/USD"]), 1.0)
    plain.load(bids[:10], asks[:10])
    consumer = L2Book()
    consumer.load(*feed.book("BTC-USD").levels())
    sent = 0
    for n in range(2000):
        side = rnd.choice("ab")
        base = 101 if side == "a" else 86
        level = (f"{base + rnd.randint(0, 13)}.0", rnd.choice(["0.00000000", "1.50", "2.00"]))
        if side == "a":
            plain.apply([], [level])
        else:
            plain.apply([level], [])
        part = {side: [[level[0], level[1], f"{n}.5"]]}
        if rnd.random() < 0.9:
            top_bids, top_asks = plain.levels()
            part["c"] = str(checksum(top_asks[:CHECKSUM_LEVELS], top_bids[:CHECKSUM_LEVELS]))
            sent += 1
        for event in feed.on_message(json.dumps([7, part, "book-10", "XBT/USD"]), 2.0 + n):
            assert isinstance(event, BookUpdate)
            consumer.apply(event.bids, event.asks)
        assert feed.book("BTC-USD").levels() == plain.levels() == consumer.levels()
    stats = feed.statistics()
    assert (stats.checksum_ok, stats.checksum_mismatch, stats.resyncs) == (sent, 0, 0)
