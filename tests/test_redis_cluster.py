"""tickwire's roles on a real Redis Cluster (docs/cluster.md, "Redis Cluster"):
three ``redis-server`` masters on 127.0.0.1 joined by ``redis-cli --cluster
create`` (tests/redis_server.py), ``cluster.redis_cluster = true``; a real
collector replaying the Coinbase capture, a real edge, a real WebSocket client.
Expected trades and books come from the raw frames (tests/test_replay_loop.py)."""

from __future__ import annotations

import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import orjson
import pytest
import trio
import trio_websocket

from daemon.cluster.engine import Write, open_engine, split_payload
from daemon.errors import RedisUnavailable
from tests.daemon_process import admin, run_cli, tickwire, write_config
from tests.helpers import request
from tests.redis_server import NO_REDIS, NO_REDIS_CLI, RedisClusterServers, free_port
from tests.test_cluster import (
    Frames,
    books_of,
    contiguous_trades,
    drain,
    node_config,
    port_of,
    read_until,
    trades,
    welcome,
)
from tests.test_replay_loop import COINBASE, coinbase_final_books, recorded

CLUSTER = "redis_cluster = true"


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """One 3-master Redis Cluster for this module's tests (they keep apart by key
    prefix), killed at the end. Skips where redis-server or redis-cli is missing."""
    if shutil.which("redis-server") is None:
        pytest.skip(NO_REDIS)
    if shutil.which("redis-cli") is None:
        pytest.skip(NO_REDIS_CLI)
    servers = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


async def test_a_collector_and_an_edge_on_a_redis_cluster(
        tmp_path: Path, captures: Path, redis_cluster: RedisClusterServers) -> None:
    """A collector replays the Coinbase capture into a 3-master Redis Cluster; an
    edge serves it to a client subscribed to every trade and book. The client
    gets every recorded trade once, with contiguous seq from 1 per stream, and
    books equal to the recording's final books. The streams are spread over all
    three masters, each stream's keys on one node (its hash tag), and the edge
    reads them with one blocking reader per slot: as many as the slots of the
    streams it follows, more than one."""
    frames = recorded(captures, COINBASE)
    n_trades = sum(1 for m in frames if m["type"] in ("match", "last_match"))
    prefix = f"t{secrets.token_hex(4)}"
    paths = [str(captures / name) for name in COINBASE]
    async with AsyncExitStack() as stack:
        edge = await stack.enter_async_context(tickwire(
            "run", "--config",
            str(node_config(tmp_path, "e", "edge", redis_cluster, prefix, CLUSTER))))  # type: ignore[arg-type]
        ws = await stack.enter_async_context(
            trio_websocket.open_websocket_url(f"ws://127.0.0.1:{await port_of(edge)}"))
        await welcome(ws)
        await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades", "book"],
                           "symbols": ["coinbase:*"]})
        got: Frames = []
        await read_until(ws, got, lambda g: any(m["type"] == "ack" for m in g))
        collector = await stack.enter_async_context(tickwire(
            "replay", *paths, "--speed", "max", "--listen", "127.0.0.1:0", "--config",
            str(node_config(tmp_path, "c", "collector", redis_cluster, prefix, CLUSTER))))  # type: ignore[arg-type]
        await collector.wait_for("lease of coinbase taken by c")
        await read_until(ws, got, lambda g: len(trades(g)) >= n_trades, 30)
        await collector.wait_for("replay finished", 30)
        await drain(ws, got)
        [status] = await admin(tmp_path / "e.sock", {"op": "status", "id": 1})
        shown = (await run_cli("status", "--socket", str(tmp_path / "e.sock"))).stdout.decode()
    for daemon in (edge, collector):
        assert daemon.process.returncode == 0, daemon.log()
        assert "Traceback" not in daemon.log(), daemon.log()
    # every trade once, contiguous from 1 per stream; the books of the recording
    ids = [(m["symbol"], m["id"]) for m in trades(got)]
    assert len(ids) == len(set(ids)) == n_trades
    assert all(seqs[0] == 1 for seqs in contiguous_trades(got).values())
    assert books_of(got) == coinbase_final_books(frames)
    # where the keys are: every master holds streams, each stream's keys on one
    by_node = redis_cluster.keys_by_node(f"{prefix}:{{*")
    nodes_of: dict[str, set[int]] = {}
    for port, keys in by_node.items():
        for key in keys:
            found = re.fullmatch(re.escape(prefix) + r":\{(.+)\}:(s|m|b)", key)
            assert found, key
            nodes_of.setdefault(found.group(1), set()).add(port)
    assert all(len(ports) == 1 for ports in nodes_of.values()), nodes_of
    assert all(by_node.values()), {port: len(keys) for port, keys in by_node.items()}
    streams = {s["stream"] for s in status["cluster"]["streams"]}
    assert {f"trades:coinbase:{symbol}" for symbol, _ in ids} <= streams <= nodes_of.keys()
    # one reader per slot followed (slots as Redis gives them: CLUSTER KEYSLOT)
    slots = {redis_cluster.slot(f"{prefix}:{{{stream}}}:s") for stream in streams}
    assert status["cluster"]["mirror"]["readers"] == len(slots) > 1
    assert status["cluster"]["redis_cluster"] and status["cluster"]["connected"]
    # tickwire status says so too
    assert f"node e, redis {redis_cluster.url} (cluster) ({prefix}) connected" in shown
    assert f"{len(slots)} readers" in shown
    [redis] = [c for c in status["components"] if c["name"] == "redis"]
    assert redis["health"] == "healthy"


