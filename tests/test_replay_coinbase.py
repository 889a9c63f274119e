"""The Coinbase emulator venue on the recorded traffic (``COINBASE.0``,
``COINBASE.ws.28.0``, 2021-04-17): sans-IO, then end to end with real sockets.

Expected values are computed independently here, from the raw frames with the
standard ``json`` module and plain dicts, never from the venue's own code.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_websocket

from daemon.config import Config
from daemon.exchanges.base import Send
from daemon.exchanges.coinbase import CoinbaseFeed, parse_markets
from daemon.replay.capture import Capture, Received, read_capture
from daemon.replay.emulator import make_venue
from daemon.replay.run import serve_replay
from daemon.replay.tape import Faults, merge_frames
from daemon.replay.venues.coinbase import CoinbaseVenue
from tests.helpers import as_plain, messages, request

Book = tuple[dict[str, str], dict[str, str]]  # normalized plain bids, asks


@attrs.frozen
class Recorded:
    captures: list[Capture]
    tape: list[Received]
    decoded: list[dict[str, Any]]  # the tape's frames, json-decoded
    products: tuple[str, ...]  # as the recorder subscribed them
    products_body: str

    def books_after(self, count: int) -> dict[str, Book]:
        """The books once the first ``count`` tape frames have played."""
        books: dict[str, Book] = {}
        for m in self.decoded[:count]:
            if m["type"] == "snapshot":
                books[m["product_id"]] = (as_plain(m["bids"]), as_plain(m["asks"]))
            elif m["type"] == "l2update" and m["product_id"] in books:
                bids, asks = books[m["product_id"]]
                for side, price, size in m["changes"]:
                    levels = bids if side == "buy" else asks
                    if Decimal(size) == 0:
                        levels.pop(str(Decimal(price).normalize()), None)
                    else:
                        levels[str(Decimal(price).normalize())] = str(Decimal(size).normalize())
        return books

    def matches(self, count: int | None = None) -> list[dict[str, Any]]:
        return [m for m in self.decoded[:count] if m["type"] in ("match", "last_match")]

    def index(self, type_: str, product: str) -> int:
        """Tape position (0-based) of the first frame of that type and product."""
        return next(
            i for i, m in enumerate(self.decoded)
            if m["type"] == type_ and m.get("product_id") == product
        )


@pytest.fixture(scope="module")
def rec(captures: Path) -> Recorded:
    files = [read_capture(captures / "COINBASE.0"), read_capture(captures / "COINBASE.ws.28.0")]
    tape = merge_frames(files)
    (rest,) = files[0].rest
    (conn,) = files[1].connections
    return Recorded(
        captures=files,
        tape=tape,
        decoded=[json.loads(frame.text) for frame in tape],
        products=tuple(json.loads(conn.sent[0][1])["product_ids"]),
        products_body=rest.body,
    )


def plain(levels: Any) -> Book:
    bids, asks = levels
    return as_plain(bids), as_plain(asks)


def new_venue(rec: Recorded) -> CoinbaseVenue:
    venue = make_venue("coinbase", rec.captures)
    assert isinstance(venue, CoinbaseVenue)
    return venue


def play(venue: CoinbaseVenue, frames: list[Received]) -> list[str | None]:
    return [venue.route(frame) for frame in frames]


def subscribe(venue: CoinbaseVenue, keys: set[str], **body: Any) -> list[dict[str, Any]]:
    text = json.dumps({"type": "subscribe", **body})
    return [json.loads(reply) for reply in venue.on_client_message(keys, text)]


def unsubscribe(venue: CoinbaseVenue, keys: set[str], **body: Any) -> list[dict[str, Any]]:
    text = json.dumps({"type": "unsubscribe", **body})
    return [json.loads(reply) for reply in venue.on_client_message(keys, text)]


def listed(reply: dict[str, Any]) -> dict[str, set[str]]:
    """A ``subscriptions`` reply as ``{channel: {product, ...}}``."""
    assert reply["type"] == "subscriptions"
    return {c["name"]: set(c["product_ids"]) for c in reply["channels"]}


# -- what the recording subscribed ------------------------------------------------------


def test_recording_facts(rec: Recorded) -> None:
    counts = Counter(m["type"] for m in rec.decoded)
    assert counts == {
        "l2update": 9719, "ticker": 107, "match": 97, "last_match": 10, "snapshot": 10,
        "subscriptions": 3,
    }
    assert len(rec.products) == 10


def test_subscriptions_of_the_recording(rec: Recorded) -> None:
    symbols, channels = new_venue(rec).subscriptions(rec.captures)
    markets = parse_markets(rec.products_body)
    assert symbols == [markets[p] for p in rec.products]
    assert sorted(channels) == ["book", "ticker", "trades"]


# -- subscribe / unsubscribe ------------------------------------------------------------


def test_a_new_connection_has_no_keys_and_no_greeting(rec: Recorded) -> None:
    venue = new_venue(rec)
    assert venue.open("/") == set()
    assert venue.greeting() == []


def test_subscribe_before_the_tape_waits_for_the_recorded_snapshot(rec: Recorded) -> None:
    venue = new_venue(rec)
    keys: set[str] = set()
    products = list(rec.products)
    replies = subscribe(venue, keys, product_ids=products, channels=["level2", "ticker", "matches"])
    # no book yet: no snapshot of the venue, only the subscriptions reply
    (reply,) = replies
    assert listed(reply) == {c: set(products) for c in ("level2", "ticker", "matches")}
    assert keys == {f"{c}:{p}" for c in ("level2", "level2-snapshot", "ticker", "matches")
                    for p in products}
    # the recorded snapshot frames are routed to exactly those keys
    routed = play(venue, rec.tape)
    snapshots = [k for k, m in zip(routed, rec.decoded, strict=True) if m["type"] == "snapshot"]
    assert snapshots == [f"level2-snapshot:{m['product_id']}" for m in rec.decoded
                         if m["type"] == "snapshot"]
    assert set(snapshots) <= keys


def test_subscribe_mid_tape_gets_the_current_book_first(rec: Recorded) -> None:
    venue = new_venue(rec)
    half = len(rec.tape) // 2
    play(venue, rec.tape[:half])
    keys: set[str] = set()
    replies = subscribe(venue, keys, product_ids=["SKL-USD", "DASH-BTC"], channels=["level2"])
    *snapshots, last = replies
    assert listed(last) == {"level2": {"SKL-USD", "DASH-BTC"}}
    expected = rec.books_after(half)
    assert [s["type"] for s in snapshots] == ["snapshot", "snapshot"]
    for snapshot in snapshots:
        assert plain((snapshot["bids"], snapshot["asks"])) == expected[snapshot["product_id"]]
        bids = [Decimal(p) for p, _ in snapshot["bids"]]
        asks = [Decimal(p) for p, _ in snapshot["asks"]]
        assert bids == sorted(bids, reverse=True) and asks == sorted(asks)
    # the book came from the venue: the recorded snapshot frame is not for this connection
    assert keys == {"level2:SKL-USD", "level2:DASH-BTC"}
    # subscribing again to what it has sends no second snapshot
    (again,) = subscribe(venue, keys, product_ids=["SKL-USD"], channels=["level2"])
    assert listed(again) == {"level2": {"SKL-USD", "DASH-BTC"}}


def test_channel_objects_batch_alias_and_heartbeat(rec: Recorded) -> None:
    venue = new_venue(rec)
    play(venue, rec.tape[: rec.index("snapshot", "NU-GBP") + 1])
    keys: set[str] = set()
    replies = subscribe(
        venue, keys, product_ids=["YFI-BTC"],
        channels=["heartbeat", {"name": "level2_batch", "product_ids": ["SKL-USD", "NU-GBP"]},
                  {"name": "ticker"}],
    )
    # NU-GBP's recorded snapshot has played (a venue snapshot), SKL-USD's not yet
    assert [r["type"] for r in replies] == ["snapshot", "subscriptions"]
    assert replies[0]["product_id"] == "NU-GBP"
    assert listed(replies[-1]) == {
        "heartbeat": {"YFI-BTC"}, "level2": {"SKL-USD", "NU-GBP"}, "ticker": {"YFI-BTC"},
    }
    assert keys == {"heartbeat:YFI-BTC", "level2:SKL-USD", "level2:NU-GBP",
                    "level2-snapshot:SKL-USD", "ticker:YFI-BTC"}


def test_unsubscribe(rec: Recorded) -> None:
    venue = new_venue(rec)
    keys: set[str] = set()
    subscribe(venue, keys, product_ids=list(rec.products), channels=["level2", "ticker"])
    (reply,) = unsubscribe(venue, keys, product_ids=["SKL-USD"], channels=["level2", "ticker"])
    rest = set(rec.products) - {"SKL-USD"}
    assert listed(reply) == {"level2": rest, "ticker": rest}
    assert "level2-snapshot:SKL-USD" not in keys and "level2-snapshot:NU-GBP" in keys
    (reply,) = unsubscribe(venue, keys, channels=["level2"])  # every product of a channel
    assert listed(reply) == {"ticker": rest}
    assert keys == {f"ticker:{p}" for p in rest}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"type":"hello"}', "either subscribe or unsubscribe"),
        ('{"type":"subscribe","product_ids":["SKL-USD"],"channels":["full"]}', "full"),
        ('{"type":"subscribe","product_ids":["NOPE-USD"],"channels":["ticker"]}', "NOPE-USD"),
        ('{"type":"subscribe","channels":["ticker"]}', "no product ids"),
        ('{"type":"subscribe","product_ids":"SKL-USD","channels":["ticker"]}', "product_ids"),
        ('{"type":"subscribe","product_ids":["SKL-USD"]}', "channels"),
        ('{"type":"subscribe","product_ids":["SKL-USD"],"channels":[7]}', "not a channel"),
    ],
)
def test_malformed_requests_get_an_error_and_change_nothing(
    rec: Recorded, text: str, reason: str
) -> None:
    venue = new_venue(rec)
    keys = {"ticker:SKL-BTC"}
    (reply,) = [json.loads(r) for r in venue.on_client_message(keys, text)]
    assert reply["type"] == "error" and reply["message"]
    assert reason in reply["reason"]
    assert keys == {"ticker:SKL-BTC"}


# -- the tape ---------------------------------------------------------------------------


def test_routing_keys(rec: Recorded) -> None:
    routed = play(new_venue(rec), rec.tape)
    kinds = {"l2update": "level2", "snapshot": "level2-snapshot", "ticker": "ticker",
             "match": "matches", "last_match": "matches"}
    expected = [
        f"{kinds[m['type']]}:{m['product_id']}" if m["type"] in kinds else None
        for m in rec.decoded
    ]
    assert routed == expected
    assert routed.count(None) == 3  # the recording's own subscriptions replies


def test_books_after_the_whole_tape(rec: Recorded) -> None:
    venue = new_venue(rec)
    play(venue, rec.tape)
    expected = rec.books_after(len(rec.tape))
    assert set(venue.books) == set(expected) == set(rec.products)
    for product, book in venue.books.items():
        assert plain(book.levels()) == expected[product], product
        assert not book.is_crossed()


def test_corrupt_checksum_crosses_the_book(rec: Recorded) -> None:
    venue = new_venue(rec)
    after = rec.index("snapshot", "SKL-USD")  # the last recorded snapshot
    updates = [i for i, m in enumerate(rec.decoded) if i > after and m["type"] == "l2update"]
    sell_only = next(i for i in updates if all(c[0] == "sell" for c in rec.decoded[i]["changes"]))
    with_buy = next(i for i in updates if any(c[0] == "buy" for c in rec.decoded[i]["changes"]))
    play(venue, rec.tape[: max(sell_only, with_buy) + 1])
    for i in (sell_only, with_buy):
        original = rec.decoded[i]
        corrupted = json.loads(venue.corrupt_checksum(rec.tape[i].text))
        best_ask = Decimal(venue.books[original["product_id"]].best_ask()[0])
        buys = [Decimal(p) for side, p, size in corrupted["changes"]
                if side == "buy" and Decimal(size) > 0]
        assert buys and max(buys) > best_ask
        assert {k: v for k, v in corrupted.items() if k != "changes"} == {
            k: v for k, v in original.items() if k != "changes"
        }
    snapshot = json.loads(venue.corrupt_checksum(rec.tape[after].text))
    assert Decimal(snapshot["bids"][0][0]) > Decimal(snapshot["asks"][0][0])
    ticker = rec.tape[rec.index("ticker", "SKL-USD")].text
    assert venue.corrupt_checksum(ticker) == ticker


# -- REST -------------------------------------------------------------------------------


def test_rest_products(rec: Recorded) -> None:
    venue = new_venue(rec)
    status, body = venue.rest("/products")
    assert status == 200 and json.loads(body) == json.loads(rec.products_body)
    status, body = venue.rest("/products/SKL-USD")
    assert status == 200 and json.loads(body)["id"] == "SKL-USD"
    for target in ("/nope", "/products/NOPE-USD/trades", "/products/SKL-USD/candles", "/"):
        status, body = venue.rest(target)
        assert status == 404 and json.loads(body) == {"message": "NotFound"}


def rest_trades(venue: CoinbaseVenue, target: str) -> list[dict[str, Any]]:
    status, body = venue.rest(target)
    assert status == 200, body
    return json.loads(body)


def test_rest_trades_from_the_matches_played(rec: Recorded) -> None:
    venue = new_venue(rec)
    assert rest_trades(venue, "/products/SKL-USD/trades") == []
    half = len(rec.tape) // 2
    play(venue, rec.tape[:half])

    def expected(count: int | None, product: str) -> list[dict[str, Any]]:
        trades = [
            {k: m[k] for k in ("time", "trade_id", "price", "size", "side")}
            for m in rec.matches(count) if m["product_id"] == product
        ]
        return sorted(trades, key=lambda t: t["trade_id"], reverse=True)

    assert rest_trades(venue, "/products/SKL-USD/trades") == expected(half, "SKL-USD")
    play(venue, rec.tape[half:])
    for product in rec.products:
        assert rest_trades(venue, f"/products/{product}/trades") == expected(None, product)
    total = sum(len(rest_trades(venue, f"/products/{p}/trades")) for p in rec.products)
    assert total == len(rec.matches()) == 107

    # Coinbase's cursors: after = older than, before = newer than (nearest first)
    every = expected(None, "SKL-USD")
    assert len(every) == 53
    ids = [t["trade_id"] for t in every]
    assert [t["trade_id"] for t in rest_trades(venue, "/products/SKL-USD/trades?limit=5")] \
        == ids[:5]
    page = rest_trades(venue, f"/products/SKL-USD/trades?after={ids[4]}&limit=10")
    assert [t["trade_id"] for t in page] == ids[5:15]
    page = rest_trades(venue, f"/products/SKL-USD/trades?before={ids[20]}&limit=3")
    assert [t["trade_id"] for t in page] == ids[17:20]
    assert rest_trades(venue, f"/products/SKL-USD/trades?before={ids[0]}") == []
    for query in ("limit=0", "limit=1001", "after=x"):
        assert venue.rest(f"/products/SKL-USD/trades?{query}")[0] == 400


def test_rest_book(rec: Recorded) -> None:
    venue = new_venue(rec)
    play(venue, rec.tape)
    bids, asks = (sorted(side.items(), key=lambda kv: Decimal(kv[0]), reverse=reverse)
                  for side, reverse in zip(rec.books_after(len(rec.tape))["DASH-BTC"],
                                           (True, False), strict=True))
    status, body = venue.rest("/products/DASH-BTC/book?level=2")
    assert status == 200
    book = json.loads(body)
    for side, levels in ((bids, book["bids"]), (asks, book["asks"])):
        assert [(str(Decimal(p).normalize()), str(Decimal(s).normalize()))
                for p, s, _ in levels] == side[:50]
    status, body = venue.rest("/products/DASH-BTC/book")
    assert status == 200 and len(json.loads(body)["bids"]) == 1
    assert venue.rest("/products/DASH-BTC/book?level=3")[0] == 400


# -- the collector's protocol against the venue, in memory ----------------------------


class Wire:
    """One emulated connection: the venue routes the tape to a ``CoinbaseFeed``."""

    def __init__(self, rec: Recorded, venue: CoinbaseVenue) -> None:
        markets = parse_markets(rec.products_body)
        self.venue = venue
        self.feed = CoinbaseFeed(list(rec.products), ["book", "ticker", "trades"], markets)
        self.keys = venue.open("/")
        self.outputs: list = []
        self.deliver(self.feed.on_open(0.0))

    def deliver(self, outputs: list) -> None:
        """Send the feed's ``Send`` frames to the venue and feed back its replies."""
        for output in outputs:
            self.outputs.append(output)
            if isinstance(output, Send):
                for reply in self.venue.on_client_message(self.keys, output.text):
                    self.deliver(self.feed.on_message(reply, 0.0))

    def play(self, frames: list[Received], corrupt: set[int] = frozenset()) -> None:
        for number, frame in enumerate(frames):
            key = self.venue.route(frame)
            if key in self.keys:
                text = frame.text
                if number in corrupt:
                    text = self.venue.corrupt_checksum(text)
                self.deliver(self.feed.on_message(text, frame.ts))


