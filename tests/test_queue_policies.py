"""A client's queue and its policies without sockets (``daemon.broadcast.queue``):
a real dispatcher delivers into a ``ClientQueue``; what it holds is rendered into
the frames a client would get and read back (conflation, 4008, throttle). The
last test checks the session acts on what its queue tells it (closes, counts)."""

from __future__ import annotations

import orjson
import trio
import trio.testing
from hdrh.histogram import HdrHistogram

from daemon.broadcast.auth import EVERYTHING
from daemon.broadcast.coalesce import Coalescer
from daemon.broadcast.connection import ServerConnection
from daemon.broadcast.frames import build_frames
from daemon.broadcast.queue import ClientQueue, QueueHooks
from daemon.broadcast.session import CLOSE_SLOW_CONSUMER, ServerCounters, Session
from daemon.config import ServerConfig
from daemon.dispatch import Dispatcher
from daemon.events import BookSnapshot, BookUpdate
from tests.test_channels import ticker, trade


class Client:
    """A ``ClientQueue`` at a clock the test sets, and what it told its owner."""

    def __init__(self, limit: int) -> None:
        self.now = 0.0
        self.told: list[str] = []
        self.queue = ClientQueue(limit, lambda: self.now, QueueHooks(
            ready=lambda: self.told.append("ready"), wake=lambda: self.told.append("wake"),
            conflated=lambda: self.told.append("conflated"),
            slow_consumer=lambda: self.told.append("slow_consumer")))


def sent(queue: ClientQueue) -> list[dict[str, object]]:
    """What the queue becomes on the wire: the messages, in order (frames parsed)."""
    data = build_frames(queue.items, queue.render, 256, 1 << 20).data
    out = []
    while data:
        n = data[1]
        start = 2 if n < 126 else 4
        size = n if n < 126 else int.from_bytes(data[2:4], "big")
        parsed = orjson.loads(data[start:start + size])
        out += parsed if isinstance(parsed, list) else [parsed]
        data = data[start + size:]
    return out


def test_a_full_queue_conflates_a_ticker_to_its_latest_state() -> None:
    dispatcher = Dispatcher(8, {})
    client = Client(limit=3)
    dispatcher.subscribe(client.queue, ["ticker"], ["*"])
    for bid in ("1", "2", "3", "4", "5"):
        dispatcher.publish(ticker(bid))
    assert client.told == ["ready"] * 3 + ["conflated", "ready"]  # the 5th: marked, nothing
    assert client.queue.statistics().conflated == 1
    got = sent(client.queue)
    assert [m["bid"] for m in got] == ["5"]  # the backlog became the latest state
    assert got[0]["conflated"] is True and got[0]["seq"] == 5
    dispatcher.publish(ticker("6"))  # the marker left: the stream queues again
    assert client.told[-1] == "ready" and len(client.queue) == 1
    assert [(m["bid"], m.get("conflated")) for m in sent(client.queue)] == [("6", None)]


def test_a_conflated_book_arrives_as_the_current_snapshot() -> None:
    dispatcher = Dispatcher(8, {})
    client = Client(limit=2)
    dispatcher.subscribe(client.queue, ["book"], ["*"])
    dispatcher.publish(BookSnapshot(exchange="x", symbol="A-B", ts=1.0, recv_ts=1.0,
                                    bids=(("10", "1"),), asks=(("11", "1"),)))
    for size in ("2", "3", "0"):
        dispatcher.publish(BookUpdate(exchange="x", symbol="A-B", ts=1.0, recv_ts=1.0,
                                      bids=(("10", size),), asks=(("12", size),)))
    assert client.told == ["ready", "ready", "conflated", "ready"]
    [snapshot] = sent(client.queue)
    assert snapshot["type"] == "book_snapshot" and snapshot["conflated"] is True
    assert snapshot["bids"] == [] and snapshot["asks"] == [["11", "1"]]
    assert snapshot["seq"] == 4


def test_a_full_queue_with_a_trade_is_a_slow_consumer_and_queues_nothing() -> None:
    dispatcher = Dispatcher(8, {})
    client = Client(limit=3)
    dispatcher.subscribe(client.queue, ["trades"], ["*"])
    for i in range(4):
        dispatcher.publish(trade(i))
    assert client.told == ["ready"] * 3 + ["slow_consumer"] and client.queue.closed
    dispatcher.publish(trade(9))  # a closed queue takes nothing more
    client.queue.control(b'{"type":"pong"}')
    assert client.told[-1] == "slow_consumer"
    assert [m["id"] for m in sent(client.queue)] == ["0", "1", "2"]


def test_initial_messages_and_control_messages_pass_the_limit() -> None:
    client = Client(1)
    dispatcher = Dispatcher(8, {})
    for i in range(3):
        dispatcher.publish(trade(i))
    history, _ = dispatcher.subscribe(client.queue, ["trades"], ["*"], history=3)
    for message in history:
        client.queue.deliver(message, initial=True)
    client.queue.control(b'{"type":"pong","id":1}')
    assert client.told == ["ready"] * 3 and not client.queue.closed
    assert [m.get("id") for m in sent(client.queue)] == ["0", "1", "2", 1]


