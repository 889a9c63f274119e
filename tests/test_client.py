"""``daemon.client`` and ``tickwire publish`` against real daemons: subprocesses
(``tickwire run``) and an ``App`` in this process for the trio flavour, over the
real admin Unix socket and the real HTTP listener on 127.0.0.1, with a real
WebSocket subscriber that checks what was delivered."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio_websocket
import trustme

from daemon import admin, client
from daemon.app import App
from daemon.config import load_config
from daemon.publish.endpoint import MAX_BATCH
from tests.daemon_process import TICKWIRE, Daemon, tickwire, write_config
from tests.daemon_process import admin as ask_admin
from tests.helpers import messages, request

#: Tokens: a strategy that may publish signals and portfolio as momentum or desk1,
#: an execution service that may publish executions only, a dashboard that may
#: only subscribe.
STRATEGY, OMS, DASHBOARD = "strategy-s3cret", "oms-s3cret", "dashboard-s3cret"
EVENT_TYPES = {"signal", "execution", "portfolio", "trading_state", "message"}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def config_text(sock: Path, extra: str = "") -> str:
    """No exchanges; the publish listener on a free port; auth on, three tokens."""
    return f"""
[server]
listen = "127.0.0.1:0"
[admin]
socket = "{sock}"
[publish]
listen = "127.0.0.1:0"
timeout = 1.0
[auth]
enabled = "on"
[[auth.tokens]]
name = "strategy"
sha256 = "{sha(STRATEGY)}"
publish = {{ channels = ["signals", "portfolio"], sources = ["momentum", "desk1"] }}
[[auth.tokens]]
name = "oms"
sha256 = "{sha(OMS)}"
publish = {{ channels = ["executions"] }}
[[auth.tokens]]
name = "dashboard"
sha256 = "{sha(DASHBOARD)}"
{extra}"""


@attrs.define
class Running:
    """A daemon subprocess: its admin socket, publish URL, WebSocket URL, epoch."""

    daemon: Daemon
    sock: Path
    url: str
    ws: str
    epoch: str


async def started(daemon: Daemon, sock: Path, scheme: str = "http") -> Running:
    ws = (await daemon.wait_for(r"listening on (wss?://127\.0\.0\.1:\d+)")).group(1)
    url = (await daemon.wait_for(rf"publish: serving ({scheme}://127\.0\.0\.1:\d+)/api/publish")
           ).group(1)
    epoch = (await daemon.wait_for(r"tickwire \S+ started: epoch (\S+),")).group(1)
    return Running(daemon, sock, url, ws, epoch)


@asynccontextmanager
async def running(tmp_path: Path, extra: str = "", scheme: str = "http") -> AsyncIterator[Running]:
    sock = tmp_path / "admin.sock"
    config = write_config(tmp_path / "tickwire.toml", config_text(sock, extra))
    async with tickwire("run", "--config", str(config)) as daemon:
        yield await started(daemon, sock, scheme)


@asynccontextmanager
async def subscriber(ws_url: str, channels: list[str], symbols: list[str],
                     ssl_context: ssl.SSLContext | None = None,
                     ) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A WebSocket client with the dashboard's token, subscribed (ack received)."""
    headers = [(b"authorization", f"Bearer {DASHBOARD}".encode())]
    async with trio_websocket.open_websocket_url(ws_url, extra_headers=headers,
                                                 ssl_context=ssl_context) as ws:
        with trio.fail_after(5):
            assert messages(await ws.get_message())[0]["type"] == "welcome"
            await request(ws, {"op": "subscribe", "id": 1, "channels": channels,
                               "symbols": symbols})
            assert messages(await ws.get_message())[0]["type"] == "ack"
        yield ws


async def received(ws: trio_websocket.WebSocketConnection, count: int,
                   seconds: float = 10) -> list[dict[str, Any]]:
    """The next ``count`` published messages (other types skipped); bounded in time."""
    got: list[dict[str, Any]] = []
    with trio.fail_after(seconds):
        while len(got) < count:
            got += [m for m in messages(await ws.get_message()) if m.get("type") in EVENT_TYPES]
    return got


async def nothing_more(ws: trio_websocket.WebSocketConnection, seconds: float = 0.5) -> None:
    """Nothing published arrives within ``seconds``."""
    with trio.move_on_after(seconds):
        while True:
            extra = [m for m in messages(await ws.get_message()) if m.get("type") in EVENT_TYPES]
            assert not extra, f"delivered and not expected: {extra}"


