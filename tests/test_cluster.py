"""Scale-out on Redis (docs/cluster.md): a real ``redis-server`` on 127.0.0.1
(tests/redis_server.py), real ``tickwire`` daemons as subprocesses in roles
``collector`` and ``edge``, real WebSocket clients; the Coinbase capture replayed
by the collector. Expected trades and books are computed from the raw frames
(tests/test_replay_loop.py), never from the daemon's code."""

from __future__ import annotations

import re
import secrets
import signal
from collections import defaultdict
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson
import trio
import trio.lowlevel
import trio_websocket

from daemon.cluster.engine import Write, open_engine, split_payload
from tests.daemon_process import Daemon, admin, stop, tickwire, write_config
from tests.helpers import apply_levels, messages, request
from tests.redis_server import RedisServer
from tests.test_replay_loop import COINBASE, coinbase_final_books, recorded

Frames = list[dict[str, Any]]
#: the products of the Coinbase capture (its subscription)
SYMBOLS = ["SKL-USD", "SKL-BTC", "BAND-GBP", "NMR-EUR", "BAND-BTC", "YFI-BTC", "DASH-BTC",
           "NU-GBP", "CRV-EUR", "SKL-GBP"]


def node_config(folder: Path, name: str, role: str, redis: RedisServer, prefix: str,
                extra: str = "") -> Path:
    """A node's config file: its role, Redis, its own admin socket, any port."""
    return write_config(folder / f"{name}.toml", f"""
role = "{role}"
[server]
listen = "127.0.0.1:0"
[admin]
socket = "{folder / name}.sock"
[reconnect]
base = 0.1
cap = 1.0
[cluster]
redis = "{redis.url}"
prefix = "{prefix}"
node = "{name}"
{extra}
""")


#: Messages a test client reads ahead while the test reads another client: it keeps
#: reading its socket, as a real client does (trio-websocket's default of 1 stops
#: reading, and the edge closes it 4008 as a slow consumer of a lossless stream).
READ_AHEAD = 100_000


async def port_of(daemon: Daemon) -> int:
    found = await daemon.wait_for(r"listening on ws://127\.0\.0\.1:(\d+)")
    return int(found.group(1))