def test_throttle_passes_one_message_per_interval_and_the_latest_state_after() -> None:
    dispatcher = Dispatcher(8, {})
    client = Client(limit=100)
    dispatcher.subscribe(client.queue, ["ticker"], ["*"])
    client.queue.throttle([("ticker", "*")], 0.1)
    dispatcher.publish(ticker("1"))  # the first passes as it is
    dispatcher.publish(ticker("2"))  # within 100 ms: held
    dispatcher.publish(ticker("3"))
    assert client.told == ["ready", "wake"]
    assert client.queue.next_due == 0.1 and client.queue.statistics().throttled == 1
    got = sent(client.queue)
    assert [(m["bid"], m.get("conflated")) for m in got] == [("1", None)]
    client.now = 0.05
    assert not client.queue.release_due()  # not due yet
    client.now = 0.1
    assert client.queue.release_due()
    [late] = sent(client.queue)
    assert late["bid"] == "3" and late["conflated"] is True and late["seq"] == 3
    client.now = 0.2  # the interval since the held state left has passed
    dispatcher.publish(ticker("4"))
    assert [(m["bid"], m.get("conflated")) for m in sent(client.queue)] == [("4", None)]
    client.queue.unthrottle([("ticker", "*")])
    dispatcher.publish(ticker("5"))
    dispatcher.publish(ticker("6"))
    assert [m["bid"] for m in sent(client.queue)] == ["5", "6"]


def test_a_throttle_does_not_hold_lossless_streams() -> None:
    dispatcher = Dispatcher(8, {})
    client = Client(limit=100)
    dispatcher.subscribe(client.queue, ["trades"], ["*"])
    client.queue.throttle([("trades", "*")], 1.0)
    for i in range(3):
        dispatcher.publish(trade(i))
    assert client.told == ["ready"] * 3 and len(client.queue) == 3


class Step:
    """A ``WriteStep`` the test turns on and off."""

    now = False


def test_in_a_write_step_an_empty_queue_hands_the_message_on_and_never_reorders() -> None:
    """In a step written at once, a message that finds the queue empty goes to
    ``send_now`` (nothing is queued); one that finds something queued goes behind
    it; one that ``send_now`` declines (the connection is busy) is queued; a
    holding queue conflates as always; outside such a step everything is queued."""
    dispatcher = Dispatcher(8, {})
    step = Step()
    handed: list[int] = []
    accept = [True]

    def send_now(message: object) -> bool:
        if accept[0]:
            handed.append(orjson.loads(message.payload)["seq"])  # type: ignore[attr-defined]
        return accept[0]

    told: list[str] = []
    queue = ClientQueue(10, lambda: 0.0, QueueHooks(
        ready=lambda: told.append("ready"), wake=list, conflated=list, slow_consumer=list,
        send_now=send_now), step=step)
    dispatcher.subscribe(queue, ["trades", "ticker"], ["*"])
    dispatcher.publish(trade(1))  # not a write step: queued
    step.now = True
    dispatcher.publish(trade(2))  # behind trade 1: queued
    assert handed == [] and [m["seq"] for m in sent(queue)] == [1, 2]
    dispatcher.publish(trade(3))  # the queue is empty: handed on
    assert handed == [3] and len(queue) == 0 and told == ["ready", "ready"]
    accept[0] = False
    dispatcher.publish(trade(4))  # declined: queued
    accept[0] = True
    dispatcher.publish(trade(5))  # behind trade 4
    assert handed == [3] and [m["seq"] for m in sent(queue)] == [4, 5]
    queue.hold()
    dispatcher.publish(ticker("1"))  # the client does not read: a marker, not a write
    assert handed == [3] and len(queue) == 1 and queue.statistics().conflated == 1


async def test_the_session_closes_a_slow_consumer_and_counts_a_conflation() -> None:
    stream, _ = trio.testing.memory_stream_pair()
    shared = ServerCounters(latency=HdrHistogram(1, 60_000_000, 3))
    dispatcher = Dispatcher(8, {})
    client = Session(ServerConnection(stream, 65536), "test", dispatcher,
                     ServerConfig(client_queue=3), {"type": "welcome", "epoch": "e"},
                     EVERYTHING, shared, Coalescer(0.0))
    client.handle('{"op":"subscribe","id":1,"channels":["ticker","trades"],"symbols":["*"]}')
    for bid in ("1", "2", "3", "4"):
        dispatcher.publish(ticker(bid))
    assert client.close_code is None and shared.conflations == 1
    assert client.statistics().conflated == 1
    client.queue.items.clear()  # as if written
    for i in range(4):
        dispatcher.publish(trade(i))
    assert client.close_code == CLOSE_SLOW_CONSUMER and shared.slow_consumers == 1
    assert client.queue not in dispatcher.subscriptions  # nothing more is delivered
    assert len(client.queue) == 3
