"""Derived streams end to end: ``tickwire replay``'s code path (``serve_replay``) on the
Coinbase capture with ``[derived]`` bars and whales, a client over a real WebSocket,
and recovery with ``since`` after it leaves. Expected values come from the
capture's raw frames (``tests/test_derived.py``'s independent computation)."""

from __future__ import annotations

from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio
import trio_websocket

from daemon.config import BarsConfig, Config, DerivedConfig, WhalesConfig
from daemon.metrics import samples
from daemon.replay.run import serve_replay
from tests.helpers import messages, request
from tests.test_derived import check_bars, coinbase_raw_trades, expected_bars


def derived_config() -> Config:
    config = Config()
    return attrs.evolve(
        config, server=attrs.evolve(config.server, listen="127.0.0.1:0"),
        derived=DerivedConfig(whales=WhalesConfig(enabled=True, threshold=1000.0),
                              bars=BarsConfig(intervals=["1s"], grace=1.0)))


async def collect(ws: trio_websocket.WebSocketConnection, got: list[dict[str, Any]],
                  seconds: float) -> None:
    with trio.move_on_after(seconds):
        while True:
            got.extend(messages(await ws.get_message()))


async def test_bars_and_whales_over_a_replay_and_since(captures: Path) -> None:
    raw = coinbase_raw_trades(captures)
    paths = [captures / "COINBASE.0", captures / "COINBASE.ws.28.0"]
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(
            partial(serve_replay, paths, derived_config(), speed=None))
        url = f"ws://127.0.0.1:{replay.app.port}"
        with trio.fail_after(30):
            await replay.wait_finished()
        await trio.sleep(2.5)  # the last bars close on the clock (1 s + grace)
        got: list[dict[str, Any]] = []
        with trio.fail_after(20):
            async with trio_websocket.open_websocket_url(url) as ws:
                welcome = messages(await ws.get_message())[0]
                await request(ws, {"op": "subscribe", "id": 1, "channels": ["bars", "whales"],
                                   "symbols": ["coinbase:*"], "history": 1000})
                await collect(ws, got, 1.0)
            bars = [m for m in got if m["type"] == "bar" and not m["partial"]]
            by_symbol: dict[str, list[dict[str, Any]]] = {}
            for bar in bars:
                by_symbol.setdefault(bar["symbol"], []).append(bar)
            assert check_bars(by_symbol, expected_bars(raw, 1, True), True) >= 40
            assert not [b for b in bars if b["revision"]]
            whales = [m for m in got if m["type"] == "whale"]
            assert sorted((w["symbol"], w["id"]) for w in whales) == sorted(
                (t.symbol, t.id) for t in raw if t.symbol.endswith("-USD")
                and Decimal(t.price) * Decimal(t.size) >= 1000)
            # leave having seen half of SKL-USD's bars; come back with since
            key = "bars:coinbase:SKL-USD:1s"
            skl = by_symbol["SKL-USD"]
            seen = skl[len(skl) // 2]["seq"]
            await trio.sleep(1.5)  # more carried bars meanwhile
            again: list[dict[str, Any]] = []
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.get_message()
                await request(ws, {"op": "subscribe", "id": 2, "channels": ["bars"],
                                   "symbols": ["coinbase:SKL-USD:1s"], "since": {key: seen},
                                   "epoch": welcome["epoch"]})
                await collect(ws, again, 0.5)
        ack = next(m for m in again if m["type"] == "ack")
        assert ack["recovered"] == {key: True}
        recovered = [m for m in again if m["type"] == "bar" and not m["partial"]]
        stream = replay.app.dispatcher.streams[key]
        assert [b["seq"] for b in recovered][: stream.seq - seen] == list(
            range(seen + 1, stream.seq + 1))
        assert [b for b in recovered if b["seq"] <= len(skl)] == skl[len(skl) // 2 + 1:]
        status = {c.name: c for c in replay.app.reporter.report()[1]}
        assert status["derived bars"].health == "healthy"
        assert status["derived whales"].figures["figures"]["whales"] == len(whales)
        assert status["derived whales"].figures["figures"]["unconvertible"] == {
            "BTC": 35, "EUR": 10, "GBP": 9}
        # the same counters in the Prometheus metrics
        metrics = {(m["name"], m["labels"].get("name")): m["value"]
                   for m in samples(replay.app.registry) if m["name"].startswith("tickwire_derived")}
        bars_stats = replay.app.derived[1].statistics()
        assert metrics["tickwire_derived_received_total", "bars"] == bars_stats.received == 107
        assert metrics["tickwire_derived_published_total", "whales"] == len(whales)
        assert metrics["tickwire_derived_lost_total", "bars"] == 0
        assert ("tickwire_derived_queued", "views") in metrics
        nursery.cancel_scope.cancel()
