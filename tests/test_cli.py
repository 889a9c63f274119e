"""The ``tickwire`` command as a user runs it: real subprocesses, real sockets."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import trio
import trio_websocket

from tests.daemon_process import reaped
from tests.helpers import receive_until, request

TICKWIRE = [sys.executable, "-m", "daemon.cli"]
BINANCE = ("BINANCE.0", "BINANCE.ws.1.0", "BINANCE.http.0.0")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TICKWIRE, *args], capture_output=True, text=True, timeout=60)


def test_check_config_accepts_the_default_config() -> None:
    default = Path(__file__).parent.parent / "daemon" / "default.toml"
    result = run_cli("check-config", str(default))
    assert result.returncode == 0, result.stderr
    assert "binance" in result.stdout and "kraken" in result.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nport = 80\n", "extra fields found (port) @ server"),
        ('[server]\nlisten = "localhost"\n', "must be HOST:PORT, got 'localhost' @ server.listen"),
        ("[server]\nclient_queue = 1.9\n", "expected an integer, got 1.9 @ server.client_queue"),
        ('[server]\nclient_queue = "10"\n', "expected an integer, got '10' @ server.client_queue"),
        ('[exchanges.binance]\nsymbols = ["BTCUSDT"]\n',
         "'BTCUSDT' is not BASE-QUOTE in upper case @ exchanges.binance.symbols"),
        ('[exchanges.binance]\nsymbols = ["BTC-USDT"]\nchannels = ["candles"]\n',
         "unknown channel 'candles', expected one of trades, book, ticker @ exchanges.binance.channels"),
        ('log_level = "loud"\n', "'loud' is not one of debug, info, warning, error @ log_level"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_a_config_error_is_one_clear_line_and_exit_2(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for command in (["check-config", str(path)], ["run", "--config", str(path)]):
        result = run_cli(*command)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("tickwire: config error: ")
        assert message in lines[0]


def test_a_missing_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("check-config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr and len(result.stderr.strip().splitlines()) == 1


async def start_replay(captures: Path, *args: str) -> tuple[trio.Process, int, list[str]]:
    """``tickwire replay`` as a subprocess; returns it, its port and its log lines."""
    process = await trio.lowlevel.open_process(
        [*TICKWIRE, "replay", *(str(captures / f) for f in BINANCE),
         "--listen", "127.0.0.1:0", *args],
        stderr=subprocess.PIPE,
    )
    lines: list[str] = []
    buffer = b""
    with trio.fail_after(30):
        while True:
            chunk = await process.stderr.receive_some()
            assert chunk, f"tickwire replay ended: {b''.join([buffer]).decode()}"
            buffer += chunk
            *done, buffer = buffer.split(b"\n")
            lines += [line.decode() for line in done]
            for line in lines:
                found = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", line)
                if found:
                    return process, int(found.group(1)), lines


async def test_sigterm_during_replay_closes_clients_with_1001_and_exits_0(captures: Path) -> None:
    process, port, _ = await start_replay(captures, "--speed", "1")
    async with reaped(process):
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}") as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["book"],
                               "symbols": ["binance:NKN-USDT"]})
            await receive_until(ws, lambda m: m["type"] == "book_update", seconds=30)
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            assert closed.value.reason.code == 1001
        with trio.fail_after(10):
            assert await process.wait() == 0


async def test_tail_prints_the_stream_one_event_a_line(captures: Path) -> None:
    process, port, _ = await start_replay(captures, "--speed", "2")
    try:
        tail = await trio.lowlevel.open_process(
            [*TICKWIRE, "tail", "--url", f"ws://127.0.0.1:{port}", "book", "binance:NKN-USDT"],
            stdout=subprocess.PIPE,
        )
        output = b""
        with trio.fail_after(30):
            while output.count(b"\n") < 5:
                output += await tail.stdout.receive_some()
        tail.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            await tail.wait()
        events = [orjson.loads(line) for line in output.splitlines()[:5]]
        assert events[0]["type"] == "book_snapshot" and events[0]["symbol"] == "NKN-USDT"
        assert all(e["type"] == "book_update" for e in events[1:])
        assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[0]["seq"] + 5))
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0


def test_replay_refuses_a_bad_speed(captures: Path) -> None:
    result = run_cli("replay", str(captures / "BINANCE.0"), "--speed", "fast")
    assert result.returncode == 2 and "--speed" in result.stderr


def test_version() -> None:
    from daemon import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout
