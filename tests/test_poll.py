"""The ccxt REST polling collector, against the emulated Binance REST API (ccxt's
URLs pointed at the emulator; no mock of ccxt), and its pure parts: the trade
tracker, decimal strings, the rate-limit rule, the ccxt error mapping, and the
emulator's REST endpoints it uses.

ccxt runs in worker threads: these tests use real time (no autojump clock), and
every wait is bounded by ``fail_after``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import ccxt
import orjson
import pytest
import trio

from daemon.collectors.poll import PollCollector, poll_period
from daemon.config import ExchangeConfig, ReconnectConfig
from daemon.errors import FeedDisconnected, FeedProtocolError, ccxt_errors
from daemon.events import FeedState, Gap, Ticker, Trade
from daemon.exchanges.base import FeedCounters
from daemon.replay.capture import read_capture
from daemon.replay.emulator import Emulator
from daemon.replay.tape import merge_frames
from daemon.replay.venues.binance import BinanceVenue
from daemon.trades import MAX_BEHIND, TradeTracker, decimal_text

BINANCE = ("BINANCE.0", "BINANCE.ws.1.0", "BINANCE.http.0.0")
SYMBOLS = ["NKN-USDT", "BLZ-ETH", "LRC-BTC", "RUNE-EUR"]
NATIVE = {"NKNUSDT": "NKN-USDT", "BLZETH": "BLZ-ETH", "LRCBTC": "LRC-BTC", "RUNEEUR": "RUNE-EUR"}
FAST = ReconnectConfig(base=0.05, cap=0.2)


def poll_config(**fields: Any) -> ExchangeConfig:
    """An exchange configured for polling."""
    return ExchangeConfig(mode="poll", **fields)


def recorded(captures: Path) -> tuple[list[tuple], dict[str, list[tuple[str, str, str, str]]]]:
    """Straight from the capture file: the aggTrades as ``(symbol, id, price, size,
    side, ts)`` in tape order, and every bookTicker's ``(bid, bid size, ask, ask
    size)`` per symbol, in order."""
    trades: list[tuple] = []
    tickers: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)
    for conn in read_capture(captures / "BINANCE.ws.1.0").connections:
        for frame in conn.received:
            message = orjson.loads(frame.text)
            stream, data = message.get("stream", ""), message.get("data")
            if stream.endswith("@aggTrade"):
                side = "sell" if data["m"] else "buy"
                trades.append((NATIVE[data["s"]], str(data["a"]), data["p"], data["q"], side,
                               data["T"] / 1000))
            elif stream.endswith("@bookTicker"):
                tickers[NATIVE[data["s"]]].append((data["b"], data["B"], data["a"], data["A"]))
    return trades, tickers


def emulator_of(captures: Path, speed: float | None) -> Emulator:
    return Emulator([read_capture(captures / name) for name in BINANCE], speed=speed)


def drain(receive: trio.MemoryReceiveChannel) -> list[Any]:
    events = []
    while True:
        try:
            events.append(receive.receive_nowait())
        except trio.WouldBlock:
            return events


async def wait_for(predicate: Any, seconds: float = 20) -> None:
    """Poll the collector's counters (there is no event to wait on), bounded."""
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


def polled(collector: PollCollector, rounds: int) -> Any:
    """A predicate: ``rounds`` more rounds of requests answered from now on."""
    target = collector.stats.messages + rounds * collector.requests_per_round
    return lambda: collector.stats.messages >= target


def states(events: list[Any]) -> list[FeedState]:
    return [e for e in events if isinstance(e, FeedState)]


def top(ticker: Ticker) -> tuple[str, str, str, str]:
    return (ticker.bid, ticker.bid_size, ticker.ask, ticker.ask_size)


