"""KrakenFeed (sans-IO Kraken WebSocket v1) on the recorded traffic in tests/captures.

Every test feeds real frames, in order, after ``on_open``; the channelIDs come from
the captured ``subscriptionStatus`` frames. Books are checked against a plain-dict
computation written here, independent of ``L2Book`` and of the feed.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from daemon.book import L2Book
from daemon.events import BookSnapshot, BookUpdate, FeedState, Gap, Ticker, Trade
from daemon.exchanges import kraken
from daemon.exchanges.base import FetchTrades, Malformed, Send
from daemon.exchanges.kraken import KrakenFeed, parse_markets
from daemon.replay.capture import Received, read_capture
from daemon.replay.venues.kraken import KrakenVenue
from tests.helpers import consumer_books

BOOK_CAPTURE = "KRAKEN.ws.50.0"


@pytest.fixture(scope="module")
def markets(captures):
    return parse_markets(read_capture(captures / "KRAKEN.0").rest[0].body)


def _connection(captures, name):
    (connection,) = read_capture(captures / name).connections
    return connection


def _pairs(connection) -> list[str]:
    return json.loads(connection.sent[0][1])["pair"]


def _feed(markets, connection, channels, depth=10) -> KrakenFeed:
    symbols = [markets[p] for p in _pairs(connection)]
    return KrakenFeed(symbols, channels, markets, depth=depth)


def _data(text: str, channel: str) -> list | None:
    """The decoded data array of a frame when it belongs to ``channel``."""
    msg = json.loads(text)
    return msg if isinstance(msg, list) and msg[-2].startswith(channel) else None


class RefBook:
    """Kraken's book rules with plain dicts: {Decimal price: (price, size)} per side,
    each side cut to ``depth`` after every message."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.sides: dict[str, dict] = {"a": {}, "b": {}}

    def apply(self, side: str, levels: list) -> None:
        for level in levels:
            key = Decimal(level[0])
            if Decimal(level[1]) == 0:
                self.sides[side].pop(key, None)
            else:
                self.sides[side][key] = (level[0], level[1])

    def top(self, side: str, n: int | None = None) -> tuple:
        keys = sorted(self.sides[side], reverse=side == "b")[:n]
        return tuple(self.sides[side][k] for k in keys)

    def message(self, parts: list) -> None:
        for part in parts:
            self.apply("a", part.get("as", part.get("a", [])))
            self.apply("b", part.get("bs", part.get("b", [])))
        for side in self.sides:
            if len(self.sides[side]) > self.depth:
                self.sides[side] = {Decimal(p): (p, s) for p, s in self.top(side, self.depth)}

    def levels(self) -> tuple:
        return self.top("b"), self.top("a")


def _reference_books(frames, depth: int) -> dict[str, RefBook]:
    books: dict[str, RefBook] = {}
    for frame in frames:
        msg = _data(frame.text, "book")
        if msg is None:
            continue
        if "as" in msg[1] or "bs" in msg[1]:
            books[msg[-1]] = RefBook(depth)
        books[msg[-1]].message(msg[1:-2])
    return books


def _run(feed: KrakenFeed, connection, frames=None) -> list:
    out = feed.on_open(connection.opened)
    for frame in connection.received if frames is None else frames:
        out += feed.on_message(frame.text, frame.ts)
    return out


# -- markets -------------------------------------------------------------------------


def test_parse_markets_maps_wsnames_with_kraken_aliases(captures, markets):
    assert markets["XBT/CHF"] == "BTC-CHF"
    assert markets["XDG/USD"] == "DOGE-USD"
    assert markets["XTZ/USD"] == "XTZ-USD"  # a wsname is never prefix-stripped
    assert markets["ETH/XBT"] == "ETH-BTC"  # the .d dark-pool pair does not replace it
    for name in ("KRAKEN.ws.48.0", "KRAKEN.ws.49.0", BOOK_CAPTURE):
        pairs = _pairs(_connection(captures, name))
        assert len(pairs) == 10 and all(p in markets for p in pairs)


@pytest.mark.parametrize(
    "body", ["not json", "[]", '{"error":["EQuery:Unknown asset pair"]}', '{"result":[]}']
)
def test_parse_markets_rejects_other_bodies(body):
    with pytest.raises(ValueError):
        parse_markets(body)