def test_a_crossed_book_resyncs_from_the_venue_snapshot(rec: Recorded) -> None:
    venue = new_venue(rec)
    wire = Wire(rec, venue)
    n = len(rec.tape) // 3
    assert rec.decoded[n]["type"] == "l2update"
    wire.play(rec.tape, corrupt={n})
    assert wire.feed.stats.resyncs == 1
    assert wire.feed.stats.malformed == 0
    assert wire.feed.stats.trades == 107
    for product in rec.products:
        assert plain(wire.feed.book(product).levels()) == plain(venue.books[product].levels())


# -- end to end, with sockets -----------------------------------------------------------


def paths(captures: Path) -> list[Path]:
    return [captures / "COINBASE.0", captures / "COINBASE.ws.28.0"]


def local_config() -> Config:
    config = Config()
    return attrs.evolve(config, server=attrs.evolve(config.server, listen="127.0.0.1:0"))


async def book_snapshots(ws: trio_websocket.WebSocketConnection, count: int) -> dict[str, Book]:
    """Subscribe to every Coinbase book; the ``count`` snapshots that come first."""
    await request(ws, {"op": "subscribe", "id": 1, "channels": ["book"],
                       "symbols": ["coinbase:*"]})
    books: dict[str, Book] = {}
    while len(books) < count:
        for message in messages(await ws.get_message()):
            if message["type"] == "book_snapshot":
                books[message["symbol"]] = plain((message["bids"], message["asks"]))
    await request(ws, {"op": "unsubscribe", "id": 2, "channels": ["book"],
                       "symbols": ["coinbase:*"]})
    return books


