"""Derived streams (``daemon.derived``) on the recorded captures: large trades and
trade bars computed by the daemon's dispatcher and derived tasks (no sockets, the
recorded tape played on trio's autojump clock), against an independent
computation written here from the capture's raw frames (the standard ``json``
module, ``datetime`` and ``Decimal``; never the daemon's parsers or bar code).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio

from daemon.config import ConfigError, ReporterConfig, load_config, structure_config
from daemon.derived.bars import BarsComputation, BarSeries
from daemon.derived.runner import DerivedStream
from daemon.derived.whales import Whales, WhalesComputation
from daemon.dispatch import Dispatcher, Message, Retention, Stream
from daemon.events import Event, Ticker, Trade
from daemon.exchanges.kraken import KrakenFeed
from daemon.exchanges.kraken import parse_markets as kraken_markets
from daemon.health import DerivedHealth
from daemon.replay.capture import read_capture
from tests.broadcast_server import coinbase_events

RETENTION = {
    "trades": Retention(1000, 3600.0), "ticker": Retention(100, 60.0),
    "bars": Retention(1000, 86400.0), "whales": Retention(1000, 86400.0),
    "book": Retention(100, 60.0), "system": Retention(100, 60.0),
}

# -- the independent side: raw frames, plain Python --------------------------------------


@attrs.frozen
class RawTrade:
    symbol: str
    id: str
    ts: float
    price: str
    size: str
    side: str  # the taker's


def coinbase_raw_trades(captures: Path) -> list[RawTrade]:
    """Every ``match``/``last_match`` of the Coinbase capture, in tape order.
    Coinbase's ``side`` is the maker's: the taker's is the other."""
    taker = {"buy": "sell", "sell": "buy"}
    trades = []
    for line in (captures / "COINBASE.ws.28.0").read_text().splitlines():
        head, sep, text = line.partition(": ")
        if not sep or not text.startswith("{"):
            continue
        m = json.loads(text)
        if m.get("type") in ("match", "last_match"):
            ts = datetime.fromisoformat(m["time"].replace("Z", "+00:00")).timestamp()
            trades.append(RawTrade(m["product_id"], str(m["trade_id"]), ts, m["price"],
                                   m["size"], taker[m["side"]]))
    return trades


def kraken_raw_trades(captures: Path) -> list[RawTrade]:
    """Every trade of the Kraken capture (``[id, [[price, volume, time, side, ...]],
    "trade", "PAIR"]``), in tape order."""
    trades = []
    for line in (captures / "KRAKEN.ws.48.0").read_text().splitlines():
        head, sep, text = line.partition(": ")
        if not sep or not text.startswith("["):
            continue
        frame = json.loads(text)
        symbol = frame[3].replace("/", "-").replace("XBT", "BTC")
        for price, volume, time, side, *_ in frame[1]:
            trades.append(RawTrade(symbol, "", float(time), price, volume,
                                   {"b": "buy", "s": "sell"}[side]))
    return trades


