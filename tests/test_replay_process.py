"""Emulators in child processes: ``tickwire emulate`` and ``tickwire replay
--emulators process``, with real subprocesses and real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio_websocket

from daemon.replay.capture import read_capture
from daemon.replay.emulator import make_venue
from daemon.replay.process import (
    EmulatorProcess,
    EmulatorProcessError,
    JsonLines,
    run_emulator_process,
)
from daemon.replay.run import serve_replay
from daemon.replay.tape import Faults
from tests.daemon_process import reaped
from tests.helpers import apply_levels, messages, request
from tests.test_replay_loop import COINBASE, coinbase_final_books, local_config, recorded

TICKWIRE = [sys.executable, "-m", "daemon.cli"]


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_replay_with_the_emulator_in_a_child_process(captures: Path) -> None:
    """The Coinbase capture played by a child ``tickwire emulate`` to the daemon's
    native collector: the child is a real process of this one, the replay learns
    the end of its tape, the client gets every recorded trade once with contiguous
    ``seq`` and the recording's final books; cancelling the replay ends the child."""
    frames = recorded(captures, COINBASE)
    n_trades = sum(1 for m in frames if m["type"] in ("match", "last_match"))
    got: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(partial(
            serve_replay, [captures / name for name in COINBASE], local_config(),
            speed=None, emulators="process"))
        child = replay.emulators["coinbase"]
        assert isinstance(child, EmulatorProcess) and child.pid != os.getpid()
        assert alive(child.pid)
        cmdline = await trio.Path(f"/proc/{child.pid}/cmdline").read_bytes()
        assert b"emulate" in cmdline
        async with trio_websocket.open_websocket_url(
                f"ws://127.0.0.1:{replay.app.port}") as ws:
            await request(ws, {"op": "subscribe", "id": 1,
                               "channels": ["trades", "book", "ticker"],
                               "symbols": ["coinbase:*"], "history": 1000})
            with trio.fail_after(60):
                await replay.wait_finished()
                while sum(m["type"] == "trade" for m in got) < n_trades:
                    got += messages(await ws.get_message())
                with trio.move_on_after(0.5):  # what the daemon still holds
                    while True:
                        got += messages(await ws.get_message())
        nursery.cancel_scope.cancel()
    with trio.fail_after(10):
        while alive(child.pid):
            await trio.sleep(0.05)

    trades = [(m["symbol"], m["id"]) for m in got if m["type"] == "trade"]
    assert len(trades) == len(set(trades)) == n_trades
    # trades: contiguous seq per stream; books: contiguous from each snapshot (a
    # client that falls behind gets a conflated snapshot in place of its backlog)
    expected: dict[tuple[str, str], int] = {}
    books: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    for m in got:
        if m["type"] not in ("trade", "book_snapshot", "book_update"):
            continue
        stream = ("book" if m["type"].startswith("book") else "trades", m["symbol"])
        if m["type"] != "book_snapshot" and stream in expected:
            assert m["seq"] == expected[stream], (stream, m["seq"], expected[stream])
        expected[stream] = m["seq"] + 1
        if m["type"] == "book_snapshot":
            books[m["symbol"]] = ({}, {})
        if m["type"] != "trade":
            apply_levels(books[m["symbol"]][0], m["bids"])
            apply_levels(books[m["symbol"]][1], m["asks"])
    assert books == coinbase_final_books(frames)
    stats = replay.app.collectors["coinbase"].feed.stats
    assert (stats.resyncs, stats.malformed, stats.gaps) == (0, 0, 0)


async def test_child_emulators_refuse_what_only_an_inside_emulator_does(captures: Path) -> None:
    paths = [captures / name for name in COINBASE]
    for kwargs in ({"via": "ccxt"}, {"faults": {"coinbase": Faults(drop=frozenset({3}))}},
                   {"passes": 2, "loop": True}):
        with pytest.raises(ValueError, match="child processes"):
            await serve_replay(paths, local_config(), emulators="process", **kwargs)
    with pytest.raises(ValueError, match="emulators must be"):
        await serve_replay(paths, local_config(), emulators="thread")