def test_feed_rejects_bad_arguments(markets):
    with pytest.raises(ValueError):
        KrakenFeed(["BTC-USD"], ["book"], markets, depth=20)
    with pytest.raises(ValueError):
        KrakenFeed(["BTC-USD"], ["candles"], markets)
    with pytest.raises(ValueError):
        KrakenFeed(["NOPE-USD"], ["trades"], markets)


# -- books ---------------------------------------------------------------------------


def test_book_depth_1000_all_checksums_and_books_match(captures, markets):
    conn = _connection(captures, BOOK_CAPTURE)
    feed = _feed(markets, conn, ["book"], depth=1000)
    out = _run(feed, conn)

    assert [o.text for o in out if isinstance(o, Send)] == [conn.sent[0][1]]
    with_checksum = sum(
        1 for f in conn.received if (m := _data(f.text, "book")) and "c" in m[-3]
    )
    assert with_checksum == 4269
    s = feed.stats
    assert (s.checksum_ok, s.checksum_mismatch, s.book_updates) == (4269, 0, 4269)
    assert (s.snapshots, s.resyncs, s.malformed) == (10, 0, 0)
    states = [(o.symbol, o.state) for o in out if isinstance(o, FeedState)]
    symbols = [markets[p] for p in _pairs(conn)]
    assert states == [(sym, "resyncing") for sym in symbols] + [
        (o.symbol, "synced") for o in out if isinstance(o, BookSnapshot)
    ]

    reference = _reference_books(conn.received, 1000)
    consumer = consumer_books(out)
    for pair in _pairs(conn):
        expected = reference[pair].levels()
        assert feed.book(markets[pair]).levels() == expected
        assert consumer[markets[pair]].levels() == expected


def _as_depth_10(frames) -> tuple[list[Received], int]:
    """Rewrite the depth-1000 recording into what a depth-10 subscription receives:
    snapshots cut to 10; per update only the levels that change the top 10, with
    levels entering the top 10 republished with ``"r"``; nothing when the top 10
    does not change. Returns the frames and how many of them carry ``"c"``."""
    full: dict[str, RefBook] = {}
    rewritten, updates = [], 0
    for frame in frames:
        msg = _data(frame.text, "book")
        if msg is None:
            rewritten.append(frame)
            continue
        pair, parts = msg[-1], msg[1:-2]
        if "as" in parts[0] or "bs" in parts[0]:
            full[pair] = RefBook(1000)
            full[pair].message(parts)
            snap = {k: parts[0][k][:10] for k in ("as", "bs")}
            rewritten.append(Received(frame.ts, json.dumps([msg[0], snap, "book-10", pair])))
            continue
        before = {side: dict(full[pair].top(side, 10)) for side in "ab"}
        full[pair].message(parts)
        after = {side: dict(full[pair].top(side, 10)) for side in "ab"}
        times = [lv[2] for p in parts for side in "ab" for lv in p.get(side, [])]
        out_parts = []
        for side in "ab":
            levels, sent = [], set()
            for p in parts:
                for price, _, t in p.get(side, []):
                    if price in sent:
                        continue
                    sent.add(price)
                    if price in after[side]:
                        levels.append([price, after[side][price], t])
                    elif price in before[side]:
                        levels.append([price, "0.00000000", t])
            for price, size in after[side].items():
                if price not in sent and before[side].get(price) != size:
                    levels.append([price, size, max(times), "r"])
            if levels:
                out_parts.append({side: levels})
        if out_parts:
            out_parts[-1]["c"] = msg[-3]["c"]
            updates += 1
            text = json.dumps([msg[0], *out_parts, "book-10", pair])
            rewritten.append(Received(frame.ts, text))
    return rewritten, updates


def test_book_depth_10_keeps_consumers_to_10_levels(captures, markets):
    conn = _connection(captures, BOOK_CAPTURE)
    frames, updates = _as_depth_10(conn.received)
    assert any('"r"]' in f.text for f in frames)  # the rewrite exercises republishes
    feed = _feed(markets, conn, ["book"], depth=10)
    consumer: dict[str, L2Book] = {}
    truncations = 0
    consumer_books(feed.on_open(conn.opened), consumer)
    for frame in frames:
        out = feed.on_message(frame.text, frame.ts)
        consumer_books(out, consumer)
        for o in out:
            if isinstance(o, BookUpdate):
                parts = json.loads(frame.text)[1:-2]
                sent = {lv[0] for part in parts for k in "ab" for lv in part.get(k, [])}
                truncations += sum(1 for p, size in o.bids + o.asks if p not in sent)
                bids, asks = consumer[o.symbol].levels()
                assert len(bids) <= 10 and len(asks) <= 10
                assert (bids, asks) == feed.book(o.symbol).levels()
    assert (feed.stats.checksum_ok, feed.stats.checksum_mismatch) == (updates, 0)
    assert updates > 1000 and truncations > 0  # explicit "0" for levels cut by the depth
    reference = _reference_books(conn.received, 1000)
    for pair in _pairs(conn):
        expected = tuple(reference[pair].top(side, 10) for side in "ba")
        assert feed.book(markets[pair]).levels() == consumer[markets[pair]].levels() == expected


def test_depth_10_feed_on_the_depth_1000_recording_resyncs_rather_than_drift(captures, markets):
    # A depth-1000 stream never republishes the 11th level when one of the top 10
    # goes: a depth-10 book then misses it, and the checksum catches that.
    conn = _connection(captures, BOOK_CAPTURE)
    feed = _feed(markets, conn, ["book"], depth=10)
    out = _run(feed, conn)
    s = feed.stats
    assert s.checksum_mismatch == s.resyncs > 0
    assert sum(isinstance(o, Send) and '"unsubscribe"' in o.text for o in out) == s.resyncs
    for book in consumer_books(out).values():
        assert len(book.bids) <= 10 and len(book.asks) <= 10


def _update_indexes(frames, pair: str) -> list[int]:
    return [
        i for i, f in enumerate(frames)
        if (m := _data(f.text, "book")) and m[-1] == pair and "c" in m[-3]
    ]


def test_checksum_mismatch_resyncs_that_pair_until_its_snapshot(captures, markets):
    conn = _connection(captures, BOOK_CAPTURE)
    frames = conn.received
    pair, symbol = "XBT/CHF", "BTC-CHF"
    updates = _update_indexes(frames, pair)
    bad, resub = updates[5], updates[15]
    msg = json.loads(frames[bad].text)
    msg[-3]["c"] = str((int(msg[-3]["c"]) + 1) % 2**32)
    corrupted = json.dumps(msg)
    channel_id = msg[0]
    snapshot_of = _reference_books(frames[: resub + 1], 1000)[pair]

    feed = _feed(markets, conn, ["book"], depth=1000)
    out = feed.on_open(conn.opened)
    for i, frame in enumerate(frames):
        got = feed.on_message(corrupted if i == bad else frame.text, frame.ts)
        if i == bad:
            sub = {"name": "book", "depth": 1000}
            assert [type(o) for o in got] == [FeedState, Send, Send]
            assert (got[0].symbol, got[0].state) == (symbol, "resyncing")
            assert [json.loads(o.text) for o in got[1:]] == [
                {"event": "unsubscribe", "pair": [pair], "subscription": sub},
                {"event": "subscribe", "pair": [pair], "subscription": sub},
            ]
            assert feed.book(symbol) is None
        elif bad < i <= resub:
            assert not [o for o in got if getattr(o, "symbol", None) == symbol]
        if i == resub:  # Kraken's answer to the resubscription
            status = {"channelID": channel_id, "event": "subscriptionStatus", "pair": pair,
                      "channelName": "book-1000", "subscription": {"name": "book", "depth": 1000}}
            assert feed.on_message(json.dumps({**status, "status": "unsubscribed"}), frame.ts) == []
            assert feed.on_message(json.dumps({**status, "status": "subscribed"}), frame.ts) == []
            levels = {k: [[p, s, str(frame.ts)] for p, s in snapshot_of.top(side)]
                      for k, side in (("as", "a"), ("bs", "b"))}
            got = feed.on_message(json.dumps([channel_id, levels, "book-1000", pair]), frame.ts)
            assert [type(o) for o in got] == [BookSnapshot, FeedState]
            assert got[1].state == "synced"
        out += got
    skipped = sum(1 for i in updates if bad < i <= resub)
    s = feed.stats
    assert (s.checksum_mismatch, s.resyncs) == (1, 1)
    assert s.checksum_ok == 4269 - 1 - skipped
    expected = _reference_books(frames, 1000)[pair].levels()
    assert feed.book(symbol).levels() == expected == consumer_books(out)[symbol].levels()