def expected_bars(trades: list[RawTrade], seconds: int, carry: bool
                  ) -> dict[str, list[dict[str, Any]]]:
    """Per symbol, the bars from its first trade's interval to its last's, in order:
    open/close the first/last trade by time (ties: arrival), high/low the first
    highest/lowest, sums in Decimal, VWAP = sum(p x s) / volume; an interval without
    trades carries the previous close (``carry``) or is absent."""
    by_symbol: dict[str, dict[int, list[RawTrade]]] = defaultdict(lambda: defaultdict(list))
    for t in trades:
        by_symbol[t.symbol][math.floor(t.ts / seconds) * seconds].append(t)
    result: dict[str, list[dict[str, Any]]] = {}
    for symbol, buckets in by_symbol.items():
        bars = []
        close = None
        start, end = min(buckets), max(buckets)
        for open_time in range(start, end + seconds, seconds):
            inside = buckets.get(open_time, [])
            if not inside:
                if carry:
                    bars.append({"open_time": float(open_time), "open": close, "high": close,
                                 "low": close, "close": close, "volume": Decimal(0),
                                 "buy_volume": Decimal(0), "sell_volume": Decimal(0),
                                 "count": 0, "vwap": None})
                continue
            by_time = sorted(inside, key=lambda t: t.ts)  # stable: ties keep arrival order
            volume = sum((Decimal(t.size) for t in inside), Decimal(0))
            notional = sum((Decimal(t.price) * Decimal(t.size) for t in inside), Decimal(0))
            close = by_time[-1].price
            bars.append({
                "open_time": float(open_time), "open": by_time[0].price,
                "high": max(inside, key=lambda t: Decimal(t.price)).price,
                "low": min(inside, key=lambda t: Decimal(t.price)).price, "close": close,
                "volume": volume,
                "buy_volume": sum((Decimal(t.size) for t in inside if t.side == "buy"),
                                  Decimal(0)),
                "sell_volume": sum((Decimal(t.size) for t in inside if t.side == "sell"),
                                   Decimal(0)),
                "count": len(inside), "vwap": notional / volume,
            })
        result[symbol] = bars
    return result


def comparable(bar: dict[str, Any]) -> dict[str, Any]:
    """A published bar's fields as ``expected_bars`` gives them (numbers as Decimal)."""
    return {
        "open_time": bar["open_time"], "open": bar["open"], "high": bar["high"],
        "low": bar["low"], "close": bar["close"], "volume": Decimal(bar["volume"]),
        "buy_volume": Decimal(bar["buy_volume"]), "sell_volume": Decimal(bar["sell_volume"]),
        "count": bar["count"], "vwap": None if bar["vwap"] is None else Decimal(bar["vwap"]),
    }


# -- the daemon side: dispatcher and derived tasks on the autojump clock -----------------


class Recorder:
    """A subscriber that keeps what it is given, with the trio time it came."""

    def __init__(self) -> None:
        self.got: list[tuple[float, dict[str, Any]]] = []

    def deliver(self, message: Message) -> None:
        self.got.append((trio.current_time(), orjson.loads(message.payload)))

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [m for _, m in self.got if m["type"] == type_]


def kraken_events(captures: Path) -> list[Trade]:
    """The Kraken capture's trades through the real protocol."""
    markets = kraken_markets(read_capture(captures / "KRAKEN.0").rest[0].body)
    conn = read_capture(captures / "KRAKEN.ws.48.0").connections[0]
    pairs = orjson.loads(conn.sent[0][1])["pair"]
    feed = KrakenFeed([markets[p] for p in pairs], ["trades"], markets)
    feed.on_open(0.0)
    events: list[Trade] = []
    for frame in conn.received:
        events += [o for o in feed.on_message(frame.text, frame.ts) if isinstance(o, Trade)]
    return events


@attrs.define
class Played:
    dispatcher: Dispatcher
    derived: DerivedStream
    recorder: Recorder
    sent_at: dict[str, float]  # trade id -> trio time it was sent


async def play(events: list[Event], computation: Any, *, after: float = 10.0,
               hold: dict[str, float] | None = None, limit: int = 10_000) -> Played:
    """Play ``events`` into a dispatcher at their recorded ``recv_ts`` on the trio
    clock (trades in ``hold`` later by that many seconds), with ``computation``
    running as a derived stream; ``after`` seconds past the last event, stop."""
    hold = hold or {}
    dispatcher = Dispatcher(256, RETENTION)
    recorder = Recorder()
    sent_at: dict[str, float] = {}
    t0 = min(e.recv_ts for e in events)
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.serve)
        derived = DerivedStream(computation, dispatcher, dispatcher.open_source(), limit)
        await nursery.start(derived.run)
        dispatcher.subscribe(recorder, ["bars", "whales", "trades"], ["*"])
        base = trio.current_time()
        schedule = sorted(
            ((e.recv_ts - t0 + hold.get(getattr(e, "id", ""), 0.0), n, e)
             for n, e in enumerate(events)), key=lambda x: (x[0], x[1]))
        async with dispatcher.open_source() as source:
            for at, _, event in schedule:
                await trio.sleep_until(base + at)
                if isinstance(event, Trade):
                    sent_at[event.id] = trio.current_time()
                await source.send(event)
        await trio.sleep(after)
        nursery.cancel_scope.cancel()
    return Played(dispatcher, derived, recorder, sent_at)