async def test_a_child_that_cannot_start_is_an_error(tmp_path: Path) -> None:
    """Not a capture file: the child exits at once (its error on stderr), and the
    replay gets ``EmulatorProcessError`` rather than waiting."""
    bogus = tmp_path / "bogus.0"
    bogus.write_text("this is not a capture\n")
    with trio.fail_after(60), pytest.raises(ExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_emulator_process, "coinbase", [bogus], None))
    assert raised.group_contains(EmulatorProcessError, match="did not start")


async def test_emulate_prints_where_it_listens_and_stops_on_sigterm(captures: Path) -> None:
    """``tickwire emulate``: one JSON line when it listens (URLs, the recorded
    symbols and channels), one when its tape has played; it answers REST on its
    URL; SIGTERM ends it with status 0."""
    process = await trio.lowlevel.open_process(
        [*TICKWIRE, "emulate", *(str(captures / f) for f in COINBASE), "--speed", "max"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = JsonLines(process.stdout)
    async with reaped(process):
        with trio.fail_after(60):
            ready = await out.next()
        assert ready is not None, "tickwire emulate ended early"
        venue = make_venue("coinbase", [read_capture(captures / f) for f in COINBASE])
        symbols, channels = venue.subscriptions(
            [read_capture(captures / f) for f in COINBASE])
        assert ready["exchange"] == "coinbase" and ready["ws_url"].startswith("ws://127.0.0.1:")
        assert (ready["symbols"], ready["channels"]) == (symbols, channels)
        async with httpx.AsyncClient() as http:
            products = await http.get(ready["rest_url"] + "/products")
        assert products.status_code == 200
        assert set(symbols) <= {p["id"] for p in products.json()}
        # the tape starts when a connection subscribes: subscribe, read it all
        async with (
            trio_websocket.open_websocket_url(ready["ws_url"]) as ws,
            trio.open_nursery() as nursery,
        ):
            await ws.send_message(orjson.dumps({
                "type": "subscribe", "product_ids": symbols,
                "channels": ["level2", "matches", "ticker"]}).decode())

            async def read() -> None:
                while True:
                    await ws.get_message()

            nursery.start_soon(read)
            with trio.fail_after(60):
                finished = await out.next()
            nursery.cancel_scope.cancel()
        assert finished == {"exchange": "coinbase", "finished": True}
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


async def test_sigterm_ends_the_replay_and_its_emulator_process(captures: Path) -> None:
    """``tickwire replay --emulators process`` as under systemd: a client gets the
    book through the child emulator; SIGTERM ends the daemon with status 0 and
    leaves no emulator process behind."""
    from tests.test_cli import start_replay

    process, port, _ = await start_replay(captures, "--speed", "1", "--emulators", "process")
    async with reaped(process):
        children = await trio.to_thread.run_sync(children_of, process.pid)
        assert len(children) == 1
        cmdline = await trio.Path(f"/proc/{children[0]}/cmdline").read_bytes()
        assert b"emulate" in cmdline
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}") as ws:
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["book"],
                               "symbols": ["binance:NKN-USDT"]})
            with trio.fail_after(30):
                while not any(m["type"] == "book_update"
                              for m in messages(await ws.get_message())):
                    pass
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.wait() == 0
            while alive(children[0]):
                await trio.sleep(0.05)


async def test_an_emulator_process_does_not_outlive_a_killed_daemon(captures: Path) -> None:
    """SIGKILL leaves the daemon no chance to stop its child: the child ends by
    itself when its stdin, the daemon's end of a pipe, closes."""
    from tests.test_cli import start_replay

    process, _, _ = await start_replay(captures, "--speed", "1", "--emulators", "process")
    async with reaped(process):
        children = await trio.to_thread.run_sync(children_of, process.pid)
        assert len(children) == 1 and alive(children[0])
        process.kill()
        await process.wait()
        with trio.fail_after(15):
            while alive(children[0]):
                await trio.sleep(0.05)
