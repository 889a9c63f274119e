"""The admin socket and ``tickwire status``: real daemons (subprocesses, or in
process for fault injection), real Unix sockets."""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path

import orjson
import pytest
import trio
import trio_websocket

from daemon.admin import parse_request
from daemon.config import Config, structure_config
from daemon.replay.capture import read_capture
from daemon.replay.run import serve_replay
from daemon.replay.tape import Faults, merge_frames
from tests.daemon_process import admin, run_cli, tickwire, write_config
from tests.helpers import messages, request

ALL = ("BINANCE.0", "BINANCE.ws.1.0", "BINANCE.http.0.0", "COINBASE.0", "COINBASE.ws.28.0",
       "KRAKEN.0", "KRAKEN.ws.48.0", "KRAKEN.ws.49.0", "KRAKEN.ws.50.0")
KRAKEN = ("KRAKEN.0", "KRAKEN.ws.48.0", "KRAKEN.ws.49.0", "KRAKEN.ws.50.0")


def config_text(sock: Path, extra: str = "") -> str:
    return (f'[server]\nlisten = "127.0.0.1:0"\n[admin]\nsocket = "{sock}"\n'
            f"[reporter]\ncheck = 0.2\ninterval = 1.0\n{extra}")


def feeds_of(status: dict) -> dict[str, dict]:
    return {c["name"]: c for c in status["components"] if c["kind"] == "feed"}


async def test_status_during_a_replay_shows_every_feed_healthy_with_live_figures(
    captures: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "admin.sock"
    config = write_config(tmp_path / "tickwire.toml", config_text(sock))
    async with tickwire("replay", *(str(captures / f) for f in ALL), "--speed", "3",
                        "--config", str(config)) as daemon:
        port = int((await daemon.wait_for(r"listening on ws://127\.0\.0\.1:(\d+)")).group(1))
        await daemon.wait_for(r"tickwire \S+ started")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        assert stat.S_ISSOCK(os.stat(sock).st_mode)

        with trio.fail_after(20):  # every feed up and streaming
            while True:
                (status,) = await admin(sock, {"op": "status", "id": 1})
                feeds = feeds_of(status)
                if status["health"] == "healthy" and len(feeds) == 3 and all(
                    f["health"] == "healthy" and (f["figures"]["messages_per_second"] or 0) > 0
                    and all(book["synced"] for book in f["figures"]["books"].values())
                    for f in feeds.values()
                ):
                    break
                await trio.sleep(0.2)
        assert status["type"] == "status" and status["id"] == 1
        assert status["version"] and status["epoch"] and status["pid"] and status["uptime"] > 0
        assert {c["name"]: c["criticality"] for c in status["components"]} == {
            "dispatcher": "critical", "server": "critical", "admin": "critical",
            "publish": "degraded", "derived views": "degraded", "feed:binance": "degraded",
            "feed:coinbase": "degraded", "feed:kraken": "degraded"}
        for feed in feeds.values():
            f = feed["figures"]
            assert f["state"] == "subscribed" and f["last_message_age"] < 5
            assert len(f["books"]) >= 4 and all(book["seq"] > 0 for book in f["books"].values())
        assert feeds["feed:kraken"]["figures"]["checksum_ok"] > 0
        assert feeds["feed:coinbase"]["figures"]["book_updates"] > 0
        # the figures are live: they move between two requests
        await trio.sleep(0.5)
        (later,) = await admin(sock, {"op": "feeds"})
        moved = {f["name"]: f["figures"]["messages"] for f in later["feeds"]}
        assert moved["feed:coinbase"] > feeds["feed:coinbase"]["figures"]["messages"]

        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}") as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades", "book"],
                               "symbols": ["kraken:*"]})
            await ws.get_message()
            (clients,) = await admin(sock, {"op": "clients"})
            (client,) = clients["clients"]
            assert client["subscriptions"] == ["book:kraken:*", "trades:kraken:*"]
            assert client["sent"] >= 1 and "queue" in client
            assert re.fullmatch(r"127\.0\.0\.1:\d+", client["address"])

            result = await run_cli("status", "--socket", str(sock))
            assert result.returncode == 0, result.stderr
            table = result.stdout.decode()
            for word in ("healthy", "binance", "coinbase", "kraken", client["address"],
                         "book:kraken:*", "derived views: "):
                assert word in table
            result = await run_cli("status", "--socket", str(sock), "--json")
            assert result.returncode == 0
            assert orjson.loads(result.stdout)["health"] == "healthy"
            result = await run_cli("clients", "--socket", str(sock), "--json")
            assert result.returncode == 0
            assert orjson.loads(result.stdout)["clients"][0]["address"] == client["address"]
    assert not sock.exists()  # removed at exit