async def welcome(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    hello: dict[str, Any] = orjson.loads(await ws.get_message())
    assert hello["type"] == "welcome"
    return hello


async def read_until(ws: trio_websocket.WebSocketConnection, got: Frames, done: Any,
                     seconds: float = 60) -> None:
    """Append every message to ``got`` until ``done(got)``."""
    with trio.fail_after(seconds):
        while not done(got):
            got += messages(await ws.get_message())


async def drain(ws: trio_websocket.WebSocketConnection, got: Frames, quiet: float = 1.0) -> None:
    """Append messages until none came for ``quiet`` seconds (bounded: 30 s)."""
    with trio.fail_after(30):
        while True:
            with trio.move_on_after(quiet):
                got += messages(await ws.get_message())
                continue
            return


def trades(got: Frames) -> list[dict[str, Any]]:
    return [m for m in got if m["type"] == "trade"]


def books_of(got: Frames) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """The books a client holds from its book messages (contiguous from each
    snapshot: asserted)."""
    books: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    expected: dict[str, int] = {}
    for m in got:
        if m["type"] == "book_snapshot":
            books[m["symbol"]] = ({}, {})
        elif m["type"] == "book_update":
            assert m["seq"] == expected[m["symbol"]], (m["symbol"], m["seq"])
        else:
            continue
        expected[m["symbol"]] = m["seq"] + 1
        apply_levels(books[m["symbol"]][0], m["bids"])
        apply_levels(books[m["symbol"]][1], m["asks"])
    return books


def contiguous_trades(got: Frames) -> dict[str, list[int]]:
    by_stream: dict[str, list[int]] = defaultdict(list)
    for m in trades(got):
        by_stream[m["symbol"]].append(m["seq"])
    for symbol, seqs in by_stream.items():
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (symbol, seqs)
    return by_stream


async def test_one_collector_two_edges_and_a_client_moving_between_them(
        tmp_path: Path, captures: Path, redis_server: RedisServer) -> None:
    """One collector replays the Coinbase capture into Redis; two edges serve it.
    A client on each edge gets every recorded trade once, with contiguous seq from
    1, the same seq and the same messages on both edges, and books equal to the
    recording's final books. A third client reads edge A until 20 trades, leaves,
    and resumes on edge B with ``since`` and A's epoch: ``recovered: true`` for
    every stream, exactly the trades it missed, none twice."""
    frames = recorded(captures, COINBASE)
    n_trades = sum(1 for m in frames if m["type"] in ("match", "last_match"))
    prefix = f"t{secrets.token_hex(4)}"
    paths = [str(captures / name) for name in COINBASE]
    symbols = ["coinbase:*"]
    async with AsyncExitStack() as stack:
        edge_a = await stack.enter_async_context(tickwire(
            "run", "--config", str(node_config(tmp_path, "a", "edge", redis_server, prefix))))
        edge_b = await stack.enter_async_context(tickwire(
            "run", "--role", "edge",
            "--config", str(node_config(tmp_path, "b", "all", redis_server, prefix))))
        port_a, port_b = await port_of(edge_a), await port_of(edge_b)
        ws_a = await stack.enter_async_context(
            trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port_a}", message_queue_size=READ_AHEAD))
        ws_b = await stack.enter_async_context(
            trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port_b}", message_queue_size=READ_AHEAD))
        mover = await stack.enter_async_context(
            trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port_a}", message_queue_size=READ_AHEAD))
        hello_a, hello_b, hello_m = await welcome(ws_a), await welcome(ws_b), await welcome(mover)
        # one cluster, one epoch: both edges say the same
        assert hello_a["epoch"] == hello_b["epoch"] == hello_m["epoch"]
        for ws in (ws_a, ws_b):
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades", "book"],
                               "symbols": symbols})
        await request(mover, {"op": "subscribe", "id": 1, "channels": ["trades"],
                              "symbols": symbols})
        got_a: Frames = []
        got_b: Frames = []
        moved: Frames = []
        for ws, got in ((ws_a, got_a), (ws_b, got_b), (mover, moved)):
            await read_until(ws, got, lambda g: any(m["type"] == "ack" for m in g))
        collector = await stack.enter_async_context(tickwire(
            "replay", *paths, "--speed", "max", "--listen", "127.0.0.1:0",
            "--config", str(node_config(tmp_path, "c", "collector", redis_server, prefix))))
        await read_until(mover, moved, lambda g: len(trades(g)) >= 20)
        await mover.aclose()
        for ws, got in ((ws_a, got_a), (ws_b, got_b)):
            await read_until(ws, got, lambda g: len(trades(g)) >= n_trades)
        await collector.wait_for("replay finished", 60)
        for ws, got in ((ws_a, got_a), (ws_b, got_b)):
            await drain(ws, got)

        # the client that left A resumes on B with since and A's epoch; it names
        # every stream of its symbols, 0 for one it saw nothing of (a stream that
        # first traded between its last read and its leaving: not named, it would
        # start fresh)
        last = {f"trades:coinbase:{m['product_id']}": 0
                for m in frames if m["type"] in ("match", "last_match")}
        for m in trades(moved):
            last[f"trades:coinbase:{m['symbol']}"] = m["seq"]
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port_b}") as ws:
            assert (await welcome(ws))["epoch"] == hello_m["epoch"]
            await request(ws, {"op": "subscribe", "id": 2, "channels": ["trades"],
                               "symbols": symbols, "since": last, "epoch": hello_m["epoch"]})
            resumed: Frames = []
            await read_until(ws, resumed, lambda g: any(m["type"] == "ack" for m in g))
            await drain(ws, resumed)
        status, metrics = await admin(tmp_path / "b.sock", {"op": "status", "id": 1},
                                      {"op": "metrics", "id": 2})

    # every node stopped cleanly on SIGTERM
    for daemon in (edge_a, edge_b, collector):
        assert daemon.process.returncode == 0, daemon.log()
        assert "Traceback" not in daemon.log(), daemon.log()
    # every trade once, contiguous from 1, on both edges
    for got in (got_a, got_b):
        ids = [(m["symbol"], m["id"]) for m in trades(got)]
        assert len(ids) == len(set(ids)) == n_trades
        assert all(seqs[0] == 1 for seqs in contiguous_trades(got).values())
        assert books_of(got) == coinbase_final_books(frames)
    # same seq, same message on both edges (books: where both got the same seq; a
    # client that falls behind gets a conflated snapshot in place of its backlog)
    # (per stream: the order across streams is each edge's reading)
    by_stream = lambda got: sorted(trades(got), key=lambda m: (m["symbol"], m["seq"]))  # noqa: E731
    assert by_stream(got_a) == by_stream(got_b)
    book_a = {(m["symbol"], m["seq"], m["type"]): m for m in got_a if m["type"].startswith("book")}
    book_b = {(m["symbol"], m["seq"], m["type"]): m for m in got_b if m["type"].startswith("book")}
    shared = book_a.keys() & book_b.keys()
    assert len(shared) >= 1000
    assert all(book_a[k] == book_b[k] for k in shared)
    # the move: recovered, exactly what was missed
    [ack] = [m for m in resumed if m["type"] == "ack"]
    assert ack["recovered"] == dict.fromkeys(last, True)
    before = {(m["symbol"], m["id"]) for m in trades(moved)}
    after = [(m["symbol"], m["id"]) for m in trades(resumed)]
    assert len(before) >= 20 and not before & set(after)
    assert len(after) == len(set(after))
    assert before | set(after) == {(m["symbol"], m["id"]) for m in trades(got_a)}
    for m in trades(resumed):
        stream = f"trades:coinbase:{m['symbol']}"
        if stream in last:
            assert m["seq"] > last[stream]
    contiguous_trades(resumed)
    # status: the role, Redis, and per stream the lag between Redis and the edge
    [redis] = [c for c in status["components"] if c["name"] == "redis"]
    assert redis["health"] == "healthy"
    assert status["cluster"]["role"] == "edge" and status["cluster"]["connected"]
    lags = {s["stream"]: s for s in status["cluster"]["streams"]}
    assert lags["trades:coinbase:SKL-USD"]["seq"] == 53
    values = {(m["name"], tuple(sorted(m["labels"].items()))): m["value"]
              for m in metrics["samples"]}
    assert values[("tickwire_cluster_redis_connected", ())] == 1
    assert values[("tickwire_cluster_role", (("node", "b"), ("role", "edge")))] == 1
    assert values[("tickwire_cluster_entries_read_total", ())] >= n_trades
    assert ("tickwire_cluster_stream_delay_seconds", (("stream", "trades:coinbase:SKL-USD"),)) in values


async def test_two_writers_never_give_one_seq_twice(redis_server: RedisServer) -> None:
    """Two engines (two connections, as two collectors) write 2 x 500 events into
    one stream at once, in pipelined batches of 50: Redis numbers them 1..1000,
    each once, and each entry holds its own writer's payload with its seq inside."""
    prefix = f"t{secrets.token_hex(4)}"
    stream = "signals:desk:BTC-USD"

    async def writer(name: str) -> list[int]:
        seqs: list[int] = []
        async with open_engine(redis_server.url, prefix) as engine:
            for batch in range(10):
                writes = []
                for i in range(50):
                    n = batch * 50 + i + 1
                    before, after = split_payload(
                        orjson.dumps({"w": name, "n": n, "seq": 0}), 0)
                    writes.append(Write(stream=stream, before=before, after=after,
                                        maxlen=2000, recv_ts=1.0, wseq=n))
                seqs += [w.seq for w in await engine.write(writes, name, "E")]
                await trio.lowlevel.checkpoint()
        return seqs

    results: dict[str, list[int]] = {}

    async def run(name: str) -> None:
        results[name] = await writer(name)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "one")
            nursery.start_soon(run, "two")
        async with open_engine(redis_server.url, prefix) as engine:
            entries = await engine.range(stream, 0, 5000)
            meta = await engine.meta(stream)
    assert sorted(results["one"] + results["two"]) == list(range(1, 1001))
    assert [e.seq for e in entries] == list(range(1, 1001))
    assert meta is not None and meta.seq == 1000 and meta.epoch == "E"
    for entry in entries:
        body = orjson.loads(entry.payload)
        assert body["seq"] == entry.seq
        assert entry.seq in results[body["w"]]
    # a retried batch (same writer, same wseq) is not written again
    async with open_engine(redis_server.url, prefix) as engine:
        before, after = split_payload(orjson.dumps({"w": "one", "seq": 0}), 0)
        [again] = await engine.write([Write(stream=stream, before=before, after=after,
                                            maxlen=2000, recv_ts=1.0, wseq=500)], "one", "E")
        assert again.outcome == "duplicate"
        assert (await engine.meta(stream)).seq == 1000  # type: ignore[union-attr]


