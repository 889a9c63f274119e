"""A cluster's takeover for ccxt feeds (docs/cluster.md): a ``poll`` or ``watch``
collector handed the previous owner's last trade of each symbol (``resume``)
recovers the trades after them from ccxt's REST ``fetch_trades``, each once, and
announces a ``gap`` where the exchange's history no longer reaches back to them.

Real ccxt (``coinbaseexchange``) against the Coinbase emulator's REST and
WebSocket on 127.0.0.1; the whole tape has played before the collector starts
(the previous owner's time), so what it delivers comes from the REST history.
Expected trades come from the capture's raw frames. ccxt runs in threads: real
time, every wait bounded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import trio

from daemon.collectors.poll import PollCollector
from daemon.collectors.watch import WatchCollector
from daemon.config import ExchangeConfig, ReconnectConfig
from daemon.events import Gap, Trade
from daemon.replay.capture import read_capture
from daemon.replay.emulator import Emulator
from tests.test_replay_loop import recorded

COINBASE = ["COINBASE.0", "COINBASE.ws.28.0"]
FAST = ReconnectConfig(base=0.05, cap=0.2)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: a product of which the previous owner delivered no trade
QUIET = "NU-GBP"
Rest = Callable[[Callable[[str], tuple[int, bytes]], str], tuple[int, bytes]]


def matches(captures: Path) -> list[dict[str, Any]]:
    """The capture's trades (``match`` and ``last_match`` frames), in tape order."""
    return [m for m in recorded(captures, COINBASE) if m["type"] in ("match", "last_match")]


def ms(text: str) -> int:
    """An ISO 8601 time as integer ms since the epoch, truncated (as ccxt reads it)."""
    return (datetime.fromisoformat(text.replace("Z", "+00:00")) - EPOCH) // timedelta(
        milliseconds=1)


def as_trade(match: dict[str, Any]) -> Trade:
    """A match as the previous (ccxt) owner delivered it, and Redis holds it."""
    return Trade(exchange="coinbase", symbol=match["product_id"], ts=ms(match["time"]) / 1000,
                 recv_ts=0.0, id=str(match["trade_id"]), price=match["price"],
                 size=match["size"], side="sell" if match["side"] == "buy" else "buy")


def last_of_each(prefix: Sequence[dict[str, Any]]) -> list[Trade]:
    """The last trade of each product in ``prefix``: what Redis holds when the
    previous owner dies after delivering ``prefix``."""
    last = {m["product_id"]: m for m in prefix}
    return [as_trade(m) for m in last.values()]


def hiding(product: str, before: int) -> Rest:
    """A REST wrapper: the emulator's answers, with ``product``'s trades older than
    trade id ``before`` gone from the history (an exchange that keeps less)."""
    def rest(answer: Callable[[str], tuple[int, bytes]], target: str) -> tuple[int, bytes]:
        status, body = answer(target)
        if urlsplit(target).path != f"/products/{product}/trades" or status != 200:
            return status, body
        return status, orjson.dumps([t for t in orjson.loads(body) if t["trade_id"] >= before])
    return rest


@asynccontextmanager
async def resumed(captures: Path, mode: str, symbols: list[str], seeds: list[Trade],
                  rest: Rest | None = None) -> AsyncIterator[tuple[Any, list[Any]]]:
    """A ``mode`` (poll, watch) collector of ``symbols`` (trades only) resumed from
    ``seeds``, started after the whole tape played on the Coinbase emulator (REST
    through ``rest`` if given); yields it and the list its events go to."""
    emulator = Emulator([read_capture(captures / name) for name in COINBASE], speed=None)
    if rest is not None:
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
        emulator.started.set()  # the previous owner's time: the tape plays out
        with trio.fail_after(10):
            await emulator.finished.wait()
        cfg = ExchangeConfig(mode=mode, symbols=symbols, channels=["trades"],
                             rest_url=address.rest_url, ws_url=address.ws_url, interval=0.05)
        collector: PollCollector | WatchCollector
        if mode == "poll":
            collector = PollCollector("coinbase", cfg, FAST, send, ccxt_id="coinbaseexchange")
        else:
            collector = WatchCollector("coinbase", cfg, FAST, send, ccxt_id="coinbaseexchange",
                                       ccxt_config={"rateLimit": 20})
        collector.resume(seeds)
        await nursery.start(collector.run)
        yield collector, events
        nursery.cancel_scope.cancel()


async def delivered(collector: PollCollector | WatchCollector, trades: int) -> None:
    """Wait until ``trades`` trades were delivered, then some more time (poll: three
    more rounds; watch: half a second) for any trade delivered twice to show."""
    with trio.fail_after(30):
        while collector.stats.trades < trades:  # noqa: ASYNC110
            await trio.sleep(0.02)
        if isinstance(collector, PollCollector):
            target = collector.stats.messages + 3 * collector.requests_per_round
            while collector.stats.messages < target:  # noqa: ASYNC110
                await trio.sleep(0.02)
        else:
            await trio.sleep(0.5)


