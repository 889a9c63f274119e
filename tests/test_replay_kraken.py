"""KrakenVenue (the emulated Kraken) on the recorded captures, then the whole daemon
on it over real sockets.

The unit tests drive the venue as the emulator does, with no socket: ``route`` each
tape frame and hand it to the connections whose keys match; what a connection sends
goes to ``on_client_message`` and the replies come back to it. Expected books come
from a plain-dict computation written here, independent of the venue, of ``L2Book``
and of ``KrakenFeed``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from functools import partial

import attrs
import pytest
import trio
from trio_websocket import open_websocket_url

from daemon.config import Config
from daemon.exchanges.base import Send
from daemon.exchanges.kraken import KrakenFeed, parse_markets
from daemon.replay.capture import read_capture
from daemon.replay.run import serve_replay
from daemon.replay.tape import merge_frames
from daemon.replay.venues.kraken import KrakenVenue

FILES = ("KRAKEN.0", "KRAKEN.ws.48.0", "KRAKEN.ws.49.0", "KRAKEN.ws.50.0")
DEPTH = 1000
CHECKSUMS = 4269  # book updates with "c" in KRAKEN.ws.50.0 (captures README)


@pytest.fixture(scope="module")
def paths(captures):
    return [captures / name for name in FILES]


@pytest.fixture(scope="module")
def recorded(paths):
    return [read_capture(path) for path in paths]


@pytest.fixture(scope="module")
def tape(recorded):
    return merge_frames(recorded)


@pytest.fixture(scope="module")
def markets(recorded):
    return parse_markets(recorded[0].rest[0].body)


@pytest.fixture(scope="module")
def pairs(recorded):
    return json.loads(recorded[3].connections[0].sent[0][1])["pair"]


def _data(text: str) -> list | None:
    message = json.loads(text)
    return message if isinstance(message, list) else None


# -- the independent reference -------------------------------------------------------


class RefBook:
    """Kraken's book with plain dicts: {Decimal price: [price, volume, time]} per side,
    each side cut to ``DEPTH`` after every message."""

    def __init__(self) -> None:
        self.sides: dict[str, dict] = {"as": {}, "bs": {}}

    def message(self, parts: list) -> None:
        for part in parts:
            for side, keys in (("as", ("as", "a")), ("bs", ("bs", "b"))):
                for key in keys:
                    for price, volume, time, *_ in part.get(key, []):
                        if Decimal(volume) == 0:
                            self.sides[side].pop(Decimal(price), None)
                        else:
                            self.sides[side][Decimal(price)] = [price, volume, time]
        for side in self.sides:
            if len(self.sides[side]) > DEPTH:
                kept = self.top(side, DEPTH)
                self.sides[side] = {Decimal(level[0]): level for level in kept}

    def top(self, side: str, n: int | None = None) -> list:
        keys = sorted(self.sides[side], reverse=side == "bs")[:n]
        return [self.sides[side][k] for k in keys]

    def snapshot(self) -> dict:
        return {"as": self.top("as"), "bs": self.top("bs")}

    def pairs_of(self, side: str) -> tuple:
        return tuple((price, volume) for price, volume, _ in self.top(side))


def _reference(frames) -> dict[str, RefBook]:
    books: dict[str, RefBook] = {}
    for frame in frames:
        message = _data(frame.text)
        if message is None or not message[-2].startswith("book"):
            continue
        if "as" in message[1] or "bs" in message[1]:
            books[message[-1]] = RefBook()
        books[message[-1]].message(message[1:-2])
    return books


def _book_updates(frames) -> int:
    return sum(
        1 for f in frames if (m := _data(f.text)) and m[-2].startswith("book") and "c" in m[-3]
    )


# -- an in-memory connection, driven as the emulator drives one -----------------------


class Client:
    """A KrakenFeed on one emulated connection: frames of the keys it holds reach the
    feed; what the feed sends is answered by the venue at once."""

    def __init__(self, venue: KrakenVenue, feed: KrakenFeed, now: float) -> None:
        self.venue = venue
        self.feed = feed
        self.keys: set[str] = set()
        self.received: list[str] = []
        self.outputs = self.send(feed.on_open(now), now)

    def send(self, outputs: list, now: float) -> list:
        out = list(outputs)
        for output in outputs:
            if isinstance(output, Send):
                for reply in self.venue.on_client_message(self.keys, output.text):
                    out += self.receive(reply, now)
        return out

    def receive(self, text: str, now: float) -> list:
        self.received.append(text)
        return self.send(self.feed.on_message(text, now), now)


def _play(venue: KrakenVenue, frames, clients, start: int = 0, corrupt: int | None = None):
    for number, frame in enumerate(frames[start:], start):
        key = venue.route(frame)
        text = venue.corrupt_checksum(frame.text) if number == corrupt else frame.text
        for client in clients:
            if key is not None and key in client.keys:
                client.outputs += client.receive(text, frame.ts)


def _feed(markets, pairs) -> KrakenFeed:
    return KrakenFeed([markets[p] for p in pairs], ["book", "trades", "ticker"], markets, DEPTH)


# -- WebSocket requests ---------------------------------------------------------------


def test_subscription_replies_carry_the_recorded_channel_ids(recorded, pairs):
    venue = KrakenVenue(recorded)
    assert venue.recorded_depth == DEPTH
    keys: set[str] = set()
    for capture in recorded[1:]:
        (conn,) = capture.connections
        replies = [json.loads(r) for r in venue.on_client_message(keys, conn.sent[0][1])]
        statuses = [m for f in conn.received if (m := json.loads(f.text)) and
                    isinstance(m, dict) and m["event"] == "subscriptionStatus"]
        assert replies == statuses and len(replies) == 10  # no snapshot: none played yet
    assert keys == {"heartbeat"} | {
        f"{name}:{pair}" for name in ("book", "book-snapshot", "trade", "ticker") for pair in pairs
    }
    ids = [json.loads(r)["channelID"] for name in ("book", "trade", "ticker") for r in
           venue.on_client_message(set(), json.dumps(
               {"event": "subscribe", "pair": pairs, "subscription": {"name": name, "depth": DEPTH}}
           ))]
    assert len(set(ids)) == 30


def test_client_requests_pings_errors_and_unsubscribe(recorded):
    venue = KrakenVenue(recorded)
    keys: set[str] = set()

    def ask(request) -> list[dict]:
        text = request if isinstance(request, str) else json.dumps(request)
        return [json.loads(r) for r in venue.on_client_message(keys, text)]

    book = {"name": "book", "depth": DEPTH}
    assert ask({"event": "ping", "reqid": 7}) == [{"event": "pong", "reqid": 7}]
    for bad in ("{not json", "[]", '{"reqid":1}', '{"event":"subscribe","pair":"XBT/CHF",'
                '"subscription":{"name":"trade"}}', '{"event":"subscribe","pair":["XBT/CHF"]}'):
        (reply,) = ask(bad)
        assert reply["event"] == "error" and reply["errorMessage"]
    assert ask({"event": "subscribe", "pair": ["XBT/CHF"], "subscription": {"name": "book"}}) == [
        {"errorMessage": "Subscription depth not supported", "event": "subscriptionStatus",
         "pair": "XBT/CHF", "status": "error", "subscription": {"name": "book"}}
    ]
    errors = ask({"event": "subscribe", "pair": ["XBT/USD"], "subscription": book})
    errors += ask({"event": "subscribe", "pair": ["XBT/CHF"], "subscription": {"name": "spread"}})
    assert [e["errorMessage"] for e in errors] == [
        "Currency pair not supported", "Subscription name invalid"
    ]
    assert keys == set()

    (subscribed,) = ask(
        {"event": "subscribe", "pair": ["XBT/CHF"], "subscription": book, "reqid": 3}
    )
    assert (subscribed["status"], subscribed["channelID"], subscribed["reqid"]) == (
        "subscribed", 464, 3
    )
    assert keys == {"book:XBT/CHF", "book-snapshot:XBT/CHF", "heartbeat"}
    (again,) = ask({"event": "subscribe", "pair": ["XBT/CHF"], "subscription": book})
    assert again["status"] == "error"
    (gone,) = ask({"event": "unsubscribe", "pair": ["XBT/CHF"], "subscription": book})
    assert {**subscribed, "status": "unsubscribed"} == {**gone, "reqid": 3}
    assert keys == set()
    (missing,) = ask({"event": "unsubscribe", "pair": ["XBT/CHF"], "subscription": book})
    assert missing["errorMessage"] == "Subscription Not Found"


def test_greeting_is_the_recorded_system_status_with_a_fresh_connection_id(recorded, markets):
    venue = KrakenVenue(recorded)
    (text,) = venue.greeting()
    first, second = json.loads(text), json.loads(venue.greeting()[0])
    assert {**first, "connectionID": 0} == {
        "connectionID": 0, "event": "systemStatus", "status": "online", "version": "1.8.3"
    }
    assert first["connectionID"] != second["connectionID"]
    feed = KrakenFeed(["BTC-CHF"], ["trades"], markets)
    feed.on_open(1.0)
    assert feed.on_message(text, 1.0) == [] and feed.system_status == "online"


def test_subscriptions_are_the_recorded_symbols_and_channels(recorded, markets, pairs):
    symbols, channels = KrakenVenue(recorded).subscriptions(recorded)
    assert symbols == [markets[p] for p in pairs]
    assert channels == ["book", "trades", "ticker"]  # in recorded order: the book first


# -- the tape -------------------------------------------------------------------------


def test_routing_of_the_merged_tape(recorded, tape, pairs):
    venue = KrakenVenue(recorded)
    everything: set[str] = set()
    for capture in recorded[1:]:
        venue.on_client_message(everything, capture.connections[0].sent[0][1])
    keys = [venue.route(frame) for frame in tape]

    kinds: dict[str | None, int] = {}
    for key in keys:
        kind = key and key.partition(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds == {None: 33, "heartbeat": 92, "book-snapshot": 10, "book": CHECKSUMS,
                     "trade": 8, "ticker": 18}
    assert all(key in everything for key in keys if key is not None)
    for frame, key in zip(tape, keys, strict=True):
        message = json.loads(frame.text)
        if isinstance(message, list):
            snapshot = "as" in message[1]
            name = "book-snapshot" if snapshot else message[-2].partition("-")[0]
            assert key == f"{name}:{message[-1]}"
    assert sorted(k for k in keys if k and k.startswith("book-snapshot")) == sorted(
        f"book-snapshot:{p}" for p in pairs
    )


def test_books_after_the_whole_tape_equal_a_plain_dict_computation(recorded, tape, pairs):
    venue = KrakenVenue(recorded)
    for frame in tape:
        venue.route(frame)
    reference = _reference(tape)
    keys: set[str] = set()
    book = {"name": "book", "depth": DEPTH}
    request = {"event": "subscribe", "pair": pairs, "subscription": book}
    replies = [json.loads(r) for r in venue.on_client_message(keys, json.dumps(request))]
    snapshots = {m[-1]: m for m in replies if isinstance(m, list)}
    assert list(snapshots) == pairs
    for pair in pairs:
        assert snapshots[pair][1] == reference[pair].snapshot()
        assert snapshots[pair][2] == "book-1000"
        assert venue.books[pair].levels() == (reference[pair].top("as"), reference[pair].top("bs"))
    assert not any(k.startswith("book-snapshot") for k in keys)  # one snapshot per connection

    status, body = venue.rest("/0/public/Depth?pair=XBTCHF&count=5")
    expected = {
        side: [[p, v, int(Decimal(t))] for p, v, t in reference["XBT/CHF"].top(key, 5)]
        for side, key in (("asks", "as"), ("bids", "bs"))
    }
    assert (status, json.loads(body)) == (200, {"error": [], "result": {"XBTCHF": expected}})


def _check_books(feed: KrakenFeed, reference, markets, pairs) -> None:
    for pair in pairs:
        ref = reference[pair]
        assert feed.book(markets[pair]).levels() == (ref.pairs_of("bs"), ref.pairs_of("as"))


def test_resubscribe_and_a_late_connection_mid_tape_stay_consistent(
    recorded, tape, markets, pairs
):
    venue = KrakenVenue(recorded)
    early = Client(venue, _feed(markets, pairs), tape[0].ts)
    middle = len(tape) // 2
    _play(venue, tape[:middle], [early])
    now = tape[middle].ts
    at_middle = _reference(tape[:middle])

    seen = len(early.received)
    early.outputs += early.send(early.feed.resync("BTC-CHF", "test"), now)
    resync = [json.loads(t) for t in early.received[seen:]]
    assert [m["status"] for m in resync[:2]] == ["unsubscribed", "subscribed"]
    assert resync[2][1] == at_middle["XBT/CHF"].snapshot() and len(resync) == 3

    late = Client(venue, _feed(markets, pairs), now)
    snapshots = {m[-1]: m[1] for t in late.received if isinstance(m := json.loads(t), list)
                 and "as" in m[1]}
    assert snapshots == {pair: at_middle[pair].snapshot() for pair in pairs}
    _play(venue, tape, [early, late], start=middle)

    final = _reference(tape)
    for client, checked in ((early, CHECKSUMS), (late, _book_updates(tape[middle:]))):
        stats = client.feed.stats
        assert (stats.checksum_ok, stats.checksum_mismatch, stats.malformed) == (checked, 0, 0)
        _check_books(client.feed, final, markets, pairs)
    assert early.feed.stats.resyncs == 1 and late.feed.stats.snapshots == 10


def test_a_corrupted_checksum_resyncs_through_the_venue(recorded, tape, markets, pairs):
    venue = KrakenVenue(recorded)
    updates = [i for i, f in enumerate(tape)
               if (m := _data(f.text)) and m[-1] == "XBT/CHF" and "c" in m[-3]]
    bad = updates[20]
    corrupted = json.loads(venue.corrupt_checksum(tape[bad].text))
    original = json.loads(tape[bad].text)
    assert corrupted[-3]["c"] != original[-3]["c"] and corrupted[:-3] == original[:-3]

    client = Client(venue, _feed(markets, pairs), tape[0].ts)
    _play(venue, tape, [client], corrupt=bad)
    stats = client.feed.stats
    assert (stats.checksum_ok, stats.checksum_mismatch, stats.resyncs) == (CHECKSUMS - 1, 1, 1)
    assert stats.snapshots == 11
    _check_books(client.feed, _reference(tape), markets, pairs)


# -- REST -----------------------------------------------------------------------------


def test_rest_asset_pairs_as_recorded(recorded):
    venue = KrakenVenue(recorded)
    assert venue.rest("/0/public/AssetPairs") == (200, recorded[0].rest[0].body.encode())
    status, body = venue.rest("/0/public/AssetPairs?pair=XMRUSD,XBTCHF")
    assert status == 200 and list(json.loads(body)["result"]) == ["XXMRZUSD", "XBTCHF"]
    assert venue.rest("/0/public/AssetPairs?pair=NOPE") == (
        200, b'{"error":["EQuery:Unknown asset pair"]}'
    )
    assert venue.rest("/0/public/Time") == (404, b'{"error":["EGeneral:Unknown method"]}')


def test_rest_trades_are_those_the_tape_played(recorded, tape):
    venue = KrakenVenue(recorded)

    def trades(target: str) -> dict:
        status, body = venue.rest(target)
        assert status == 200
        return json.loads(body)

    assert trades("/0/public/Trades?pair=XMRUSD")["result"] == {"XXMRZUSD": [], "last": "0"}
    for frame in tape:
        venue.route(frame)
    recorded_trades = [(m[-1], e) for f in tape if (m := _data(f.text)) and m[-2] == "trade"
                       for e in m[1]]
    assert len(recorded_trades) == 10
    for alias in ("XMRUSD", "XXMRZUSD", "XMR%2FUSD"):
        result = trades(f"/0/public/Trades?pair={alias}&since=0")["result"]
        expected = [e for pair, e in recorded_trades if pair == "XMR/USD"]
        assert [row[:6] for row in result["XXMRZUSD"]] == [
            [p, v, float(t), side, kind, misc] for p, v, t, side, kind, misc in expected
        ]
        assert [row[6] for row in result["XXMRZUSD"]] == [1, 2, 3, 4]
        assert result["last"] == expected[-1][2].replace(".", "") + "000"
    last = trades("/0/public/Trades?pair=XMRUSD&since=0")["result"]["last"]
    assert trades(f"/0/public/Trades?pair=XMRUSD&since={last}")["result"]["XXMRZUSD"] == []
    one = trades("/0/public/Trades?pair=SCEUR&since=1618678155")["result"]["SCEUR"]
    assert [row[2] for row in one] == [1618678155.71895, 1618678155.720582, 1618678157.908269,
                                       1618678157.946108, 1618678158.135041]
    assert trades("/0/public/Trades?pair=NOPE")["error"] == ["EQuery:Unknown asset pair"]


# -- end to end: emulator, collector, dispatcher, broadcast server, client -------------


def _config() -> Config:
    config = Config()
    return attrs.evolve(config, server=attrs.evolve(config.server, listen="127.0.0.1:0"))


@asynccontextmanager
async def _replay(paths, speed: float | None) -> AsyncIterator:
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(partial(serve_replay, paths, _config(), speed=speed))
        yield replay
        nursery.cancel_scope.cancel()


async def _receive(ws) -> list[dict]:
    """The messages of one server frame (one object, or a batch as an array)."""
    data = json.loads(await ws.get_message())
    return data if isinstance(data, list) else [data]


async def test_end_to_end_books_equal_the_recorded_books(paths, tape, markets, pairs):
    final = _reference(tape)
    expected = {markets[p]: (final[p].pairs_of("bs"), final[p].pairs_of("as")) for p in pairs}
    with trio.fail_after(15):
        async with _replay(paths, None) as replay:
            await replay.wait_finished()
            stats = replay.app.collectors["kraken"].feed.stats
            for _ in range(500):  # the feed's counters have no event: poll, for 5 s at most
                if stats.checksum_ok + stats.checksum_mismatch >= CHECKSUMS:
                    break
                await trio.sleep(0.01)
            assert (stats.checksum_ok, stats.checksum_mismatch) == (CHECKSUMS, 0)
            assert (stats.resyncs, stats.malformed, stats.snapshots) == (0, 0, 10)

            url = f"ws://127.0.0.1:{replay.app.port}"
            async with open_websocket_url(url) as ws:
                await ws.send_message(json.dumps(
                    {"op": "subscribe", "id": 1, "channels": ["book"], "symbols": ["kraken:*"]}
                ))
                # The collector has applied every update (above): the snapshots a new
                # subscriber gets are the final books.
                snapshots: dict[str, tuple] = {}
                while len(snapshots) < len(pairs):
                    for message in await _receive(ws):
                        if message["type"] == "book_snapshot":
                            snapshots[message["symbol"]] = tuple(
                                tuple(map(tuple, message[side])) for side in ("bids", "asks")
                            )
    assert snapshots == expected


async def test_end_to_end_every_trade_arrives_once(paths, tape, markets):
    recorded_trades = sorted(
        (markets[m[-1]], e[0], e[1], float(e[2])) for f in tape
        if (m := _data(f.text)) and m[-2] == "trade" for e in m[1]
    )
    assert len(recorded_trades) == 10
    received: list[dict] = []
    with trio.fail_after(15):
        async with _replay(paths, 20) as replay:
            url = f"ws://127.0.0.1:{replay.app.port}"
            async with open_websocket_url(url) as ws:
                await ws.send_message(json.dumps({
                    "op": "subscribe", "id": 1, "channels": ["trades"], "symbols": ["kraken:*"],
                    "history": 1000,
                }))
                assert not replay.emulators["kraken"].finished.is_set()
                while len(received) < len(recorded_trades):
                    received += [m for m in await _receive(ws) if m["type"] == "trade"]
                await replay.wait_finished()
                with trio.move_on_after(0.3):  # nothing more may come
                    while True:
                        received += [m for m in await _receive(ws) if m["type"] == "trade"]
            assert replay.app.collectors["kraken"].feed.stats.trades == 10
    got = sorted((t["symbol"], t["price"], t["size"], t["ts"]) for t in received)
    assert got == recorded_trades
    assert len({(t["symbol"], t["id"]) for t in received}) == 10