async def test_malformed_requests_get_errors_and_the_connection_goes_on(
    captures: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "admin.sock"
    config = write_config(tmp_path / "tickwire.toml", config_text(sock))
    async with tickwire("run", "--config", str(config)) as daemon:
        await daemon.wait_for(r"tickwire \S+ started")
        replies = await admin(
            sock, b"not json", b"[1, 2]", b'{"id": 4}', b'{"op": "dance", "id": 5}',
            b'{"op": "status", "id": 6, "verbose": true}', b'{"op": 7}', b"\xff\xfe",
            {"op": "status", "id": 9},
        )
        codes = [(r["type"], r.get("code"), r["id"]) for r in replies]
        assert codes == [
            ("error", "invalid_json", None), ("error", "invalid_request", None),
            ("error", "invalid_request", 4), ("error", "unknown_op", 5),
            ("error", "invalid_request", 6), ("error", "invalid_request", None),
            ("error", "invalid_json", None), ("status", None, 9),
        ]
        assert all(r["message"] for r in replies[:-1])
        # a line too long is refused and that connection closed; the daemon goes on
        (reply,) = await admin(sock, b"x" * 200_000)  # above 2 x publish.max_message_bytes
        assert reply["code"] == "request_too_large"
        (metrics,) = await admin(sock, {"op": "metrics"})
        names = {s["name"] for s in metrics["samples"]}
        assert {"tickwire_health", "tickwire_dispatcher_events_total"} <= names
        assert "level=error" not in daemon.log()


async def test_a_stale_socket_is_replaced_a_second_daemon_refuses_and_status_exit_codes(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "admin.sock"
    # a crashed run leaves its socket file behind: nobody answers on it
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    assert sock.exists()
    result = await run_cli("status", "--socket", str(sock))
    assert result.returncode == 2 and "unreachable" in result.stderr.decode()

    # a feed that cannot reach its exchange: the daemon runs, degraded
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
    config = write_config(tmp_path / "tickwire.toml", config_text(sock, (
        f'[exchanges.kraken]\nsymbols = ["BTC-USD"]\nfallback_after = 0.0\n'
        f'rest_url = "http://{dead}"\nws_url = "ws://{dead}"\n'
        '[reconnect]\nbase = 0.05\ncap = 0.2\n')))
    async with tickwire("run", "--config", str(config)) as first:
        await first.wait_for(r"tickwire \S+ started")
        assert "replacing the stale socket" in first.log()
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660

        async with tickwire("run", "--config", str(config)) as second:
            with trio.fail_after(15):
                assert await second.process.wait() == 2
            await second.ended.wait()
        refusal = [line for line in second.lines if line.startswith("tickwire: ")]
        assert refusal == [
            f"tickwire: another tickwire (pid {first.process.pid}) is already running with "
            f"admin socket {sock}; stop it first, or give this one another admin.socket"
        ]
        assert first.process.returncode is None and sock.exists()

        result = await run_cli("status", "--socket", str(sock))
        assert result.returncode == 1, result.stdout
        assert "degraded" in result.stdout.decode() and "kraken" in result.stdout.decode()
        (status,) = await admin(sock, {"op": "status"})
        assert status["health"] == "degraded"
        kraken = feeds_of(status)["feed:kraken"]
        assert kraken["health"] == "unhealthy" and kraken["reason"] == "failed"
        # the cause, in the answer and in what status prints
        assert "Connection refused" in kraken["figures"]["last_error"]
        assert "kraken: last error" in result.stdout.decode()
        assert "Connection refused" in result.stdout.decode()
        result = await run_cli("clients", "--socket", str(sock))
        assert result.returncode == 1
    assert first.process.returncode == 0
    assert not sock.exists()
    result = await run_cli("status", "--socket", str(sock))
    assert result.returncode == 2 and "no admin socket" in result.stderr.decode()


async def test_status_exits_2_when_the_daemon_reports_unhealthy(tmp_path: Path) -> None:
    """A critical component down ends the daemon soon after; while it lasts, the
    command says so with exit code 2 (a stand-in daemon answers here)."""
    sock = tmp_path / "admin.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(sock))
    listener.listen()

    async def answer(stream: trio.SocketStream) -> None:
        data = b""
        while data.count(b"\n") < 2:
            data += await stream.receive_some()
        for line in data.splitlines():
            request = parse_request(line)
            body = {"type": request.op, "id": request.id, "health": "unhealthy", "clients": [],
                    "components": [{"name": "dispatcher", "kind": "dispatcher",
                                    "criticality": "critical", "health": "unhealthy",
                                    "reason": "stalled", "figures": {}}]}
            await stream.send_all(orjson.dumps(body) + b"\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, answer, [trio.SocketListener(listener)])
        result = await run_cli("status", "--socket", str(sock))
        nursery.cancel_scope.cancel()
    assert result.returncode == 2
    assert "unhealthy" in result.stdout.decode() and "stalled" in result.stdout.decode()


def kraken_config(sock: Path) -> Config:
    return structure_config({
        "server": {"listen": "127.0.0.1:0"},
        "admin": {"socket": str(sock)},
        "reconnect": {"base": 0.05, "cap": 0.2},
        "reporter": {"check": 0.1, "interval": 1.0, "recent": 1.5},
    })


async def test_a_feed_killed_by_the_emulator_shows_degraded_then_healthy_again(
    captures: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "admin.sock"
    tape = merge_frames([read_capture(captures / f) for f in KRAKEN])
    faults = {"kraken": Faults(close=frozenset({len(tape) // 4}))}
    async with trio.open_nursery() as nursery:
        replay = await nursery.start(serve_replay, [captures / f for f in KRAKEN],
                                     kraken_config(sock), 4.0, faults)
        with trio.fail_after(30):
            for wanted in ("healthy", "degraded", "healthy"):
                while True:
                    (status,) = await admin(sock, {"op": "status"})
                    kraken = feeds_of(status)["feed:kraken"]
                    if status["health"] == wanted:
                        break
                    await trio.sleep(0.05)
                if wanted == "degraded":
                    assert kraken["health"] in ("unhealthy", "degraded")
                    assert kraken["reason"] in ("reconnecting", "connecting") or (
                        "1 reconnect in the last 1.5s" in kraken["reason"])
        assert kraken["health"] == "healthy" and kraken["figures"]["reconnects"] == 1
        with trio.fail_after(5):  # the reporter logs the change at its next check
            while True:
                (status,) = await admin(sock, {"op": "status"})
                changes = [(t["component"], t["health"]) for t in status["transitions"]]
                if changes[-1] == ("feed:kraken", "healthy") and len(changes) >= 3:
                    break
                await trio.sleep(0.05)
        assert changes[0] == ("feed:kraken", "healthy")  # from starting
        assert {health for _, health in changes[1:-1]} <= {"unhealthy", "degraded"}

        # a late subscriber gets the transitions the dispatcher retained
        port = replay.app.port
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}") as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["system"],
                               "symbols": ["tickwire:*"], "history": 20})
            got = []
            with trio.move_on_after(1):
                while True:
                    got += [m for m in messages(await ws.get_message())
                            if m["type"] == "health_change"]
            assert [(m["component"], m["health"]) for m in got] == changes
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("variable", ["RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR", None])
def test_the_default_socket_path(variable: str | None) -> None:
    from daemon.admin import default_socket_path

    env = {variable: "/run/x"} if variable else {}
    expected = {"RUNTIME_DIRECTORY": "/run/x/admin.sock",
                "XDG_RUNTIME_DIR": "/run/x/tickwire/admin.sock",
                None: f"/tmp/tickwire-{os.getuid()}/admin.sock"}[variable]
    assert str(default_socket_path(env)) == expected