@asynccontextmanager
async def polling_through(captures: Path, rest: Callable[[Callable[[str], tuple[int, bytes]], str],
                                                         tuple[int, bytes]],
                          symbols: list[str]) -> AsyncIterator[tuple[PollCollector, list[Any]]]:
    """A poll collector of ``symbols`` against the Binance emulator whose REST
    answers go through ``rest(answer, target)`` (``answer``: the emulator's own);
    yields the collector and the list its events are collected into."""
    emulator = emulator_of(captures, speed=None)
    answer = emulator.venue.rest
    emulator.venue.rest = lambda target: rest(answer, target)  # type: ignore[method-assign]
    send, receive = trio.open_memory_channel[Any](10_000)
    events: list[Any] = []

    async def collect() -> None:
        async for event in receive:
            events.append(event)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        address = await nursery.start(emulator.serve)
        emulator.started.set()  # no WebSocket client: start the tape by hand
        cfg = poll_config(symbols=symbols, rest_url=address.rest_url, interval=0.05)
        collector = PollCollector("binance", cfg, FAST, send)
        await nursery.start(collector.run)
        yield collector, events
        nursery.cancel_scope.cancel()


# -- against the emulator -----------------------------------------------------------------


async def test_poll_delivers_recorded_trades_once_and_the_latest_tickers(captures: Path) -> None:
    """The tape plays at 20x while the collector polls every round: the two recorded
    trades arrive once each, with their recorded ids, prices and sizes; tickers are
    published on change only, each one a recorded bookTicker, the last one the
    latest recorded; a symbol with no bookTicker yet has none; requests keep to
    ccxt's rate limit."""
    want_trades, want_tickers = recorded(captures)
    send, receive = trio.open_memory_channel[Any](10_000)
    async with trio.open_nursery() as nursery:
        emulator = emulator_of(captures, speed=20)
        answer, requests = emulator.venue.rest, []

        def rest(target: str) -> tuple[int, bytes]:
            requests.append((trio.current_time(), target))
            return answer(target)

        emulator.venue.rest = rest  # type: ignore[method-assign]  # before serve() takes it
        address = await nursery.start(emulator.serve)
        cfg = poll_config(symbols=SYMBOLS, rest_url=address.rest_url, interval=0.05)
        collector = PollCollector("binance", cfg, FAST, send)
        assert collector.requests_per_round == 5  # one bookTicker call + 4 aggTrades calls
        assert collector.period == pytest.approx(0.25)  # 0.05 s raised to 5 x 50 ms
        async with trio.open_nursery() as polling:
            began = trio.current_time()
            await polling.start(collector.run)
            await wait_for(lambda: collector.state == "subscribed")
            # The emulator's tape starts when a WebSocket client subscribes; polling
            # uses REST only, so start it by hand: it plays at `speed` from here.
            emulator.started.set()
            with trio.fail_after(30):
                await emulator.finished.wait()
            await wait_for(polled(collector, 2))
            polling.cancel_scope.cancel()
        report = collector.statistics()
        elapsed = trio.current_time() - began
        nursery.cancel_scope.cancel()
    events = drain(receive)

    trades = [e for e in events if isinstance(e, Trade)]
    assert [(t.symbol, t.id, t.price, t.size, t.side, t.ts) for t in trades] == want_trades
    assert [t.id for t in trades] == ["15683430", "9213679"]
    assert trades[0].price == "0.35280000" and trades[1].price == "0.00000638"
    assert all(t.exchange == "binance" for t in trades)

    tickers: dict[str, list[Ticker]] = defaultdict(list)
    for event in events:
        if isinstance(event, Ticker):
            tickers[event.symbol].append(event)
    assert set(tickers) == {"NKN-USDT", "LRC-BTC", "BLZ-ETH"}  # RUNE-EUR: no bookTicker played
    for symbol, published in tickers.items():
        tops = [top(t) for t in published]
        assert tops[-1] == want_tickers[symbol][-1]  # the latest recorded
        assert set(tops) <= set(want_tickers[symbol])  # each one a recorded bookTicker
        assert all(a != b for a, b in zip(tops, tops[1:], strict=False))  # on change only
    assert len(tickers["NKN-USDT"]) > 1  # it changed while polled

    assert not [e for e in events if isinstance(e, Gap)]
    assert [s.state for s in states(events)] == ["connecting", "subscribed"]
    assert report.mode == "poll" and report.state == "subscribed"
    assert report.counters.trades == 2 and report.frames == collector.stats.messages
    assert set(report.symbols) == {"NKN-USDT", "LRC-BTC", "BLZ-ETH"}
    # every request waited for ccxt's rateLimit (50 ms) since the one before, and
    # rounds (each starts with the bookTicker request) are a period apart
    assert collector.stats.messages <= elapsed / collector.spacing + 1
    rounds = [t for t, target in requests if target.startswith("/api/v3/ticker/bookTicker")]
    assert len(rounds) >= 6
    assert min(b - a for a, b in zip(rounds, rounds[1:], strict=False)) >= 0.8 * collector.period