async def test_the_engine_keeps_every_command_to_one_slot(
        redis_cluster: RedisClusterServers) -> None:
    """The engine's commands on a Redis Cluster: a pipelined batch of writes into
    12 streams on every master numbers each stream 1..5; a publish's idempotency
    key (a key beside its stream's) answers ``duplicate`` with the first seq, a
    stale ``version`` is refused; the cluster's epoch, the registry and a lease
    (global keys, single-key commands) behave as on one Redis; one XREAD on
    streams of two slots is refused by the client (CROSSSLOT: why the edge reads
    per slot), one per slot reads them."""
    from coredis.exceptions import ClusterCrossSlotError

    prefix = f"t{secrets.token_hex(4)}"
    streams = [f"trades:coinbase:S{i}-USD" for i in range(12)]

    def write(stream: str, n: int, **more: object) -> Write:
        before, after = split_payload(orjson.dumps({"n": n, "seq": 0}), 0)
        return Write(stream=stream, before=before, after=after, maxlen=100, recv_ts=1.0,
                     **more)  # type: ignore[arg-type]

    with trio.fail_after(20):
        async with open_engine(redis_cluster.url, prefix, 2.0, True) as one, \
                open_engine(redis_cluster.url, prefix, 2.0, True) as two:
            assert await one.cluster_epoch("E1") == await two.cluster_epoch("E2") == "E1"
            await one.register(streams[:6])
            await two.register(streams[6:])
            assert await two.streams() == set(streams)
            written = await one.write([write(s, n, wseq=n) for n in range(1, 6) for s in streams],
                                      "w", "E1")
            assert [w.seq for w in written] == [n for n in range(1, 6) for _ in streams]
            again = await two.write([write(streams[0], 5, wseq=5)], "w", "E1")
            assert [(w.outcome, w.seq) for w in again] == [("duplicate", 5)]
            signal = "signals:desk:BTC-USD"
            first = await one.write([write(signal, 1, idempotency="k1", window=60.0)], "a", "E1")
            dup = await two.write([write(signal, 1, idempotency="k1", window=60.0)], "b", "E1")
            assert [(w.outcome, w.seq) for w in first + dup] == [("accepted", 1), ("duplicate", 1)]
            state = "portfolio:desk:BTC"
            await one.write([write(state, 1, version=5)], "a", "E1")
            [stale] = await two.write([write(state, 2, version=4)], "b", "E1")
            assert (stale.outcome, stale.version) == ("stale", 5)
            assert await one.acquire("coinbase", "n1", 5.0) == "n1"
            assert await two.acquire("coinbase", "n2", 5.0) == "n1"
            assert await two.release("coinbase", "n2") is False
            assert await one.release("coinbase", "n1") is True
            assert await two.acquire("coinbase", "n2", 5.0) == "n2"
            by_slot: dict[int, list[str]] = {}
            for stream in streams:
                by_slot.setdefault(one.slot(stream), []).append(stream)
            assert len(by_slot) > 1
            a, b = (group[0] for group in list(by_slot.values())[:2])
            with pytest.raises(ClusterCrossSlotError):
                await one.read({a: 0, b: 0}, 0.01, 10)
            for group in by_slot.values():
                got = await one.read(dict.fromkeys(group, 3), 0.01, 10)
                assert {k: [e.seq for e in v] for k, v in got.items()} == dict.fromkeys(group, [4, 5])
    # the slots the engine computes are Redis's own
    assert all(redis_cluster.slot(f"{prefix}:{{{stream}}}:s") == slot
               for slot, group in by_slot.items() for stream in group)
    masters = redis_cluster.keys_by_node(f"{prefix}:{{trades:*}}:s")
    assert all(masters.values())


async def test_an_unreachable_redis_cluster_is_unavailable_not_a_crash() -> None:
    """``redis_cluster`` with no node answering: opening the engine does not fail
    (a node may start later: its keeper tries again); each command raises
    ``RedisUnavailable`` naming the cause, within the reply timeout."""
    url = f"redis://127.0.0.1:{free_port()}"
    with trio.fail_after(10):
        async with open_engine(url, "t", 0.5, True) as engine:
            for _ in range(2):
                with pytest.raises(RedisUnavailable, match="redis: ping: the cluster is not reachable"):
                    await engine.ping()
            with pytest.raises(RedisUnavailable, match="redis: meta"):
                await engine.meta("trades:coinbase:BTC-USD")


