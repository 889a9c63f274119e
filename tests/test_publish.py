"""Publishing the desk's own streams (issue 15), end to end: real daemons
(``tickwire run`` / ``tickwire replay`` subprocesses with a config written here,
or an in-process ``App`` where a test must hold the dispatcher), real publishers
(``curl`` and httpx over HTTP, the WebSocket ``publish`` op, the admin Unix
socket) and real WebSocket subscribers, all on 127.0.0.1.

The ``tickwire publish`` command is tested in ``test_client.py``.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import string
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from daemon.app import App
from daemon.config import structure_config
from tests.daemon_process import Daemon, admin, run_cli, tickwire, write_config
from tests.helpers import messages, request
from tests.test_publish_message import json_objects, json_values
from tests.test_publish_message import messages as publish_messages

COINBASE = ("COINBASE.0", "COINBASE.ws.28.0")
PUBLISHED = {"signals", "executions", "portfolio", "trading_state"}
ALL_PUBLISHED = {"op": "subscribe", "channels": sorted(PUBLISHED), "symbols": ["*"]}

#: tokens (only their SHA-256 goes into the config)
DESK = "desk-token-9f2c"  # publishes signals, executions and portfolio
SIGNALS_ONLY = "signals-token-51aa"  # publishes signals only, as momentum
READER = "reader-token-07de"  # subscribes to everything, publishes nothing


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TOKENS = f"""
[[auth.tokens]]
name = "desk"
sha256 = "{sha(DESK)}"
publish = {{ channels = ["signals", "executions", "portfolio"] }}
[[auth.tokens]]
name = "strategy"
sha256 = "{sha(SIGNALS_ONLY)}"
publish = {{ channels = ["signals"], sources = ["momentum"] }}
[[auth.tokens]]
name = "reader"
sha256 = "{sha(READER)}"
"""


def config_text(tmp_path: Path, *, server: str = "", publish: str = "allow_loopback_anonymous = true",
                extra: str = "") -> str:
    return (f'[server]\nlisten = "127.0.0.1:0"\n{server}\n'
            f'[admin]\nsocket = "{tmp_path / "admin.sock"}"\n'
            f"[reporter]\ncheck = 0.2\ninterval = 0.5\n"
            f'[publish]\nlisten = "127.0.0.1:0"\n{publish}\n{extra}')


@attrs.frozen
class Ports:
    daemon: Daemon
    ws: int
    http: int
    sock: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.ws}"

    @property
    def publish_url(self) -> str:
        return f"http://127.0.0.1:{self.http}/api/publish"


@asynccontextmanager
async def daemon(tmp_path: Path, *args: str, **config: str) -> AsyncIterator[Ports]:
    """``tickwire ARGS --config`` (``run`` by default) with ``config_text(**config)``."""
    path = write_config(tmp_path / "tickwire.toml", config_text(tmp_path, **config))
    async with tickwire(*(args or ("run",)), "--config", str(path)) as process:
        ws = int((await process.wait_for(r"listening on ws://127\.0\.0\.1:(\d+)")).group(1))
        http = int((await process.wait_for(r"publish: serving http://127\.0\.0\.1:(\d+)")).group(1))
        await process.wait_for(r"tickwire \S+ started")
        yield Ports(process, ws, http, tmp_path / "admin.sock")


class Reader:
    """A WebSocket client that reads all along (so the server never finds it slow)
    and keeps every message; ``welcome`` is the first one."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.welcome = welcome
        self.got: list[dict[str, Any]] = []
        self.closed: Any = None
        self._changed = trio.Event()
        self._ids = 0

    async def _run(self) -> None:
        try:
            while True:
                self.got += messages(await self.ws.get_message())
                self._changed.set()
                self._changed = trio.Event()
        except trio_websocket.ConnectionClosed as exc:
            self.closed = exc.reason
            self._changed.set()

    async def until(self, predicate: Callable[[list[dict[str, Any]]], bool],
                    seconds: float = 10) -> list[dict[str, Any]]:
        """Wait (bounded) until ``predicate(self.got)``; returns ``self.got``."""
        with trio.fail_after(seconds):
            while not predicate(self.got):
                assert self.closed is None, f"closed: {self.closed}"
                await self._changed.wait()
        return self.got

    async def send(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send a request with a fresh ``id``; its reply (``ack`` or ``error``)."""
        self._ids += 1
        body = {**body, "id": f"r{self._ids}"}
        await request(self.ws, body)
        got = await self.until(lambda got: any(m.get("id") == body["id"] for m in got))
        return next(m for m in got if m.get("id") == body["id"])

    def published(self) -> list[dict[str, Any]]:
        """The messages of published channels received so far, in order."""
        return [m for m in self.got if m.get("channel") in PUBLISHED]


@asynccontextmanager
async def reader(url: str, token: str | None = None) -> AsyncIterator[Reader]:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else None
    async with trio_websocket.open_websocket_url(url, extra_headers=headers,
                                                 max_message_size=1 << 24) as ws:
        welcome = messages(await ws.get_message())[0]
        assert welcome["type"] == "welcome"
        client = Reader(ws, welcome)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._run)
            yield client
            nursery.cancel_scope.cancel()


def stream_of(message: dict[str, Any]) -> str:
    return f"{message['channel']}:{message['source']}:{message['key']}"


def by_stream(got: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    streams: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for message in got:
        streams[stream_of(message)].append(message)
    return dict(streams)


def message(channel: str, source: str, key: str, data: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"channel": channel, "source": source, "key": key, "data": data, **fields}


def publish_component(status: dict[str, Any]) -> dict[str, Any]:
    (component,) = [c for c in status["components"] if c["name"] == "publish"]
    return component


def figures_of(component: dict[str, Any]) -> dict[tuple[str, str], dict[str, int]]:
    return {(f["channel"], f["source"]): {k: f[k] for k in ("accepted", "duplicate", "stale", "refused")}
            for f in component["figures"]["publishers"]}


# -- while a replay streams market data: curl publishes, a client gets it all -----------


def curl_config(port: int, token: str, bodies: list[dict[str, Any]], folder: Path) -> Path:
    """A curl config file that POSTs each body (a file of its own) in order."""
    folder.mkdir()
    lines: list[str] = []
    for i, body in enumerate(bodies):
        path = folder / f"{i}.json"
        path.write_bytes(orjson.dumps(body))
        lines += [*(["next"] if i else []), f'url = "http://127.0.0.1:{port}/api/publish"',
                  f'header = "Authorization: Bearer {token}"',
                  'header = "Content-Type: application/json"',
                  f'data-binary = "@{path}"', 'write-out = "\\t%{http_code}\\n"']
    config = folder / "curl.conf"
    config.write_text("\n".join(lines) + "\n")
    return config


async def curl(port: int, token: str, bodies: list[dict[str, Any]], folder: Path) -> list[tuple[int, dict]]:
    """One ``curl`` process POSTs every body in order on one keep-alive connection;
    each answer's status and JSON."""
    executable = shutil.which("curl")
    assert executable, "the curl command is needed (apt-get install curl)"
    config = curl_config(port, token, bodies, folder)
    with trio.fail_after(30):
        result = await trio.run_process([executable, "-sS", "--config", str(config)],
                                        capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    answers = []
    for line in result.stdout.decode().splitlines():
        body, _, status = line.rpartition("\t")
        answers.append((int(status), orjson.loads(body)))
    return answers


async def test_a_curl_publisher_during_a_replay_reaches_a_client_of_both(
    captures: Path, tmp_path: Path
) -> None:
    async with daemon(tmp_path, "replay", *(str(captures / f) for f in COINBASE),
                      "--loop", "--rate", "300", publish="", extra=TOKENS) as d:
        async with reader(d.url) as client:
            assert (await client.send({"op": "subscribe", "channels": ["trades", "ticker"],
                                       "symbols": ["coinbase:*"]}))["type"] == "ack"
            assert (await client.send({"op": "subscribe", "channels": ["signals", "executions"],
                                       "symbols": ["*"]}))["type"] == "ack"
            assert (await client.send({"op": "subscribe", "channels": ["portfolio"],
                                       "symbols": ["desk1:*"]}))["type"] == "ack"
            await client.until(lambda got: sum(m["type"] == "trade" for m in got) >= 5)
            trades_before = sum(m["type"] == "trade" for m in client.got)

            # 40 signals on two keys, 20 executions, 12 portfolio states of 3 keys, interleaved
            bodies: list[dict[str, Any]] = []
            for i in range(20):
                for key in ("BTC-USD", "ETH-USD"):
                    bodies.append(message("signals", "momentum", key,
                                          {"n": i, "side": "buy" if i % 3 else "sell",
                                           "confidence": round(0.5 + i / 100, 2)},
                                          ts=1_733_400_000 + i))
                bodies.append(message("executions", "desk1", "BTC-USD",
                                      {"order": f"o-{i}", "price": f"{60000 + i}.5", "size": "0.01"},
                                      idempotency_key=f"exec-{i}"))
                if i % 5 < 4:
                    asset = ("BTC", "ETH", "USD")[i % 3]
                    bodies.append(message("portfolio", "desk1", asset,
                                          {"position": str(i), "pnl": i * 1.5}, version=i))
            assert len(bodies) == 76
            answers = await curl(d.http, DESK, bodies, tmp_path / "curl")

            assert [status for status, _ in answers] == [200] * len(bodies)
            epoch = client.welcome["epoch"]
            assert all(a["ok"] and a["epoch"] == epoch and "duplicate" not in a for _, a in answers)
            # the answers number each stream from 1, contiguous
            answered: dict[str, list[int]] = defaultdict(list)
            for body, (_, answer) in zip(bodies, answers, strict=True):
                answered[stream_of(body)].append(answer["seq"])
            assert {k: v == list(range(1, len(v) + 1)) for k, v in answered.items()} == dict.fromkeys(answered, True)

            await client.until(lambda got: len(client.published()) == len(bodies))
            streams = by_stream(client.published())
            sent = by_stream(bodies)
            assert set(streams) == set(sent) == {
                "signals:momentum:BTC-USD", "signals:momentum:ETH-USD", "executions:desk1:BTC-USD",
                "portfolio:desk1:BTC", "portfolio:desk1:ETH", "portfolio:desk1:USD"}
            for key, got in streams.items():  # every one once, in order, seq 1..N, data unchanged
                assert [m["seq"] for m in got] == list(range(1, len(sent[key]) + 1)), key
                assert [m["data"] for m in got] == [b["data"] for b in sent[key]], key
                assert all(m["recv_ts"] > 1.7e9 for m in got)
            signal = streams["signals:momentum:ETH-USD"][3]
            assert signal["type"] == "signal" and signal["ts"] == 1_733_400_003
            assert streams["executions:desk1:BTC-USD"][0]["type"] == "execution"
            assert [m["version"] for m in streams["portfolio:desk1:BTC"]] == [0, 3, 6, 12, 15, 18]
            # market data went on all along
            await client.until(lambda got: sum(m["type"] == "trade" for m in got) >= trades_before + 5)
            trades = [m for m in client.got if m["type"] == "trade"]
            trade_seqs = defaultdict(list)
            for trade in trades:
                trade_seqs[trade["symbol"]].append(trade["seq"])
            assert all(s == list(range(s[0], s[0] + len(s))) for s in trade_seqs.values())

        # a late subscriber gets the current state of every portfolio key, nothing older
        latest = {}
        for body in bodies:
            if body["channel"] == "portfolio":
                latest[body["key"]] = body
        async with reader(d.url) as late:
            await late.send({"op": "subscribe", "channels": ["portfolio"], "symbols": ["desk1:*"]})
            got = await late.until(lambda got: len(late.published()) >= 3)
            await late.send({"op": "ping"})  # anything else would have come before its pong
            assert len(late.published()) == 3
            current = {m["key"]: m for m in late.published()}
            assert {k: m["data"] for k, m in current.items()} == {k: b["data"] for k, b in latest.items()}
            assert {k: m["version"] for k, m in current.items()} == {k: b["version"] for k, b in latest.items()}
            assert {k: m["seq"] for k, m in current.items()} == {
                k: len(sent[f"portfolio:desk1:{k}"]) for k in latest}
            assert all(m["type"] == "portfolio" for m in got if m.get("channel"))
            # and a signal subscriber asking for history gets the last ones of each stream
            await late.send({"op": "subscribe", "channels": ["signals"], "symbols": ["momentum:*"],
                             "history": 3})
            await late.send({"op": "ping"})
            history = [m for m in late.published() if m["channel"] == "signals"]
            assert [(m["key"], m["seq"]) for m in sorted(history, key=stream_of)] == [
                ("BTC-USD", 18), ("BTC-USD", 19), ("BTC-USD", 20),
                ("ETH-USD", 18), ("ETH-USD", 19), ("ETH-USD", 20)]

        (status,) = await admin(d.sock, {"op": "status"})
        assert figures_of(publish_component(status)) == {
            ("executions", "desk1"): {"accepted": 20, "duplicate": 0, "stale": 0, "refused": 0},
            ("portfolio", "desk1"): {"accepted": 16, "duplicate": 0, "stale": 0, "refused": 0},
            ("signals", "momentum"): {"accepted": 40, "duplicate": 0, "stale": 0, "refused": 0},
        }
        assert "desk-token" not in d.daemon.log()  # tokens never reach the logs


# -- idempotency, version, recovery with since; the counters in status ---------------------


async def test_idempotency_version_and_recovery_with_since(tmp_path: Path) -> None:
    async with (
        daemon(tmp_path) as d,
        httpx.AsyncClient(timeout=10) as http,
        reader(d.url) as sub,
        reader(d.url) as publisher,
    ):
        epoch = sub.welcome["epoch"]
        assert (await sub.send({**ALL_PUBLISHED}))["type"] == "ack"

        async def post(body: Any) -> tuple[int, dict[str, Any]]:
            response = await http.post(d.publish_url, content=orjson.dumps(body))
            assert response.headers["content-type"] == "application/json"
            return response.status_code, response.json()

        # idempotency: the same key again, by each way in, is not delivered again
        first = message("signals", "momentum", "BTC-USD", {"n": 1}, idempotency_key="sig-1")
        assert await post(first) == (200, {"ok": True, "seq": 1, "epoch": epoch})
        assert await post(first) == (200, {"ok": True, "seq": 1, "epoch": epoch, "duplicate": True})
        retry = {**first, "data": {"n": "the retry's data is not looked at"}}
        assert await post(retry) == (200, {"ok": True, "seq": 1, "epoch": epoch, "duplicate": True})
        ack = await publisher.send({"op": "publish", **first})
        assert {k: ack[k] for k in ("type", "op", "seq", "epoch", "duplicate")} == {
            "type": "ack", "op": "publish", "seq": 1, "epoch": epoch, "duplicate": True}
        (reply,) = await admin(d.sock, {"op": "publish", "id": 9, "message": first})
        assert {k: reply[k] for k in ("type", "id", "ok", "seq", "epoch", "duplicate")} == {
            "type": "publish", "id": 9, "ok": True, "seq": 1, "epoch": epoch, "duplicate": True}
        # another key, or none, is another message; the same key for another stream
        # (another source, or another key of the source) too
        assert (await post({**first, "idempotency_key": "sig-2", "data": {"n": 2}}))[1]["seq"] == 2
        assert await post({**first, "key": "ETH-USD"}) == (200, {"ok": True, "seq": 1, "epoch": epoch})
        ack = await publisher.send({"op": "publish", **message("signals", "momentum", "BTC-USD", {"n": 3})})
        assert (ack["type"], ack["seq"], ack.get("duplicate")) == ("ack", 3, None)
        (reply,) = await admin(d.sock, {"op": "publish", "message": {**first, "source": "meanrev"}})
        assert (reply["ok"], reply["seq"], reply.get("duplicate")) == (True, 1, None)

        # version: not above the current is stale; above is accepted
        state = message("portfolio", "desk1", "BTC", {"position": "1.5"}, version=5)
        assert await post(state) == (200, {"ok": True, "seq": 1, "epoch": epoch})
        for stale in (5, 4, 0):
            status, answer = await post({**state, "version": stale, "data": {"position": "old"}})
            assert (status, answer["ok"], answer["code"]) == (409, False, "stale")
            assert "version 5" in answer["message"]
        ack = await publisher.send({"op": "publish", **state, "version": 3})
        assert (ack["type"], ack["code"]) == ("error", "stale")
        assert await post({**state, "version": 6, "data": {"position": "2"}}) == (
            200, {"ok": True, "seq": 2, "epoch": epoch})

        await sub.until(lambda got: len(sub.published()) == 7)
        await sub.send({"op": "ping"})  # nothing more was on its way
        assert [(stream_of(m), m["seq"], m["data"]) for m in sub.published()] == [
            ("signals:momentum:BTC-USD", 1, {"n": 1}),
            ("signals:momentum:BTC-USD", 2, {"n": 2}),
            ("signals:momentum:ETH-USD", 1, {"n": 1}),
            ("signals:momentum:BTC-USD", 3, {"n": 3}),
            ("signals:meanrev:BTC-USD", 1, {"n": 1}),
            ("portfolio:desk1:BTC", 1, {"position": "1.5"}),
            ("portfolio:desk1:BTC", 2, {"position": "2"}),
        ]
        assert [m.get("version") for m in sub.published()] == [None] * 5 + [5, 6]

    # recovery with since on a lossless published channel, in a daemon of its own
    second = tmp_path / "second"
    second.mkdir()
    async with daemon(second) as d, httpx.AsyncClient(timeout=10) as http:
        key = "signals:momentum:ETH-USD"

        async def signal(n: int) -> int:
            response = await http.post(d.publish_url, json=message("signals", "momentum", "ETH-USD", {"n": n}))
            assert response.status_code == 200
            return int(response.json()["seq"])

        async with reader(d.url) as first_client:
            epoch = first_client.welcome["epoch"]
            await first_client.send({"op": "subscribe", "channels": ["signals"], "symbols": ["momentum:*"]})
            assert [await signal(n) for n in range(4)] == [1, 2, 3, 4]
            await first_client.until(lambda got: len(first_client.published()) == 4)
            last_seen = first_client.published()[-1]["seq"]
        # disconnected: three more are published meanwhile
        assert [await signal(n) for n in range(4, 7)] == [5, 6, 7]
        async with reader(d.url) as again:
            ack = await again.send({"op": "subscribe", "channels": ["signals"], "symbols": ["momentum:*"],
                                    "since": {key: last_seen}, "epoch": epoch})
            assert ack["type"] == "ack" and ack["recovered"] == {key: True} and ack["epoch"] == epoch
            await again.until(lambda got: len(again.published()) == 3)
            assert await signal(7) == 8  # then live ones follow without a hole
            await again.until(lambda got: len(again.published()) == 4)
            assert [(m["seq"], m["data"]["n"]) for m in again.published()] == [(5, 4), (6, 5), (7, 6), (8, 7)]
        async with reader(d.url) as other_epoch:  # a since from another run is not applied
            ack = await other_epoch.send({"op": "subscribe", "channels": ["signals"], "symbols": ["momentum:*"],
                                          "since": {key: 2}, "epoch": "1-deadbeef"})
            assert ack["recovered"] == {key: False}
            await other_epoch.send({"op": "ping"})
            assert other_epoch.published() == []  # history 0: nothing old

        (status,) = await admin(d.sock, {"op": "status"})
        assert figures_of(publish_component(status)) == {
            ("signals", "momentum"): {"accepted": 8, "duplicate": 0, "stale": 0, "refused": 0}}


async def test_status_shows_the_publish_counters_by_channel_and_source(tmp_path: Path) -> None:
    async with daemon(tmp_path) as d, httpx.AsyncClient(timeout=10) as http:
        async def post(body: Any) -> int:
            response = await http.post(d.publish_url, content=body if isinstance(body, bytes)
                                       else orjson.dumps(body))
            return response.status_code

        state = message("portfolio", "desk1", "BTC", {"p": 1}, version=2)
        statuses = [
            await post(message("signals", "momentum", "BTC-USD", {"n": 1}, idempotency_key="a")),
            await post(message("signals", "momentum", "BTC-USD", {"n": 1}, idempotency_key="a")),
            await post(message("signals", "trend", "BTC-USD", {"n": 1})),
            await post(state), await post(state), await post({**state, "version": 1}),
            await post({**state, "version": 3}),
            await post(message("signals", "momentum", "BTC-USD", [1])),  # refused: data
            await post(message("signals", "Not A Source", "BTC-USD", {})),  # refused: source
            await post(message("candles", "momentum", "BTC-USD", {})),  # unknown channel
            await post(b"{not json"),
        ]
        assert statuses == [200, 200, 200, 200, 409, 409, 200, 400, 400, 404, 400]
        (status,) = await admin(d.sock, {"op": "status", "id": "s"})
        component = publish_component(status)
        assert component["health"] == "healthy"
        assert figures_of(component) == {
            ("-", "-"): {"accepted": 0, "duplicate": 0, "stale": 0, "refused": 2},
            ("portfolio", "desk1"): {"accepted": 2, "duplicate": 0, "stale": 2, "refused": 0},
            ("signals", "-"): {"accepted": 0, "duplicate": 0, "stale": 0, "refused": 1},
            ("signals", "momentum"): {"accepted": 1, "duplicate": 1, "stale": 0, "refused": 1},
            ("signals", "trend"): {"accepted": 1, "duplicate": 0, "stale": 0, "refused": 0},
        }
        figures = component["figures"]
        assert (figures["accepted"], figures["duplicate"], figures["stale"], figures["refused"],
                figures["busy"]) == (4, 1, 2, 4, 0)
        assert figures["listen"] == f"127.0.0.1:{d.http}"
        # the command line shows the same component
        result = await run_cli("status", "--socket", str(d.sock), "--json")
        assert result.returncode == 0, result.stderr
        shown = publish_component(orjson.loads(result.stdout))
        assert figures_of(shown) == figures_of(component)
        result = await run_cli("status", "--socket", str(d.sock))
        assert result.returncode == 0 and "publish" in result.stdout.decode()


# -- conflation on a latest channel -----------------------------------------------------------


@asynccontextmanager
async def stalled_client(port: int) -> AsyncIterator[tuple[trio_websocket.WebSocketConnection, str]]:
    """A WebSocket client with a small receive buffer, so that a server writing to it
    while it does not read fills its socket soon; its local ``HOST:PORT``."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with trio.fail_after(5):
        await sock.connect(("127.0.0.1", port))
    host, local = sock.getsockname()
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, trio.SocketStream(sock), "127.0.0.1", "/",
                                                     max_message_size=1 << 24)
        yield ws, f"{host}:{local}"
        nursery.cancel_scope.cancel()


async def test_a_client_that_stops_reading_a_latest_channel_is_conflated_a_fast_one_gets_all(
    tmp_path: Path,
) -> None:
    keys = ("BTC", "ETH", "SOL")
    padding = "x" * 4000
    async with (
        daemon(tmp_path, server="client_queue = 8\nmax_write_delay_ms = 0") as d,
        httpx.AsyncClient(timeout=10) as http,
        reader(d.url) as fast,
        stalled_client(d.ws) as (slow, slow_address),
    ):
        assert messages(await slow.get_message())[0]["type"] == "welcome"
        subscribe = {"op": "subscribe", "id": 1, "channels": ["portfolio"], "symbols": ["desk1:*"]}
        await request(slow, subscribe)
        assert messages(await slow.get_message())[0]["type"] == "ack"
        await fast.send(subscribe)
        # the slow client reads nothing more from here

        sent: list[dict[str, Any]] = []

        async def publish_batch() -> None:
            batch = [message("portfolio", "desk1", keys[(len(sent) + i) % 3],
                             {"n": len(sent) + i, "pad": padding}, version=len(sent) + i)
                     for i in range(30)]
            response = await http.post(f"{d.publish_url}/batch", json=batch)
            assert response.status_code == 200
            assert all(a["ok"] for a in response.json())
            sent.extend(batch)

        def slow_figures(clients: dict[str, Any]) -> dict[str, Any]:
            return next(c for c in clients["clients"] if c["address"] == slow_address)

        with trio.fail_after(30):
            for _ in range(100):  # at most 3,000 states (12 MB)
                await publish_batch()
                await fast.until(lambda got: len(fast.published()) == len(sent))
                (clients,) = await admin(d.sock, {"op": "clients"})
                if slow_figures(clients)["conflated"] > 0:
                    break
            else:
                raise AssertionError(f"no conflation after {len(sent)} states")
            await publish_batch()  # more after the conflation: the marker stands for them
        await fast.until(lambda got: len(fast.published()) == len(sent))
        final = {m["key"]: m for m in sent[-3:]}
        expected_seq = {key: sum(m["key"] == key for m in sent) for key in keys}

        # the fast client: every state, in order, none conflated
        streams = by_stream(fast.published())
        for key in keys:
            got = streams[f"portfolio:desk1:{key}"]
            assert [m["seq"] for m in got] == list(range(1, expected_seq[key] + 1))
            assert [m["data"]["n"] for m in got] == [m["data"]["n"] for m in sent if m["key"] == key]
        assert not any("conflated" in m for m in fast.published())

        # the slow one reads again: what it gets ends with the current state of each key
        slow_got: list[dict[str, Any]] = []
        last: dict[str, int] = {}
        with trio.fail_after(20):
            while any(last.get(key) != expected_seq[key] for key in keys):
                for m in messages(await slow.get_message()):
                    slow_got.append(m)
                    last[m["key"]] = m["seq"]
        conflated = [m for m in slow_got if m.get("conflated")]
        assert conflated, "nothing came conflated"
        assert len(slow_got) < len(sent)
        for key in keys:
            seqs = [m["seq"] for m in slow_got if m["key"] == key]
            assert seqs == sorted(set(seqs)), key  # in order, never twice
            final_state = [m for m in slow_got if m["key"] == key][-1]
            assert final_state["data"] == final[key]["data"] and final_state["version"] == final[key]["version"]
        assert all(m["type"] == "portfolio" and m["data"]["pad"] == padding for m in slow_got)
        (clients,) = await admin(d.sock, {"op": "clients"})
        assert slow_figures(clients)["conflated"] >= 1  # still connected: never closed
        assert next(c for c in clients["clients"] if c["address"] != slow_address and
                    c["subscriptions"])["conflated"] == 0
        print(f"conflation: {len(sent)} states published, the slow client got {len(slow_got)} "
              f"({len(conflated)} conflated)")


# -- authorization -----------------------------------------------------------------------------


async def test_publishing_needs_a_token_with_a_grant_for_the_channel(tmp_path: Path) -> None:
    async with (
        daemon(tmp_path, publish="", extra=f'[auth]\nenabled = "on"\n{TOKENS}') as d,
        httpx.AsyncClient(timeout=10) as http,
        reader(d.url, READER) as sub,
    ):
        assert (await sub.send({**ALL_PUBLISHED}))["type"] == "ack"
        signal = message("signals", "momentum", "BTC-USD", {"side": "buy"})
        execution = message("executions", "momentum", "BTC-USD", {"order": "o-1"})

        async def post(body: dict[str, Any], token: str | None) -> tuple[int, dict[str, Any], httpx.Headers]:
            headers = {"authorization": f"Bearer {token}"} if token else {}
            response = await http.post(d.publish_url, json=body, headers=headers)
            return response.status_code, response.json(), response.headers

        refused = [
            (signal, None, 401, "unauthorized"),
            (signal, "not-a-token", 401, "unauthorized"),
            (signal, READER, 403, "forbidden"),  # a subscriber's token never publishes
            (execution, SIGNALS_ONLY, 403, "forbidden"),  # a grant for another channel
            ({**signal, "source": "trend"}, SIGNALS_ONLY, 403, "forbidden"),  # another source
        ]
        for body, token, status, code in refused:
            got_status, answer, headers = await post(body, token)
            assert (got_status, answer["ok"], answer["code"]) == (status, False, code), (token, body)
            assert answer["message"]
            if status == 401:
                assert headers["www-authenticate"].startswith("Bearer")
        response = await http.post(f"{d.publish_url}/batch", json=[signal])  # a batch too
        assert response.status_code == 401 and response.json()["code"] == "unauthorized"

        # over the WebSocket: a client whose token has no publish grant is refused
        error = await sub.send({"op": "publish", **signal})
        assert (error["type"], error["code"]) == ("error", "forbidden")
        async with reader(d.url, SIGNALS_ONLY) as strategy:
            error = await strategy.send({"op": "publish", **execution})
            assert (error["type"], error["code"]) == ("error", "forbidden")
            ack = await strategy.send({"op": "publish", **signal})
            assert (ack["type"], ack["seq"]) == ("ack", 1)
        # the granted ways in: HTTP with the token, and the admin socket without one
        status, answer, _ = await post(signal, SIGNALS_ONLY)
        assert (status, answer["seq"]) == (200, 2)
        status, answer, _ = await post(execution, DESK)
        assert (status, answer["seq"]) == (200, 1)
        (reply,) = await admin(d.sock, {"op": "publish", "message": {**execution, "data": {"order": "o-2"}}})
        assert (reply["type"], reply["ok"], reply["seq"]) == ("publish", True, 2)

        # the subscriber got exactly the four accepted messages: nothing refused was numbered
        await sub.until(lambda got: len(sub.published()) == 4)
        await sub.send({"op": "ping"})
        assert [(stream_of(m), m["seq"], m["data"]) for m in sub.published()] == [
            ("signals:momentum:BTC-USD", 1, {"side": "buy"}),
            ("signals:momentum:BTC-USD", 2, {"side": "buy"}),
            ("executions:momentum:BTC-USD", 1, {"order": "o-1"}),
            ("executions:momentum:BTC-USD", 2, {"order": "o-2"}),
        ]
        # a WebSocket client without a token is not let in at all (auth on)
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with trio_websocket.open_websocket_url(d.url):
                pass
        assert rejected.value.status_code == 401
        log = d.daemon.log()
        assert all(token not in log for token in (DESK, SIGNALS_ONLY, READER, "not-a-token"))


# -- bad input -----------------------------------------------------------------------------------


async def test_bad_input_is_refused_clearly_and_nothing_else_changes(tmp_path: Path) -> None:
    async with (
        daemon(tmp_path, publish="allow_loopback_anonymous = true\nmax_message_bytes = 1024") as d,
        httpx.AsyncClient(timeout=10) as http,
        reader(d.url) as sub,
    ):
        await sub.send({**ALL_PUBLISHED})
        await sub.send({"op": "subscribe", "channels": ["status"], "symbols": ["*"]})
        await sub.until(lambda got: any(m["type"] == "status" for m in got))
        good = message("signals", "momentum", "BTC-USD", {"side": "buy"})
        deep = (b'{"channel":"signals","source":"momentum","key":"BTC-USD","data":'
                + b'{"a":' * 300 + b"1" + b"}" * 301)
        cases: list[tuple[bytes, int, str, str]] = [
            (b"not json", 400, "invalid_json", "not JSON"),
            (b"", 400, "invalid_json", "not JSON"),
            (b"[1, 2]", 400, "invalid_field", "JSON object"),
            (orjson.dumps({**good, "data": {"blob": "x" * 2000}}), 413, "too_large", "at most 1024"),
            (orjson.dumps({**good, "channel": "candles"}), 404, "unknown_channel", "unknown channel 'candles'"),
            (orjson.dumps({**good, "channel": "trades"}), 404, "unknown_channel", "market-data channel"),
            (orjson.dumps({**good, "colour": "red"}), 400, "invalid_field", "unknown field 'colour'"),
            (orjson.dumps({**good, "source": "Momentum"}), 400, "invalid_field", "source"),
            (orjson.dumps({**good, "source": "momentum\n"}), 400, "invalid_field", "source"),
            (orjson.dumps({**good, "key": "BTC:USD"}), 400, "invalid_field", "key"),
            (orjson.dumps({**good, "key": "*"}), 400, "invalid_field", "key"),
            (orjson.dumps({**good, "data": "buy"}), 400, "invalid_field", "data"),
            (orjson.dumps({**good, "version": 3}), 400, "invalid_field", "version"),
            (orjson.dumps({**good, "ts": "now"}), 400, "invalid_field", "ts"),
            (deep, 400, "invalid_field", "nested"),
        ]
        for body, status, code, words in cases:
            response = await http.post(d.publish_url, content=body)
            assert response.status_code == status, (body[:80], response.text)
            answer = response.json()
            assert (answer["ok"], answer["code"]) == (False, code), body[:80]
            assert words in answer["message"], (words, answer["message"])
        # the same through the WebSocket and the admin socket
        error = await sub.send({"op": "publish", **good, "channel": "trades"})
        assert (error["type"], error["code"]) == ("error", "unknown_channel")
        (reply,) = await admin(d.sock, {"op": "publish", "id": 3, "message": {**good, "data": {"b": "x" * 2000}}})
        assert (reply["type"], reply["id"], reply["code"]) == ("error", 3, "too_large")
        # other routes and methods
        assert (await http.get(d.publish_url)).status_code == 405
        assert (await http.post(f"http://127.0.0.1:{d.http}/api/other", content=b"{}")).status_code == 404
        # batches: one bad item is refused alone, the others are answered in order
        batch = [{**good, "data": {"n": 1}}, {**good, "colour": "red"}, "x",
                 {**good, "data": {"n": 2}}, {**good, "channel": "book"}, {**good, "data": {"n": 3}}]
        response = await http.post(f"{d.publish_url}/batch", json=batch)
        assert response.status_code == 200
        answers = response.json()
        assert [(a["ok"], a.get("seq"), a.get("code")) for a in answers] == [
            (True, 1, None), (False, None, "invalid_field"), (False, None, "invalid_field"),
            (True, 2, None), (False, None, "unknown_channel"), (True, 3, None)]
        for body, code in ((b"{}", "invalid_field"), (b"[]", "invalid_field"), (b"[", "invalid_json")):
            response = await http.post(f"{d.publish_url}/batch", content=body)
            assert (response.status_code, response.json()["code"]) == (400, code)

        # the subscriber got the batch's three good ones, then a last one: nothing else
        response = await http.post(d.publish_url, json={**good, "data": {"n": 4}})
        assert response.json()["seq"] == 4
        await sub.until(lambda got: len(sub.published()) == 4)
        await sub.send({"op": "ping"})
        assert [(m["seq"], m["data"]) for m in sub.published()] == [(n, {"n": n}) for n in range(1, 5)]
        # the daemon and its clients go on: status events keep coming, health is good
        statuses = sum(m["type"] == "status" for m in sub.got)
        await sub.until(lambda got: sum(m["type"] == "status" for m in got) >= statuses + 2)
        (status,) = await admin(d.sock, {"op": "status"})
        assert status["health"] == "healthy", status
        assert "Traceback" not in d.daemon.log()


# -- fuzzed bodies over real HTTP ----------------------------------------------------------------


@st.composite
def valid_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A valid publish message, whose idempotency key may repeat and whose version
    may be stale."""
    channel = draw(st.sampled_from(sorted(PUBLISHED)))
    body = message(channel, draw(st.sampled_from(["momentum", "desk1"])),
                   draw(st.sampled_from(["BTC-USD", "ETH"])), draw(json_objects))
    if draw(st.booleans()):
        body["idempotency_key"] = draw(st.sampled_from(["k1", "k2", "k3"]))
    if channel in ("portfolio", "trading_state") and draw(st.booleans()):
        body["version"] = draw(st.integers(0, 6))
    if draw(st.booleans()):
        body["ts"] = draw(st.floats(0, 2e9))
    return body


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """A body for ``/api/publish`` or ``/api/publish/batch``: a publish message
    (valid, or broken in any way), a batch of them, any JSON, or bytes."""
    kind = draw(st.integers(0, 6))
    if kind <= 1:
        return "", orjson.dumps(draw(valid_messages()))
    if kind <= 3:
        return "", orjson.dumps(draw(publish_messages()))
    if kind == 4:
        items = st.lists(valid_messages() | publish_messages(), max_size=6)
        return "/batch", orjson.dumps(draw(items))
    if kind == 5:
        text = orjson.dumps(draw(publish_messages() | json_values))
        cut = draw(st.integers(0, len(text)))
        noise = draw(st.text(alphabet=string.printable, max_size=3)).encode()
        return draw(st.sampled_from(["", "/batch"])), text[:cut] + noise + text[cut:]
    return draw(st.sampled_from(["", "/batch"])), draw(st.binary(max_size=64))


def fuzzed(count: int) -> list[tuple[str, bytes]]:
    """``count`` bodies drawn by Hypothesis (its generation phase only: the HTTP
    part runs in the trio test)."""
    drawn: list[tuple[str, bytes]] = []

    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(bodies())
    def draw(body: tuple[str, bytes]) -> None:
        drawn.append(body)

    draw()
    return drawn


async def test_fuzzed_bodies_over_http_get_json_answers_and_the_daemon_stays_healthy(
    tmp_path: Path,
) -> None:
    drawn = fuzzed(200)
    single = {200, 400, 404, 409, 413}
    async with (
        daemon(tmp_path, publish="allow_loopback_anonymous = true\nmax_message_bytes = 2048") as d,
        httpx.AsyncClient(timeout=10) as http,
        reader(d.url) as sub,
    ):
        await sub.send({**ALL_PUBLISHED})
        delivered = 0  # answers ok and not duplicate: each is one message to the subscriber
        statuses: dict[int, int] = defaultdict(int)
        with trio.fail_after(60):
            for route, body in drawn:
                response = await http.post(d.publish_url + route, content=body)
                statuses[response.status_code] += 1
                assert response.status_code in single, (route, body, response.status_code, response.text)
                assert response.headers["content-type"] == "application/json", (body, response.text)
                answer = response.json()
                answers = answer if isinstance(answer, list) else [answer]
                if isinstance(answer, list):
                    assert response.status_code == 200 and len(answers) == len(orjson.loads(body))
                else:
                    assert answer["ok"] == (response.status_code == 200), (body, answer)
                for one in answers:
                    assert isinstance(one["ok"], bool)
                    if one["ok"]:
                        assert one["seq"] >= 1 and one["epoch"] == sub.welcome["epoch"]
                        delivered += not one.get("duplicate")
                    else:
                        assert one["code"] and one["message"]
        await sub.until(lambda got: len(sub.published()) >= delivered)
        await sub.send({"op": "ping"})
        assert len(sub.published()) == delivered
        for key, got in by_stream(sub.published()).items():
            assert [m["seq"] for m in got] == list(range(1, len(got) + 1)), key
        (status,) = await admin(d.sock, {"op": "status"})
        assert status["health"] == "healthy"
        figures = publish_component(status)["figures"]
        assert figures["accepted"] == delivered
        assert "Traceback" not in d.daemon.log()
        response = await http.post(d.publish_url, json=message("signals", "after", "k", {}))
        assert response.status_code == 200
        print(f"fuzz: {len(drawn)} bodies, statuses {dict(sorted(statuses.items()))}, "
              f"{delivered} delivered")


# -- a full dispatcher ---------------------------------------------------------------------------


async def test_a_full_dispatcher_answers_busy_after_the_timeout_and_loses_nothing_accepted(
    tmp_path: Path,
) -> None:
    config = structure_config({
        "server": {"listen": "127.0.0.1:0"},
        "admin": {"socket": str(tmp_path / "admin.sock")},
        "dispatch": {"buffer": 4},
        "reporter": {"check": 60.0, "interval": 60.0, "recent": 60.0},
        "publish": {"listen": "127.0.0.1:0", "timeout": 0.3, "allow_loopback_anonymous": True},
    })
    app = App(config)
    # the dispatcher's task holds until released: its bounded input channel fills
    released = trio.Event()
    serve = app.dispatcher.serve

    async def held(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await released.wait()
        await serve()

    app.dispatcher.serve = held
    count = 12
    async with trio.open_nursery() as nursery:
        port = await nursery.start(app.run)
        url = f"http://127.0.0.1:{app.publish_port}/api/publish"
        async with reader(f"ws://127.0.0.1:{port}") as sub:
            await sub.send({"op": "subscribe", "channels": ["signals"], "symbols": ["*"]})
            await trio.sleep(0.1)  # the reporter's first status event is in the channel
            stats = app.dispatcher.statistics()
            free = stats.buffer_size - stats.buffer_used
            assert 0 < free < count

            answers: dict[int, tuple[int, dict[str, Any], float]] = {}
            limits = httpx.Limits(max_connections=count)
            async with httpx.AsyncClient(timeout=10, limits=limits) as http:
                async def publish(n: int) -> None:
                    started = trio.current_time()
                    response = await http.post(url, json=message("signals", "momentum", "BTC-USD", {"n": n}))
                    answers[n] = (response.status_code, response.json(), trio.current_time() - started)

                async with trio.open_nursery() as publishers:
                    for n in range(count):
                        publishers.start_soon(publish, n)
                    with trio.fail_after(10):  # the ones that found no room give up
                        while len(answers) < count - free:
                            await trio.sleep(0.02)
                    stats = app.dispatcher.statistics()
                    assert (stats.buffer_used, stats.tasks_waiting_send) == (stats.buffer_size, 0)
                    busy = {n: a for n, a in answers.items()}
                    assert all(status == 503 and answer["code"] == "busy" and waited >= 0.3
                               for status, answer, waited in busy.values()), busy
                    (status,) = await admin(app.admin.path, {"op": "status"})
                    component = publish_component(status)
                    assert component["health"] == "degraded" and "busy" in component["reason"]
                    assert component["figures"]["busy"] == count - free
                    released.set()  # the others were in the channel all along: accepted now
                ok = {n: a for n, a in answers.items() if n not in busy}
                assert len(ok) == free and all(status == 200 for status, _, _ in ok.values())
                assert sorted(a["seq"] for _, a, _ in ok.values()) == list(range(1, free + 1))
                # the dispatcher is free again: a publish goes through at once
                response = await http.post(url, json=message("signals", "momentum", "BTC-USD", {"n": count}))
                assert response.json()["seq"] == free + 1

            # every accepted publish was delivered, with the seq it was answered; no busy one was
            await sub.until(lambda got: len(sub.published()) == free + 1)
            await sub.send({"op": "ping"})
            delivered = {m["data"]["n"]: m["seq"] for m in sub.published()}
            assert delivered == {**{n: a["seq"] for n, (_, a, _) in ok.items()}, count: free + 1}
            (status,) = await admin(app.admin.path, {"op": "status"})
            figures = figures_of(publish_component(status))
            assert figures == {("signals", "momentum"): {
                "accepted": free + 1, "duplicate": 0, "stale": 0, "refused": count - free}}
            print(f"full dispatcher: {count} publishers, {free} accepted, {count - free} busy")
        nursery.cancel_scope.cancel()
