"""The nursery tree: backoff bounds, a failing collector restarted without taking
the daemon down, a critical failure ending it, and backpressure from a full
dispatcher to the exchange socket."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import attrs
import pytest
import trio
import trio_websocket

from daemon.app import App
from daemon.collectors.native import NativeCollector
from daemon.collectors.venues import venue
from daemon.config import Config, ExchangeConfig, ReconnectConfig
from daemon.errors import FeedDisconnected, FeedError
from daemon.events import Ticker, Trade
from daemon.replay.capture import read_capture
from daemon.replay.emulator import Emulator
from daemon.supervise import Backoff, Failure, retry, supervise
from tests.helpers import ChannelSource, receive_until, request

BINANCE = ("BINANCE.0", "BINANCE.ws.1.0", "BINANCE.http.0.0")


def test_backoff_delays_are_full_jitter_within_capped_bounds() -> None:
    backoff = Backoff(base=0.5, cap=8.0, rng=random.Random(7))
    ceilings = [0.5, 1, 2, 4, 8, 8, 8, 8]
    for ceiling in ceilings:
        assert backoff.ceiling() == ceiling
        delay = backoff.next_delay()
        assert 0 <= delay <= ceiling
    delays = [Backoff(0.5, 8.0, rng=random.Random(seed)).next_delay() for seed in range(200)]
    assert min(delays) < 0.05 and max(delays) > 0.45  # spread over the whole range
    backoff.reset()
    assert backoff.ceiling() == 0.5


async def test_supervise_restarts_with_backoff_and_resets_after_a_healthy_run(autojump_clock) -> None:
    starts: list[float] = []
    outcomes = iter(["fail", "fail", "fail", "healthy-then-fail", "fail", "return"])

    async def run() -> None:
        starts.append(trio.current_time())
        outcome = next(outcomes)
        if outcome == "healthy-then-fail":
            await trio.sleep(100)
            raise RuntimeError("after a healthy run")
        if outcome == "fail":
            raise ConnectionError("boom")

    backoff = Backoff(base=1.0, cap=4.0, rng=random.Random(1))
    failures: list[BaseException] = []
    await supervise("test", run, backoff, healthy_after=50, on_failure=failures.append)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert len(starts) == 6 and len(failures) == 5
    assert 0 <= gaps[0] <= 1 and 0 <= gaps[1] <= 2 and 0 <= gaps[2] <= 4
    assert 100 <= gaps[3] <= 101  # the healthy run reset the backoff to its base
    assert 0 <= gaps[4] <= 2


async def test_retry_retries_only_the_allowlist_and_returns_the_value(autojump_clock) -> None:
    calls: list[float] = []
    failures: list[Failure] = []

    async def attempt() -> str:
        calls.append(trio.current_time())
        if len(calls) <= 3:
            raise FeedDisconnected("down") from ConnectionRefusedError(111, "Connection refused")
        return "markets"

    async def on_retry(failure: Failure) -> None:  # awaited: a state change
        await trio.lowlevel.checkpoint()
        failures.append(failure)

    backoff = Backoff(base=1.0, cap=4.0, rng=random.Random(3))
    got = await retry("test", attempt, backoff, retryable=(FeedError,), on_retry=on_retry)
    assert got == "markets" and len(calls) == 4
    assert [f.failures for f in failures] == [1, 2, 3]
    assert all(f.cause == "ConnectionRefusedError: [Errno 111] Connection refused"
               for f in failures)
    assert [round(b - a, 6) for a, b in zip(calls, calls[1:], strict=False)] == [
        round(f.delay, 6) for f in failures]

    async def bug() -> None:
        raise KeyError("a bug is not a network fault")

    with pytest.raises(KeyError):
        await retry("test", bug, backoff, retryable=(FeedError,), on_retry=on_retry)
    assert len(failures) == 3  # not retried, no state change


async def test_retry_resets_after_a_healthy_attempt(autojump_clock) -> None:
    outcomes = iter(["fail", "fail", "fail", "healthy-then-fail", "fail", "return"])
    failures: list[Failure] = []

    async def attempt() -> None:
        outcome = next(outcomes)
        if outcome == "healthy-then-fail":
            await trio.sleep(100)
        if outcome != "return":
            raise FeedDisconnected(outcome)

    backoff = Backoff(base=1.0, cap=64.0, rng=random.Random(5))
    await retry("test", attempt, backoff, retryable=(FeedError,), healthy_after=50,
                on_retry=failures.append)
    assert [f.failures for f in failures] == [1, 2, 3, 1, 2]
    assert backoff.attempt == 2


async def test_retry_starts_over_when_the_attempt_resets_the_backoff_itself(autojump_clock) -> None:
    """A caller that knows when it is healthy again (tail, once subscribed) resets the
    backoff inside its attempt: the next failure waits the first delay again and
    counts as the first of a run."""
    outcomes = iter(["fail", "fail", "fail", "reset-then-fail", "fail", "return"])
    failures: list[Failure] = []
    backoff = Backoff(base=1.0, cap=64.0, rng=random.Random(5))

    async def attempt() -> None:
        outcome = next(outcomes)
        if outcome == "reset-then-fail":
            backoff.reset()
        if outcome != "return":
            raise FeedDisconnected(outcome)

    await retry("test", attempt, backoff, retryable=(FeedError,), on_retry=failures.append)
    assert [f.failures for f in failures] == [1, 2, 3, 1, 2]
    assert backoff.attempt == 2


async def test_a_repeating_failure_is_logged_once_then_once_a_minute(autojump_clock, caplog) -> None:
    """An exchange down for 10 minutes, tried every 0.5-1 s: the first failure and
    each change of error are logged at the caller's level, the repeats once a
    minute with their count, the rest at DEBUG."""
    caplog.set_level(logging.DEBUG, logger="test.retry")
    logger = logging.getLogger("test.retry")
    started = trio.current_time()

    async def attempt() -> None:
        elapsed = trio.current_time() - started
        if elapsed > 600:
            return
        if 300 < elapsed < 302:
            raise FeedDisconnected("HTTP 503")  # another error, once or twice
        raise FeedDisconnected("ConnectError: [Errno 111] Connection refused")

    await retry("binance", attempt, Backoff(base=1.0, cap=1.0), retryable=(FeedError,),
                logger=logger, level=logging.ERROR)
    loud = [r for r in caplog.records if r.levelno == logging.ERROR]
    quiet = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(quiet) > 500  # every attempt is still in the debug log
    assert 10 <= len(loud) <= 16  # ~1 a minute over 10 minutes, plus each change
    messages = [r.getMessage() for r in loud]
    assert "Connection refused; retry in" in messages[0] and "failed" not in messages[0]
    assert any("HTTP 503" in m for m in messages)
    assert any("times in 60s" in m for m in messages)
    changes = [m for m in messages if "times in" not in m]
    assert 3 <= len(changes) <= 4  # refused, 503, refused again (503 may repeat once)


async def test_a_failing_collector_is_restarted_and_the_daemon_keeps_serving(captures: Path) -> None:
    """A symbol the exchange does not list makes the collector fail at every start:
    it is restarted with backoff, each failure is a `failed` state on `system`, and
    clients are served all along."""
    async with trio.open_nursery() as nursery:
        emulator = Emulator([read_capture(captures / "BINANCE.0")], speed=None)
        address = await nursery.start(emulator.serve)
        config = Config()
        config = attrs.evolve(
            config,
            server=attrs.evolve(config.server, listen="127.0.0.1:0"),
            reconnect=ReconnectConfig(base=0.05, cap=0.2),
            exchanges={"binance": ExchangeConfig(
                symbols=["NOT-LISTED"], rest_url=address.rest_url, ws_url=address.ws_url)},
        )
        app = App(config)
        port = await nursery.start(app.run)
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}") as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["system"],
                               "symbols": ["binance:*"], "history": 100})
            failed = []
            with trio.fail_after(20):
                while len(failed) < 3:
                    got = await receive_until(ws, lambda m: m.get("state") == "failed")
                    failed += [m for m in got if m.get("state") == "failed"]
            assert "NOT-LISTED" in failed[0]["detail"]
            await request(ws, {"op": "ping", "id": 2})
            assert (await receive_until(ws, lambda m: m["type"] == "pong"))[-1]["id"] == 2
        nursery.cancel_scope.cancel()


async def test_a_dispatcher_failure_ends_the_daemon_with_the_error() -> None:
    config = Config()
    config = attrs.evolve(config, server=attrs.evolve(config.server, listen="127.0.0.1:0"),
                          exchanges={})
    app = App(config)
    with trio.fail_after(10), pytest.RaisesGroup(AttributeError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.run)
            async with app.dispatcher.open_source() as source:
                await source.send("not an event")  # a source bug reaching the dispatcher
            await trio.sleep_forever()


async def test_a_full_dispatcher_stops_the_collector_reading_and_nothing_is_lost(captures: Path) -> None:
    """Nobody drains the collector's output channel: the collector stops reading
    its socket after the frames of one read (their events wait to be published),
    then, drained, delivers every event in order."""
    async with trio.open_nursery() as nursery:
        emulator = Emulator([read_capture(captures / f) for f in BINANCE], speed=None)
        address = await nursery.start(emulator.serve)
        send, receive = trio.open_memory_channel(4)
        cfg = ExchangeConfig(symbols=["NKN-USDT", "BLZ-ETH", "LRC-BTC", "RUNE-EUR"],
                             rest_url=address.rest_url, ws_url=address.ws_url)
        collector = NativeCollector(venue("binance"), cfg, ReconnectConfig(),
                                    ChannelSource(send))
        collector.read_size = 2048
        # a read of 2 KiB holds at most this many of the capture's frames
        shortest = min(len(r.text.encode()) for c in read_capture(captures / BINANCE[1]).connections
                       for r in c.received)
        await nursery.start(collector.run)
        with trio.fail_after(20):  # the collector fills the channel, then waits
            while send.statistics().tasks_waiting_send == 0:
                await trio.sleep(0.01)
        stalled = collector.feed.stats.messages
        await trio.sleep(0.3)
        assert collector.feed.stats.messages == stalled  # not reading
        assert stalled <= 2048 // shortest + 1 < emulator.sent
        events = []
        with trio.fail_after(20):
            while not (
                emulator.finished.is_set()
                and collector.feed.stats.messages == emulator.sent
                and receive.statistics().current_buffer_used == 0
                and send.statistics().tasks_waiting_send == 0
            ):
                with trio.move_on_after(0.05):
                    events.append(await receive.receive())
        assert sum(isinstance(e, Trade) for e in events) == 2
        assert sum(isinstance(e, Ticker) for e in events) == 84
        nursery.cancel_scope.cancel()


async def test_the_dispatcher_delivers_a_trade_id_once_whatever_the_source() -> None:
    from daemon.dispatch import Dispatcher, Message, Retention

    class Recorder:
        def __init__(self) -> None:
            self.got: list[tuple[int, bytes]] = []

        def deliver(self, message: Message) -> None:
            self.got.append((message.seq, message.payload))

    dispatcher = Dispatcher(8, {"trades": Retention(10, 60.0)})
    recorder = Recorder()
    dispatcher.subscribe(recorder, ["trades"], ["*"])
    trade = Trade(exchange="binance", symbol="NKN-USDT", ts=1.0, recv_ts=1.0, id="15683430",
                  price="0.35280000", size="58.00000000", side="buy")
    for event in (trade, trade, attrs.evolve(trade, id="15683431"), trade):
        dispatcher.publish(event)
    assert [seq for seq, _ in recorder.got] == [1, 2]
    assert dispatcher.duplicates == 2