def same_ms_boundary(trades: list[dict[str, Any]]) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """A prefix length whose last trade shares its ms with the trades of its product
    just before it (in the prefix) and just after it (left out), and those two: the
    takeover point where the time alone cannot tell delivered from new."""
    for i, m in enumerate(trades):
        same = [t for t in trades if t["product_id"] == m["product_id"]
                and ms(t["time"]) == ms(m["time"])]
        at = same.index(m)
        if 0 < at < len(same) - 1:
            return i + 1, same[at - 1], same[at + 1]
    raise AssertionError("the capture has no three trades of a product in one ms")


def key(trade: Trade | dict[str, Any]) -> tuple[str, str]:
    if isinstance(trade, Trade):
        return trade.symbol, trade.id
    return trade["product_id"], str(trade["trade_id"])


async def check_recovers_exactly_the_trades_after(captures: Path, mode: str) -> None:
    tape = matches(captures)
    k, before, partner = same_ms_boundary(tape)
    # the previous owner delivered the prefix, but nothing of QUIET: Redis holds no
    # trade of it, so its newest REST page is new (and has trades of both parts)
    previous = [m for m in tape[:k] if m["product_id"] != QUIET]
    seeds = last_of_each(previous)
    symbols = sorted({m["product_id"] for m in tape})
    assert {t.symbol for t in seeds} == set(symbols) - {QUIET}
    assert {QUIET} == {m["product_id"] for m in tape[:k]} - {m["product_id"] for m in previous}
    assert QUIET in {m["product_id"] for m in tape[k:]}
    after = [m for m in tape if m not in previous]
    async with resumed(captures, mode, symbols, seeds) as (collector, events):
        await delivered(collector, len(after))
    got = [e for e in events if isinstance(e, Trade)]
    assert sorted(map(key, got)) == sorted(map(key, after))  # none lost, none twice
    keys = set(map(key, got))
    # told apart in one ms: the one after the seed is new, the seed and the one before not
    assert key(partner) in keys and not {key(tape[k - 1]), key(before)} & keys
    recorded_as = {key(m): m for m in after}
    for t in got:
        m = recorded_as[key(t)]
        assert (t.price, t.size, t.ts) == (m["price"], m["size"], ms(m["time"]) / 1000)
    for symbol in symbols:  # in trade order
        ids = [int(t.id) for t in got if t.symbol == symbol]
        assert ids == sorted(ids)
    assert not [e for e in events if isinstance(e, Gap)]
    assert collector.stats.trades == len(after) and collector.stats.gaps == 0


async def check_announces_what_the_history_lost(captures: Path, mode: str) -> None:
    tape = [m for m in matches(captures) if m["product_id"] == "SKL-USD"]
    seed, first_kept = tape[9], tape[20]  # the history keeps the 21st trade on
    async with resumed(captures, mode, ["SKL-USD"], [as_trade(seed)],
                       hiding("SKL-USD", first_kept["trade_id"])) as (collector, events):
        await delivered(collector, len(tape) - 20)
    [gap] = [e for e in events if isinstance(e, Gap)]
    assert events.index(gap) < min(  # before the trades after it
        i for i, e in enumerate(events) if isinstance(e, Trade))
    assert (gap.symbol, gap.stream) == ("SKL-USD", "trades")
    assert (gap.from_id, gap.to_id) == (str(seed["trade_id"] + 1), str(first_kept["trade_id"] - 1))
    assert f"did not reach back to trade {seed['trade_id']}" in gap.detail
    got = [e for e in events if isinstance(e, Trade)]
    assert [t.id for t in got] == [str(m["trade_id"]) for m in tape[20:]]  # each once, in order
    assert collector.stats.gaps == 1


async def test_a_resumed_poll_feed_recovers_exactly_the_trades_after_the_last_ones(
        captures: Path) -> None:
    """Seeded with the last trade of each product in a prefix of the tape (one of
    them shares its ms with the trades of its product just before and after it),
    a poll collector delivers exactly the tape's trades after the prefix, each
    once (over three more rounds), in trade order, with their recorded prices,
    sizes and times, and no gap: every first answer reached back to its seed. A
    product with no seed (none of its trades was delivered) starts from the
    newest page: all its trades."""
    await check_recovers_exactly_the_trades_after(captures, "poll")


async def test_a_resumed_watch_feed_recovers_exactly_the_trades_after_the_last_ones(
        captures: Path) -> None:
    """The same for a watch collector (ccxt.pro): nothing comes live (the tape has
    played), each symbol's trades since its seed come from the REST recovery, the
    unseeded product's from its newest page."""
    await check_recovers_exactly_the_trades_after(captures, "watch")


async def test_a_resumed_poll_feed_announces_a_gap_where_the_history_does_not_reach(
        captures: Path) -> None:
    """The previous owner's last SKL-USD trade is its 10th; the exchange's history
    starts at the 21st. The first answer (not a full page) does not reach back to
    the seed: a ``gap`` naming the lost ids (11th to 20th) comes first, then the
    21st trade on, each once."""
    await check_announces_what_the_history_lost(captures, "poll")


async def test_a_resumed_watch_feed_announces_a_gap_where_the_history_does_not_reach(
        captures: Path) -> None:
    """The same for a watch collector's REST recovery."""
    await check_announces_what_the_history_lost(captures, "watch")