async def lease_holder(redis: RedisServer, prefix: str, feed: str) -> str:
    reply = redis.command("GET", f"{prefix}:lease:{feed}")
    found = re.match(rb"\$\d+\r\n(.*)\r\n", reply)
    return found.group(1).decode() if found else ""


async def test_standby_collector_takes_the_feed_over_within_the_lease(
        tmp_path: Path, captures: Path, redis_server: RedisServer) -> None:
    """Two collectors configured with the same feed (each replays the capture, in
    a loop): only the lease owner ingests; SIGKILL the owner: the standby holds
    the lease and runs the feed within the lease time (1 s here) plus one second,
    announces ``feed_state`` and resyncs the books (one ``book_snapshot`` each) to
    an edge's client."""
    prefix = f"t{secrets.token_hex(4)}"
    paths = [str(captures / name) for name in COINBASE]
    lease = 'lease = 1.0'
    async with AsyncExitStack() as stack:
        edge = await stack.enter_async_context(tickwire(
            "run", "--config", str(node_config(tmp_path, "e", "edge", redis_server, prefix))))
        port = await port_of(edge)
        first = await stack.enter_async_context(tickwire(
            "replay", *paths, "--speed", "20", "--loop", "--listen", "127.0.0.1:0",
            "--config", str(node_config(tmp_path, "c1", "collector", redis_server, prefix, lease))))
        await first.wait_for("lease of coinbase taken by c1")
        second = await stack.enter_async_context(tickwire(
            "replay", *paths, "--speed", "20", "--loop", "--listen", "127.0.0.1:0",
            "--config", str(node_config(tmp_path, "c2", "collector", redis_server, prefix, lease))))
        await second.wait_for(r"started: .*; role collector")
        ws = await stack.enter_async_context(
            trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}"))
        await welcome(ws)
        await request(ws, {"op": "subscribe", "id": 1, "channels": ["book", "system"],
                           "symbols": ["coinbase:*"]})
        got: Frames = []
        await read_until(ws, got, lambda g: any(m["type"] == "book_update" for m in g))
        assert await lease_holder(redis_server, prefix, "coinbase") == "c1"
        # the standby ingests nothing: its dispatcher numbered no market data
        [standby] = await admin(tmp_path / "c2.sock", {"op": "status", "id": 1})
        assert not [line for line in second.lines if "lease of coinbase taken" in line]
        assert standby["cluster"]["leases"] == [
            {"feed": "coinbase", "holder": "c1", "owned": False, "takeovers": 0}]
        from tests.daemon_process import run_cli

        shown = (await run_cli("status", "--socket", str(tmp_path / "c2.sock"))).stdout.decode()
        assert f"cluster: role collector, node c2, redis {redis_server.url} ({prefix}) connected" in shown
        assert "lease coinbase: held by c1\n" in shown
        killed = trio.current_time()
        first.process.send_signal(signal.SIGKILL)
        await second.wait_for("lease of coinbase taken by c2", 10)
        took = trio.current_time() - killed
        assert took <= 1.0 + 1.0, took
        assert await lease_holder(redis_server, prefix, "coinbase") == "c2"
        mark = len(got)
        await read_until(ws, got, lambda g: any(
            m["type"] == "feed_state" and m["state"] == "subscribed" for m in g[mark:]), 30)
        await read_until(ws, got, lambda g: len(
            {m["symbol"] for m in g[mark:] if m["type"] == "book_snapshot"}) >= 1, 30)
        # a clean stop gives the lease up at once (a standby need not wait for it)
        assert await stop(second) == 0
        assert await lease_holder(redis_server, prefix, "coinbase") == ""
        assert "lease of coinbase released" in second.log()
        assert "Traceback" not in second.log()
    states = [m for m in got[mark:] if m["type"] == "feed_state"]
    assert states, "the new owner announces its feed's state"