async def test_many_polls_of_an_unchanged_exchange_deliver_nothing_twice(captures: Path) -> None:
    """The whole tape has played before the first poll; then many rounds see the same
    trades and tickers again: each is delivered once."""
    send, receive = trio.open_memory_channel[Any](10_000)
    async with trio.open_nursery() as nursery:
        emulator = emulator_of(captures, speed=None)
        address = await nursery.start(emulator.serve)
        # no WebSocket client starts the tape: start it by hand (as fast as it goes)
        emulator.started.set()
        with trio.fail_after(10):
            await emulator.finished.wait()
        cfg = poll_config(symbols=["NKN-USDT", "LRC-BTC"], channels=["ticker", "trades"],
                         rest_url=address.rest_url, interval=0.05)
        collector = PollCollector("binance", cfg, FAST, send)
        rounds = 15
        async with trio.open_nursery() as polling:
            await polling.start(collector.run)
            await wait_for(polled(collector, rounds))
            polling.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    events = drain(receive)
    trades = [e for e in events if isinstance(e, Trade)]
    assert sorted(t.id for t in trades) == ["15683430", "9213679"]
    assert [e.symbol for e in events if isinstance(e, Ticker)] == ["NKN-USDT", "LRC-BTC"]
    assert collector.stats.duplicates >= rounds  # seen again and again, dropped
    assert not [e for e in events if isinstance(e, Gap)]


async def test_rest_failures_are_retried_with_backoff_and_polling_recovers(captures: Path) -> None:
    """The emulated REST answers 503 for a while, twice: first while markets load
    (state ``failed``, retried), then while polling (``reconnecting``, retried); each
    time the collector recovers (``subscribed``) with jittered delays within the
    backoff bounds, and no trade is delivered twice across the outage."""
    outage = True

    def rest(answer: Callable[[str], tuple[int, bytes]], target: str) -> tuple[int, bytes]:
        if outage:
            return 503, b'{"code":-1001,"msg":"Internal error; emulated outage."}'
        return answer(target)

    async with polling_through(captures, rest, ["NKN-USDT", "LRC-BTC"]) as (collector, events):
        await wait_for(lambda: collector.state_counts["failed"] >= 3)
        outage = False
        await wait_for(lambda: collector.state == "subscribed")
        await wait_for(lambda: sum(isinstance(e, Trade) for e in events) == 2)
        outage = True
        await wait_for(lambda: collector.state_counts["reconnecting"] >= 3)
        outage = False
        await wait_for(lambda: collector.state_counts["subscribed"] == 2)
        await wait_for(polled(collector, 3))

    sequence = [s.state for s in states(events)]
    first_ok = sequence.index("subscribed")
    assert sequence[0] == "connecting" and set(sequence[1:first_ok]) == {"failed"}
    back = sequence.index("subscribed", first_ok + 1)
    assert set(sequence[first_ok + 1 : back]) == {"reconnecting"}
    for state in states(events):
        if state.state == "failed":
            assert state.detail.startswith("market metadata: binance markets: ")
        if state.state in ("failed", "reconnecting"):
            assert "emulated outage" in state.detail or "503" in state.detail
    delays = [float(m) for s in states(events)
              for m in re.findall(r"retry in ([0-9.]+)s", s.detail)]
    assert len(delays) >= 3 and all(0 <= d <= FAST.cap for d in delays)
    assert sorted(e.id for e in events if isinstance(e, Trade)) == ["15683430", "9213679"]


async def test_a_refused_connection_is_a_failed_state_retried(captures: Path) -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connections are refused
    send, receive = trio.open_memory_channel[Any](1000)
    cfg = poll_config(symbols=["NKN-USDT"], rest_url=f"http://127.0.0.1:{port}", interval=0.05)
    collector = PollCollector("binance", cfg, FAST, send)
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.run)
        await wait_for(lambda: collector.state_counts["failed"] >= 2)
        nursery.cancel_scope.cancel()
    failed = [s for s in states(drain(receive)) if s.state == "failed"]
    assert "binance markets" in failed[0].detail
    assert "NetworkError" in failed[0].detail or "ExchangeNotAvailable" in failed[0].detail


