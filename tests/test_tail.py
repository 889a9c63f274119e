"""``tickwire tail`` resumes: after a slow-consumer close, beyond retention, across a
daemon restart; and it stops on a refused request. Real WebSockets on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import subprocess
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing

from daemon.config import AuthConfig, TokenConfig
from daemon.dispatch import Retention
from daemon.events import Trade
from daemon.supervise import Backoff
from daemon.tail import Resume, TailError, tail_events
from tests.broadcast_server import HELLO, Running, coinbase_events, publish, start
from tests.daemon_process import TICKWIRE

FAST = {"base": 0.02, "cap": 0.1}  # reconnect delays of the tests, seconds


def busiest_trades(captures: Path) -> list[Trade]:
    """The Coinbase capture's trades of its busiest symbol, in order."""
    trades = [e for e in coinbase_events(captures) if isinstance(e, Trade)]
    symbol = max({t.symbol for t in trades}, key=lambda s: sum(t.symbol == s for t in trades))
    return [t for t in trades if t.symbol == symbol]


def printed(out: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


async def until_printed(out: io.StringIO, count: int) -> list[dict]:
    with trio.fail_after(10):
        while len(printed(out)) < count:
            await trio.sleep(0.01)
    return printed(out)


async def tail_in(nursery: trio.Nursery, running: Running, symbol: str, **kwargs) -> tuple[
        io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    kwargs.setdefault("backoff", Backoff(**FAST))
    nursery.start_soon(lambda: tail_events(
        running.url, ["trades"], [f"coinbase:{symbol}"], out=out, err=err, **kwargs))
    with trio.fail_after(10):
        while not running.dispatcher.subscriptions:
            await trio.sleep(0.01)
    return out, err


def close_every_client(running: Running, code: int, reason: str) -> None:
    for session in list(running.server.sessions):
        session.close(code, reason)


async def test_tail_resumes_after_a_slow_consumer_close_with_exactly_the_missed_trades(
        captures: Path) -> None:
    trades = busiest_trades(captures)
    assert len(trades) >= 10
    backoff = Backoff(**FAST)
    async with trio.open_nursery() as nursery:
        running = await start(nursery)
        out, err = await tail_in(nursery, running, trades[0].symbol, backoff=backoff)
        await publish(running, trades[:4])
        await until_printed(out, 4)
        close_every_client(running, 4008, "slow consumer")
        await publish(running, trades[4:])  # while tail is away
        events = await until_printed(out, len(trades))
        nursery.cancel_scope.cancel()
    assert [e["seq"] for e in events] == list(range(1, len(trades) + 1))
    assert [e["id"] for e in events] == [t.id for t in trades]
    assert "tail: closed: 4008 slow consumer; connecting again in" in err.getvalue()
    assert "no longer retained" not in err.getvalue()
    assert backoff.attempt == 0  # subscribed again: the next failure starts over


async def test_tail_says_when_the_missed_trades_are_no_longer_retained(captures: Path) -> None:
    trades = busiest_trades(captures)[:20]
    assert len(trades) == 20
    async with trio.open_nursery() as nursery:
        running = await start(nursery, retention={"trades": Retention(5, 3600)})
        out, err = await tail_in(nursery, running, trades[0].symbol, history=5)
        await publish(running, trades[:4])
        await until_printed(out, 4)
        close_every_client(running, 4008, "slow consumer")
        await publish(running, trades[4:])  # 16 missed: only the last 5 retained
        events = await until_printed(out, 9)
        nursery.cancel_scope.cancel()
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 16, 17, 18, 19, 20]
    stream = f"trades:coinbase:{trades[0].symbol}"
    assert f"tail: {stream}: the missed messages are no longer retained" in err.getvalue()


async def test_tail_starts_again_when_the_daemon_restarts(captures: Path) -> None:
    trades = busiest_trades(captures)
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as first_nursery:  # the first daemon, stopped alone
            first = await start(first_nursery)
            out, err = await tail_in(nursery, first, trades[0].symbol)
            await publish(first, trades[:4])
            await until_printed(out, 4)
            port = first.url.rsplit(":", 1)[1]
            first_nursery.cancel_scope.cancel()  # clients get 1001 going away
        second = await start(nursery, listen=f"127.0.0.1:{port}",
                             hello={**HELLO, "epoch": "second-epoch"})
        with trio.fail_after(10):
            while not second.dispatcher.subscriptions:  # tail is back
                await trio.sleep(0.01)
        await publish(second, trades[4:7])
        events = await until_printed(out, 7)
        nursery.cancel_scope.cancel()
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 1, 2, 3]  # numbered again by the new daemon
    assert [e["id"] for e in events] == [t.id for t in trades[:7]]
    assert "closed: 1001" in err.getvalue()
    assert "the daemon restarted (epoch test-epoch -> second-epoch)" in err.getvalue()