def closed_bars(recorder: Recorder, interval: str) -> dict[str, list[dict[str, Any]]]:
    bars: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for bar in recorder.of("bar"):
        if bar["interval"] == interval and not bar["partial"] and bar["revision"] == 0:
            bars[bar["symbol"]].append(bar)
    return bars


def check_bars(got: dict[str, list[dict[str, Any]]], expected: dict[str, list[dict[str, Any]]],
               carry: bool) -> int:
    """Every expected bar was published once, in order; bars after the last trade's
    interval are carried empties (carry) or none (skip). Returns bars compared."""
    assert set(got) == set(expected)
    compared = 0
    for symbol, bars in expected.items():
        published = got[symbol]
        assert [comparable(b) for b in published[:len(bars)]] == bars, symbol
        compared += len(bars)
        extra = published[len(bars):]
        if not carry:
            assert extra == []
        for bar in extra:
            assert bar["count"] == 0 and bar["close"] == bars[-1]["close"], symbol
    return compared


# -- whales ---------------------------------------------------------------------------


async def test_whales_on_the_coinbase_capture(captures: Path, autojump_clock: Any) -> None:
    """Threshold 1,000 USD: every USD-quoted trade at or above it is one whale with
    its notional, none below; trades quoted in BTC, EUR, GBP (no USD ticker in the
    capture) are counted as unconvertible, not guessed at."""
    raw = coinbase_raw_trades(captures)
    assert len(raw) == 107
    threshold = Decimal(1000)
    computation = WhalesComputation(threshold, {}, ["*"])
    played = await play(coinbase_events(captures), computation, after=1.0)
    whales = played.recorder.of("whale")
    expected = {(t.symbol, t.id): Decimal(t.price) * Decimal(t.size) for t in raw
                if t.symbol.endswith("-USD") and Decimal(t.price) * Decimal(t.size) >= threshold}
    assert len(expected) == 7
    assert {(w["symbol"], w["id"]): Decimal(w["notional_usd"]) for w in whales} == expected
    assert len(whales) == len(expected)
    for w in whales:
        assert Decimal(w["notional"]) == Decimal(w["notional_usd"])
        assert w["threshold"] == "1000" and w["exchange"] == "coinbase"
    unconvertible: dict[str, int] = defaultdict(int)
    for t in raw:
        quote = t.symbol.split("-")[1]
        if quote != "USD":
            unconvertible[quote] += 1
    figures = played.derived.statistics().figures
    assert figures["unconvertible"] == dict(unconvertible) == {"BTC": 35, "EUR": 10, "GBP": 9}
    assert figures["trades"] == 107 and figures["whales"] == 7
    # seq, history: a late joiner gets the last 3
    late = Recorder()
    initial, _ = played.dispatcher.subscribe(late, ["whales"], ["coinbase:SKL-USD"], history=3)
    assert [orjson.loads(m.payload)["seq"] for m in initial] == [5, 6, 7]


