"""systemd's side of ``Type=notify``, played by the test: a real datagram socket as
``$NOTIFY_SOCKET``, a real daemon subprocess, real emulated exchanges. And
``systemd-analyze verify`` on the unit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio_websocket

from daemon.replay.capture import read_capture
from daemon.replay.emulator import Emulator
from tests.daemon_process import admin, tickwire, write_config
from tests.helpers import receive_until, request

ROOT = Path(__file__).parent.parent
KRAKEN = ("KRAKEN.0", "KRAKEN.ws.48.0", "KRAKEN.ws.49.0", "KRAKEN.ws.50.0")
COINBASE = ("COINBASE.0", "COINBASE.ws.28.0")


def exchange_toml(name: str, emulator: Emulator, symbols: list[str], channels: list[str]) -> str:
    assert emulator.address is not None
    quoted = ", ".join(f'"{s}"' for s in symbols)
    channel_list = ", ".join(f'"{c}"' for c in channels)
    return (f"[exchanges.{name}]\nsymbols = [{quoted}]\nchannels = [{channel_list}]\n"
            f'fallback_after = 0.0\nrest_url = "{emulator.address.rest_url}"\n'
            f'ws_url = "{emulator.address.ws_url}"\n')


async def test_systemd_hears_ready_status_watchdog_reload_and_stopping(
    captures: Path, tmp_path: Path
) -> None:
    received: list[tuple[float, list[str]]] = []
    arrived = trio.Event()

    async def listen(sock: trio.socket.SocketType) -> None:
        nonlocal arrived
        while True:
            data = await sock.recv(4096)
            received.append((time.monotonic(), data.decode().split("\n")))
            arrived.set()
            arrived = trio.Event()

    def lines() -> list[str]:
        return [line for _, datagram in received for line in datagram]

    async def wait_line(line: str, after: int = 0) -> int:
        """Index (in ``lines()``) of the first ``line`` at or past ``after``."""
        with trio.fail_after(20):
            while True:
                found = [i for i, seen in enumerate(lines()) if i >= after and seen == line]
                if found:
                    return found[0]
                await arrived.wait()

    notify_path = tmp_path / "notify.sock"
    sock = tmp_path / "admin.sock"
    async with trio.open_nursery() as nursery:
        systemd = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
        await systemd.bind(str(notify_path))
        nursery.start_soon(listen, systemd)
        emulators = {}
        for name, files in (("kraken", KRAKEN), ("coinbase", COINBASE)):
            captured = [read_capture(captures / f) for f in files]
            emulators[name] = (Emulator(captured, speed=1.0), captured)
            await nursery.start(emulators[name][0].serve)
        kraken, kraken_captures = emulators["kraken"]
        k_symbols, k_channels = kraken.venue.subscriptions(kraken_captures)
        coinbase, coinbase_captures = emulators["coinbase"]
        c_symbols, c_channels = coinbase.venue.subscriptions(coinbase_captures)
        base = ('[server]\nlisten = "127.0.0.1:0"\n'
                f'[admin]\nsocket = "{sock}"\n[reporter]\ncheck = 0.1\ninterval = 1.0\n'
                + exchange_toml("coinbase", coinbase, c_symbols, c_channels))
        config = write_config(tmp_path / "tickwire.toml",
                              base + exchange_toml("kraken", kraken, k_symbols[:3], k_channels))
        env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
        async with tickwire("run", "--config", str(config), env=env) as daemon:
            ready = await wait_line("READY=1")
            port = int((await daemon.wait_for(r"listening on ws://127\.0\.0\.1:(\d+)")).group(1))
            (status,) = await admin(sock, {"op": "feeds"})
            assert {f["name"] for f in status["feeds"]} == {"feed:kraken", "feed:coinbase"}
            first_ping = await wait_line("WATCHDOG=1")
            # READY (with STATUS in the same datagram) comes before any ping
            assert lines()[0] == "READY=1" and lines()[1].startswith("STATUS=")
            assert lines()[1].split("=", 1)[1].split(":")[0] in ("healthy", "degraded")
            assert ready < first_ping

            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}") as ws:
                await ws.get_message()
                await request(ws, {"op": "subscribe", "id": 1, "channels": ["book"],
                                   "symbols": ["coinbase:*"]})
                await receive_until(ws, lambda m: m["type"] == "book_update", seconds=15)

                # reload: kraken gets more symbols; coinbase is not touched
                write_config(config, base + exchange_toml("kraken", kraken, k_symbols, k_channels))
                (before,) = await admin(sock, {"op": "feeds"})
                start = time.monotonic_ns() // 1000
                daemon.process.send_signal(signal.SIGHUP)
                reloading = await wait_line("RELOADING=1", after=first_ping)
                ready_again = await wait_line("READY=1", after=reloading)
                end = time.monotonic_ns() // 1000
                usec = lines()[reloading + 1]
                assert usec.startswith("MONOTONIC_USEC=")
                assert start <= int(usec.split("=")[1]) <= end
                await daemon.wait_for(r"reload: restarted kraken")

                # the client stayed connected and its stream goes on
                await request(ws, {"op": "ping", "id": 2})
                await receive_until(ws, lambda m: m["type"] == "pong")
                await receive_until(ws, lambda m: m["type"] == "book_update", seconds=15)
                (after,) = await admin(sock, {"op": "feeds"})
                old = {f["name"]: f["figures"] for f in before["feeds"]}
                new = {f["name"]: f["figures"] for f in after["feeds"]}
                assert len(new["feed:kraken"]["books"]) == len(k_symbols) > 3
                assert new["feed:kraken"]["running_for"] < old["feed:kraken"]["running_for"]
                assert new["feed:coinbase"]["running_for"] > old["feed:coinbase"]["running_for"]
                pings_after_reload = await wait_line("WATCHDOG=1", after=ready_again)
                assert pings_after_reload > ready_again

                daemon.process.send_signal(signal.SIGTERM)
                stopping = await wait_line("STOPPING=1", after=ready_again)
            with trio.fail_after(10):
                assert await daemon.process.wait() == 0

        # pings every half WATCHDOG_USEC, from READY until STOPPING
        pings = [at for at, datagram in received if datagram == ["WATCHDOG=1"]]
        gaps = sorted(b - a for a, b in zip(pings, pings[1:], strict=False))
        assert gaps and all(0.35 < gap < 0.9 for gap in gaps), gaps  # about 0.5 s
        assert "READY=1" not in lines()[stopping:]
        nursery.cancel_scope.cancel()


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """The unit as shipped; only ExecStart's binary is this environment's tickwire
    (systemd-analyze checks that the binary exists)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (.ci/run installs it as root)")
    unit = (ROOT / "systemd" / "tickwire.service").read_text()
    assert "ExecStart=/opt/tickwire/bin/tickwire run --config /etc/tickwire/tickwire.toml" in unit
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "RuntimeDirectory=tickwire",
                 "DynamicUser=yes", "ProtectSystem=strict", "ProtectHome=yes",
                 "NoNewPrivileges=yes", "PrivateTmp=yes", "RestrictAddressFamilies=",
                 "CapabilityBoundingSet=\n", "SystemCallFilter=@system-service"):
        assert line in unit
    here = Path(sys.executable).parent / "tickwire"
    assert here.exists(), "tickwire is not installed in this environment"
    copy = tmp_path / "tickwire.service"
    copy.write_text(unit.replace("/opt/tickwire/bin/tickwire", str(here)))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    assert result.returncode == 0, result.stderr
    assert "tickwire.service" not in result.stderr, result.stderr


def test_systemd_analyze_verify_accepts_the_role_template(tmp_path: Path) -> None:
    """``tickwire@.service``: one instance per cluster role (docs/cluster.md), its
    config ``/etc/tickwire/%i.toml`` and a runtime directory (admin socket) of its
    own; an instance of it passes ``systemd-analyze verify``."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (.ci/run installs it as root)")
    unit = (ROOT / "systemd" / "tickwire@.service").read_text()
    for line in ("ExecStart=/opt/tickwire/bin/tickwire run --config /etc/tickwire/%i.toml",
                 "RuntimeDirectory=tickwire-%i", "Type=notify", "DynamicUser=yes"):
        assert line in unit
    here = Path(sys.executable).parent / "tickwire"
    copy = tmp_path / "tickwire@edge.service"
    copy.write_text(unit.replace("/opt/tickwire/bin/tickwire", str(here)))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    assert result.returncode == 0, result.stderr
    assert "tickwire@" not in result.stderr, result.stderr