async def test_tail_with_once_or_a_refused_request_stops(captures: Path) -> None:
    trades = busiest_trades(captures)
    async with trio.open_nursery() as nursery:
        running = await start(nursery)
        with pytest.raises(TailError, match="unknown channel"):
            await tail_events(running.url, ["candles"], ["*"], out=io.StringIO())
        guarded = await start(nursery, auth=AuthConfig(enabled="on", tokens=[TokenConfig(
            name="t", sha256=hashlib.sha256(b"secret").hexdigest(), channels=["trades"],
            symbols=["*"])]))
        with pytest.raises(TailError, match="refused: HTTP 401"):  # no token: no retry
            await tail_events(guarded.url, ["trades"], ["*"], out=io.StringIO())
        out = io.StringIO()

        async def print_two_then_close() -> None:
            with trio.fail_after(10):
                while not running.dispatcher.subscriptions:
                    await trio.sleep(0.01)
            await publish(running, trades[:2])
            await until_printed(out, 2)
            close_every_client(running, 4008, "slow consumer")

        nursery.start_soon(print_two_then_close)
        with pytest.raises(TailError, match="closed: 4008 slow consumer"):
            await tail_events(running.url, ["trades"], [f"coinbase:{trades[0].symbol}"],
                              resume=False, out=out, err=io.StringIO())
        assert len(printed(out)) == 2
        nursery.cancel_scope.cancel()


async def test_tail_command_exits_1_on_a_refused_request_and_2_without_a_daemon() -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery)
        refused = await trio.run_process([*TICKWIRE, "tail", "--url", running.url, "candles", "*"],
                                         capture_stdout=True, capture_stderr=True, check=False)
        port = running.url.rsplit(":", 1)[1]
        nursery.cancel_scope.cancel()
    assert refused.returncode == 1 and b"unknown channel" in refused.stderr
    unreachable = await trio.run_process(
        [*TICKWIRE, "tail", "--url", f"ws://127.0.0.1:{port}", "trades", "*"],
        capture_stderr=True, stdout=subprocess.DEVNULL, check=False)
    assert unreachable.returncode == 2 and b"cannot reach" in unreachable.stderr


# -- the protocol side, without sockets ----------------------------------------------


def test_resume_asks_since_the_last_seq_printed_and_prints_nothing_twice() -> None:
    state = Resume(["trades", "book"], ["*"], history=10)
    assert state.welcome({"type": "welcome", "epoch": "e1"}) == []
    assert "since" not in state.subscribe()
    trade = {"type": "trade", "exchange": "coinbase", "symbol": "BTC-USD"}
    book = {"exchange": "coinbase", "symbol": "BTC-USD"}
    assert [state.accept({**trade, "seq": n}) for n in (1, 2, 3)] == [True] * 3
    assert state.accept({**book, "type": "book_snapshot", "seq": 7})
    assert state.subscribe()["since"] == {"trades:coinbase:BTC-USD": 3, "book:coinbase:BTC-USD": 7}
    assert state.subscribe()["epoch"] == "e1"
    # history sent again after a failed recovery: what was printed is not printed again
    assert [state.accept({**trade, "seq": n}) for n in (2, 3, 4)] == [False, False, True]
    # a book's state at the last seq is printed again (a fresh snapshot); an update is not
    assert state.accept({**book, "type": "book_snapshot", "seq": 7})
    assert not state.accept({**book, "type": "book_update", "seq": 7})
    assert state.ack({"type": "ack", "recovered": {"trades:coinbase:BTC-USD": True,
                                                   "book:coinbase:BTC-USD": False}}) == [
        "tail: book:coinbase:BTC-USD: the missed messages are no longer retained; "
        "it starts again"]
    # another epoch: the daemon restarted, every stream starts again
    assert state.welcome({"type": "welcome", "epoch": "e2"}) != []
    assert "since" not in state.subscribe()
    assert state.accept({**trade, "seq": 1})