# -- malformed frames ----------------------------------------------------------------

_BAD_FRAMES = {
    "not JSON": ("{not json", False),
    "unknown channelID": ('[99999,{"a":[["56300.00000","0.1","1618678170.0"]],"c":"1"},'
                          '"book-1000","XBT/CHF"]', True),
    "price abc": ('[464,{"a":[["abc","0.10000000","1618678170.0"]],"c":"1"},'
                  '"book-1000","XBT/CHF"]', True),
    "list too short": ('[464,"book-1000"]', True),
}


@pytest.mark.parametrize("case", list(_BAD_FRAMES))
def test_malformed_frames_are_counted_and_resync_their_book(captures, markets, case):
    text, resyncs = _BAD_FRAMES[case]
    conn = _connection(captures, BOOK_CAPTURE)
    frames = conn.received
    nxt = next(i for i in _update_indexes(frames, "XBT/CHF") if i > 100)
    feed = _feed(markets, conn, ["book"], depth=1000)
    _run(feed, conn, frames[:100])
    assert feed.book("BTC-CHF") is not None

    out = feed.on_message(text, frames[100].ts)
    assert isinstance(out[0], Malformed) and feed.stats.malformed == 1
    if resyncs:
        assert (out[1].symbol, out[1].state) == ("BTC-CHF", "resyncing")
        assert [json.loads(o.text)["pair"] for o in out[2:]] == [["XBT/CHF"], ["XBT/CHF"]]
        assert feed.stats.resyncs == 1 and feed.book("BTC-CHF") is None
        assert feed.on_message(frames[nxt].text, frames[nxt].ts) == []
    else:
        assert out[1:] == [] and feed.stats.resyncs == 0
        assert feed.book("BTC-CHF") is not None


def test_subscription_error_is_reported(markets):
    feed = KrakenFeed(["BTC-USD"], ["trades"], markets)
    feed.on_open(1.0)
    out = feed.on_message(
        '{"errorMessage":"Currency pair not supported","event":"subscriptionStatus",'
        '"pair":"XBT/USD","status":"error","subscription":{"name":"trade"}}', 2.0
    )
    assert isinstance(out[0], Malformed) and feed.stats.malformed == 1


# -- trades and tickers ----------------------------------------------------------------


def test_trades_one_event_per_entry_with_unique_ids(captures, markets):
    conn = _connection(captures, "KRAKEN.ws.48.0")
    feed = _feed(markets, conn, ["trades"])
    out = _run(feed, conn)
    entries = [e for f in conn.received if (m := _data(f.text, "trade")) for e in m[1]]
    trades = [o for o in out if isinstance(o, Trade)]
    assert len(trades) == len(entries) == feed.stats.trades > 0
    assert len({(t.symbol, t.id) for t in trades}) == len(trades)
    assert [(t.price, t.size, t.ts) for t in trades] == [(e[0], e[1], float(e[2])) for e in entries]
    assert [t.side for t in trades] == [{"b": "buy", "s": "sell"}[e[3]] for e in entries]
    first = trades[0]
    assert (first.symbol, first.id, first.side) == ("XMR-USD", "1618678142.557535-0", "sell")
    heartbeats = [f.ts for f in conn.received if '"heartbeat"' in f.text]
    assert feed.last_heartbeat == heartbeats[-1]
    assert feed.stats.malformed == 0


@pytest.mark.parametrize(("time", "expected"), [
    ("1618678142.557535", ("1618678142.557535-0", 1618678142.557535)),
    ("01618678142.557535", ("1618678142.557535-0", 1618678142.557535)),
    (".557535", ("0.557535-0", 0.557535)),
    ("1618678142.5575351", ("1618678142.557535-0", 1618678142.557535)),
    ("1618678142.5", ("1618678142.500000-0", 1618678142.5)),
    ("١.557535", ("1.557535-0", 1.557535)),
    ("1e30", None), ("-1.000000", None), ("1.2.345678", None), ("1.55753x", None),
])
def test_trade_times_as_v1_writes_them_and_others(markets, time, expected):
    # ids and times as str/float of the time rounded to the microsecond, as Decimal
    # reads it; a time that is not one is malformed (never an exception)
    feed = KrakenFeed(["BTC-USD"], ["trades"], markets)
    feed.on_open(1.0)
    feed.on_message('{"channelID":7,"channelName":"trade","event":"subscriptionStatus",'
                    '"pair":"XBT/USD","status":"subscribed","subscription":{"name":"trade"}}', 2.0)
    frame = json.dumps([7, [["100.0", "1.5", time, "b", "l", ""]], "trade", "XBT/USD"])
    out = feed.on_message(frame, 3.0)
    if expected is None:
        assert [type(o) for o in out] == [Malformed] and feed.stats.malformed == 1
    else:
        assert [(t.id, t.ts) for t in out] == [expected] and feed.stats.trades == 1

def test_tickers_one_event_per_frame(captures, markets):
    conn = _connection(captures, "KRAKEN.ws.49.0")
    feed = _feed(markets, conn, ["ticker"])
    out = _run(feed, conn)
    frames = [(f, m) for f in conn.received if (m := _data(f.text, "ticker"))]
    tickers = [o for o in out if isinstance(o, Ticker)]
    assert len(tickers) == len(frames) == feed.stats.tickers > 0
    for t, (f, m) in zip(tickers, frames, strict=True):
        assert t.symbol == markets[m[-1]] and t.ts == t.recv_ts == f.ts
        assert (t.bid, t.bid_size, t.ask, t.ask_size) == (m[1]["b"][0], m[1]["b"][2],
                                                           m[1]["a"][0], m[1]["a"][2])
    assert (tickers[0].symbol, tickers[0].bid_size) == ("WAVES-EUR", "185.18432037")
    assert feed.stats.malformed == 0


# -- trade recovery after a reconnect ---------------------------------------------------
#
# The venue of the emulator plays the whole tape (``route`` of every frame), so its
# REST history ``/0/public/Trades`` holds exactly what was played; the feed misses
# the frames of a dropped connection. The venue also answers the feed's subscribe
# frames, as the emulator does, and a frame reaches the feed only through a routing
# key its connection holds.

TRADE_CAPTURE = "KRAKEN.ws.48.0"


@pytest.fixture(scope="module")
def trade_tape(captures):
    recorded = [read_capture(captures / "KRAKEN.0"), read_capture(captures / TRADE_CAPTURE)]
    (conn,) = recorded[1].connections
    return recorded, conn


def _trade_frames(frames) -> list[int]:
    return [i for i, f in enumerate(frames) if _data(f.text, "trade") is not None]


class Link:
    """The feed, the venue, and the emulated connection between them. ``out``: what
    the feed returned (no ``Send``/``FetchTrades``); ``recovered``: trades that
    ``on_trades`` delivered; ``fetched``: every ``FetchTrades``."""

    def __init__(self, feed: KrakenFeed, venue: KrakenVenue) -> None:
        self.feed, self.venue = feed, venue
        self.keys: set[str] = set()
        self.out: list = []
        self.opens: list[list] = []
        self.pending: list[FetchTrades] = []
        self.fetched: list[FetchTrades] = []
        self.recovered: list[Trade] = []

    def connect(self, now: float) -> None:
        self.keys = set()
        outputs = self.feed.on_open(now)
        self.opens.append(outputs)
        for text in self.venue.greeting():
            self.take(self.feed.on_message(text, now), now)
        self.take(outputs, now)

    def take(self, outputs: list, now: float) -> None:
        for output in outputs:
            if isinstance(output, Send):
                for reply in self.venue.on_client_message(self.keys, output.text):
                    self.take(self.feed.on_message(reply, now), now)
            elif isinstance(output, FetchTrades):
                self.pending.append(output)
                self.fetched.append(output)
            else:
                self.out.append(output)

    def deliver(self, frame: Received) -> None:
        """The emulator's step: route the frame, send it if the connection holds its key."""
        key = self.venue.route(frame)
        if key is not None and key in self.keys:
            self.take(self.feed.on_message(frame.text, frame.ts), frame.ts)

    def answer(self, now: float, bodies: dict | None = None) -> None:
        """Answer every pending fetch from the venue's REST history (``bodies``
        replaces the first answer for some symbols)."""
        bodies = dict(bodies or {})
        while self.pending:
            fetch = self.pending.pop(0)
            body = bodies.pop(fetch.symbol, None)
            if body is None:
                status, body = self.venue.rest(fetch.target)
                assert status == 200, (fetch, body)
            got = self.feed.on_trades(fetch.symbol, body, now)
            self.recovered += [o for o in got if isinstance(o, Trade)]
            self.take(got, now)