def test_whales_convert_with_the_latest_usd_ticker(captures: Path) -> None:
    """The capture's BTC-quoted trades, once a BTC-USD ticker is known (here one
    made in the test: the capture has none), are converted at its mid; thresholds
    per symbol beat per exchange beat the default."""
    raw = [t for t in coinbase_raw_trades(captures) if t.symbol.endswith("-BTC")]
    finder = Whales(Decimal(100_000), {"coinbase": Decimal(800), "DASH-BTC": Decimal(500),
                                       "coinbase:SKL-BTC": Decimal(1000)})
    trade = {"exchange": "coinbase", "ts": 1.0, "recv_ts": 1.0}
    assert all(finder.trade({**trade, "symbol": t.symbol, "id": t.id, "price": t.price,
                             "size": t.size, "side": t.side}) is None for t in raw)
    assert finder.unconvertible == {"BTC": len(raw)}
    finder.ticker("BTC-USDT", "61000", "61002")  # a USDT ticker: used until a USD one comes
    finder.ticker("BTC-USD", "61000.5", "61001.5")
    mid = Decimal("61001")
    found = {}
    for t in raw:
        whale = finder.trade({**trade, "symbol": t.symbol, "id": t.id, "price": t.price,
                              "size": t.size, "side": t.side})
        usd = Decimal(t.price) * Decimal(t.size) * mid
        limit = {"DASH-BTC": 500, "SKL-BTC": 1000}.get(t.symbol, 800)
        assert (whale is not None) == (usd >= limit), t
        if whale is not None:
            assert Decimal(whale.notional_usd) == usd and whale.threshold == str(limit)
            found[t.symbol] = found.get(t.symbol, 0) + 1
    assert found == {"DASH-BTC": 5, "SKL-BTC": 1, "BAND-BTC": 2}  # at 61001 USD per BTC
    assert finder.unconvertible == {"BTC": len(raw)}  # the earlier ones stay counted


# -- bars -----------------------------------------------------------------------------


@pytest.mark.parametrize("empty", ["carry", "skip"])
async def test_bars_on_the_coinbase_capture(captures: Path, autojump_clock: Any,
                                            empty: str) -> None:
    """1 s and 5 s bars of the 107 trades equal the independent computation, empty
    intervals per ``empty_bars``; the last bar closes on the clock with no later
    trade: at its end + grace, on the exchange's clock."""
    raw = coinbase_raw_trades(captures)
    grace = 1.0
    computation = BarsComputation(["1s", "5s"], grace, empty, 500, ["*"])
    played = await play(coinbase_events(captures), computation, after=8.0)
    carry = empty == "carry"
    compared = 0
    for interval, seconds in (("1s", 1), ("5s", 5)):
        compared += check_bars(closed_bars(played.recorder, interval),
                               expected_bars(raw, seconds, carry), carry)
    assert compared >= 60
    assert not [b for b in played.recorder.of("bar") if b["revision"]]  # none late
    # on the clock: the exchange's time is the daemon's plus the largest ts - sent
    offset = max(t.ts - played.sent_at[t.id] for t in raw)
    last = max(raw, key=lambda t: played.sent_at[t.id])
    close_time = math.floor(last.ts) + 1.0
    (at, bar), = [(at, b) for at, b in played.recorder.got
                  if b["type"] == "bar" and b["symbol"] == last.symbol
                  and b["interval"] == "1s" and b["close_time"] == close_time
                  and not b["partial"]]
    assert at == pytest.approx(close_time + grace - offset, abs=1e-6)
    assert at > max(played.sent_at.values())  # no trade came after it
    assert bar["count"] >= 1
    figures = played.derived.statistics().figures
    assert figures["trades"] == 2 * 107 and figures["late"] == 0
    # partial bars: the bar in progress, at most every partial_ms per stream
    partials = defaultdict(list)
    for at, b in played.recorder.got:
        if b["type"] == "bar" and b["partial"]:
            partials[b["symbol"], b["interval"]].append(at)
    assert partials
    for times in partials.values():
        assert all(b - a >= 0.5 - 1e-9 for a, b in zip(times, times[1:], strict=False))


async def test_bars_on_the_kraken_capture(captures: Path, autojump_clock: Any) -> None:
    raw = kraken_raw_trades(captures)
    assert len(raw) == 10
    computation = BarsComputation(["1s", "1m"], 1.0, "carry", 1000, ["kraken:*"])
    played = await play(list(kraken_events(captures)), computation, after=65.0)
    compared = check_bars(closed_bars(played.recorder, "1s"), expected_bars(raw, 1, True), True)
    compared += check_bars(closed_bars(played.recorder, "1m"), expected_bars(raw, 60, True), True)
    assert compared >= 20