async def test_tail_command_reads_its_token_from_the_environment_or_a_file(
        captures: Path, tmp_path: Path) -> None:
    """A daemon with auth on: ``tickwire tail`` gets events with the token from
    ``$TICKWIRE_TOKEN`` or ``--token-file`` (never an argument, which ps shows), and
    is refused (exit 1, HTTP 401) with none or a wrong one; a token file that cannot
    be read is one line and exit 2."""
    import os

    trades = busiest_trades(captures)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    env = {k: v for k, v in os.environ.items() if k != "TICKWIRE_TOKEN"}
    command = [*TICKWIRE, "tail", "trades", f"coinbase:{trades[0].symbol}", "--once"]
    async with trio.open_nursery() as nursery:
        guarded = await start(nursery, auth=AuthConfig(enabled="on", tokens=[TokenConfig(
            name="t", sha256=hashlib.sha256(b"s3cret-token").hexdigest())]))
        command += ["--url", guarded.url]
        for run, (extra, extra_env) in enumerate((
                ([], {"TICKWIRE_TOKEN": "s3cret-token"}),
                (["--token-file", str(token_file)], {"TICKWIRE_TOKEN": "wrong"}))):
            batch = trades[3 * run:3 * run + 3]  # new trades: the dispatcher drops repeated ids
            assert not any("s3cret" in arg for arg in command + extra)
            process = await trio.lowlevel.open_process(
                command + extra, stdout=subprocess.PIPE, env={**env, **extra_env})
            try:
                with trio.fail_after(20):
                    while not guarded.dispatcher.subscriptions:
                        await trio.sleep(0.01)
                await publish(guarded, batch)
                output = b""
                with trio.fail_after(20):
                    while output.count(b"\n") < len(batch):
                        output += await process.stdout.receive_some()
            finally:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            assert [orjson.loads(line)["id"] for line in output.splitlines()] == [t.id for t in batch]
            with trio.fail_after(10):
                while guarded.dispatcher.subscriptions:
                    await trio.sleep(0.01)
        for extra_env in ({}, {"TICKWIRE_TOKEN": "wrong"}):
            refused = await trio.run_process(command, env={**env, **extra_env}, capture_stdout=True,
                                             capture_stderr=True, check=False)
            assert refused.returncode == 1 and b"refused: HTTP 401" in refused.stderr
        nursery.cancel_scope.cancel()
    for path, message in ((tmp_path / "none", b"cannot read the token file"),
                          (tmp_path / "empty", b"is empty")):
        if path.name == "empty":
            path.write_text("\n")
        bad = await trio.run_process(command + ["--token-file", str(path)], capture_stdout=True,
                                     capture_stderr=True, check=False)
        assert bad.returncode == 2 and message in bad.stderr
        assert len(bad.stderr.splitlines()) == 1