def _play_trades(markets, recorded, frames, *, lost=range(0), answer_at=None,
                 answer_first=False, bodies=None) -> Link:
    """Play ``frames``; the connection drops at ``lost.start`` and comes back at
    ``lost.stop`` (frames in ``lost`` go through the venue only). The fetches are
    answered at frame ``answer_at`` (default: ``lost.stop``), after it reached the
    feed, or before if ``answer_first``."""
    conn = recorded[1].connections[0]
    link = Link(_feed(markets, conn, ["trades"]), KrakenVenue(recorded))
    link.connect(conn.opened)
    answer_at = lost.stop if answer_at is None else answer_at
    for i, frame in enumerate(frames):
        if lost and i == lost.stop:
            link.connect(frame.ts)
        if i in lost:
            link.venue.route(frame)
            continue
        if answer_first and i == answer_at:
            link.venue.route(frame)  # played, and in the history: in flight to the feed
            link.answer(frame.ts, bodies)
            link.take(link.feed.on_message(frame.text, frame.ts), frame.ts)
            continue
        link.deliver(frame)
        if i >= answer_at:
            link.answer(frame.ts, bodies)
    link.answer(frames[-1].ts)
    return link


def _same_time(frames) -> list[Received]:
    """The tape with the two XMR/USD trades of one message at one time, as the fills
    of one taker order are (the capture has no such trades)."""
    out = []
    for frame in frames:
        data = _data(frame.text, "trade")
        if data is not None and len(data[1]) == 2 and data[-1] == "XMR/USD":
            data[1][1][2] = data[1][0][2]
            frame = Received(ts=frame.ts, text=json.dumps(data))
        out.append(frame)
    return out


def _clean_trades(markets, recorded, frames) -> list[Trade]:
    conn = recorded[1].connections[0]
    feed = _feed(markets, conn, ["trades"])
    return [o for o in _run(feed, conn, frames) if isinstance(o, Trade)]


def _as_recorded(trades: list[Trade]) -> list[tuple]:
    return [(t.symbol, t.id, t.price, t.size, t.side, t.ts) for t in trades]


@pytest.mark.parametrize("same_time", [False, True])
def test_trades_missed_while_disconnected_come_from_the_rest_history(
    trade_tape, markets, same_time
):
    recorded, conn = trade_tape
    frames = _same_time(conn.received) if same_time else list(conn.received)
    at = _trade_frames(frames)
    assert len(at) == 8
    # the 4th and 5th trade messages (XMR/USD 2 trades, SC/EUR 2 trades) are missed;
    # the 6th (SC/EUR) arrives live while the REST answers are awaited
    lost = range(at[3], at[5])
    link = _play_trades(markets, recorded, frames, lost=lost, answer_at=at[5])
    trades = [o for o in link.out if isinstance(o, Trade)]
    clean = _clean_trades(markets, recorded, frames)
    assert len(clean) == 10
    assert _as_recorded(trades) == [t for t in _as_recorded(clean)
                                    if t[1] in {x.id for x in trades}]  # per-pair order
    assert sorted(_as_recorded(trades)) == sorted(_as_recorded(clean))  # each once
    if same_time:
        assert [t.id for t in clean if t.symbol == "XMR-USD"][2:] == [
            "1618678150.826417-0", "1618678150.826417-1"]
    missed = {(t.symbol, t.id) for t in clean if t.ts > 1618678150 and t.ts < 1618678157.9}
    assert len(missed) == 4
    recovered = {(t.symbol, t.id) for t in link.recovered}
    held = (markets["SC/EUR"], "1618678157.908269-0")
    assert recovered == missed | {held}  # the held live trade was recovered too: once
    assert link.feed.stats.duplicates == 1 and link.feed.stats.trades == 10
    assert not [o for o in link.out if isinstance(o, Gap | Malformed)]
    # asked for when the pair's trade subscription is confirmed, not by on_open
    assert not [o for o in link.opens[1] if isinstance(o, FetchTrades)]
    assert link.fetched == [
        FetchTrades("XMR-USD", "/0/public/Trades?pair=XMRUSD&since=1618678145715784000&count=1000"),
        FetchTrades("SC-EUR", "/0/public/Trades?pair=SCEUR&since=1618678145920707000&count=1000"),
    ]
    assert not link.feed.recovering