async def test_a_late_trade_revises_its_bar(captures: Path, autojump_clock: Any) -> None:
    """One SKL-USD trade held back 3 s past its bar's close: the bar is published
    without it (revision 0), then again with it as revision 1, each equal to the
    independent computation; the later bars are unchanged."""
    raw = coinbase_raw_trades(captures)
    sku = [t for t in raw if t.symbol == "SKL-USD"]
    late = sku[len(sku) // 2]
    computation = BarsComputation(["1s"], 0.5, "carry", 1000, ["*"])
    played = await play(coinbase_events(captures), computation, after=5.0,
                        hold={late.id: 4.0})
    without = expected_bars([t for t in raw if t is not late], 1, True)["SKL-USD"]
    with_it = expected_bars(raw, 1, True)["SKL-USD"]
    bars = [b for b in played.recorder.of("bar") if b["symbol"] == "SKL-USD"
            and not b["partial"]]
    revised = [b for b in bars if b["revision"]]
    assert len(revised) == 1 and revised[0]["revision"] == 1
    bucket = float(math.floor(late.ts))
    assert revised[0]["open_time"] == bucket
    assert comparable(revised[0]) == next(b for b in with_it if b["open_time"] == bucket)
    first = [b for b in bars if not b["revision"]]
    assert [comparable(b) for b in first[:len(without)]] == without
    assert played.derived.statistics().figures["late"] == 1
    # the revision is a numbered message of the stream, after the bars published before it
    seqs = [b["seq"] for b in bars]
    assert seqs == list(range(1, len(bars) + 1))


async def test_a_late_trade_reprices_the_bars_carried_after_it(
        captures: Path, autojump_clock: Any) -> None:
    """Two SKL-USD trades held back, each alone in its 1 s bar: 1568272 (0.7921,
    after a bar closing at 0.7916) arrives after three or more empty bars carried
    0.7916 on; its bar is revised, then each of those carried bars is revised at
    0.7921 (revision 1, in order, numbered), and the bars after carry 0.7921.
    1568274 (0.792, the close before it too) revises its own bar only: the empty
    bar carried after it keeps its price. The latest revision of every bar equals
    the independent computation with every trade."""
    raw = coinbase_raw_trades(captures)
    late = {t.id: t for t in raw if t.id in ("1568272", "1568274")}
    computation = BarsComputation(["1s"], 0.5, "carry", 1000, ["*"])
    played = await play(coinbase_events(captures), computation, after=5.0,
                        hold={"1568272": 4.0, "1568274": 3.0})
    with_all = {b["open_time"]: b for b in expected_bars(raw, 1, True)["SKL-USD"]}
    timed = [(at, b) for at, b in played.recorder.got if b["type"] == "bar"
             and b["symbol"] == "SKL-USD" and not b["partial"]]
    bars = [b for _, b in timed]
    latest: dict[float, dict[str, Any]] = {}
    for b in bars:
        assert b["revision"] == latest[b["open_time"]]["revision"] + 1 \
            if b["open_time"] in latest else b["revision"] == 0
        latest[b["open_time"]] = b
    assert set(with_all) <= set(latest)  # and empty bars after the last trade
    assert all(comparable(latest[t]) == with_all[t] for t in with_all)
    assert [b["seq"] for b in bars] == list(range(1, len(bars) + 1))
    # 1568272: its bar, then the carried bars published before it came, at 0.7921
    first, second = late["1568272"], late["1568274"]
    bucket = float(math.floor(first.ts))
    before = [b["open_time"] for at, b in timed
              if at < played.sent_at[first.id] and bucket < b["open_time"] < 1618677824.0]
    assert len(before) >= 3
    revised = [b for b in bars if b["revision"]]
    assert [b["open_time"] for b in revised] == [bucket, *before, math.floor(second.ts)]
    for b in revised[1:-1]:
        assert b["count"] == 0 and b["revision"] == 1
        assert (b["open"], b["high"], b["low"], b["close"]) == ("0.7921",) * 4
    first_made = next(b for b in bars if b["open_time"] == before[0])
    assert first_made["close"] == "0.7916"  # what it carried before the late trade
    # 1568274: the empty bar after its own was published before it came, and stays
    after = next(b for at, b in timed if b["open_time"] == math.floor(second.ts) + 1.0)
    assert after["count"] == 0 and after["close"] == "0.792"
    assert next(at for at, b in timed if b is after) < played.sent_at[second.id]
    assert played.derived.statistics().figures["late"] == 2


async def test_since_returns_exactly_the_missed_bars(captures: Path, autojump_clock: Any) -> None:
    computation = BarsComputation(["1s"], 1.0, "carry", 1000, ["*"])
    played = await play(coinbase_events(captures), computation, after=3.0)
    key = "bars:coinbase:SKL-USD:1s"
    stream = played.dispatcher.streams[key]
    published = [m for m in played.recorder.of("bar") if m["symbol"] == "SKL-USD"
                 and m["interval"] == "1s" and not m["partial"]]
    assert [b["seq"] for b in published] == list(range(1, stream.seq + 1))
    seen = stream.seq // 2
    again = Recorder()
    initial, recovered = played.dispatcher.subscribe(
        again, ["bars"], ["coinbase:SKL-USD:1s"], since={key: seen})
    assert recovered == {key: True}
    assert [orjson.loads(m.payload) for m in initial] == published[seen:]
    # a pattern without the interval matches every interval; one with it, only it
    other = Recorder()
    initial, _ = played.dispatcher.subscribe(other, ["bars"], ["coinbase:SKL-USD"], history=2)
    assert {orjson.loads(m.payload)["interval"] for m in initial} == {"1s"}
    assert len(initial) == 2


def test_bar_series_revises_skipped_and_refuses_too_late() -> None:
    """Sans-IO edge cases: a trade in a skipped interval publishes it as a revision;
    one older than every kept bar is counted in too_late; a malformed size changes
    nothing."""
    series = BarSeries("x", "A-B", "1s", 1, 0.0, "skip")
    assert series.trade(10.2, "1", "2", "buy") is None
    assert series.trade(12.5, "3", "1", "sell") is None
    assert [b.open_time for b in series.close_due(14.0)] == [10.0, 12.0]
    revised = series.trade(11.5, "2", "1", "buy")
    assert revised is not None and revised.revision == 1 and revised.open_time == 11.0
    assert series.trade(5.0, "2", "1", "buy") is None and series.too_late == 1
    with pytest.raises(ArithmeticError):  # decimal.InvalidOperation
        series.trade(13.5, "2", "x", "buy")
    with pytest.raises(ValueError):
        series.trade(13.5, "NaN", "1", "buy")
    assert series.open == {} and series.trades == 3


# -- isolation: a derived stream that raises or stalls ----------------------------------


class Stuck:
    """Where a stalled stream's output goes: a downstream that never takes it."""

    async def publish(self, events: object, *, drained: bool = False) -> None:
        await trio.sleep_forever()

    async def send(self, event: object) -> None:
        await trio.sleep_forever()


class Raises:
    """A computation with a bug: it raises on every trade of SKL-USD."""

    name = "raises"
    inputs = ((("trades",), ("*",)),)

    def take(self, stream: Stream, payload: dict[str, Any], now: float) -> list[Event]:
        if payload["symbol"] == "SKL-USD":
            raise RuntimeError("a bug")
        return []

    def due(self) -> float:
        return math.inf

    def tick(self, now: float) -> list[Event]:
        return []

    def figures(self) -> dict[str, Any]:
        return {}


async def test_a_derived_stream_that_raises_or_stalls_stops_nothing_else(
        captures: Path, autojump_clock: Any) -> None:
    """Three derived streams on one dispatcher: one raising on 53 of the trades, one
    whose output never drains (stalled), and bars. The dispatcher publishes every
    event, a client gets every trade, the bars are right; the raising and the
    stalled ones are unhealthy with their counters."""
    events = coinbase_events(captures)
    raw = coinbase_raw_trades(captures)
    dispatcher = Dispatcher(256, RETENTION)
    client = Recorder()
    config = ReporterConfig()
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.serve)
        raising = DerivedStream(Raises(), dispatcher, dispatcher.open_source(), 1000)
        stalled = DerivedStream(WhalesComputation(Decimal(1), {}, ["*"]), dispatcher,
                                Stuck(), 20)
        bars = DerivedStream(BarsComputation(["5s"], 1.0, "skip", 1000, ["*"]), dispatcher,
                             dispatcher.open_source(), 1000)
        for derived in (raising, stalled, bars):
            await nursery.start(derived.run)
        checks = {d.name: DerivedHealth(d, config) for d in (raising, stalled, bars)}
        for check in checks.values():
            check.sample(trio.current_time())
        dispatcher.subscribe(client, ["trades", "bars"], ["*"])
        base, t0 = trio.current_time(), events[0].recv_ts
        async with dispatcher.open_source() as source:
            for event in events:  # the recorded tape's timing
                await trio.sleep_until(base + event.recv_ts - t0)
                await source.send(event)
        await trio.sleep(10.0)
        now = trio.current_time()
        for check in checks.values():
            check.sample(now)
        verdicts = {name: check.check(now) for name, check in checks.items()}
        nursery.cancel_scope.cancel()
    # every event published, nothing held back by the derived ones (and their bars)
    assert dispatcher.events == len(events) + len(
        [b for b in client.of("bar") if not b["partial"]])
    assert len(client.of("trade")) == 107
    assert raising.statistics().errors == 53 and "a bug" in raising.statistics().last_error
    assert verdicts["raises"].health == "unhealthy"
    stats = stalled.statistics()
    assert stats.stalled and stats.dropped > 0 and stats.published == 0
    assert verdicts["whales"].health == "unhealthy" and "stalled" in verdicts["whales"].reason
    assert verdicts["bars"].health == "healthy"
    check_bars(closed_bars(client, "5s"), expected_bars(raw, 5, False), False)