async def test_a_redis_cluster_with_a_database_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """``redis_cluster = true`` with a database other than 0 in the URL: the config
    check prints one line naming the key, and exits 2."""
    bad = write_config(tmp_path / "bad.toml", '[cluster]\nredis = "redis://127.0.0.1:7000/2"\n'
                                              f"{CLUSTER}\n")
    checked = await run_cli("check-config", str(bad))
    assert checked.returncode == 2
    [line] = checked.stderr.decode().strip().splitlines()
    assert "a Redis Cluster has database 0 only" in line and "cluster.redis_cluster" in line


async def test_a_master_back_empty_starts_its_streams_over_on_the_edge(tmp_path: Path) -> None:
    """A master of a Redis Cluster killed and started again without its data
    (no persistence) while ``PREFIX:epoch`` lives on another master: the
    cluster's epoch stays, but an edge's mirror (in this process) sees that the
    lost master's streams were made again (their ``born``) when it reads Redis
    again: it closes the clients of exactly those streams (1012 in the daemon)
    and follows them from their new history; the other streams go on. (The
    mirror's first retry waits 2.9 s, a seeded backoff, so that the collector's
    writes of the new history come first: read again from its last seq, a
    stream made again would never deliver anything.)"""
    import random

    from daemon.channels import Retention
    from daemon.cluster.mirror import Mirror
    from daemon.dispatch import Dispatcher
    from daemon.supervise import Backoff

    if shutil.which("redis-server") is None:
        pytest.skip(NO_REDIS)
    if shutil.which("redis-cli") is None:
        pytest.skip(NO_REDIS_CLI)
    servers = RedisClusterServers(tmp_path / "cluster")
    prefix = "born"
    streams = [f"trades:coinbase:S{i}-USD" for i in range(12)]

    def trade(stream: str, n: int, life: str) -> Write:
        before, after = split_payload(orjson.dumps({"life": life, "n": n, "seq": 0}), 0)
        return Write(stream=stream, before=before, after=after, maxlen=100, recv_ts=1.0, wseq=n)

    async def until(done: object, seconds: float) -> None:
        with trio.fail_after(seconds):
            while not done():  # type: ignore[operator]
                await trio.sleep(0.02)

    closed: list[set[str] | None] = []
    try:
        servers.start()
        async with open_engine(servers.url, prefix, 1.0, True) as writer, \
                open_engine(servers.url, prefix, 1.0, True) as reader:
            epoch = await writer.cluster_epoch("E")
            await writer.register(streams)
            await writer.write([trade(s, n, "first") for n in range(1, 6) for s in streams],
                               "w", epoch)
            by_node = servers.keys_by_node(f"{prefix}:*")
            port = next(port for port, keys in by_node.items()
                        if not {f"{prefix}:epoch", f"{prefix}:streams"} & set(keys)
                        and any(key.endswith(":s") for key in keys))
            lost = {s for s in streams if f"{prefix}:{{{s}}}:s" in by_node[port]}
            [node] = [n for n in servers.nodes if n.port == port]
            dispatcher = Dispatcher(64, {"trades": Retention(1000, 3600.0)})
            mirror = Mirror(reader, dispatcher, 100, Backoff(3.0, 3.0, random.Random(2)),
                            closed.append, lambda epoch: None)
            async with trio.open_nursery() as nursery:
                await nursery.start(mirror.run)
                await until(lambda: all(s in dispatcher.streams and dispatcher.streams[s].seq == 5
                                        for s in streams), 10)
                node.stop()
                await until(lambda: not mirror.connected, 10)
                node.start()
                servers.wait_ok()
                for _ in range(100):  # the writer's connections to the node broke
                    try:
                        await writer.write([trade(s, n, "second") for n in (1, 2) for s in lost],
                                           "w", epoch)
                        break
                    except RedisUnavailable:
                        await trio.sleep(0.05)
                await until(lambda: mirror.connected and closed, 10)
                await until(lambda: all(dispatcher.streams[s].seq == 2 for s in lost), 10)
                nursery.cancel_scope.cancel()
            assert await reader.cluster_epoch("X") == epoch  # the cluster's epoch stayed
    finally:
        servers.stop()
    assert 0 < len(lost) < len(streams)
    assert closed == [lost]
    for stream in streams:
        history = [orjson.loads(m.payload) for m in dispatcher.streams[stream].history]
        if stream in lost:
            assert [(h["life"], h["seq"]) for h in history] == [("second", 1), ("second", 2)]
        else:
            assert [(h["life"], h["seq"]) for h in history] == [("first", n) for n in range(1, 6)]
    assert mirror.statistics().resets == len(lost)