async def test_final_books_reach_a_client_after_a_resync(captures: Path, rec: Recorded) -> None:
    """The whole tape as fast as the daemon reads, with one SKL-USD ``l2update`` made
    to cross the book: the collector resubscribes that product mid-replay, gets the
    venue's current book, and every book still ends as recorded."""
    expected = rec.books_after(len(rec.tape))
    corrupt = next(
        number for number, m in enumerate(rec.decoded, 1)
        if number > len(rec.tape) // 3 and m["type"] == "l2update"
        and m["product_id"] == "SKL-USD"
    )
    faults = {"coinbase": Faults(corrupt_checksum=frozenset({corrupt}))}
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(
            partial(serve_replay, paths(captures), local_config(), speed=None, faults=faults)
        )
        with trio.fail_after(30):  # about 5 s: the daemon's pipeline sets the pace
            await replay.wait_finished()
        url = f"ws://127.0.0.1:{replay.app.port}"
        with trio.fail_after(10):
            async with trio_websocket.open_websocket_url(url) as ws:
                # the tape has been played; the daemon may still be draining its queues
                for _ in range(100):
                    books = await book_snapshots(ws, len(expected))
                    if books == expected:
                        break
                    await trio.sleep(0.05)
        assert set(books) == set(rec.products)
        for product in rec.products:
            assert books[product] == expected[product], product
        emulator = replay.emulators["coinbase"]
        assert emulator.connections_total == 1
        # every frame but the 3 recorded `subscriptions`, less the few of the resynced
        # product that passed while it was unsubscribed (the exchange sends those to
        # nobody; its new snapshot covers them)
        assert len(rec.tape) - 3 - 20 <= emulator.statistics().sent <= len(rec.tape) - 3
        assert replay.app.collectors["coinbase"].feed.stats.resyncs == 1
        nursery.cancel_scope.cancel()