async def test_a_symbol_the_exchange_does_not_list_is_an_error_not_a_retry(captures: Path) -> None:
    send, _receive = trio.open_memory_channel[Any](1000)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(emulator_of(captures, speed=None).serve)
        cfg = poll_config(symbols=["NKN-USDT", "NOT-LISTED"], rest_url=address.rest_url)
        collector = PollCollector("binance", cfg, FAST, send)
        with trio.fail_after(20), pytest.raises(ValueError, match="lists no market NOT-LISTED"):
            await collector.run()
        nursery.cancel_scope.cancel()


# -- pure parts -----------------------------------------------------------------------------


def test_the_poll_period_respects_the_exchange_rate_limit() -> None:
    assert poll_period(2.0, 50, 5) == 2.0  # the limit allows more: interval as configured
    assert poll_period(0.05, 50, 5) == pytest.approx(0.25)  # raised to 5 x 50 ms
    assert poll_period(1.0, 1000, 4) == 4.0
    send, _ = trio.open_memory_channel[Any](1)
    binance = PollCollector("binance", poll_config(symbols=SYMBOLS, interval=0.05), FAST, send)
    assert (binance.requests_per_round, binance.spacing) == (5, 0.05)  # fetch_bids_asks: 1 call
    trades_only = poll_config(symbols=SYMBOLS, channels=["trades"], interval=0.05)
    assert PollCollector("binance", trades_only, FAST, send).period == pytest.approx(0.2)
    # Kraken (rateLimit 1000 ms) has no fetch_bids_asks: one ticker call per symbol
    kraken = PollCollector("kraken", poll_config(symbols=["BTC-USD", "ETH-USD"]), FAST, send)
    assert (kraken.requests_per_round, kraken.period) == (4, 4.0)
    default = PollCollector("binance", poll_config(symbols=["BTC-USDT"]), FAST, send)
    assert default.period == 2.0
    with pytest.raises(ValueError, match="ccxt knows no exchange"):
        PollCollector("no-such-exchange", poll_config(symbols=["BTC-USD"]), FAST, send)


def test_ccxt_errors_map_to_feed_errors_and_bugs_propagate() -> None:
    cases = [
        (ccxt.RequestTimeout("slow"), FeedDisconnected),
        (ccxt.ExchangeNotAvailable("503"), FeedDisconnected),
        (ccxt.RateLimitExceeded("429"), FeedDisconnected),
        (ccxt.OperationFailed("-1001"), FeedDisconnected),
        (ccxt.BadResponse("not json"), FeedProtocolError),
        (ccxt.BadSymbol("-1121"), FeedProtocolError),
        (ccxt.ExchangeError("?"), FeedProtocolError),
    ]
    for error, mapped in cases:
        with pytest.raises(mapped) as info, ccxt_errors("x trades"):
            raise error
        assert info.value.__cause__ is error and str(info.value).startswith("x trades: ")
    for bug in (ccxt.NotSupported("no"), ccxt.ArgumentsRequired("symbol"), KeyError("k")):
        with pytest.raises(type(bug)), ccxt_errors("x"):
            raise bug


def trade(tid: int, ts: int, price: str = "0.10000000", size: str = "1.00000000") -> dict[str, Any]:
    """A trade as ccxt's fetch_trades gives it for Binance (aggTrade in ``info``)."""
    return {"id": str(tid), "timestamp": ts, "price": float(price), "amount": float(size),
            "side": "buy", "info": {"a": tid, "p": price, "q": size, "T": ts}}


def ids(events: list[Any]) -> list[str]:
    return [e.id for e in events if isinstance(e, Trade)]


def test_trade_tracker_drops_repeats_orders_and_asks_since_the_newest() -> None:
    tracker = TradeTracker("x", "A-B", limit=5, stats=FeedCounters())
    assert tracker.since() is None
    out = tracker.page([trade(3, 1000), trade(1, 1000), trade(2, 999)], None, 1.0)
    assert ids(out) == ["2", "1", "3"]  # by time, then by numeric id
    assert out[0].price == "0.10000000" and out[0].size == "1.00000000" and out[0].ts == 0.999
    assert tracker.since() == 1000
    out = tracker.page([trade(1, 1000), trade(3, 1000), trade(4, 1001), trade(4, 1001)], 1000, 2.0)
    assert ids(out) == ["4"] and tracker.stats.duplicates == 3
    assert tracker.since() == 1001