async def test_edge_survives_a_redis_restart_without_persistence(
        tmp_path: Path, captures: Path, own_redis: RedisServer) -> None:
    """Redis killed and started again empty while a collector replays (in a loop)
    and an edge serves a client: the edge stays up and its client connected while
    Redis is gone, the edge reports unhealthy, then healthy once Redis is back;
    the cluster's epoch changes, the client is closed with 1012, and when it comes
    back with ``since`` it gets ``recovered: false`` and a fresh book snapshot."""
    prefix = "restart"
    paths = [str(captures / name) for name in COINBASE]
    async with AsyncExitStack() as stack:
        edge = await stack.enter_async_context(tickwire(
            "run", "--config", str(node_config(tmp_path, "e", "edge", own_redis, prefix))))
        port = await port_of(edge)
        await stack.enter_async_context(tickwire(
            "replay", *paths, "--speed", "20", "--loop", "--listen", "127.0.0.1:0",
            "--config", str(node_config(tmp_path, "c", "collector", own_redis, prefix))))
        ws = await stack.enter_async_context(
            trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}"))
        epoch = (await welcome(ws))["epoch"]
        await request(ws, {"op": "subscribe", "id": 1, "channels": ["book", "trades"],
                           "symbols": ["coinbase:SKL-USD"]})
        got: Frames = []
        await read_until(ws, got, lambda g: any(m["type"] == "book_update" for m in g))
        own_redis.stop()
        await edge.wait_for("redis healthy -> unhealthy", 10)
        [status] = await admin(tmp_path / "e.sock", {"op": "status", "id": 1})
        assert status["health"] == "unhealthy"
        assert not status["cluster"]["connected"]
        # the client is still connected: a ping is answered
        await request(ws, {"op": "ping", "id": 7})
        await read_until(ws, got, lambda g: any(m.get("type") == "pong" for m in g), 10)
        own_redis.start()
        await edge.wait_for("redis unhealthy -> healthy", 20)
        await edge.wait_for("epoch changed", 5)
        with trio.fail_after(10):
            try:
                while True:
                    got += messages(await ws.get_message())
            except trio_websocket.ConnectionClosed as closed:
                assert closed.reason.code == 1012
        last = {"book:coinbase:SKL-USD": max(m["seq"] for m in got if m["type"].startswith("book"))}
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}") as again:
            new_epoch = (await welcome(again))["epoch"]
            assert new_epoch != epoch
            await request(again, {"op": "subscribe", "id": 2, "channels": ["book"],
                                  "symbols": ["coinbase:SKL-USD"], "since": last, "epoch": epoch})
            fresh: Frames = []
            await read_until(again, fresh, lambda g: any(m["type"] == "book_snapshot" for m in g), 30)
        [ack] = [m for m in fresh if m["type"] == "ack"]
        assert ack["recovered"] == {"book:coinbase:SKL-USD": False}
        assert ack["epoch"] == new_epoch


