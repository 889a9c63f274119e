"""What one client's throttles may cost: the floor on ``throttle_ms``
(``server.min_throttle_ms``) and the cap on throttled streams
(``server.max_throttled``), refused with a code and a message that says why;
sans-IO (the request handler and the queue with a real dispatcher), then over a
real WebSocket on 127.0.0.1."""

from __future__ import annotations

import attrs
import orjson
import pytest
import trio
import trio_websocket

from daemon.broadcast.protocol import THROTTLE_TOO_LOW, TOO_MANY_THROTTLED
from daemon.broadcast.queue import ClientQueue, QueueHooks
from daemon.config import ServerConfig
from daemon.dispatch import Dispatcher
from daemon.events import Ticker
from tests.broadcast_server import publish, start, until_published
from tests.helpers import receive_until, request
from tests.test_channels import ticker, trade
from tests.test_queue_policies import Client, sent
from tests.test_requests import handler


def tickers(*symbols: str, bid: str = "1") -> list[Ticker]:
    return [attrs.evolve(ticker(bid), symbol=symbol) for symbol in symbols]


def subscribe(channels: list[str], symbols: list[str], throttle_ms: int, id: int = 1) -> bytes:
    return orjson.dumps({"op": "subscribe", "id": id, "channels": channels, "symbols": symbols,
                         "throttle_ms": throttle_ms})


def test_a_throttle_under_the_floor_is_refused_and_says_the_floor() -> None:
    requests, dispatcher = handler()  # the default floor: 50 ms
    [error] = requests.receive(subscribe(["ticker"], ["*"], 10), 0.0).replies
    assert error == {"type": "error", "id": 1, "code": THROTTLE_TOO_LOW,
                     "message": "throttle_ms must be 0 (no throttle) or at least 50 "
                                "(server.min_throttle_ms)"}
    assert requests.queue not in dispatcher.subscriptions and not requests.queue.throttles
    [error] = requests.receive(subscribe(["ticker"], ["*"], 49, id=2), 0.0).replies
    assert error["code"] == THROTTLE_TOO_LOW and error["id"] == 2
    [ack] = requests.receive(subscribe(["ticker"], ["*"], 50, id=3), 0.0).replies
    assert ack["type"] == "ack" and requests.queue.throttles == {("ticker", "*"): 0.05}
    [ack] = requests.receive(subscribe(["book"], ["*"], 0, id=4), 0.0).replies
    assert ack["type"] == "ack"  # 0: no throttle, whatever the floor
    free, _ = handler(min_throttle_ms=0)
    [ack] = free.receive(subscribe(["ticker"], ["*"], 1), 0.0).replies
    assert ack["type"] == "ack"


def test_more_throttled_streams_than_the_cap_are_refused_and_nothing_is_subscribed() -> None:
    requests, dispatcher = handler(max_throttled=3)
    for event in tickers("A-B", "C-D", "E-F", "G-H", "I-J"):
        dispatcher.publish(event)
    for i in range(3):
        dispatcher.publish(trade(i))
    [error] = requests.receive(subscribe(["ticker"], ["*"], 100), 0.0).replies
    assert error == {"type": "error", "id": 1, "code": TOO_MANY_THROTTLED,
                     "message": "a client throttles at most 3 streams (server.max_throttled); "
                                "with this subscription it would throttle 5"}
    assert requests.queue not in dispatcher.subscriptions and not requests.queue.throttles
    answer = requests.receive(subscribe(["ticker"], ["x:A-B", "x:C-D"], 100, id=2), 0.0)
    assert answer.replies[0]["type"] == "ack" and len(answer.initial) == 2
    # the earlier throttles count: two more would make four
    [error] = requests.receive(subscribe(["ticker"], ["x:E-F", "x:G-H"], 100, id=3), 0.0).replies
    assert error["code"] == TOO_MANY_THROTTLED and "would throttle 4" in error["message"]
    assert dispatcher.subscriptions[requests.queue] == {("ticker", "x:A-B"), ("ticker", "x:C-D")}
    # streams that are never throttled (trades) and unthrottled subscriptions are free
    for text in (subscribe(["trades"], ["*"], 100, id=4), subscribe(["ticker"], ["*"], 0, id=5),
                 subscribe(["ticker"], ["x:E-F"], 100, id=6)):
        assert requests.receive(text, 0.0).replies[0]["type"] == "ack"
    assert requests.queue.max_throttled == 3