def test_trade_tracker_reports_a_gap_only_for_a_full_page_that_does_not_overlap() -> None:
    tracker = TradeTracker("x", "A-B", limit=3, stats=FeedCounters())
    tracker.page([trade(10, 100)], None, 1.0)
    out = tracker.page([trade(11, 101), trade(12, 102)], 100, 2.0)  # not full: no gap
    assert ids(out) == ["11", "12"]
    out = tracker.page([trade(20, 200), trade(21, 201), trade(22, 202)], 102, 3.0)  # full, apart
    assert isinstance(out[0], Gap) and (out[0].from_id, out[0].to_id) == ("13", "19")
    assert ids(out) == ["20", "21", "22"] and tracker.stats.gaps == 1
    out = tracker.page([trade(22, 202), trade(23, 203), trade(24, 204)], 202, 4.0)  # full, overlaps
    assert ids(out) == ["23", "24"] and not any(isinstance(e, Gap) for e in out)


def test_trade_tracker_jumps_to_the_newest_page_when_since_stalls_or_stays_behind() -> None:
    tracker = TradeTracker("x", "A-B", limit=2, stats=FeedCounters())
    tracker.page([trade(1, 10)], None, 1.0)
    tracker.page([trade(1, 10)], 10, 1.0)  # nothing new from `since`: the window may be stale
    assert tracker.since() is None
    tracker.page([trade(1, 10)], None, 1.0)
    assert tracker.since() == 10
    tid = 1
    for n in range(MAX_BEHIND):  # full pages in a row: behind the exchange
        assert tracker.since() is not None
        tracker.page([trade(tid, 10 + tid), trade(tid + 1, 11 + tid)], tracker.since(), 1.0)
        tid += 1
        assert (tracker.since() is None) == (n == MAX_BEHIND - 1)


def test_trade_tracker_memory_is_bounded_and_forgotten_trades_stay_delivered() -> None:
    tracker = TradeTracker("x", "A-B", limit=10, stats=FeedCounters())
    for start in range(0, 500, 10):
        tracker.page([trade(i, 1000 + i) for i in range(start, start + 10)], tracker.since(), 1.0)
    assert len(tracker.seen) == tracker.memory == 100
    assert tracker.stats.trades == 500
    out = tracker.page([trade(5, 1005), trade(500, 1500)], tracker.since(), 2.0)  # 5 was forgotten
    assert ids(out) == ["500"]


def test_decimal_strings_come_from_the_raw_answer_when_it_agrees() -> None:
    info = {"bidPrice": "0.00000637", "bidQty": "2500.00000000"}
    assert decimal_text(info, ("bidPrice",), 6.37e-06) == "0.00000637"
    assert decimal_text(info, ("bidQty",), 2500.0) == "2500.00000000"
    assert decimal_text(info, ("bidPrice",), 6.38e-06) == "0.00000638"  # raw disagrees: the float
    assert decimal_text({}, ("p",), 1e22) == "10000000000000000000000"
    assert decimal_text([["0.1", "2"]], ("p",), 0.1) == "0.1"  # a raw answer that is no dict
    assert decimal_text({}, ("p",), None) is None
    assert decimal_text({}, ("p",), float("nan")) is None


def test_emulated_binance_rest_serves_tickers_and_agg_trades_of_the_tape(captures: Path) -> None:
    capture_files = [read_capture(captures / name) for name in BINANCE]
    venue = BinanceVenue(capture_files)

    def get(target: str) -> tuple[int, Any]:
        status, body = venue.rest(target)
        return status, orjson.loads(body)

    zero = "0.00000000"
    assert get("/api/v3/ticker/bookTicker?symbol=NKNUSDT") == (200, {
        "symbol": "NKNUSDT", "bidPrice": zero, "bidQty": zero, "askPrice": zero, "askQty": zero})
    assert get("/api/v3/aggTrades?symbol=NKNUSDT") == (200, [])
    streams = {venue.route(frame) for frame in merge_frames(capture_files)}
    assert "nknusdt@aggTrade" in streams and "nknusdt@bookTicker" in streams

    want_trades, want_tickers = recorded(captures)
    status, body = get("/api/v3/ticker/bookTicker?symbol=LRCBTC")
    assert status == 200 and (body["bidPrice"], body["bidQty"], body["askPrice"],
                              body["askQty"]) == want_tickers["LRC-BTC"][-1]
    status, body = get('/api/v3/ticker/bookTicker?symbols=["NKNUSDT","RUNEEUR"]')
    assert status == 200 and [b["symbol"] for b in body] == ["NKNUSDT", "RUNEEUR"]
    assert body[1]["bidPrice"] == zero  # listed, but no bookTicker played
    played = {b["symbol"] for b in get("/api/v3/ticker/bookTicker")[1]}
    assert played == {"NKNUSDT", "LRCBTC", "BLZETH"}
    assert get("/api/v3/ticker/bookTicker?symbol=NOPE")[1]["code"] == -1121

    nkn = {"a": 15683430, "p": "0.35280000", "q": "58.00000000", "f": 19862790, "l": 19862790,
           "T": 1633998523963, "m": False, "M": True}
    assert want_trades[0][:4] == ("NKN-USDT", "15683430", "0.35280000", "58.00000000")
    assert get("/api/v3/aggTrades?symbol=NKNUSDT") == (200, [nkn])
    assert get("/api/v3/aggTrades?symbol=NKNUSDT&fromId=15683430&limit=1000") == (200, [nkn])
    assert get("/api/v3/aggTrades?symbol=NKNUSDT&fromId=15683431") == (200, [])
    assert get("/api/v3/aggTrades?symbol=NKNUSDT&startTime=1633998523963") == (200, [nkn])
    window = "startTime=1633998523963&endTime=1634002123963"  # one hour, as ccxt asks
    assert get(f"/api/v3/aggTrades?symbol=NKNUSDT&{window}") == (200, [nkn])
    assert get("/api/v3/aggTrades?symbol=NKNUSDT&startTime=1633998523964") == (200, [])
    assert get("/api/v3/aggTrades?symbol=NKNUSDT&limit=0") == (200, [nkn])  # clamped to 1..1000
    assert get("/api/v3/aggTrades?symbol=BLZETH") == (200, [])
    for target, code in [
        ("/api/v3/aggTrades", -1102),
        ("/api/v3/aggTrades?symbol=NOPE", -1121),
        ("/api/v3/aggTrades?symbol=NKNUSDT&fromId=1&startTime=1", -1128),
        ("/api/v3/aggTrades?symbol=NKNUSDT&startTime=0&endTime=3600001", -1127),
        ("/api/v3/aggTrades?symbol=NKNUSDT&limit=x", -1100),
    ]:
        status, body = get(target)
        assert (status, body["code"]) == (400, code), target


async def test_a_request_that_keeps_failing_does_not_stop_the_rest_of_the_round(
        captures: Path) -> None:
    """The exchange refuses every ticker request (503) but answers the trade
    requests: the trades of the round still arrive, once; the collector stays
    ``subscribed`` (no backoff: the exchange is up), and status counts the failed
    requests and names the last one's cause."""
    refused: list[str] = []

    def rest(answer: Callable[[str], tuple[int, bytes]], target: str) -> tuple[int, bytes]:
        if "ticker" in target:
            refused.append(target)
            return 503, b'{"code":-1001,"msg":"Internal error; tickers refused."}'
        return answer(target)

    async with polling_through(captures, rest, ["NKN-USDT", "LRC-BTC"]) as (collector, events):
        await wait_for(lambda: sum(isinstance(e, Trade) for e in events) == 2)
        await wait_for(polled(collector, 3))
        stats = collector.statistics()
    assert refused and stats.failed_requests is not None and stats.failed_requests >= 3
    assert stats.last_error is not None and "tickers refused" in stats.last_error
    assert collector.state == "subscribed" and collector.state_counts["reconnecting"] == 0
    assert not any(isinstance(e, Ticker) for e in events)
    assert sorted(e.id for e in events if isinstance(e, Trade)) == ["15683430", "9213679"]