def test_help_texts_have_no_rest_markup() -> None:
    """click prints docstrings as they are: no ``double backticks`` or :param: in --help."""
    commands = ["run", "check-config", "replay", "emulate", "status", "clients", "tail"]
    for command in [[], *([c] for c in commands)]:
        result = subprocess.run([*TICKWIRE, *command, "--help"], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        for markup in ("``", ":param", ":class:", ":func:"):
            assert markup not in result.stdout, (command, result.stdout)


async def test_tail_into_a_closed_pipe_ends_by_sigpipe_without_a_traceback(captures: Path) -> None:
    """``tickwire tail ... | head -1``: once the reader is gone, tail's next write
    ends it as SIGPIPE ends cat."""
    import os
    import signal

    trades = busiest_trades(captures)[:2]
    async with trio.open_nursery() as nursery:
        running = await start(nursery)
        read, write = os.pipe()
        os.close(read)
        try:
            process = await trio.lowlevel.open_process(
                [*TICKWIRE, "tail", "--url", running.url, "trades", f"coinbase:{trades[0].symbol}"],
                stdout=write, stderr=subprocess.PIPE)
        finally:
            os.close(write)
        try:
            with trio.fail_after(20):
                while not running.dispatcher.subscriptions:
                    await trio.sleep(0.01)
            await publish(running, trades)
            with trio.fail_after(20):
                code = await process.wait()
            stderr = await process.stderr.receive_some()
        finally:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        nursery.cancel_scope.cancel()
    assert code == -signal.SIGPIPE
    assert not stderr


def test_resume_keys_derived_streams_and_asks_for_depth() -> None:
    """A bar's stream ends with its interval, a depth view's with its depth and
    interval, a quote's with its interval; a partial bar (the closed bar's seq) is
    printed, a bar seen before is not; the subscribe asks for depth and throttle."""
    from daemon.tail import market_stream

    bar = {"type": "bar", "exchange": "coinbase", "symbol": "SKL-USD", "interval": "1m",
           "seq": 4, "partial": False}
    assert market_stream(bar) == ("bars", "bars:coinbase:SKL-USD:1m")
    view = {"type": "book_snapshot", "exchange": "kraken", "symbol": "XBT-CHF", "depth": 10,
            "interval_ms": 100, "seq": 2}
    assert market_stream(view) == ("views", "views:kraken:XBT-CHF:10:100")
    assert market_stream({"type": "quote", "exchange": "x", "symbol": "A-B",
                          "interval_ms": 0})[1] == "quote:x:A-B:0"
    assert market_stream({"type": "book_snapshot", "exchange": "x", "symbol": "A-B"})[1] \
        == "book:x:A-B"
    resume = Resume(["bars", "book"], ["coinbase:*"], depth=10, throttle_ms=100)
    assert resume.accept(bar) and resume.accept({**bar, "interval": "5m"})
    assert resume.accept({**bar, "partial": True})  # the bar in progress, at seq 4
    assert not resume.accept(bar)  # printed already
    resume.epoch = "e"
    request = resume.subscribe()
    assert request["depth"] == 10 and request["throttle_ms"] == 100
    assert request["since"] == {"bars:coinbase:SKL-USD:1m": 4, "bars:coinbase:SKL-USD:5m": 4}


async def test_tail_prints_depth_views(captures: Path) -> None:
    from daemon.events import BookSnapshot, BookUpdate

    events = [e for e in coinbase_events(captures)
              if isinstance(e, BookSnapshot | BookUpdate) and e.symbol == "SKL-USD"]
    out, err = io.StringIO(), io.StringIO()
    async with trio.open_nursery() as nursery:
        running = await start(nursery, views=True)
        nursery.start_soon(lambda: tail_events(
            running.url, ["book"], ["coinbase:SKL-USD"], depth=5, out=out, err=err,
            backoff=Backoff(**FAST)))
        with trio.fail_after(10):
            while not running.dispatcher.subscriptions.get(running.views):
                await trio.sleep(0.01)
        await publish(running, events)
        key = "views:coinbase:SKL-USD:5:0"
        with trio.fail_after(10):
            # every book event published, and the views made of them, before the
            # last view printed is compared with the stream's
            while running.dispatcher.streams["book:coinbase:SKL-USD"].seq < len(events):  # noqa: ASYNC110
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked(0.05)
            while (key not in running.dispatcher.streams
                   or not printed(out)
                   or printed(out)[-1]["seq"] != running.dispatcher.streams[key].seq):
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    views = printed(out)
    assert all(v["type"] == "book_snapshot" and v["depth"] == 5 for v in views)
    assert all(len(v["bids"]) <= 5 and len(v["asks"]) <= 5 for v in views)
    assert [v["seq"] for v in views] == list(range(views[0]["seq"], views[-1]["seq"] + 1))
    last = orjson.loads(running.dispatcher.streams[key].latest.payload)
    assert views[-1] == last