async def test_a_publish_to_any_node_is_numbered_once_and_reaches_every_edge(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Published messages across nodes: the same idempotency key published to
    edge A and then to edge B is one message (B answers ``duplicate`` with A's
    seq), a client of each edge gets it once; a stale ``version`` is refused by
    Redis whichever node it reaches."""
    prefix = f"t{secrets.token_hex(4)}"
    first = {"channel": "signals", "source": "momentum", "key": "BTC-USD", "data": {"n": 1},
             "idempotency_key": "sig-1"}
    state = {"channel": "portfolio", "source": "desk1", "key": "BTC", "data": {"p": "1.5"},
             "version": 5}
    async with AsyncExitStack() as stack:
        edges = [await stack.enter_async_context(tickwire(
            "run", "--config", str(node_config(tmp_path, name, "edge", redis_server, prefix))))
            for name in ("a", "b")]
        clients = []
        for daemon in edges:
            ws = await stack.enter_async_context(
                trio_websocket.open_websocket_url(f"ws://127.0.0.1:{await port_of(daemon)}"))
            epoch = (await welcome(ws))["epoch"]
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["signals", "portfolio"],
                               "symbols": ["*"]})
            clients.append(ws)
        [a1] = await admin(tmp_path / "a.sock", {"op": "publish", "id": 1, "message": first})
        [b1] = await admin(tmp_path / "b.sock", {"op": "publish", "id": 2, "message": first})
        [a2] = await admin(tmp_path / "a.sock", {"op": "publish", "id": 3, "message": state})
        [b2] = await admin(tmp_path / "b.sock", {"op": "publish", "id": 4,
                                                 "message": {**state, "version": 4}})
        got: list[Frames] = [[], []]
        for ws, frames in zip(clients, got, strict=True):
            await read_until(ws, frames, lambda g: sum(m["type"] in ("signal", "portfolio")
                                                       for m in g) >= 2, 20)
            await drain(ws, frames, 0.5)
    assert (a1["ok"], a1["seq"], a1["epoch"], a1.get("duplicate")) == (True, 1, epoch, None)
    assert (b1["ok"], b1["seq"], b1.get("duplicate")) == (True, 1, True)
    assert (a2["ok"], a2["seq"]) == (True, 1)
    assert (b2["type"], b2["code"]) == ("error", "stale")
    for frames in got:
        signals = [m for m in frames if m["type"] == "signal"]
        assert [(m["key"], m["seq"], m["data"]) for m in signals] == [("BTC-USD", 1, {"n": 1})]
        assert [(m["seq"], m["version"]) for m in frames if m["type"] == "portfolio"] == [(1, 5)]


async def test_redis_away_for_5_seconds_with_persistence_loses_nothing(
        tmp_path: Path, captures: Path, own_redis: RedisServer) -> None:
    """A persistent Redis (append-only, fsync always) killed for 5 s while a
    collector replays in a loop and an edge serves a client: the client stays
    connected, and after Redis is back it gets every trade with contiguous seq
    per stream, none twice, the same epoch (the collector held its events while
    Redis was away: backpressure, nothing dropped)."""
    redis = RedisServer(tmp_path / "aof", persistent=True)
    own_redis.stop()
    redis.start()
    try:
        paths = [str(captures / name) for name in COINBASE]
        async with AsyncExitStack() as stack:
            edge = await stack.enter_async_context(tickwire(
                "run", "--config", str(node_config(tmp_path, "e", "edge", redis, "aof"))))
            port = await port_of(edge)
            collector = await stack.enter_async_context(tickwire(
                "replay", *paths, "--speed", "10", "--loop", "--listen", "127.0.0.1:0",
                "--config", str(node_config(tmp_path, "c", "collector", redis, "aof"))))
            ws = await stack.enter_async_context(
                trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}"))
            epoch = (await welcome(ws))["epoch"]
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades"],
                               "symbols": ["coinbase:*"], "history": 1000})
            got: Frames = []
            await read_until(ws, got, lambda g: len(trades(g)) >= 10)
            redis.stop()
            await edge.wait_for("redis healthy -> unhealthy", 10)
            await trio.sleep(5)
            before = len(trades(got))
            redis.start()
            await edge.wait_for("redis unhealthy -> healthy", 20)
            await collector.wait_for("redis (unhealthy|degraded) -> healthy", 20)
            await read_until(ws, got, lambda g: len(trades(g)) >= before + 30, 60)
            [status] = await admin(tmp_path / "e.sock", {"op": "status", "id": 1})
    finally:
        redis.stop()
    assert status["epoch"] == epoch
    ids = [(m["symbol"], m["id"]) for m in trades(got)]
    assert len(ids) == len(set(ids))
    assert all(seqs[0] == 1 for seqs in contiguous_trades(got).values())


async def test_a_cluster_role_without_redis_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """``role = "edge"`` (or ``--role collector``) with no ``cluster.redis``: the
    config check and the daemon print one line naming the key, and exit 2; a bad
    URL too."""
    from tests.daemon_process import run_cli

    edge = write_config(tmp_path / "edge.toml", 'role = "edge"\n')
    checked = await run_cli("check-config", str(edge))
    assert checked.returncode == 2
    assert checked.stderr.decode().strip().splitlines() == [
        "tickwire: config error: role 'edge' needs Redis: set cluster.redis = "
        '"redis://HOST:PORT" @ cluster.redis']
    ran = await run_cli("run", "--role", "collector")
    assert ran.returncode == 2
    assert "role 'collector' needs Redis" in ran.stderr.decode()
    assert len(ran.stderr.decode().strip().splitlines()) == 1
    bad = write_config(tmp_path / "bad.toml", '[cluster]\nredis = "http://x"\n')
    checked = await run_cli("check-config", str(bad))
    assert checked.returncode == 2
    assert "must be redis://HOST[:PORT][/DB]" in checked.stderr.decode()


async def test_a_full_writer_holds_every_source_and_loses_nothing(redis_server: RedisServer) -> None:
    """The collector's writer is a bounded, lossless subscriber: with room for 20
    events, a source that ``send``s and one that ``publish``es in its own step
    (as the native collectors do) both wait while Redis is behind, and every
    event is written once, contiguous per stream (1..300 each), the queue never
    past its bound plus one step of the dispatcher."""
    from daemon.channels import Retention
    from daemon.cluster.writer import Writer
    from daemon.dispatch import Dispatcher
    from daemon.events import Trade
    from daemon.supervise import Backoff

    prefix = f"t{secrets.token_hex(4)}"
    dispatcher = Dispatcher(64, {"trades": Retention(1000, 3600.0)})

    def trade(symbol: str, n: int) -> Trade:
        return Trade(exchange="coinbase", symbol=symbol, ts=1.0, recv_ts=2.0, id=str(n),
                     price="1.5", size="2", side="buy")

    async with open_engine(redis_server.url, prefix) as engine:
        writer = Writer(engine, "w", "E", queue=20, batch=7, backoff=Backoff(0.01, 0.1))
        dispatcher.subscribe(writer, ["trades"], ["*"])
        dispatcher.gate = writer.room

        async def sender() -> None:
            async with dispatcher.open_source() as source:
                for n in range(1, 301):
                    await source.send(trade("A-USD", n))

        async def publisher() -> None:
            async with dispatcher.open_source() as source:
                for n in range(1, 301):
                    await source.publish([trade("B-USD", n)])

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(dispatcher.serve)
                await nursery.start(writer.run)
                async with trio.open_nursery() as sources:
                    sources.start_soon(sender)
                    sources.start_soon(publisher)
                while writer.written < 600:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        for symbol in ("A-USD", "B-USD"):
            entries = await engine.range(f"trades:coinbase:{symbol}", 0, 1000)
            assert [e.seq for e in entries] == list(range(1, 301))
            assert [orjson.loads(e.payload)["id"] for e in entries] == [str(n) for n in range(1, 301)]
    stats = writer.statistics()
    assert (stats.written, stats.duplicates, stats.queued) == (600, 0, 0)
    assert 20 <= stats.peak <= 20 + 256


async def edge_and_two_collectors(
        stack: AsyncExitStack, tmp_path: Path, redis_server: RedisServer, prefix: str,
        feed: str, exchange: str) -> tuple[trio_websocket.WebSocketConnection, Daemon, Daemon]:
    """An edge with a client subscribed to ``exchange``'s trades and the system
    channel, then collector c1 (which takes the feed's lease) and collector c2
    (standing by), both configured with ``feed``."""
    edge = await stack.enter_async_context(tickwire(
        "run", "--config", str(node_config(tmp_path, "e", "edge", redis_server, prefix))))
    ws = await stack.enter_async_context(
        trio_websocket.open_websocket_url(f"ws://127.0.0.1:{await port_of(edge)}"))
    await welcome(ws)
    await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades", "system"],
                       "symbols": [f"{exchange}:*"]})
    first = await stack.enter_async_context(tickwire(
        "run", "--config", str(node_config(tmp_path, "c1", "collector", redis_server,
                                           prefix, feed))))
    await first.wait_for(f"lease of {exchange} taken by c1")
    second = await stack.enter_async_context(tickwire(
        "run", "--config", str(node_config(tmp_path, "c2", "collector", redis_server,
                                           prefix, feed))))
    await second.wait_for(r"started: .*; role collector")
    return ws, first, second


async def test_a_takeover_recovers_the_handover_trades_from_rest_once(
        tmp_path: Path, captures: Path, redis_server: RedisServer) -> None:
    """Two collectors run the same Coinbase feed against one exchange (an
    emulator in this process, as the exchange is one for both). SIGKILL the
    owner mid-tape: the standby takes the lease, reads the last trade of each
    symbol from Redis, and recovers the trades after it from the exchange's REST
    history. An edge's client gets every recorded trade exactly once, with
    contiguous seq and no gap. (The lease is 3 s so that trades are played while
    no collector is connected: without the recovery about a third of the tape's
    trades, those of the handover, never arrive.)"""
    from daemon.replay.capture import read_capture
    from daemon.replay.emulator import Emulator

    frames = recorded(captures, COINBASE)
    expected = sorted(str(m["trade_id"]) for m in frames
                      if m["type"] in ("match", "last_match"))
    prefix = f"t{secrets.token_hex(4)}"
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        emulator = Emulator([read_capture(captures / name) for name in COINBASE], speed=3.0)
        address = await nursery.start(emulator.serve)
        feed = (f'lease = 3.0\n[exchanges.coinbase]\nsymbols = {orjson.dumps(SYMBOLS).decode()}\n'
                f'rest_url = "{address.rest_url}"\nws_url = "{address.ws_url}"\n')
        ws, first, second = await edge_and_two_collectors(
            stack, tmp_path, redis_server, prefix, feed, "coinbase")
        got: Frames = []
        await read_until(ws, got, lambda g: len(trades(g)) >= 25)
        first.process.send_signal(signal.SIGKILL)
        await second.wait_for("lease of coinbase taken by c2", 10)
        with trio.fail_after(90):
            await emulator.finished.wait()
        await read_until(ws, got, lambda g: len(trades(g)) >= len(expected), 60)
        await drain(ws, got)
        assert await stop(second) == 0
        assert "Traceback" not in second.log()
        nursery.cancel_scope.cancel()
    ids = [t["id"] for t in trades(got)]
    assert sorted(ids) == expected  # every trade once: none lost, none twice
    contiguous_trades(got)
    assert not [m for m in got if m["type"] == "gap"]
    assert emulator.connections_total >= 2  # the second owner connected


async def test_a_poll_feed_takeover_recovers_the_handover_trades_once(
        tmp_path: Path, captures: Path, redis_server: RedisServer) -> None:
    """The same for a ``poll`` feed (ccxt's ``coinbaseexchange`` polling the one
    emulator's REST): SIGKILL the owner mid-tape; the standby takes the lease,
    hands each symbol's last trade in Redis to its poll collector, which polls
    from there. An edge's client gets every recorded trade exactly once, with
    contiguous seq and no gap. (Without the handover, the new owner's first
    answers, the newest pages, would deliver again what the first owner did.)"""
    from daemon.replay.capture import read_capture
    from daemon.replay.emulator import Emulator

    def played(emulator: Emulator) -> int:
        """Trades the emulator's REST history holds now: those played so far."""
        return sum(len(held) for held in emulator.venue.trades.values())  # type: ignore[attr-defined]

    frames = recorded(captures, COINBASE)
    expected = sorted(str(m["trade_id"]) for m in frames
                      if m["type"] in ("match", "last_match"))
    prefix = f"t{secrets.token_hex(4)}"
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        emulator = Emulator([read_capture(captures / name) for name in COINBASE], speed=4.0)
        address = await nursery.start(emulator.serve)
        feed = (f'lease = 2.0\n[exchanges.coinbaseexchange]\nmode = "poll"\n'
                f'symbols = {orjson.dumps(SYMBOLS).decode()}\nchannels = ["trades"]\n'
                f'interval = 0.2\nrest_url = "{address.rest_url}"\n')
        ws, first, second = await edge_and_two_collectors(
            stack, tmp_path, redis_server, prefix, feed, "coinbaseexchange")
        emulator.started.set()  # REST only: no WebSocket client starts the tape
        got: Frames = []
        await read_until(ws, got, lambda g: len(trades(g)) >= 15)
        first.process.send_signal(signal.SIGKILL)
        at_kill = played(emulator)
        await second.wait_for("lease of coinbaseexchange taken by c2", 10)
        at_takeover = played(emulator)
        with trio.fail_after(90):
            await emulator.finished.wait()
        await read_until(ws, got, lambda g: len(trades(g)) >= len(expected), 60)
        await drain(ws, got, quiet=2.0)  # a trade delivered twice would come meanwhile
        assert await stop(second) == 0
        assert "Traceback" not in second.log()
        nursery.cancel_scope.cancel()
    ids = [t["id"] for t in trades(got)]
    assert sorted(ids) == expected  # every trade once: none lost, none twice
    contiguous_trades(got)
    assert not [m for m in got if m["type"] == "gap"]
    # trades were played while no collector polled, and after the takeover
    assert at_kill < at_takeover < len(expected)