async def test_every_trade_once_to_a_client_from_the_start(captures: Path, rec: Recorded) -> None:
    recorded_trades = {(m["product_id"], str(m["trade_id"])): m for m in rec.matches()}
    tickers = Counter(m["product_id"] for m in rec.decoded if m["type"] == "ticker")
    got: list[dict[str, Any]] = []
    all_trades = trio.Event()

    async def collect(ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            got.extend(messages(await ws.get_message()))
            if len(trades()) >= len(recorded_trades):
                all_trades.set()

    def trades() -> list[dict[str, Any]]:
        return [m for m in got if m["type"] == "trade"]

    async with trio.open_nursery() as nursery:
        replay = await nursery.start(
            partial(serve_replay, paths(captures), local_config(), speed=20.0)
        )
        url = f"ws://127.0.0.1:{replay.app.port}"
        with trio.fail_after(30):
            async with (
                trio_websocket.open_websocket_url(url) as ws,
                trio.open_nursery() as client,
            ):
                await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades", "ticker"],
                                   "symbols": ["coinbase:*"], "history": 1000})
                client.start_soon(collect, ws)
                await replay.wait_finished()
                await all_trades.wait()
                await trio.sleep(0.3)  # anything repeated would come now
                client.cancel_scope.cancel()
        nursery.cancel_scope.cancel()

    assert [m["type"] for m in got[:2]] == ["welcome", "ack"]
    keys = [(t["symbol"], t["id"]) for t in trades()]
    assert len(keys) == len(set(keys)) == 107
    assert set(keys) == set(recorded_trades)
    for t in trades():
        m = recorded_trades[t["symbol"], t["id"]]
        assert (t["exchange"], t["price"], t["size"]) == ("coinbase", m["price"], m["size"])
    seqs: dict[tuple[str, str], list[int]] = defaultdict(list)
    for m in got:
        if m["type"] in ("trade", "ticker"):
            seqs[m["type"], m["symbol"]].append(m["seq"])
    for (kind, symbol), numbers in seqs.items():
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), (kind, symbol)
        if kind == "trade":
            assert numbers[0] == 1
        else:  # a late subscriber starts at the latest ticker; every one was numbered
            assert numbers[-1] == tickers[symbol]
    assert {symbol for kind, symbol in seqs if kind == "ticker"} == set(tickers)