def test_recovered_trades_are_not_repeated_when_they_also_arrive_live(trade_tape, markets):
    """The history is read while a live message is in flight: the message brings
    trades already recovered, with the same ids (time, k): not delivered again."""
    recorded, conn = trade_tape
    frames = _same_time(conn.received)
    at = _trade_frames(frames)
    lost = range(at[2] + 1, at[3])  # no trade lost; then XMR/USD's two-trade message
    # is played (in the history) but still in flight when the history is read
    link = _play_trades(markets, recorded, frames, lost=lost, answer_at=at[3],
                        answer_first=True)
    trades = [o for o in link.out if isinstance(o, Trade)]
    assert sorted(_as_recorded(trades)) == sorted(_as_recorded(
        _clean_trades(markets, recorded, frames)))
    assert [(t.symbol, t.id) for t in link.recovered] == [
        ("XMR-USD", "1618678150.826417-0"), ("XMR-USD", "1618678150.826417-1")]
    assert link.feed.stats.duplicates == 2  # the in-flight message's two trades


def test_history_pages_are_followed(trade_tape, markets, monkeypatch):
    """With pages of 3 trades, each next page starts a microsecond before the last
    trade of the previous one (so it starts with that trade again)."""
    monkeypatch.setattr(kraken, "TRADES_LIMIT", 3)
    recorded, conn = trade_tape
    frames = _same_time(conn.received)
    at = _trade_frames(frames)
    link = _play_trades(markets, recorded, frames, lost=range(at[2] + 1, at[7] + 1))
    trades = [o for o in link.out if isinstance(o, Trade)]
    assert sorted(_as_recorded(trades)) == sorted(_as_recorded(
        _clean_trades(markets, recorded, frames)))
    assert len(link.recovered) == 7
    assert [f.target for f in link.fetched] == [
        "/0/public/Trades?pair=XMRUSD&since=1618678145715784000&count=3",
        "/0/public/Trades?pair=SCEUR&since=1618678145920707000&count=3",
        "/0/public/Trades?pair=XMRUSD&since=1618678150826416000&count=3",
        "/0/public/Trades?pair=SCEUR&since=1618678155720581000&count=3",
        "/0/public/Trades?pair=SCEUR&since=1618678157946107000&count=3",
    ]
    assert not [o for o in link.out if isinstance(o, Gap)]


def test_a_full_page_within_one_microsecond_is_a_gap(trade_tape, markets, monkeypatch):
    monkeypatch.setattr(kraken, "TRADES_LIMIT", 2)
    recorded, conn = trade_tape
    frames = _same_time(conn.received)
    at = _trade_frames(frames)
    link = _play_trades(markets, recorded, frames, lost=range(at[2] + 1, at[7] + 1))
    xmr = [o for o in link.out if isinstance(o, Trade | Gap) and o.symbol == "XMR-USD"]
    assert [o.id if isinstance(o, Trade) else "gap" for o in xmr] == [
        "1618678142.557535-0", "1618678145.715785-0", "1618678150.826417-0",
        "1618678150.826417-1", "gap"]
    assert "within one microsecond" in xmr[-1].detail


def test_a_history_without_the_last_delivered_trade_is_a_gap(trade_tape, markets):
    recorded, conn = trade_tape
    frames = list(conn.received)
    at = _trade_frames(frames)
    lost = range(at[3], at[5])
    venue = KrakenVenue(recorded)
    for frame in frames[: lost.stop]:
        venue.route(frame)
    answer = json.loads(venue.rest(
        "/0/public/Trades?pair=XMRUSD&since=1618678145715784000&count=1000")[1])
    (rows,) = [v for k, v in answer["result"].items() if k != "last"]
    assert len(rows) == 3  # the last delivered trade, then the two missed
    del rows[:2]  # a history without the last delivered trade nor the first missed
    link = _play_trades(markets, recorded, frames, lost=lost,
                        bodies={"XMR-USD": json.dumps(answer)})
    xmr = [o for o in link.out if isinstance(o, Trade | Gap) and o.symbol == "XMR-USD"]
    assert [o.id if isinstance(o, Trade) else "gap" for o in xmr] == [
        "1618678142.557535-0", "1618678145.715785-0", "gap", "1618678150.827816-0"]
    gap = xmr[2]
    assert gap.stream == "trades" and (gap.from_id, gap.to_id) == ("", "")
    assert "1618678145.715785-0 and 1618678150.827816-0" in gap.detail
    assert link.feed.stats.gaps == 1