def test_a_stream_that_appears_past_the_cap_is_delivered_unthrottled_and_the_client_told() -> None:
    dispatcher = Dispatcher(8, {})
    client = Client(limit=100)
    client.queue.max_throttled = 2
    dispatcher.subscribe(client.queue, ["ticker"], ["*"])
    client.queue.throttle([("ticker", "*")], 1.0)
    for bid in ("1", "2"):  # two rounds within the interval: the second is held
        for event in tickers("A-B", "C-D", "E-F", bid=bid):
            dispatcher.publish(event)
    got = sent(client.queue)
    assert [(m.get("symbol"), m.get("bid")) for m in got] == [
        ("A-B", "1"), ("C-D", "1"),
        (None, None), ("E-F", "1"),  # the notice, then E-F as it comes
        ("E-F", "2")]
    assert got[2] == {"type": "error", "id": None, "code": TOO_MANY_THROTTLED,
                      "message": "ticker:x:E-F is not throttled: a client throttles at most 2 "
                                 "streams (server.max_throttled)"}
    assert client.queue.throttled_streams == 2 and client.queue.statistics().throttled == 2
    client.now = 1.0
    assert client.queue.release_due()  # A-B and C-D: their latest state, once due
    assert [(m["symbol"], m["bid"], m["conflated"]) for m in sent(client.queue)] == [
        ("A-B", "2", True), ("C-D", "2", True)]
    # a change of throttles finds each stream's interval again (once, not per message)
    client.queue.unthrottle([("ticker", "*")])
    assert client.queue.intervals == {} and client.queue.throttled_streams == 0


def test_the_interval_of_a_stream_is_the_longest_throttle_that_matches_it() -> None:
    dispatcher = Dispatcher(8, {})
    queue = ClientQueue(100, lambda: 0.0, QueueHooks(ready=list, wake=list, conflated=list,
                                                     slow_consumer=list))
    dispatcher.subscribe(queue, ["ticker"], ["*"])
    queue.throttle([("ticker", "*")], 0.1)
    queue.throttle([("ticker", "x:*")], 0.5)
    queue.throttle([("ticker", "x:A-B")], 0.2)
    queue.throttle([("ticker", "y:A-B"), ("book", "x:A-B")], 9.0)  # match nothing here
    dispatcher.publish(ticker("1"))
    assert list(queue.intervals.values()) == [0.5]


async def test_a_real_client_is_told_the_floor_and_the_cap_and_stays_connected() -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery, max_throttled=2)
        await publish(running, tickers("A-B", "C-D", "E-F"))
        await until_published(running, 3)
        async with trio_websocket.open_websocket_url(running.url) as ws:
            await ws.get_message()  # welcome
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["ticker"],
                               "symbols": ["*"], "throttle_ms": 1})
            [error] = await receive_until(ws, lambda m: m["type"] == "error")
            assert error["code"] == THROTTLE_TOO_LOW and "at least 50" in error["message"]
            await request(ws, {"op": "subscribe", "id": 2, "channels": ["ticker"],
                               "symbols": ["*"], "throttle_ms": 100})
            [error] = await receive_until(ws, lambda m: m["type"] == "error")
            assert error["code"] == TOO_MANY_THROTTLED and error["id"] == 2
            assert "at most 2 streams" in error["message"] and "throttle 3" in error["message"]
            await request(ws, {"op": "subscribe", "id": 3, "channels": ["ticker"],
                               "symbols": ["x:A-B", "x:C-D"], "throttle_ms": 100})
            got = await receive_until(ws, lambda m: m["type"] == "ack")
            assert got[-1]["id"] == 3
            await request(ws, {"op": "ping", "id": 4})
            await receive_until(ws, lambda m: m["type"] == "pong")
        nursery.cancel_scope.cancel()


def test_the_config_bounds_the_floor() -> None:
    assert ServerConfig().min_throttle_ms == 50 and ServerConfig().max_throttled == 100
    for bad in (-1, 60_001):
        with pytest.raises(ValueError, match="min_throttle_ms: must be from 0 to 60000"):
            ServerConfig(min_throttle_ms=bad)
    with pytest.raises(ValueError, match="max_throttled: must be greater than 0"):
        ServerConfig(max_throttled=0)
