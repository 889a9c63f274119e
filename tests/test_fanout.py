"""The broadcast server's fan-out features over real WebSockets on 127.0.0.1:
recovery with ``since``, throttle, batching, keepalive, limits, authentication,
and fuzzing of the client protocol."""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import attrs
import orjson
import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from daemon.broadcast import coalesce as server_module
from daemon.broadcast.auth import Authenticator
from daemon.config import AuthConfig, TokenConfig
from daemon.dispatch import Retention
from daemon.events import Ticker, Trade
from tests.broadcast_server import (
    EPOCH,
    coinbase_events,
    publish,
    start,
    until_published,
)
from tests.helpers import messages, receive_until, request

# -- recovery --------------------------------------------------------------------


async def test_a_client_back_with_since_gets_exactly_the_missed_trades(captures: Path) -> None:
    trades = [e for e in coinbase_events(captures) if isinstance(e, Trade)]
    busiest = max({t.symbol for t in trades}, key=lambda s: sum(t.symbol == s for t in trades))
    stream = f"trades:coinbase:{busiest}"
    same = [t for t in trades if t.symbol == busiest]
    assert len(same) >= 10
    async with trio.open_nursery() as nursery:
        running = await start(nursery)
        async with trio_websocket.open_websocket_url(running.url) as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades"],
                               "symbols": [f"coinbase:{busiest}"]})
            await receive_until(ws, lambda m: m["type"] == "ack")
            await publish(running, same[:4])
            seen = await receive_until(ws, lambda m: m.get("seq") == 4)
        last = seen[-1]["seq"]
        await publish(running, same[4:])  # missed while away
        await until_published(running, len(same))
        async with trio_websocket.open_websocket_url(running.url) as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 2, "channels": ["trades"],
                               "symbols": ["coinbase:*"], "history": 100,
                               "since": {stream: last}, "epoch": EPOCH})
            got = await receive_until(ws, lambda m: m.get("seq") == len(same))
        ack, *events = got
        assert ack["recovered"] == {stream: True} and ack["epoch"] == EPOCH
        assert [e["seq"] for e in events] == list(range(last + 1, len(same) + 1))
        assert [e["id"] for e in events] == [t.id for t in same[4:]]
        nursery.cancel_scope.cancel()


async def test_beyond_retention_or_another_epoch_is_not_recovered(captures: Path) -> None:
    events = coinbase_events(captures)
    symbol = next(e.symbol for e in events if type(e).__name__ == "BookSnapshot")
    book = [e for e in events if e.symbol == symbol and type(e).__name__.startswith("Book")]
    stream = f"book:coinbase:{symbol}"
    async with trio.open_nursery() as nursery:
        running = await start(nursery, retention={"book": Retention(5, 60)})
        await publish(running, book[:50])
        await until_published(running, 50)
        for since, epoch, why in (({stream: 10}, EPOCH, "too old"),
                                  ({stream: 48}, "another-epoch", "another epoch")):
            async with trio_websocket.open_websocket_url(running.url) as ws:
                await ws.get_message()
                await request(ws, {"op": "subscribe", "id": 1, "channels": ["book"],
                                   "symbols": [f"coinbase:{symbol}"], "since": since,
                                   "epoch": epoch})
                ack, snapshot = await receive_until(ws, lambda m: m["type"] == "book_snapshot")
                assert ack["recovered"] == {stream: False}, why
                assert ack["epoch"] == EPOCH
                assert snapshot["seq"] == 50  # a fresh snapshot of the current book
        async with trio_websocket.open_websocket_url(running.url) as ws:  # within retention
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["book"],
                               "symbols": [f"coinbase:{symbol}"], "since": {stream: 47},
                               "epoch": EPOCH})
            ack, *updates = await receive_until(ws, lambda m: m.get("seq") == 50)
            assert ack["recovered"] == {stream: True}
            assert [(u["type"], u["seq"]) for u in updates] == [("book_update", n) for n in (48, 49, 50)]
        nursery.cancel_scope.cancel()


# -- throttle and batching -----------------------------------------------------------