def test_an_unreadable_history_answer_is_a_gap_and_releases_held_trades(trade_tape, markets):
    recorded, conn = trade_tape
    frames = list(conn.received)
    at = _trade_frames(frames)
    lost = range(at[3], at[5])
    busy = '{"error":["EGeneral:Too many requests"]}'
    link = _play_trades(markets, recorded, frames, lost=lost, answer_at=at[5],
                        bodies={"SC-EUR": busy})
    sc = [o for o in link.out if getattr(o, "symbol", None) == "SC-EUR" or
          isinstance(o, Malformed)]
    assert [type(o) for o in sc] == [Trade, Malformed, Gap, Trade, Trade, Trade]
    assert "Too many requests" in sc[1].reason
    assert "after 1618678145.920708-0" in sc[2].detail
    assert [t.id for t in sc[3:]] == [  # held, then live again
        "1618678157.908269-0", "1618678157.946108-0", "1618678158.135041-0"]
    assert not link.feed.recovering


def test_a_pair_without_a_delivered_trade_fetches_nothing(trade_tape, markets):
    recorded, conn = trade_tape
    link = _play_trades(markets, recorded, list(conn.received), lost=range(10, 12))
    assert link.fetched == [] and link.feed.on_trades("XMR-USD", b"{}", 1.0) == []


def test_a_page_that_ends_inside_a_run_of_one_time_numbers_the_rest_alike(
    markets, monkeypatch
):
    """Page 1 ends with the first of two trades at one time; page 2 (from a
    microsecond before) starts with both: the second gets k=1, as live."""
    feed = KrakenFeed(["XMR-USD"], ["trades"], markets)
    subscribed = json.dumps({"channelID": 993, "channelName": "trade", "event":
                             "subscriptionStatus", "pair": "XMR/USD", "status": "subscribed",
                             "subscription": {"name": "trade"}})

    def row(time: float, price: str = "354.0") -> list:
        return [price, "1.0", time, "b", "m", "", 1]  # REST times are numbers

    def page(*rows) -> str:
        return json.dumps({"error": [], "result": {"XXMRZUSD": list(rows), "last": "0"}})

    feed.on_open(0.0)
    feed.on_message(subscribed, 1.0)
    trade = '[993,[["354.1","1.0","1618678100.000001","s","l",""]],"trade","XMR/USD"]'
    assert [t.id for t in feed.on_message(trade, 1.0)] == ["1618678100.000001-0"]
    feed.on_open(2.0)
    assert feed.on_message(subscribed, 2.0) == [FetchTrades(
        "XMR-USD", "/0/public/Trades?pair=XMRUSD&since=1618678100000000000&count=1000")]
    monkeypatch.setattr(kraken, "TRADES_LIMIT", 3)
    out = feed.on_trades("XMR-USD", page(row(1618678100.000001, "354.1"),
                                         row(1618678101.5), row(1618678102.25)), 3.0)
    assert [getattr(o, "id", None) for o in out[:2]] == [
        "1618678101.500000-0", "1618678102.250000-0"]
    assert out[2] == FetchTrades(
        "XMR-USD", "/0/public/Trades?pair=XMRUSD&since=1618678102249999000&count=3")
    out = feed.on_trades("XMR-USD", page(row(1618678102.25), row(1618678102.25, "354.2")), 3.1)
    assert [(t.id, t.price) for t in out] == [("1618678102.250000-1", "354.2")]
    live = ('[993,[["354.0","1.0","1618678102.250000","b","m",""],'
            '["354.2","1.0","1618678102.250000","b","m",""]],"trade","XMR/USD"]')
    assert feed.on_message(live, 3.2) == []  # the same two trades, live: same ids
    assert feed.stats.duplicates == 2 and feed.stats.trades == 4