async def test_an_input_overflow_resyncs_with_since(captures: Path, autojump_clock: Any) -> None:
    """A bars stream whose input holds 8 messages, the 107 trades sent in one burst:
    it overflows, catches up, subscribes again with since, and recovers what it
    missed from the dispatcher's retention: the bars are those of every trade, and
    nothing was lost."""
    events = [e for e in coinbase_events(captures) if isinstance(e, Trade)]
    raw = coinbase_raw_trades(captures)
    dispatcher = Dispatcher(512, RETENTION)
    client = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.serve)
        bars = DerivedStream(BarsComputation(["5s"], 1.0, "skip", 1000, ["*"]), dispatcher,
                             dispatcher.open_source(), 8)
        await nursery.start(bars.run)
        dispatcher.subscribe(client, ["bars"], ["*"])
        async with dispatcher.open_source() as source:
            for event in events:
                source.send_nowait(event)  # one burst: the dispatcher takes 256 at a time
        await trio.sleep(60.0)
        nursery.cancel_scope.cancel()
    stats = bars.statistics()
    assert stats.overflows >= 1 and stats.dropped > 0
    assert stats.recovered >= 1 and stats.lost == 0
    assert stats.figures["trades"] == 107
    check_bars(closed_bars(client, "5s"), expected_bars(raw, 5, False), False)