def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking client call in a worker thread (the test's event loop goes on)."""
    return trio.to_thread.run_sync(partial(function, *args, **kwargs))


async def cli(*args: str, env: dict[str, str] | None = None,
              stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """``tickwire ARGS`` as a subprocess, without ``$TICKWIRE_TOKEN`` unless given."""
    environ = {k: v for k, v in os.environ.items() if k != "TICKWIRE_TOKEN"}
    with trio.fail_after(30):
        return await trio.run_process([*TICKWIRE, *args], stdin=stdin, capture_stdout=True,
                                      capture_stderr=True, check=False,
                                      env={**environ, **(env or {})})


def err_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """stderr, which must be one line."""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, result.stderr.decode()
    return lines[0]


# -- the command line -------------------------------------------------------------------


async def test_cli_publishes_over_the_admin_socket_and_a_subscriber_gets_each_once_in_order(
        tmp_path: Path) -> None:
    async with running(tmp_path) as d, subscriber(d.ws, ["signals", "portfolio"], ["*"]) as ws:
        sock = ["--socket", str(d.sock)]
        lines = []
        for n, side in enumerate(("buy", "sell", "buy"), start=1):
            data = orjson.dumps({"side": side, "confidence": n / 10, "n": n}).decode()
            result = await cli("publish", "signals", "momentum", "BTC-USD", data, *sock)
            assert result.returncode == 0, result.stderr
            assert result.stderr == b""
            lines.append(result.stdout.decode())
        assert lines == [f"signals:momentum:BTC-USD seq {n} (epoch {d.epoch})\n"
                         for n in (1, 2, 3)]
        # --json prints the daemon's answer; JSON from stdin; a time and a version
        result = await cli("publish", "portfolio", "desk1", "BTC", "-", "--version", "7",
                           "--ts", "1733400000.5", "--json", *sock,
                           stdin=b'{"qty": "1.5", "pnl": -2.25}')
        assert result.returncode == 0, result.stderr
        assert orjson.loads(result.stdout) == {"ok": True, "seq": 1, "epoch": d.epoch}

        got = await received(ws, 4)
        signals = [m for m in got if m["channel"] == "signals"]
        assert [(m["type"], m["source"], m["key"], m["seq"], m["data"]["side"], m["data"]["n"])
                for m in signals] == [("signal", "momentum", "BTC-USD", 1, "buy", 1),
                                      ("signal", "momentum", "BTC-USD", 2, "sell", 2),
                                      ("signal", "momentum", "BTC-USD", 3, "buy", 3)]
        assert signals[1]["data"] == {"side": "sell", "confidence": 0.2, "n": 2}  # unchanged
        (portfolio,) = [m for m in got if m["channel"] == "portfolio"]
        assert portfolio["data"] == {"qty": "1.5", "pnl": -2.25}
        assert portfolio["ts"] == 1733400000.5 and portfolio["seq"] == 1
        await nothing_more(ws)


async def test_cli_over_http_takes_the_token_from_a_file_or_the_environment_never_argv(
        tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{STRATEGY}\n")
    async with running(tmp_path) as d, subscriber(d.ws, ["signals"], ["momentum:*"]) as ws:
        data = '{"side":"buy"}'
        by_file = await cli("publish", "signals", "momentum", "ETH-USD", data, "--url", d.url,
                            "--token-file", str(token_file), "--ts", "now")
        assert by_file.returncode == 0, by_file.stderr
        assert by_file.stdout.decode() == f"signals:momentum:ETH-USD seq 1 (epoch {d.epoch})\n"
        by_env = await cli("publish", "signals", "momentum", "ETH-USD", data, "--url",
                           d.url + "/", "--json", env={"TICKWIRE_TOKEN": STRATEGY})
        assert by_env.returncode == 0, by_env.stderr
        assert orjson.loads(by_env.stdout) == {"ok": True, "seq": 2, "epoch": d.epoch}

        # no token, a token that may only subscribe, an unknown token: refused, exit 1
        refusals = [
            ({}, "error: unauthorized: a token is required (Authorization: Bearer)"),
            ({"TICKWIRE_TOKEN": DASHBOARD}, "error: forbidden: token dashboard may not publish"),
            ({"TICKWIRE_TOKEN": "not-a-token"}, "error: unauthorized: unknown token"),
        ]
        for env, line in refusals:
            result = await cli("publish", "signals", "momentum", "ETH-USD", data, "--url", d.url,
                               env=env)
            assert (result.returncode, err_line(result), result.stdout) == (1, line, b"")

        got = await received(ws, 2)
        assert [m["seq"] for m in got] == [1, 2]
        assert abs(got[0]["ts"] - got[0]["recv_ts"]) < 5  # --ts now
        await nothing_more(ws)
    log = d.daemon.log()
    for secret in (STRATEGY, DASHBOARD, "not-a-token"):
        assert secret not in log


async def test_cli_refusals_are_one_line_and_exit_1_and_publish_nothing(tmp_path: Path) -> None:
    async with running(tmp_path) as d, subscriber(
            d.ws, ["signals", "portfolio", "executions"], ["*"]) as ws:
        sock = ["--socket", str(d.sock)]
        http = ["--url", d.url]
        first = await cli("publish", "portfolio", "desk1", "BTC", '{"qty":"1"}', "--version",
                          "5", *sock)
        assert first.returncode == 0, first.stderr
        cases = [
            (["nope", "momentum", "BTC-USD", "{}", *sock],
             "error: unknown_channel: unknown channel 'nope'; declared channels are executions, "
             "portfolio, signals, trading_state"),
            (["trades", "momentum", "BTC-USD", "{}", *sock],
             "error: unknown_channel: 'trades' is a market-data channel; publish to a declared "
             "channel: executions, portfolio, signals, trading_state"),
            (["portfolio", "desk1", "BTC", '{"qty":"0"}', "--version", "5", *sock],
             "error: stale: version 5 is not above the current version 5 of portfolio:desk1:BTC"),
            (["portfolio", "desk1", "BTC", '{"qty":"0"}', "--version", "4", *http],
             "error: stale: version 4 is not above the current version 5 of portfolio:desk1:BTC"),
            (["executions", "momentum", "BTC-USD", "{}", *http],
             "error: forbidden: strategy may not publish to executions as momentum"),
            (["signals", "Momentum!", "BTC-USD", "{}", *sock],
             "error: invalid_field: source must be a name of lower-case letters, digits, "
             "_ . - (at most 64)"),
        ]
        for args, line in cases:
            result = await cli("publish", *args, env={"TICKWIRE_TOKEN": STRATEGY})
            assert (result.returncode, err_line(result), result.stdout) == (1, line, b""), args
        # --json: the error answer on stdout, still exit 1
        result = await cli("publish", "nope", "momentum", "BTC-USD", "{}", "--json", *sock)
        assert result.returncode == 1 and result.stderr == b""
        assert orjson.loads(result.stdout)["code"] == "unknown_channel"

        got = await received(ws, 1)
        assert [(m["channel"], m["data"]) for m in got] == [("portfolio", {"qty": "1"})]
        await nothing_more(ws)


async def test_cli_usage_errors_and_an_unreachable_daemon_exit_2(tmp_path: Path) -> None:
    missing = ["--socket", str(tmp_path / "none.sock")]
    cases = [
        (["signals", "m", "K", "{not json", *missing], "tickwire: JSON: not JSON ("),
        (["signals", "m", "K", "[1, 2]", *missing],
         "tickwire: JSON: the data must be a JSON object ({...}), not an array"),
        (["signals", "m", "K", '"buy"', *missing],
         "tickwire: JSON: the data must be a JSON object ({...}), not a string"),
        (["signals", "m", "K", "{}", "--url", "http://127.0.0.1:9", *missing],
         "tickwire: give --url (HTTP) or --socket (the admin socket), not both"),
        (["signals", "m", "K", "{}", "--url", "127.0.0.1:9"],
         "tickwire: url must be http://HOST:PORT or https://..., not '127.0.0.1:9'"),
        (["signals", "m", "K", "{}", *missing],
         f"tickwire: unreachable: no admin socket at {tmp_path / 'none.sock'}: "
         "is tickwire running?"),
        (["signals", "m", "K", "{}", "--url", "http://127.0.0.1:9"],
         "tickwire: unreachable: http://127.0.0.1:9/api/publish: "),
        (["signals", "m", "K", "{}", "--url", "http://127.0.0.1:9", "--token-file",
          str(tmp_path / "no-token")], "tickwire: cannot read the token file"),
    ]
    for args, start in cases:
        result = await cli("publish", *args)
        assert result.returncode == 2 and result.stdout == b"", (args, result)
        assert err_line(result).startswith(start), (args, result.stderr)
    # the same exit status as tickwire status for an unreachable daemon
    status = await cli("status", *missing)
    assert status.returncode == 2


# -- the Python client, blocking ------------------------------------------------------------


async def test_idempotency_key_twice_is_one_delivery_and_the_same_seq_on_both_transports(
        tmp_path: Path) -> None:
    async with running(tmp_path) as d, subscriber(d.ws, ["signals"], ["*"]) as ws:
        first = await in_thread(client.publish, "signals", "momentum", "BTC-USD", {"n": 1},
                                idempotency_key="sig-1", url=d.url, token=STRATEGY)
        assert first == client.Receipt(1, d.epoch, duplicate=False)
        again = await in_thread(client.publish, "signals", "momentum", "BTC-USD", {"n": 1},
                                idempotency_key="sig-1", url=d.url, token=STRATEGY)
        assert again == client.Receipt(1, d.epoch, duplicate=True)
        # the key belongs to the stream's channel and source, whichever way it comes in
        by_socket = await in_thread(client.publish, "signals", "momentum", "BTC-USD", {"n": 1},
                                    idempotency_key="sig-1", socket=d.sock)
        assert by_socket == client.Receipt(1, d.epoch, duplicate=True)
        other = await in_thread(client.publish, "signals", "momentum", "BTC-USD", {"n": 2},
                                idempotency_key="sig-2", socket=d.sock)
        assert other == client.Receipt(2, d.epoch, duplicate=False)
        result = await cli("publish", "signals", "momentum", "BTC-USD", '{"n":2}',
                           "--idempotency-key", "sig-2", "--socket", str(d.sock))
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode() == (
            f"signals:momentum:BTC-USD seq 2 (epoch {d.epoch}; a duplicate: published before "
            "with this idempotency key)\n")
        got = await received(ws, 2)
        assert [(m["seq"], m["data"]["n"]) for m in got] == [(1, 1), (2, 2)]
        await nothing_more(ws)


async def test_a_publisher_keeps_one_connection_and_errors_are_typed(tmp_path: Path) -> None:
    async with running(tmp_path) as d, subscriber(d.ws, ["signals", "executions"], ["*"]) as ws:
        def admin_connections() -> int:
            (status,) = trio.from_thread.run(ask_admin, d.sock, {"op": "status"})
            (component,) = [c for c in status["components"] if c["name"] == "admin"]
            return int(component["figures"]["connections"])

        def over_the_socket() -> list[client.Receipt]:
            before = admin_connections()
            with client.Publisher(socket=d.sock) as publisher:
                receipts = [publisher.publish("signals", "momentum", "SOL-USD", {"n": n})
                            for n in range(5)]
                with pytest.raises(client.PublishRefused) as refused:
                    publisher.publish("signals", "momentum", "SOL-USD", {"n": 0}, version=1)
                receipts.append(publisher.publish("signals", "momentum", "SOL-USD", {"n": 5}))
            # the five, the refusal and the sixth on one connection (+1: the status request)
            assert admin_connections() == before + 2
            assert (refused.value.code, refused.value.status) == ("invalid_field", 400)
            return receipts

        receipts = await in_thread(over_the_socket)
        assert [r.seq for r in receipts] == [1, 2, 3, 4, 5, 6]

        def over_http() -> None:
            with client.Publisher(url=d.url, token=OMS) as publisher:
                for n in range(3):
                    publisher.publish("executions", "oms", "SOL-USD", {"id": f"x{n}"})
                with pytest.raises(client.PublishRefused) as refused:
                    publisher.publish("signals", "oms", "SOL-USD", {})
                assert (refused.value.code, refused.value.status) == ("forbidden", 403)
                assert str(refused.value) == "forbidden: oms may not publish to signals as oms"
                assert refused.value.as_dict() == {
                    "ok": False, "code": "forbidden",
                    "message": "oms may not publish to signals as oms"}
                with pytest.raises(client.PublishRefused) as refused:
                    publisher.publish("executions", "oms", "SOL-USD", {"pad": "x" * 70_000})
                assert (refused.value.code, refused.value.status) == ("too_large", 413)
                with pytest.raises(client.PublishRefused) as refused:
                    publisher.publish("nope", "oms", "SOL-USD", {})
                assert (refused.value.code, refused.value.status) == ("unknown_channel", 404)

        await in_thread(over_http)
        got = await received(ws, 9)
        assert [(m["channel"], m["seq"]) for m in got] == (
            [("signals", n) for n in range(1, 7)] + [("executions", n) for n in range(1, 4)])
        await nothing_more(ws)

        # the admin socket answers the publish codes with the HTTP status they have there
        with pytest.raises(client.PublishRefused) as refused:
            await in_thread(client.publish, "signals", "momentum", "K", {"x": "y" * 70_000},
                            socket=d.sock)
        assert (refused.value.code, refused.value.status) == ("too_large", 413)
        # a wrong URL: the daemon answers 404, but not with a publish answer
        with pytest.raises(client.BadAnswer) as bad:
            await in_thread(client.publish, "signals", "momentum", "K", {},
                            url=d.url + "/elsewhere", token=STRATEGY)
        assert str(bad.value) == (f"HTTP 404 from {d.url}/elsewhere/api/publish: not JSON: "
                                  "not found")


async def test_batches_answer_in_order_with_refusals_in_place(tmp_path: Path) -> None:
    assert client.BATCH_SIZE == MAX_BATCH
    batch = [
        client.Message("signals", "momentum", "BTC-USD", {"n": 1}),
        client.Message("nope", "momentum", "BTC-USD", {"n": 2}),
        {"channel": "signals", "source": "momentum", "key": "BTC-USD", "data": {"n": 3},
         "idempotency_key": "b-3"},
        client.Message("portfolio", "desk1", "BTC", {"qty": "1"}, version=2),
        client.Message("portfolio", "desk1", "BTC", {"qty": "0"}, version=1),
        client.Message("signals", "momentum", "BTC-USD", {"n": 3}, idempotency_key="b-3"),
    ]
    async with running(tmp_path) as d, subscriber(d.ws, ["signals", "portfolio"], ["*"]) as ws:
        answers = await in_thread(client.publish_batch, batch, url=d.url, token=STRATEGY)
        assert [type(a).__name__ for a in answers] == [
            "Receipt", "PublishRefused", "Receipt", "Receipt", "PublishRefused", "Receipt"]
        assert [(a.seq, a.duplicate) for a in answers if isinstance(a, client.Receipt)] == [
            (1, False), (2, False), (1, False), (2, True)]
        refused = [a for a in answers if isinstance(a, client.PublishRefused)]
        assert [(a.code, a.status) for a in refused] == [("unknown_channel", 404), ("stale", 409)]

        # the same over the admin socket (one request a message, one connection)
        answers = await in_thread(client.publish_batch, batch, socket=d.sock)
        assert [a.seq if isinstance(a, client.Receipt) else a.code for a in answers] == [
            3, "unknown_channel", 2, "stale", "stale", 2]
        assert [a.duplicate for a in answers if isinstance(a, client.Receipt)] == [
            False, True, True]

        # a whole batch refused: no token
        with pytest.raises(client.PublishRefused) as whole:
            await in_thread(client.publish_batch, batch, url=d.url)
        assert (whole.value.code, whole.value.status) == ("unauthorized", 401)
        assert await in_thread(client.publish_batch, [], url=d.url) == []

        got = await received(ws, 4)
        assert [(m["channel"], m["seq"]) for m in got] == [
            ("signals", 1), ("signals", 2), ("portfolio", 1), ("signals", 3)]
        await nothing_more(ws)

        # longer than the daemon's batch limit: sent as several requests, answered in order
        many = [client.Message("signals", "momentum", "bulk", {"n": n})
                for n in range(MAX_BATCH + 1)]
        answers = await in_thread(client.publish_batch, many, url=d.url, token=STRATEGY)
        assert [a.seq for a in answers if isinstance(a, client.Receipt)] == list(
            range(1, MAX_BATCH + 2))


async def test_a_daemon_that_does_not_answer_in_time_then_a_safe_retry(tmp_path: Path) -> None:
    """A stopped daemon (SIGSTOP) accepts connections (the kernel does) but does not
    answer: ``Unreachable`` after ``timeout``; the message had been sent, so once
    it goes on it is published, and a retry with the same key is answered as a
    duplicate with the same seq: delivered once."""
    async with running(tmp_path) as d, subscriber(d.ws, ["signals"], ["*"]) as ws:
        d.daemon.process.send_signal(signal.SIGSTOP)
        try:
            with trio.fail_after(10):
                with pytest.raises(client.Unreachable, match="no answer in time"):
                    await in_thread(client.publish, "signals", "momentum", "BTC-USD", {"n": 1},
                                    idempotency_key="retry-1", url=d.url, token=STRATEGY,
                                    timeout=0.5)
                with pytest.raises(client.Unreachable, match="no answer in time"):
                    await in_thread(client.publish, "signals", "momentum", "BTC-USD", {"n": 2},
                                    idempotency_key="retry-2", socket=d.sock, timeout=0.5)
                with trio.move_on_after(0.5) as cancelled:  # the trio flavour: cancelled
                    await client.apublish("signals", "momentum", "BTC-USD", {"n": 3},
                                          idempotency_key="retry-3", socket=d.sock)
                assert cancelled.cancelled_caught
        finally:
            d.daemon.process.send_signal(signal.SIGCONT)
        got = await received(ws, 3)
        seqs = {m["data"]["n"]: m["seq"] for m in got}
        assert sorted(seqs) == [1, 2, 3]
        for n in (1, 2, 3):
            retry = await in_thread(client.publish, "signals", "momentum", "BTC-USD", {"n": n},
                                    idempotency_key=f"retry-{n}", url=d.url, token=STRATEGY)
            assert retry == client.Receipt(seqs[n], d.epoch, duplicate=True)
        await nothing_more(ws)
    assert isinstance(client.Unreachable("x"), admin.Unreachable)


async def test_a_kept_connection_survives_a_daemon_restart_and_unreachable_between(
        tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    config = write_config(tmp_path / "tickwire.toml", config_text(sock))
    publisher = client.Publisher(socket=sock, timeout=5)
    try:
        async with tickwire("run", "--config", str(config)) as daemon:
            first = await started(daemon, sock)
            receipt = await in_thread(publisher.publish, "signals", "desk1", "K", {"n": 1})
            assert receipt == client.Receipt(1, first.epoch)
        with pytest.raises(client.Unreachable, match="no admin socket at"):  # in between
            await in_thread(publisher.publish, "signals", "desk1", "K", {"n": 2})
        async with tickwire("run", "--config", str(config)) as daemon:
            second = await started(daemon, sock)
            receipt = await in_thread(publisher.publish, "signals", "desk1", "K", {"n": 3})
            assert receipt == client.Receipt(1, second.epoch) and second.epoch != first.epoch
            await in_thread(publisher.close)
            # after close, a publish opens another connection
            receipt = await in_thread(publisher.publish, "signals", "desk1", "K", {"n": 4})
            assert receipt.seq == 2
    finally:
        publisher.close()


async def test_https_with_a_verifying_client(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "cert.key")
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    extra = f'[server.tls]\ncert = "{tmp_path / "cert.pem"}"\nkey = "{tmp_path / "cert.key"}"\n'
    # [server.tls] must come after the [server] table's keys: put it in the text there
    text = config_text(tmp_path / "admin.sock").replace("[admin]", extra + "[admin]", 1)
    config = write_config(tmp_path / "tickwire.toml", text)
    async with tickwire("run", "--config", str(config)) as daemon:
        d = await started(daemon, tmp_path / "admin.sock", scheme="https")
        async with subscriber(d.ws, ["signals"], ["*"], ssl_context=trusting) as ws:
            receipt = await in_thread(client.publish, "signals", "momentum", "BTC-USD",
                                      {"tls": True}, url=d.url, token=STRATEGY, verify=trusting)
            assert receipt.seq == 1
            with pytest.raises(client.Unreachable):  # the system's CAs do not know this one
                await in_thread(client.publish, "signals", "momentum", "BTC-USD", {},
                                url=d.url, token=STRATEGY)
            (got,) = await received(ws, 1)
            assert got["data"] == {"tls": True}
            await nothing_more(ws)


# -- the trio flavour, in the daemon's own event loop ------------------------------------------


async def test_trio_publisher_in_process_over_http_and_the_socket(tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    config = load_config(str(write_config(tmp_path / "tickwire.toml", config_text(sock))))
    app = App(config)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        url = f"http://127.0.0.1:{app.publish_port}"
        async with subscriber(f"ws://127.0.0.1:{port}", ["signals", "trading_state"],
                              ["*"]) as ws:
            with trio.fail_after(10):
                async with client.AsyncPublisher(url=url, token=STRATEGY) as http:
                    first = await http.publish("signals", "momentum", "BTC-USD", {"n": 1})
                    with pytest.raises(client.PublishRefused) as refused:
                        await http.publish("trading_state", "desk1", "account", {"cash": "1"})
                    assert (refused.value.code, refused.value.status) == ("forbidden", 403)
                    answers = await http.publish_batch([
                        client.Message("signals", "momentum", "BTC-USD", {"n": 2}),
                        client.Message("signals", "momentum", "BTC-USD", {"n": 2}, version=1),
                    ])
                async with client.AsyncPublisher(socket=sock) as local:
                    state = await local.publish("trading_state", "desk1", "account",
                                                {"cash": "1"}, version=1)
                    stale = await local.publish_batch([
                        client.Message("trading_state", "desk1", "account", {"cash": "0"},
                                       version=1)])
                    more = [await local.publish("signals", "desk1", "ETH-USD", {"n": n})
                            for n in range(3)]
                once = await client.apublish("signals", "momentum", "BTC-USD", {"n": 3},
                                             url=url, token=STRATEGY)
                (batch,) = await client.apublish_batch(
                    [client.Message("signals", "momentum", "BTC-USD", {"n": 4})], socket=sock)
            assert first == client.Receipt(1, app.epoch)
            assert answers[0] == client.Receipt(2, app.epoch)
            assert isinstance(answers[1], client.PublishRefused)
            assert answers[1].code == "invalid_field"
            assert state.seq == 1 and [r.seq for r in more] == [1, 2, 3]
            assert [(a.code, a.status) for a in stale if isinstance(a, client.PublishRefused)
                    ] == [("stale", 409)]
            assert (once.seq, batch) == (3, client.Receipt(4, app.epoch))
            got = await received(ws, 8)
            assert sorted((m["channel"], m["source"], m["key"], m["seq"]) for m in got) == sorted(
                [("signals", "momentum", "BTC-USD", n) for n in (1, 2, 3, 4)]
                + [("trading_state", "desk1", "account", 1)]
                + [("signals", "desk1", "ETH-USD", n) for n in (1, 2, 3)])
            await nothing_more(ws)
        nursery.cancel_scope.cancel()


# -- without a daemon ------------------------------------------------------------------------


def test_messages_answers_and_arguments_without_a_daemon(tmp_path: Path) -> None:
    message = client.Message("signals", "momentum", "BTC-USD", {"side": "buy"})
    assert message.as_dict() == {"channel": "signals", "source": "momentum", "key": "BTC-USD",
                                 "data": {"side": "buy"}}
    full = attrs.evolve(message, ts=1.5, idempotency_key="k", version=0)
    assert full.as_dict()["ts"] == 1.5 and full.as_dict()["version"] == 0
    assert client.Receipt(3, "e", True).as_dict() == {"ok": True, "seq": 3, "epoch": "e",
                                                      "duplicate": True}
    assert client.Receipt(3, "e").as_dict() == {"ok": True, "seq": 3, "epoch": "e"}
    for url, socket in (("http://127.0.0.1:1", tmp_path / "s"), ("127.0.0.1:1", None),
                        ("ws://127.0.0.1:1", None), ("http://", None)):
        with pytest.raises(ValueError):
            client.Publisher(url=url, socket=socket)
    with pytest.raises(client.Unreachable, match=re.escape(f"no admin socket at {tmp_path}")):
        client.publish("signals", "m", "K", {}, socket=tmp_path / "none.sock")
    plain = tmp_path / "not-a-socket"
    plain.write_text("")
    with pytest.raises(client.Unreachable, match="connection refused"):
        client.publish("signals", "m", "K", {}, socket=plain)
    with pytest.raises(TypeError):  # data orjson cannot encode: the caller's bug
        client.publish("signals", "m", "K", {"x": object()}, socket=tmp_path / "none.sock")
