"""Descriptors and exact connection limits, on real daemons (subprocesses) and real
sockets on 127.0.0.1: one descriptor per client, a burst of 3 x a limit admits
exactly the limit (503 or 429 for the others, with Retry-After), a daemon with a
low open-file limit refuses clients cleanly and keeps its admin socket, and the
shipped systemd unit's limit and exposure."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import orjson
import pytest
import trio
import trio_websocket
import trustme
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request, TextMessage

from daemon.config import load_config
from daemon.limits import reserve
from daemon.tls import server_context
from tests.broadcast_server import start
from tests.daemon_process import TICKWIRE, Daemon, admin, reaped, run_cli, stop
from tests.test_tls import issue, trusting

ROOT = Path(__file__).resolve().parent.parent

#: ``python -c`` that sets the open-file limit (soft, hard: argv 1 and 2), then runs
#: ``tickwire`` with the rest of argv
LAUNCH = ("import resource, sys; "
          "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
          "sys.argv = ['tickwire', *sys.argv[3:]]; "
          "from daemon.cli import main; main()")


@attrs.define
class Running:
    daemon: Daemon
    port: int
    admin: str

    @property
    def pid(self) -> int:
        return self.daemon.process.pid

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def limit_with_free(self, free: int) -> int:
        """The soft limit under which the daemon has ``free`` descriptors left (a
        new descriptor takes the lowest free number, below the limit)."""
        numbers = {int(n) for n in os.listdir(f"/proc/{self.pid}/fd")}
        limit = 0
        while limit - len([n for n in numbers if n < limit]) < free:
            limit += 1
        return limit

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.daemon.lines if re.search(pattern, line)]


@asynccontextmanager
async def daemon(config: Path, nofile: tuple[int, int] | None = None) -> AsyncIterator[Running]:
    """``tickwire run --config CONFIG`` (with the open-file limit ``nofile``),
    started; SIGTERM at the end."""
    args = ["run", "--config", str(config)]
    argv = ([sys.executable, "-c", LAUNCH, *map(str, nofile), *args] if nofile
            else [*TICKWIRE, *args])
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE,
                                               stdin=subprocess.DEVNULL, cwd=ROOT)
    running = Daemon(process)
    async with reaped(process), trio.open_nursery() as nursery:
        nursery.start_soon(running._read)
        port = int((await running.wait_for(r"broadcast: listening on ws://127\.0\.0\.1:(\d+)"))[1])
        path = (await running.wait_for(r"admin: listening on (\S+)"))[1].strip('"')
        await running.wait_for(r"tickwire \S+ started")
        yield Running(running, port, path)
        assert await stop(running) == 0, running.log()


def config(tmp_path: Path, **server: int) -> Path:
    lines = "".join(f"{key} = {value}\n" for key, value in server.items())
    path = tmp_path / "tickwire.toml"
    path.write_text(f'[server]\nlisten = "127.0.0.1:0"\n{lines}')
    return path


@attrs.define(eq=False)
class Client:
    """A WebSocket client on a raw socket (wsproto): ``status`` is the answer to
    its upgrade (101, a refusal, 0 when the server closed without one)."""

    stream: trio.SocketStream
    ws: WSConnection = attrs.field(factory=lambda: WSConnection(ConnectionType.CLIENT))
    status: int | None = None
    retry_after: str | None = None
    body: bytes = b""

    async def upgrade(self) -> int:
        await self.stream.send_all(self.ws.send(Request(host="127.0.0.1", target="/")))
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                self.status = self.status or 0
                return self.status
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    self.status = 101
                    return 101
                if isinstance(event, RejectConnection):
                    self.status = event.status_code
                    self.retry_after = dict(event.headers).get(b"retry-after", b"").decode() or None
                    if not event.has_body:
                        return self.status
                elif isinstance(event, RejectData):
                    self.body += event.data
                    if event.body_finished:
                        return self.status or 0

    async def message(self) -> dict:
        while True:
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    return orjson.loads(event.data)
            data = await self.stream.receive_some(65536)
            assert data, "the server closed the connection"
            self.ws.receive_data(data)

    async def send(self, message: dict) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(orjson.dumps(message).decode())))

    async def aclose(self) -> None:
        await self.stream.aclose()


async def connect(port: int, source: str = "127.0.0.1") -> Client:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return Client(trio.SocketStream(sock))


async def burst(port: int, count: int, sources: list[str]) -> list[Client]:
    """``count`` clients connecting and upgrading at once (from ``sources`` in
    turn); every one answered or dropped."""
    clients: list[Client] = []

    async def one(source: str) -> None:
        client = await connect(port, source)
        clients.append(client)
        await client.upgrade()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, sources[i % len(sources)])
    return clients


async def closed(clients: list[Client]) -> None:
    for client in clients:
        await client.aclose()


async def server_figures(running: Running) -> dict:
    (status,) = await admin(running.admin, {"op": "status"})
    [server] = [c for c in status["components"] if c["name"] == "server"]
    return server


async def until_open(running: Running, count: int) -> None:
    with trio.fail_after(10):
        while (await server_figures(running))["figures"]["open"] != count:
            await trio.sleep(0.02)


async def test_a_burst_of_three_times_each_limit_admits_exactly_the_limit(tmp_path: Path) -> None:
    async with daemon(config(tmp_path, max_connections=60, max_connections_per_ip=40)) as running:
        # max_connections: 180 at once from 5 addresses (36 each, under their limit)
        clients = await burst(running.port, 180, [f"127.0.0.{i}" for i in range(1, 6)])
        statuses = Counter(c.status for c in clients)
        assert statuses == {101: 60, 503: 120}, statuses
        refused = [c for c in clients if c.status == 503]
        assert {c.retry_after for c in refused} == {"5"}
        assert {c.body for c in refused} == {b"too many connections\n"}
        server = await server_figures(running)
        assert server["figures"]["open"] == 60 and server["health"] == "degraded"
        assert "max_connections" in server["reason"]
        assert len(running.lines(r"at server\.max_connections \(60\)")) == 1
        await closed(clients)
        await until_open(running, 0)

        # max_connections_per_ip: 120 at once from one address
        clients = await burst(running.port, 120, ["127.0.0.1"])
        statuses = Counter(c.status for c in clients)
        assert statuses == {101: 40, 429: 80}, statuses
        assert {c.retry_after for c in clients if c.status == 429} == {"5"}
        other = await connect(running.port, "127.0.0.2")  # another address is admitted
        assert await other.upgrade() == 101
        assert len(running.lines(r"127\.0\.0\.1 has 40 connections, at "
                                 r"server\.max_connections_per_ip \(40\)")) == 1
        await closed([*clients, other])
        await until_open(running, 0)

        # a connection counts from its accept: 60 that have not sent their handshake
        # fill the server, the next is refused, and then the 60 are all admitted
        silent = [await connect(running.port, f"127.0.0.{1 + i % 3}") for i in range(60)]
        await until_open(running, 60)
        late = await connect(running.port, "127.0.0.4")
        assert await late.upgrade() == 503
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for client in silent:
                    nursery.start_soon(client.upgrade)
        assert {c.status for c in silent} == {101}
        await closed([*silent, late])
    assert "Traceback" not in running.daemon.log()


async def test_one_descriptor_per_client(tmp_path: Path) -> None:
    async with daemon(config(tmp_path)) as running:
        clients: list[Client] = []

        async def add(count: int) -> None:
            with trio.fail_after(20):
                for _ in range(count):
                    client = await connect(running.port)
                    assert await client.upgrade() == 101
                    assert (await client.message())["type"] == "welcome"
                    await client.send({"op": "subscribe", "id": 1, "channels": ["system"],
                                       "symbols": ["*"]})
                    assert (await client.message())["type"] == "ack"
                    clients.append(client)

        before = running.descriptors()
        await add(100)
        at_100 = running.descriptors()
        await add(100)
        at_200 = running.descriptors()
        print(f"descriptors: {before} with no client, {at_100} with 100, {at_200} with 200")
        assert at_200 - at_100 <= 100
        assert at_200 - before <= 200 + 4
        await closed(clients)
        await until_open(running, 0)
        assert running.descriptors() <= before + 4


async def test_a_daemon_out_of_descriptors_refuses_cleanly_and_keeps_its_admin_socket(
    tmp_path: Path,
) -> None:
    """Soft limit 200, hard 256: the daemon raises it to 256 and keeps ``reserve``
    for itself; clients get the rest, then 503. When something else takes the
    descriptors anyway (here: its soft limit lowered under it), accept fails with
    EMFILE: one line, no traceback, the admin socket answers, and clients are
    admitted again once others have left."""
    path = config(tmp_path)
    budget = 256 - reserve(load_config(path))
    async with daemon(path, nofile=(200, 256)) as running:
        [line] = running.lines(r"descriptors: open-file limit")
        assert (f"open-file limit raised from 200 to 256 (hard limit 256); {256 - budget} kept "
                f"for the daemon, {budget} for clients") in line
        assert len(running.lines(r"exceed the open-file limit \(256; hard limit 256\)")) == 1

        # the descriptor budget: budget clients, then 503
        clients = await burst(running.port, budget + 40, ["127.0.0.1", "127.0.0.2"])
        statuses = Counter(c.status for c in clients)
        assert statuses == {101: budget, 503: 40}, statuses
        assert len(running.lines(r"at the descriptor budget")) == 1
        result = await run_cli("status", "--socket", running.admin, "--json")
        assert result.returncode == 1, result.stderr  # degraded, and it answers
        server = [c for c in orjson.loads(result.stdout)["components"] if c["name"] == "server"][0]
        assert "descriptor budget" in server["reason"]
        admitted = [c for c in clients if c.status == 101]
        await closed([c for c in clients if c.status != 101] + admitted[:30])
        admitted = admitted[30:]
        await until_open(running, budget - 30)
        more = await connect(running.port)
        assert await more.upgrade() == 101  # admitted again once others have left
        admitted.append(more)
        await running.daemon.wait_for(r"admitting clients again")

        # EMFILE: the daemon's descriptors taken from under it (its soft limit lowered
        # to leave it 5), then 20 clients
        resource.prlimit(running.pid, resource.RLIMIT_NOFILE, (running.limit_with_free(5), 256))
        waiting = [await connect(running.port) for _ in range(20)]
        async with trio.open_nursery() as nursery:
            for client in waiting:
                nursery.start_soon(client.upgrade)
            await running.daemon.wait_for(r"cannot accept clients: EMFILE")
            result = await run_cli("status", "--socket", running.admin, "--json")
            assert result.returncode == 1, result.stderr
            server = [c for c in orjson.loads(result.stdout)["components"]
                      if c["name"] == "server"][0]
            assert server["reason"] == "cannot accept clients: no descriptor left (EMFILE)"
            await trio.sleep(1.5)  # accept is tried again meanwhile: no more lines
            assert len(running.lines(r"broadcast: cannot accept clients")) == 1
            nursery.cancel_scope.cancel()
        assert Counter(c.status for c in waiting) == {101: 5, None: 15}
        await closed([c for c in waiting if c.status is None])  # they give up
        # others leave: descriptors are free, the daemon accepts clients again. The 5
        # admitted under the lowered limit leave too: their descriptors are below it
        # for sure (a new descriptor takes the lowest free number), where the others'
        # may all be above it, and free no number the daemon can use
        late = [c for c in waiting if c.status == 101]
        await closed(admitted[:20] + late)
        await running.daemon.wait_for(r"accepting clients again")
        with trio.fail_after(10):
            last = await connect(running.port)
            assert await last.upgrade() == 101
            assert (await last.message())["type"] == "welcome"
        assert len(running.lines(r"broadcast: cannot accept clients")) == 1
        assert len(running.lines(r"broadcast: accepting clients again")) == 1
        await closed([*admitted[20:], last])
    log = running.daemon.log()
    assert "Traceback" not in log and "exc=" not in log and "serve_listeners" not in log


async def test_over_wss_a_refusal_is_503_after_the_tls_handshake(tmp_path: Path) -> None:
    ca = trustme.CA()
    context = server_context(issue(ca, tmp_path, "server"))
    async with trio.open_nursery() as nursery:
        running = await start(nursery, ssl_context=context, max_connections=1)
        async with trio_websocket.open_websocket_url(running.url,
                                                     ssl_context=trusting(ca)) as first:
            await first.get_message()
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with trio_websocket.open_websocket_url(running.url,
                                                             ssl_context=trusting(ca)):
                    pass
            assert refused.value.status_code == 503
            assert dict(refused.value.headers)[b"retry-after"] == b"5"
            assert refused.value.body == b"too many connections\n"
        nursery.cancel_scope.cancel()


async def test_check_config_warns_when_max_connections_does_not_fit(tmp_path: Path) -> None:
    path = config(tmp_path, max_connections=2000)
    check = [sys.executable, "-c", LAUNCH, "1024", "1024", "check-config", str(path)]
    with trio.fail_after(30):
        result = await trio.run_process(check, capture_stdout=True, capture_stderr=True,
                                        check=False, cwd=ROOT)
    assert result.returncode == 0
    kept = reserve(load_config(path))
    assert result.stderr.decode().splitlines() == [
        f"warning: server.max_connections (2000) and the {kept} descriptors the "
        "daemon keeps for itself exceed this shell's hard open-file limit (1024), which the "
        f"daemon would raise its soft limit to: at most {1024 - kept} clients can connect, the "
        "others get 503; raise the limit (ulimit -n; under systemd LimitNOFILE=, 65536 in the "
        "shipped unit) or lower server.max_connections"]
    check[3:5] = ["1024", "4096"]  # the hard limit is what counts: no warning
    with trio.fail_after(30):
        result = await trio.run_process(check, capture_stdout=True, capture_stderr=True,
                                        check=False, cwd=ROOT)
    assert result.returncode == 0 and result.stderr == b""


def unit() -> str:
    return (ROOT / "systemd" / "tickwire.service").read_text()


def test_the_units_limit_holds_the_default_max_connections() -> None:
    [limit] = re.findall(r"^LimitNOFILE=(\d+)$", unit(), re.MULTILINE)
    default = load_config(None)
    assert default.server.max_connections == 10_000
    assert int(limit) >= default.server.max_connections + reserve(default)


def test_the_units_exposure_stays_at_or_below_2(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (.ci/run installs it as root)")
    copy = tmp_path / "tickwire.service"
    copy.write_text(unit().replace("/opt/tickwire/bin/tickwire",
                                   str(Path(sys.executable).parent / "tickwire")))
    result = subprocess.run([analyze, "security", "--offline=yes", str(copy)],
                            capture_output=True, text=True, timeout=60)
    if "--offline" in result.stderr:  # systemd before 250
        pytest.skip("systemd-analyze is too old for security --offline (systemd 250)")
    assert result.returncode == 0, result.stderr
    exposure = re.search(r"Overall exposure level for tickwire\.service: (\d+\.\d+)", result.stdout)
    assert exposure, result.stdout
    assert float(exposure[1]) <= 2.0