def test_ticker_events_make_usd_rates() -> None:
    """A ``Ticker`` of X-USD sets X's rate at its mid; a ticker of another quote or
    with a bid that is not a decimal says nothing."""
    finder = Whales(Decimal(10), {})
    for symbol, bid, ask in (("ETH-EUR", "1", "1"), ("ETH-USD", "x", "2")):
        finder.ticker(symbol, bid, ask)
    assert finder.rates.rate("ETH") is None and finder.rates.rate("USDC") == 1
    ticker = Ticker(exchange="kraken", symbol="ETH-USD", ts=1.0, recv_ts=1.0, bid="2000",
                    ask="2001", bid_size="1", ask_size="1")
    finder.ticker(ticker.symbol, ticker.bid, ticker.ask)
    assert finder.rates.rate("ETH") == Decimal("2000.5")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"bars": {"intervals": ["0s"]}}, "'0s' is not an interval"),
        ({"bars": {"intervals": ["1m", "1m"]}}, "an interval is listed twice @ derived.bars.intervals"),
        ({"bars": {"empty_bars": "zero"}}, "'zero' is not one of carry, skip @ derived.bars.empty_bars"),
        ({"bars": {"partial_ms": 0}}, "must be greater than 0, got 0 @ derived.bars.partial_ms"),
        ({"bars": {"symbols": ["BTC-USD"]}}, "'BTC-USD' is not EXCHANGE:BASE-QUOTE"),
        ({"whales": {"threshold": -1.0}}, "must be greater than 0, got -1.0 @ derived.whales.threshold"),
        ({"whales": {"thresholds": {"Coinbase": 5.0}}},
         "'Coinbase' is not EXCHANGE, BASE-QUOTE or EXCHANGE:BASE-QUOTE @ derived.whales.thresholds"),
        ({"whales": {"thresholds": {"kraken": 0}}}, "the threshold of kraken must be greater than 0"),
        ({"whales": {"enabled": 1}}, "expected true or false, got 1 @ derived.whales.enabled"),
        ({"input_queue": 0}, "must be greater than 0, got 0 @ derived.input_queue"),
    ],
)
def test_a_bad_derived_config_is_one_line_naming_the_key(section: dict[str, Any], message: str
                                                         ) -> None:
    with pytest.raises(ConfigError) as error:
        structure_config({"derived": section})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_default_config_derives_whales_and_minute_bars() -> None:
    derived = load_config().derived
    assert derived.whales.enabled and derived.whales.threshold == 100_000
    assert derived.bars.intervals == ["1m"] and derived.bars.empty_bars == "carry"