def test_rest_ticker_is_the_last_ticker_played(rec: Recorded) -> None:
    """``/products/<id>/ticker`` (what ccxt's ``fetchTicker`` asks, e.g. for a
    symbol polled beside streamed ones): 404 before anything was played, then the
    book's best bid and offer, then the last recorded ticker frame's fields."""
    venue = new_venue(rec)
    assert venue.rest("/products/SKL-USD/ticker")[0] == 404
    first_ticker = rec.index("ticker", "SKL-USD")
    snapshot = rec.index("snapshot", "SKL-USD")
    if snapshot < first_ticker:
        play(venue, rec.tape[: snapshot + 1])
        status, body = venue.rest("/products/SKL-USD/ticker")
        book = rec.books_after(snapshot + 1)["SKL-USD"]
        answer = json.loads(body)
        assert status == 200
        assert Decimal(answer["bid"]) == max(Decimal(p) for p in book[0])
        assert Decimal(answer["ask"]) == min(Decimal(p) for p in book[1])
    play(venue, rec.tape[:len(rec.tape)])
    last = [m for m in rec.decoded if m["type"] == "ticker" and m["product_id"] == "SKL-USD"][-1]
    status, body = venue.rest("/products/SKL-USD/ticker")
    assert status == 200 and json.loads(body) == {
        "trade_id": last["trade_id"], "price": last["price"], "size": last["last_size"],
        "time": last["time"], "bid": last["best_bid"], "ask": last["best_ask"],
        "volume": last["volume_24h"]}
