"""A client's queue policies without sockets: a session over an in-memory stream,
fed by a real dispatcher, its queue read back (conflation, 4008, throttle)."""

from __future__ import annotations

import orjson
import trio
import trio.testing
from hdrh.histogram import HdrHistogram

from daemon.broadcast.auth import EVERYTHING
from daemon.broadcast.coalesce import Coalescer
from daemon.broadcast.connection import ServerConnection
from daemon.broadcast.frames import build_frames
from daemon.broadcast.session import CLOSE_SLOW_CONSUMER, ServerCounters, Session
from daemon.config import ServerConfig
from daemon.dispatch import Dispatcher
from tests.test_channels import ticker, trade

HELLO = {"type": "welcome", "epoch": "e"}


def session(dispatcher: Dispatcher, **config: object) -> tuple[Session, ServerCounters]:
    stream, _ = trio.testing.memory_stream_pair()
    shared = ServerCounters(latency=HdrHistogram(1, 60_000_000, 3))
    client = Session(ServerConnection(stream, 65536), "test", dispatcher,
                     ServerConfig(**config), HELLO, EVERYTHING, shared,  # type: ignore[arg-type]
                     Coalescer(0.0))
    return client, shared


def sent(client: Session) -> list[dict[str, object]]:
    """What the queue becomes on the wire: the messages, in order."""
    data = build_frames(client.queue, client._render, 256, 1 << 20).data
    out = []
    while data:
        n = data[1]
        start = 2 if n < 126 else 4
        size = n if n < 126 else int.from_bytes(data[2:4], "big")
        parsed = orjson.loads(data[start:start + size])
        out += parsed if isinstance(parsed, list) else [parsed]
        data = data[start + size:]
    return out


async def test_a_full_queue_conflates_a_ticker_and_closes_on_a_trade() -> None:
    dispatcher = Dispatcher(8, {})
    client, shared = session(dispatcher, client_queue=3)
    dispatcher.subscribe(client, ["ticker", "trades"], ["*"])
    for bid in ("1", "2", "3", "4", "5"):
        dispatcher.publish(ticker(bid))
    assert client.close_code is None and shared.conflations == 1
    got = sent(client)
    assert [m["bid"] for m in got] == ["5"]  # the backlog became the latest state
    assert got[-1]["conflated"] is True and got[-1]["seq"] == 5
    for i in range(4):
        dispatcher.publish(trade(i))
    assert client.close_code == CLOSE_SLOW_CONSUMER and shared.slow_consumers == 1
    assert [m["id"] for m in sent(client)] == ["0", "1", "2"]  # nothing after the close


async def test_throttle_passes_a_message_after_the_interval_and_holds_the_rest(
    autojump_clock: trio.abc.Clock,
) -> None:
    dispatcher = Dispatcher(8, {})
    client, _ = session(dispatcher)
    client.handle(orjson.dumps({"op": "subscribe", "id": 1, "channels": ["ticker"],
                                "symbols": ["*"], "throttle_ms": 100}).decode())
    dispatcher.publish(ticker("1"))  # the first passes as it is
    dispatcher.publish(ticker("2"))  # within 100 ms: held
    dispatcher.publish(ticker("3"))
    got = sent(client)
    assert [m["type"] for m in got] == ["ack", "ticker"]
    assert got[1]["bid"] == "1" and "conflated" not in got[1]
    assert client.counters.throttled == 1
    await trio.sleep(0.1)
    client._release_due()  # the writer task's wake-up when the interval is over
    [late] = sent(client)
    assert late["bid"] == "3" and late["conflated"] is True and late["seq"] == 3
    await trio.sleep(0.1)
    dispatcher.publish(ticker("4"))  # the interval since has passed: as it is
    assert [(m["bid"], m.get("conflated")) for m in sent(client)] == [("4", None)]
