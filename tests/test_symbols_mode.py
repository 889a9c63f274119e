"""Per-symbol mode (``symbols_mode``): one exchange streams most symbols over its
WebSocket and polls others through ccxt's REST API, in one replay of the Coinbase
capture; each symbol's trades come once, from its own collector."""

from __future__ import annotations

from collections import Counter
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio
from rich.console import Console

from daemon.admin import Replies
from daemon.config import Config, ConfigError, ExchangeConfig, structure_config
from daemon.replay.run import serve_replay
from daemon.statuscli import render_status
from tests.test_derived import Recorder, coinbase_raw_trades


def test_groups_by_mode() -> None:
    config = ExchangeConfig(symbols=["A-B", "C-D", "E-F"], symbols_mode={"C-D": "poll"})
    assert [(mode, c.symbols, c.mode, c.symbols_mode) for mode, c in config.groups()] == [
        ("native", ["A-B", "E-F"], "native", {}), ("poll", ["C-D"], "poll", {})]
    everything = ExchangeConfig(symbols=["A-B"], mode="poll", symbols_mode={"A-B": "native"})
    assert [mode for mode, _ in everything.groups()] == ["native"]


@pytest.mark.parametrize(("section", "message"), [
    ({"symbols": ["BTC-USD"], "symbols_mode": {"ETH-USD": "poll"}},
     "'ETH-USD' is not one of this exchange's symbols @ exchanges.coinbase.symbols_mode"),
    ({"symbols": ["BTC-USD"], "symbols_mode": {"BTC-USD": "rest"}},
     "'rest' (of BTC-USD) is not one of native, poll, watch @ exchanges.coinbase.symbols_mode"),
])
def test_a_bad_symbols_mode_is_one_line(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        structure_config({"exchanges": {"coinbase": section}})
    assert message in str(error.value)


def test_a_native_symbol_on_an_exchange_without_a_native_collector() -> None:
    with pytest.raises(ConfigError, match="'okx' has no native collector"):
        structure_config({"exchanges": {"okx": {"symbols": ["BTC-USDT", "ETH-USDT"],
                                                "mode": "poll",
                                                "symbols_mode": {"ETH-USDT": "native"}}}})


async def test_one_symbol_polled_one_streamed_in_one_replay(captures: Path) -> None:
    raw = coinbase_raw_trades(captures)
    by_symbol = Counter(t.symbol for t in raw)
    paths = [captures / "COINBASE.0", captures / "COINBASE.ws.28.0"]
    config = Config()
    config = attrs.evolve(
        config, server=attrs.evolve(config.server, listen="127.0.0.1:0"),
        exchanges={"coinbase": ExchangeConfig(symbols=["SKL-USD"], interval=0.5,
                                              symbols_mode={"SKL-USD": "poll"})})
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(partial(serve_replay, paths, config, speed=4.0))
        app = replay.app
        app.dispatcher.subscribe(recorder, ["trades"], ["coinbase:*"])
        with trio.fail_after(40):
            await replay.wait_finished()
            while len(recorder.of("trade")) < len(raw):
                await trio.sleep(0.1)
        await trio.sleep(1.5)  # two more polls: nothing comes twice
        checks = {c.name: c for c in app.reporter.report()[1]}
        console = Console(width=250, record=True)
        render_status(console, Replies(app).answer("status"), {"clients": []})
        table = console.export_text()
        native = app.feeds["coinbase"].collector.statistics()
        polled = app.feeds["coinbase/poll"].collector.statistics()
        nursery.cancel_scope.cancel()
    trades = recorder.of("trade")
    keys = [(t["symbol"], t["id"]) for t in trades]
    assert len(keys) == len(set(keys)) == len(raw) == 107
    assert set(keys) == {(t.symbol, t.id) for t in raw}
    assert app.dispatcher.duplicates == 0  # no trade was brought by both collectors
    assert polled.mode == "poll" and set(polled.symbols) == {"SKL-USD"}
    assert polled.counters.trades == by_symbol["SKL-USD"] == 53
    assert native.mode == "native" and "SKL-USD" not in native.symbols
    assert native.counters.trades == 107 - 53
    assert checks["feed:coinbase/poll"].figures["symbols_mode"] == {"SKL-USD": "poll"}
    rows = {line.split("│")[1].strip(): line for line in table.splitlines()
            if line.startswith("│ coinbase")}
    assert set(rows) == {"coinbase", "coinbase/poll"}
    assert rows["coinbase/poll"].split("│")[2].strip() == "poll"
    assert rows["coinbase"].split("│")[2].strip() == "native"
    modes = checks["feed:coinbase"].figures["symbols_mode"]
    assert set(modes) == set(by_symbol) - {"SKL-USD"} and set(modes.values()) == {"native"}