async def test_throttle_sends_at_most_one_ticker_per_interval_latest_wins(captures: Path) -> None:
    tickers = [e for e in coinbase_events(captures) if isinstance(e, Ticker)]
    symbol = tickers[0].symbol
    base = tickers[0]
    series = [attrs.evolve(base, bid=f"{100 + i}.5") for i in range(40)]
    async with trio.open_nursery() as nursery:
        running = await start(nursery)
        async with trio_websocket.open_websocket_url(running.url) as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["ticker"],
                               "symbols": [f"coinbase:{symbol}"], "throttle_ms": 200})
            await receive_until(ws, lambda m: m["type"] == "ack")
            arrivals = []
            async with running.dispatcher.open_source() as source:
                for ticker in series:  # 40 tickers over about 0.4 s
                    await source.send(ticker)
                    await trio.sleep(0.01)
            with trio.move_on_after(1.0):
                while True:
                    for m in messages(await ws.get_message()):
                        arrivals.append((trio.current_time(), m))
        got = [m for _, m in arrivals]
        assert 2 <= len(got) <= 5, len(got)
        assert got[-1]["bid"] == "139.5" and got[-1]["seq"] == 40  # the latest wins
        assert got[-1]["conflated"] is True
        nursery.cancel_scope.cancel()


async def test_pending_events_leave_in_one_frame_in_order(captures: Path) -> None:
    trades = [e for e in coinbase_events(captures) if isinstance(e, Trade)]
    async with trio.open_nursery() as nursery:
        running = await start(nursery)
        async with trio_websocket.open_websocket_url(running.url) as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades"],
                               "symbols": ["coinbase:*"]})
            await receive_until(ws, lambda m: m["type"] == "ack")
            await publish(running, trades)
            frames = []
            with trio.fail_after(10):
                while sum(len(f) for f in frames) < len(trades):
                    frames.append(messages(await ws.get_message()))
        assert max(len(f) for f in frames) > 1  # batched under load
        assert len(frames) < len(trades)
        flat = [m for f in frames for m in f]
        assert [m["id"] for m in flat] == [t.id for t in trades]
        nursery.cancel_scope.cancel()


async def keep_busy() -> None:
    """Another task always ready to run, as busy feeds would be: the process is
    never idle, so a coalescing window lasts its whole length."""
    while True:
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize(("window_ms", "duty", "busy"), [
    (300.0, math.inf, True), (300.0, math.inf, False), (0.0, math.inf, True),
    (300.0, server_module.WRITE_DUTY, True)])