def test_a_long_silence_is_carried_a_thousand_bars_at_a_time() -> None:
    series = BarSeries("x", "A-B", "1s", 1, 0.0, "carry")
    series.trade(10.5, "2", "1", "buy")
    first = series.close_due(5000.0)
    assert len(first) == 1000 and first[0].count == 1 and first[-1].close == "2"
    assert series.next_close() <= 5000.0  # still due: the next call goes on
    rest = series.close_due(5000.0)
    assert [b.open_time for b in rest][0] == first[-1].open_time + 1 and len(rest) == 1000


def test_malformed_trades_are_counted_and_change_no_bar(captures: Path) -> None:
    """Capture trades with a bad field (no price, a time that is not finite, a
    size that is not a decimal) are counted in ``malformed``; the good ones make
    the same bars as without them, and the clock only sees the good ones."""
    events = [e for e in coinbase_events(captures) if isinstance(e, Trade)]
    stream = Stream(key="trades:coinbase:SKL-USD", channel="trades", exchange="coinbase",
                    symbol="SKL-USD")
    good = [orjson.loads(orjson.dumps(attrs.asdict(e))) for e in events
            if e.symbol == "SKL-USD"]
    bad = [{k: v for k, v in good[0].items() if k != "price"}, {**good[1], "ts": "nan"},
           {**good[2], "ts": "inf"}, {**good[3], "size": "x"}]
    clean, mixed = (BarsComputation(["1s"], 1.0, "carry", 1000, ["*"]) for _ in range(2))
    for n, payload in enumerate(good):
        assert clean.take(stream, payload, float(n)) == []
        if n < len(bad):
            assert mixed.take(stream, bad[n], float(n)) == []
        assert mixed.take(stream, payload, float(n)) == []
    assert mixed.malformed == 4 and clean.malformed == 0
    assert mixed.clocks["coinbase"].offset == clean.clocks["coinbase"].offset
    end = len(good) + 100.0
    assert mixed.due() == clean.due() < end
    assert [b.close for b in mixed.tick(end)] == [b.close for b in clean.tick(end)] != []
