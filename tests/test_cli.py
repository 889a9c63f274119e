"""The ``tickwire`` command as a user runs it: real subprocesses, real sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
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
        ('[derived.bars]\nintervals = ["1x"]\n',
         "'1x' is not an interval (a number and s, m, h or d: 1s, 1m, 5m) @ derived.bars.intervals"),
        ("[server\n", "not valid TOML"),
        ('[auth]\nenabled = "on"\n',
         'authentication is on (auth.enabled = "on") but no token is configured'),
        ('[server]\nlisten = "0.0.0.0:8765"\n',
         'auth.enabled = "auto" and server.listen 0.0.0.0:8765 is not a loopback address'),
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


def test_auth_off_or_on_loopback_needs_no_token(tmp_path: Path) -> None:
    for text in ('[server]\nlisten = "0.0.0.0:8765"\n[auth]\nenabled = "off"\n',
                 '[server]\nlisten = "[::1]:8765"\n'):
        path = tmp_path / "ok.toml"
        path.write_text(text)
        result = run_cli("check-config", str(path))
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", [["check-config"], ["run", "--config"],
                                     ["replay", str(Path(__file__)), "--config"]])
def test_a_missing_config_file_is_one_line_and_exit_2(tmp_path: Path, command: list[str]) -> None:
    """The line says what to do: copy the example it names to that path; doing so
    gives a config that check-config accepts."""
    missing = tmp_path / "nope.toml"
    result = run_cli(*command, str(missing))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        f"tickwire: config error: cannot read {missing}: No such file or directory; ")
    found = re.search(r"copy the example (\S+) to (\S+) and edit it", line)
    assert found is not None, line
    example, target = Path(found[1]), Path(found[2])
    assert target == missing and example.name == "default.toml"
    target.write_bytes(example.read_bytes())  # what the line says to do
    checked = run_cli("check-config", str(target))
    assert checked.returncode == 0, checked.stderr


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


def the_line(result: subprocess.CompletedProcess) -> str:
    """The one line a start-up failure prints for people (log records, ``ts=...``,
    may come before it), after checking that there is exactly one and no traceback."""
    assert "Traceback" not in result.stderr and "exc=" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("ts=")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tickwire: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["replay", "emulate"])
def test_a_file_that_is_not_a_capture_is_one_line_and_exit_2(
        tmp_path: Path, captures: Path, command: str) -> None:
    """A README, LICENSE or Markdown file alone leaves nothing to replay; any other
    file that is no capture is refused, even beside good captures."""
    readme = Path(__file__).parent.parent / "README.md"
    result = run_cli(command, str(readme))
    assert result.returncode == 2
    line = the_line(result)
    assert f"no capture file among {readme} (README*, LICENSE*, *.md files are not captures)" in line
    assert "tests/captures/README.md" in line
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    kraken = sorted(str(p) for p in captures.glob("KRAKEN.*"))
    result = run_cli(command, *kraken, str(notes), "--speed", "max")
    assert result.returncode == 2
    line = the_line(result)
    assert f"{notes}:1: not a capture file" in line and "tests/captures/README.md" in line
    binary = tmp_path / "BINANCE.ws.1.0"
    binary.write_bytes(b"\xff\xfe\x00binary")
    result = run_cli(command, str(binary))
    assert result.returncode == 2
    assert "not a capture file (not UTF-8 text)" in the_line(result)


def captures_folder_with_notes(tmp_path: Path, captures: Path, form: str) -> tuple[Path, list[str]]:
    """A folder with every file of ``captures`` (links) and a README.md, a
    LICENSE.cryptofeed and a notes.md; the arguments naming it: its files as a shell
    glob would (``form="files"``), or the folder."""
    folder = tmp_path / "captures"
    folder.mkdir()
    for path in captures.iterdir():
        (folder / path.name).symlink_to(path.resolve())
    for name in ("README.md", "LICENSE.cryptofeed", "notes.md"):  # whatever TICKWIRE_CAPTURES holds
        if not (folder / name).exists():
            (folder / name).write_text("not a capture\n")
    return folder, sorted(str(p) for p in folder.iterdir()) if form == "files" else [str(folder)]


@pytest.mark.parametrize("form", ["files", "folder"])
async def test_replay_of_a_captures_folder_skips_its_readme_and_licence(
        tmp_path: Path, captures: Path, form: str) -> None:
    """``tickwire replay tests/captures/*`` (the shell names README.md and
    LICENSE.cryptofeed too) and ``tickwire replay tests/captures`` replay every
    exchange there; the files that are no captures are skipped with a debug line."""
    from tests.daemon_process import tickwire

    folder, given = captures_folder_with_notes(tmp_path, captures, form)
    config = tmp_path / "tickwire.toml"
    config.write_text(f'log_level = "debug"\n[server]\nlisten = "127.0.0.1:0"\n'
                      f'[admin]\nsocket = "{tmp_path / "admin.sock"}"\n')
    async with tickwire("replay", *given, "--speed", "max", "--config", str(config)) as daemon:
        await daemon.wait_for(r"started: .* 3 feeds", seconds=30)
        await daemon.wait_for(r"replay: every capture played", seconds=60)
        for name in ("README.md", "LICENSE.cryptofeed", "notes.md"):
            await daemon.wait_for(rf"level=debug .*{re.escape(str(folder / name))}: skipped, "
                                  r"not a capture", seconds=1)
    assert daemon.process.returncode == 0, daemon.log()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (("KRAKEN.0",), "no WebSocket recording of kraken among KRAKEN.0: add its KRAKEN.ws.* file(s)"),
        (("COINBASE.ws.28.0",), "no coinbase markets among COINBASE.ws.28.0: add its COINBASE.0 file"),
        (("BINANCE.0", "BINANCE.ws.1.0"),
         "no binance book snapshots among BINANCE.0, BINANCE.ws.1.0: add its BINANCE.http.* file(s)"),
    ],
)
@pytest.mark.parametrize("command", ["replay", "emulate"])
def test_an_incomplete_capture_set_is_one_line_and_exit_2(
        captures: Path, files: tuple[str, ...], message: str, command: str) -> None:
    """A set the emulator cannot serve is refused before anything starts (it used to
    start "0 feeds" and report healthy, or retry a missing REST snapshot forever)."""
    result = run_cli(command, *(str(captures / f) for f in files), "--speed", "max")
    assert result.returncode == 2
    assert message in the_line(result)
    assert "listening" not in result.stderr


def daemon_config(tmp_path: Path, extra: str = "", listen: str = "127.0.0.1:0") -> Path:
    """A config with no exchange (no network), its own admin socket, and ``extra``."""
    path = tmp_path / "tickwire.toml"
    path.write_text(f'[server]\nlisten = "{listen}"\n[admin]\nsocket = "{tmp_path / "admin.sock"}"\n'
                    + extra)
    return path


def busy_port() -> socket.socket:
    """A TCP socket listening on 127.0.0.1, its port taken for the test."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_busy_metrics_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with busy_port() as taken:
        port = taken.getsockname()[1]
        config = daemon_config(tmp_path, f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        result = run_cli("run", "--config", str(config))
    assert result.returncode == 2
    line = the_line(result)
    assert f"metrics: cannot listen on 127.0.0.1:{port}" in line and "in use" in line


def test_an_unassignable_metrics_address_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this machine
    config = daemon_config(tmp_path, '[metrics]\nlisten = "192.0.2.1:9108"\n')
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 2
    assert "metrics: cannot listen on 192.0.2.1:9108" in the_line(result)


def test_an_admin_socket_path_that_is_not_a_socket_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "admin.sock").write_text("not a socket")
    result = run_cli("run", "--config", str(daemon_config(tmp_path)))
    assert result.returncode == 2
    assert "exists and is not a socket" in the_line(result)


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["clients"]])
async def test_status_into_a_closed_pipe_ends_quietly_not_degraded(
        tmp_path: Path, command: list[str]) -> None:
    """``tickwire status | head -1``: a reader that goes away ends the command as
    SIGPIPE ends cat (the shell sees 141), not with a traceback and exit status 1,
    which means "degraded"."""
    from tests.daemon_process import run_cli as run_async
    from tests.daemon_process import tickwire

    sock = tmp_path / "admin.sock"
    config = daemon_config(tmp_path)
    async with tickwire("run", "--config", str(config)) as daemon:
        await daemon.wait_for(r"tickwire \S+ started")
        result = await run_async(*command, "--socket", str(sock))
        assert result.returncode == 0, result.stderr  # healthy, and a pipe that stays open
        assert result.stdout
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first write
        try:
            with trio.fail_after(30):
                closed = await trio.run_process(
                    [*TICKWIRE, *command, "--socket", str(sock)], stdout=write,
                    capture_stderr=True, check=False)
        finally:
            os.close(write)
    assert closed.returncode == -signal.SIGPIPE, closed.stderr
    assert closed.stderr == b""


def test_a_busy_websocket_port_is_one_line_and_exit_2(tmp_path: Path, captures: Path) -> None:
    """run and replay: a port another process listens on (a real socket, bound here)."""
    with busy_port() as taken:
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        run = run_cli("run", "--config", str(daemon_config(tmp_path, listen=listen)))
        replay = run_cli("replay", *(str(captures / f) for f in BINANCE), "--listen", listen,
                         "--config", str(daemon_config(tmp_path)))
    for result in (run, replay):
        assert result.returncode == 2
        line = the_line(result)
        assert f"cannot listen on {listen}" in line and "in use" in line
        assert "server.listen" in line


def test_an_unassignable_websocket_address_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, listen="192.0.2.1:8765",
                           extra='[auth]\nenabled = "off"\n')
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 2
    assert "cannot listen on 192.0.2.1:8765" in the_line(result)


def test_under_systemd_a_start_up_failure_is_one_journal_line_at_priority_err(tmp_path: Path) -> None:
    """With stderr the journal ($JOURNAL_STREAM names it), the line is a log record
    with priority 3 (err), so that journalctl -p err shows it."""
    log = tmp_path / "journal"
    with busy_port() as taken, log.open("wb") as stderr:
        info = os.fstat(stderr.fileno())
        port = taken.getsockname()[1]
        config = daemon_config(tmp_path, f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        result = subprocess.run([*TICKWIRE, "run", "--config", str(config)], stderr=stderr,
                                stdout=subprocess.DEVNULL, timeout=60,
                                env={**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
    assert result.returncode == 2
    lines = log.read_text().splitlines()
    errors = [line for line in lines if line.startswith("<3>")]
    assert len(errors) == 1 and f"cannot start: metrics: cannot listen on 127.0.0.1:{port}" in errors[0]
    assert not [line for line in lines if line.startswith("tickwire: ")]
    assert "Traceback" not in log.read_text()