async def test_events_within_the_coalescing_window_leave_in_one_write(
    captures: Path, window_ms: float, duty: float, busy: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An event after a quiet window goes out at once; those that come within the
    window of the last write, while the process is busy, wait for its end and
    leave together (with no window, each batch of events leaves at once in its
    own frame). The window is ``WRITE_DUTY`` times what the last write took, at
    most ``max_write_delay_ms``: an infinite duty holds it at
    ``max_write_delay_ms``; with the real one, a write to one client takes
    microseconds, and events 10 ms apart each leave at once. A window ends early
    once no other task is ready to run: events that find the process idle
    leave at once."""
    monkeypatch.setattr(server_module, "WRITE_DUTY", duty)
    trades = [e for e in coinbase_events(captures) if isinstance(e, Trade)][:5]
    async with trio.open_nursery() as nursery:
        running = await start(nursery, max_write_delay_ms=window_ms)
        if busy:
            nursery.start_soon(keep_busy)
        async with trio_websocket.open_websocket_url(running.url) as ws, \
                running.dispatcher.open_source() as source:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades"],
                               "symbols": ["coinbase:*"]})
            await receive_until(ws, lambda m: m["type"] == "ack")
            writes = running.server.writes
            frames = []
            with trio.fail_after(10):
                await source.send(trades[0])
                frames.append(messages(await ws.get_message()))  # alone, at once
                for trade in trades[1:4]:  # three batches within the window
                    published = running.dispatcher.events
                    await source.send(trade)
                    await until_published(running, published + 1)
                    await trio.sleep(0.01)
                while sum(map(len, frames)) < 4:
                    frames.append(messages(await ws.get_message()))
                await trio.sleep(window_ms / 1000 + 0.05)  # a quiet window
                await source.send(trades[4])
                frames.append(messages(await ws.get_message()))
        got = [[m["id"] for m in frame] for frame in frames]
        ids = [t.id for t in trades]
        if window_ms and duty == math.inf and busy:
            assert got == [ids[:1], ids[1:4], ids[4:]]
            assert running.server.writes - writes == 3
        else:
            assert got == [[i] for i in ids]
            assert running.server.writes - writes == 5
        nursery.cancel_scope.cancel()


async def test_a_drained_source_within_the_window_is_written_in_its_own_step(
    captures: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Within a window, events published by a source that says its input is
    drained (a collector whose socket holds no more bytes) while no other task is
    ready are written before ``publish`` returns; without ``drained`` they wait
    for the coalescer's task (the end of the window, or the process idle)."""
    monkeypatch.setattr(server_module, "WRITE_DUTY", math.inf)
    trades = [e for e in coinbase_events(captures) if isinstance(e, Trade)][:3]
    async with trio.open_nursery() as nursery:
        running = await start(nursery, max_write_delay_ms=300.0)
        async with trio_websocket.open_websocket_url(running.url) as ws, \
                running.dispatcher.open_source() as source:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades"],
                               "symbols": ["coinbase:*"]})
            await receive_until(ws, lambda m: m["type"] == "ack")
            with trio.fail_after(10):
                await source.publish(trades[:1])  # after a quiet window: at once
                assert [m["id"] for m in messages(await ws.get_message())] == [trades[0].id]
                # within the 300 ms window from here on
                await trio.testing.wait_all_tasks_blocked()
                writes = running.server.writes
                await source.publish(trades[1:2])
                assert running.server.writes == writes  # left to the coalescer's task
                assert [m["id"] for m in messages(await ws.get_message())] == [trades[1].id]
                await trio.testing.wait_all_tasks_blocked()
                writes = running.server.writes
                await source.publish(trades[2:3], drained=True)
                assert running.server.writes == writes + 1  # written in this step
                assert [m["id"] for m in messages(await ws.get_message())] == [trades[2].id]
        nursery.cancel_scope.cancel()


async def test_a_step_written_at_once_sends_its_last_event_as_delivered(
    captures: Path,
) -> None:
    """A drained source's step of one event is written to each client as it is
    delivered (``Coalescer.sent_now``: once per client, one write pass); a step
    of three events still reaches each client in one frame, the same bytes for
    both clients, and nothing reorders."""
    trades = [e for e in coinbase_events(captures) if isinstance(e, Trade)][:4]
    async with trio.open_nursery() as nursery:
        running = await start(nursery)
        coalescer = running.server.coalescer
        async with trio_websocket.open_websocket_url(running.url) as a, \
                trio_websocket.open_websocket_url(running.url) as b, \
                running.dispatcher.open_source() as source:
            for ws in (a, b):
                await ws.get_message()
                await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades"],
                                   "symbols": ["coinbase:*"]})
                await receive_until(ws, lambda m: m["type"] == "ack")
            with trio.fail_after(10):
                await trio.testing.wait_all_tasks_blocked()
                sent_now, writes = coalescer.sent_now, running.server.writes
                await source.publish(trades[:1], drained=True)
                assert coalescer.sent_now == sent_now + 2
                assert running.server.writes == writes + 1
                alone = [await ws.get_message() for ws in (a, b)]
                await trio.testing.wait_all_tasks_blocked()
                await source.publish(trades[1:], drained=True)
                assert coalescer.sent_now == sent_now + 2  # queued behind the first two
                assert running.server.writes == writes + 2
                batch = [await ws.get_message() for ws in (a, b)]
        assert alone[0] == alone[1] and [m["id"] for m in messages(alone[0])] == [trades[0].id]
        assert batch[0] == batch[1]
        assert [m["id"] for m in messages(batch[0])] == [t.id for t in trades[1:]]
        nursery.cancel_scope.cancel()


async def test_steps_counts_the_other_tasks_ready_to_run() -> None:
    """``Steps`` (the coalescer's instrument) counts tasks scheduled and not yet
    stepped, and their steps, leaving its own task out."""
    steps = server_module.Steps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        event = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(event.wait)
            assert steps.ready == 3  # spawned, not yet run
            await trio.testing.wait_all_tasks_blocked()
            assert steps.ready == 0 and steps.steps >= 3
            before = steps.steps
            await trio.lowlevel.checkpoint()  # only this task ran
            assert steps.steps == before and steps.ready == 0
            event.set()
            assert steps.ready == 3
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert steps.ready == 0


async def test_a_batch_that_several_clients_get_is_built_once(
    captures: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three clients of the same stream, three events within one coalescing window:
    each gets them in one batched frame, built for the first and written as it is
    to the other two."""
    monkeypatch.setattr(server_module, "WRITE_DUTY", math.inf)
    trades = [e for e in coinbase_events(captures) if isinstance(e, Trade)][:4]
    async with trio.open_nursery() as nursery:
        running = await start(nursery, max_write_delay_ms=300.0)
        nursery.start_soon(keep_busy)
        async with trio_websocket.open_websocket_url(running.url) as a, \
                trio_websocket.open_websocket_url(running.url) as b, \
                trio_websocket.open_websocket_url(running.url) as c, \
                running.dispatcher.open_source() as source:
            clients = (a, b, c)
            for ws in clients:
                await ws.get_message()
                await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades"],
                                   "symbols": ["coinbase:*"]})
                await receive_until(ws, lambda m: m["type"] == "ack")
            with trio.fail_after(10):
                await source.send(trades[0])  # alone, at once: opens the window
                for ws in clients:
                    assert [m["id"] for m in messages(await ws.get_message())] == [trades[0].id]
                for trade in trades[1:]:
                    published = running.dispatcher.events
                    await source.send(trade)
                    await until_published(running, published + 1)
                frames = [await ws.get_message() for ws in clients]
        assert frames[0] == frames[1] == frames[2]
        assert [m["id"] for m in messages(frames[0])] == [t.id for t in trades[1:]]
        assert running.server.shared_batches == 2
        nursery.cancel_scope.cancel()


# -- keepalive and limits ------------------------------------------------------------


class RawClient:
    """A WebSocket client on a bare TCP stream, for what trio-websocket will not do
    (never answer a ping, never finish a handshake)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    async def handshake(self, port: int) -> None:
        await self.stream.send_all(self.ws.send(Request(host=f"127.0.0.1:{port}", target="/")))
        while True:
            for event in await self.events():
                if isinstance(event, AcceptConnection):
                    return

    async def events(self) -> list:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError
        self.ws.receive_data(data)
        return list(self.ws.events())


async def test_a_client_that_never_pongs_is_closed_4001() -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery, ping_interval=0.1, ping_timeout=0.3)
        port = int(running.url.rsplit(":", 1)[1])
        client = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
        await client.handshake(port)
        pings, close = 0, None
        with trio.fail_after(5):
            while close is None:
                for event in await client.events():
                    pings += isinstance(event, Ping)  # and never answer
                    if isinstance(event, CloseConnection):
                        close = event
        assert pings >= 1 and close.code == 4001
        assert running.server.ping_timeouts == 1
        nursery.cancel_scope.cancel()


async def test_a_client_that_answers_pings_stays() -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery, ping_interval=0.1, ping_timeout=0.3)
        async with trio_websocket.open_websocket_url(running.url) as ws:  # answers pings
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades"],
                               "symbols": ["*"]})
            await trio.sleep(1.0)  # several ping intervals
            await request(ws, {"op": "ping", "id": 2})
            assert (await receive_until(ws, lambda m: m["type"] == "pong"))[-1]["id"] == 2
        assert running.server.ping_timeouts == 0
        nursery.cancel_scope.cancel()


async def test_a_half_open_connection_is_dropped_after_the_handshake_timeout() -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery, handshake_timeout=0.3)
        port = int(running.url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""  # the server hung up
        nursery.cancel_scope.cancel()


async def test_an_idle_client_with_no_subscription_is_closed_4000() -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery, idle_timeout=0.3, ping_interval=0.1)
        async with trio_websocket.open_websocket_url(running.url) as ws:
            await ws.get_message()
            with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            assert closed.value.reason.code == 4000
        nursery.cancel_scope.cancel()


async def test_connection_limits_refuse_with_503_and_429() -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery, max_connections=2)
        async with (trio_websocket.open_websocket_url(running.url) as a,
                    trio_websocket.open_websocket_url(running.url) as b):
            await a.get_message()
            await b.get_message()
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with trio_websocket.open_websocket_url(running.url):
                    pass
            assert refused.value.status_code == 503
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        running = await start(nursery, max_connections_per_ip=1)
        async with trio_websocket.open_websocket_url(running.url) as a:
            await a.get_message()
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with trio_websocket.open_websocket_url(running.url):
                    pass
            assert refused.value.status_code == 429
        assert running.server.rejected == {429: 1}
        nursery.cancel_scope.cancel()


async def test_subscription_limit_and_rate_limit() -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery, max_subscriptions=2, max_messages_per_second=5,
                              rate_limit_grace=0.5)
        async with trio_websocket.open_websocket_url(running.url) as ws:
            await ws.get_message()
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades", "book", "ticker"],
                               "symbols": ["*"]})
            [error] = await receive_until(ws, lambda m: True)
            assert error["code"] == "too_many_subscriptions"
            codes = []
            with trio.fail_after(5):
                try:
                    while True:
                        await request(ws, {"op": "ping", "id": 1})
                        await trio.sleep(0.01)
                        with trio.move_on_after(0.005):
                            codes += [m.get("code") for m in messages(await ws.get_message())]
                except trio_websocket.ConnectionClosed as exc:
                    closed = exc.reason
            assert "rate_limited" in codes
            assert closed.code == 4029
        nursery.cancel_scope.cancel()


# -- authentication ---------------------------------------------------------------


TOKEN = "s3cret-token-for-tests"


def auth_config(**extra) -> AuthConfig:
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    return AuthConfig(enabled="on", tokens=[TokenConfig(
        name="dashboard", sha256=digest, channels=["ticker"], symbols=["coinbase:*"])], **extra)


async def test_tokens_accept_reject_and_forbid(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, auth=auth_config())
        for url, headers in ((running.url, [(b"authorization", f"Bearer {TOKEN}".encode())]),
                             (f"{running.url}/?token={TOKEN}", None)):
            async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
                await ws.get_message()
                await request(ws, {"op": "subscribe", "id": 1, "channels": ["ticker"],
                                   "symbols": ["coinbase:BTC-USD"]})
                assert (await receive_until(ws, lambda m: True))[0]["type"] == "ack"
                for channels, symbols in ((["trades"], ["coinbase:*"]), (["ticker"], ["*"]),
                                          (["ticker"], ["binance:*"])):
                    await request(ws, {"op": "subscribe", "id": 2, "channels": channels,
                                       "symbols": symbols})
                    [error] = await receive_until(ws, lambda m: True)
                    assert error["code"] == "forbidden"
        for url, headers in ((running.url, None),
                             (running.url, [(b"authorization", b"Bearer wrong")]),
                             (f"{running.url}/?token=wrong", None)):
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with trio_websocket.open_websocket_url(url, extra_headers=headers):
                    pass
            assert refused.value.status_code == 401
        nursery.cancel_scope.cancel()
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("daemon")]
    assert ours and not any(TOKEN in line for line in ours)


async def test_origin_allowlist() -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery, auth=AuthConfig(enabled="off",
                                                       origins=["https://desk.example"]))
        async with trio_websocket.open_websocket_url(
                running.url, extra_headers=[(b"origin", b"https://desk.example")]) as ws:
            assert (await receive_until(ws, lambda m: True))[0]["type"] == "welcome"
        with pytest.raises(trio_websocket.ConnectionRejected) as refused:
            async with trio_websocket.open_websocket_url(
                    running.url, extra_headers=[(b"origin", b"https://evil.example")]):
                pass
        assert refused.value.status_code == 403
        nursery.cancel_scope.cancel()


def test_auth_is_on_by_default_for_a_non_loopback_listen_address() -> None:
    assert Authenticator(AuthConfig(), "0.0.0.0").enabled
    assert Authenticator(AuthConfig(), "192.0.2.1").enabled
    assert not Authenticator(AuthConfig(), "127.0.0.1").enabled
    assert not Authenticator(AuthConfig(), "::1").enabled
    assert not Authenticator(AuthConfig(enabled="off"), "0.0.0.0").enabled


# -- fuzzing ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.sampled_from(["op", "id", "channels", "symbols", "history", "since",
                                       "epoch", "throttle_ms", "x"]) | st.text(max_size=5),
                      children, max_size=6),
    max_leaves=20,
)
ops = st.fixed_dictionaries(
    {"op": st.sampled_from(["subscribe", "unsubscribe", "ping", "nope"])},
    optional={"id": json_values, "channels": json_values, "symbols": json_values,
              "history": json_values, "since": json_values, "epoch": json_values,
              "throttle_ms": json_values},
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(st.one_of(json_values.map(lambda v: orjson.dumps(v).decode()),
                                 ops.map(lambda v: orjson.dumps(v).decode()),
                                 st.text(max_size=50)), min_size=1, max_size=8))
async def test_fuzzed_requests_get_answers_and_never_crash_the_server(frames: list[str]) -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery)
        async with trio_websocket.open_websocket_url(running.url) as ws:
            await ws.get_message()
            for frame in frames:
                await ws.send_message(frame)
            await request(ws, {"op": "ping", "id": "end"})
            got = await receive_until(ws, lambda m: m.get("id") == "end" and m["type"] == "pong")
            for message in got[:-1]:
                assert message["type"] in ("error", "ack", "pong", "book_snapshot", "ticker",
                                           "trade", "feed_state"), message
        nursery.cancel_scope.cancel()


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.binary(min_size=1, max_size=200))
async def test_random_bytes_get_a_defined_close(payload: bytes) -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery)
        async with trio_websocket.open_websocket_url(running.url) as ws:
            await ws.get_message()
            await ws.send_message(payload)  # a binary frame
            with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            assert closed.value.reason.code == 1003
        port = int(running.url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)  # bytes that are no HTTP
        await stream.send_all(payload + b"\r\n\r\n")
        with trio.fail_after(5):
            while await stream.receive_some(1000):
                pass
        async with trio_websocket.open_websocket_url(running.url) as ws:  # still serving
            assert (await receive_until(ws, lambda m: True))[0]["type"] == "welcome"
        nursery.cancel_scope.cancel()


async def test_a_client_that_pings_but_never_reads_is_dropped(captures: Path) -> None:
    """Its socket is full (a big book it does not read), so the pongs to its pings
    pile up behind it: past the bound the server drops the connection instead of
    holding them."""
    from daemon.broadcast.writer import MAX_PILED
    from tests.test_broadcast import nkn_book_events

    snapshot = nkn_book_events(captures)[0]
    async with trio.open_nursery() as nursery:
        running = await start(nursery, client_queue=8)
        port = int(running.url.rsplit(":", 1)[1])
        client = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
        await client.handshake(port)
        await client.stream.send_all(client.ws.send(TextMessage(data=orjson.dumps(
            {"op": "subscribe", "id": 1, "channels": ["book"], "symbols": ["*"]}).decode())))
        await publish(running, [snapshot] * 200)  # ~14 MB: more than the socket holds
        await until_published(running, 200)
        ping = client.ws.send(Ping(payload=b"x" * 120))
        session = next(iter(running.server.sessions))
        with trio.fail_after(20):
            sent = 0
            while running.server.sessions:
                try:
                    await client.stream.send_all(ping * 100)
                except trio.BrokenResourceError:
                    break  # the server dropped us while we were still pinging
                sent += 100 * len(ping)
                await trio.lowlevel.checkpoint()
        assert sent > MAX_PILED
        assert session.writer is not None and session.writer.broken
        nursery.cancel_scope.cancel()
