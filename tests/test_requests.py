"""Client requests, sans-IO: text frames in, requests or errors out, then the
handler's answers (acks, history, recovery, limits, rate limit) with a real
dispatcher and no server."""

from __future__ import annotations

import pytest

from daemon.broadcast.auth import EVERYTHING, Grant
from daemon.broadcast.protocol import (
    FORBIDDEN,
    INVALID_JSON,
    INVALID_REQUEST,
    MAX_HISTORY,
    RATE_LIMITED,
    TOO_MANY_SUBSCRIPTIONS,
    Ping,
    RequestError,
    Subscribe,
    Unsubscribe,
    parse_request,
)
from daemon.broadcast.queue import ClientQueue, QueueHooks
from daemon.broadcast.requests import CLOSE_RATE_LIMITED, Close, RequestHandler
from daemon.config import ServerConfig
from daemon.dispatch import Dispatcher
from daemon.publish.message import PublishGrant
from tests.test_channels import trade


def test_a_subscribe_with_since_and_its_epoch_side_by_side() -> None:
    request = parse_request(
        b'{"op":"subscribe","id":2,"channels":["trades","book","trades"],"symbols":["coinbase:*"],'
        b'"history":1000,"since":{"trades:coinbase:BTC-USD":1234},"epoch":"e1","throttle_ms":250}')
    assert request == Subscribe(
        id=2, channels=("trades", "book"), symbols=("coinbase:*",), history=MAX_HISTORY,
        since={"trades:coinbase:BTC-USD": 1234}, epoch="e1", throttle_ms=250)


def test_unsubscribe_and_ping() -> None:
    assert parse_request('{"op":"unsubscribe","id":"u","channels":["ticker"],"symbols":["*"]}') \
        == Unsubscribe(id="u", channels=("ticker",), symbols=("*",))
    assert parse_request('{"op":"ping"}') == Ping(id=None)


@pytest.mark.parametrize(("text", "code", "message"), [
    ('{"op":"subscribe","id":1,"channels":["trades"],"symbols":["*"],"history":1001}',
     INVALID_REQUEST, "history must be an integer from 0 to 1000"),
    ('{"op":"subscribe","id":1,"channels":["trades"],"symbols":["*"],"history":-1}',
     INVALID_REQUEST, "history must be an integer from 0 to 1000"),
    # epoch belongs beside since, not inside it
    ('{"op":"subscribe","id":1,"channels":["trades"],"symbols":["*"],'
     '"since":{"trades:x:A-B":1,"epoch":"e1"}}',
     INVALID_REQUEST, "since must map stream names to sequence numbers"),
    ('{"op":"subscribe","id":1,"channels":["trades"],"symbols":["*"],"since":{"s":1}}',
     INVALID_REQUEST, "since needs the epoch it was seen in"),
    ('{"op":"subscribe","id":1,"channels":["trades"],"symbols":["*"],"since":{"s":true},'
     '"epoch":"e"}', INVALID_REQUEST, "since must map stream names to sequence numbers"),
    ('{"op":"subscribe","id":1,"channels":["trades"],"symbols":["*"],"throttle_ms":60001}',
     INVALID_REQUEST, "throttle_ms must be an integer from 0 to 60000"),
    ('{"op":"unsubscribe","id":1,"channels":["trades"],"symbols":["*"],"history":1}',
     INVALID_REQUEST, "unknown field 'history'"),
    ("{", INVALID_JSON, "not JSON"),
])
def test_invalid_requests_are_errors_with_their_id(text: str, code: str, message: str) -> None:
    with pytest.raises(RequestError) as error:
        parse_request(text)
    assert error.value.code == code
    assert error.value.message.startswith(message)
    assert error.value.request_id == (None if code == INVALID_JSON else 1)


# -- the request handler: requests in, answers out (a real dispatcher, no socket) -----


def handler(grant: Grant = EVERYTHING, **config: object) -> tuple[RequestHandler, Dispatcher]:
    dispatcher = Dispatcher(8, {})
    queue = ClientQueue(100, lambda: 0.0, QueueHooks(ready=list, wake=list, conflated=list,
                                                      slow_consumer=list))
    settings = ServerConfig(**config)  # type: ignore[arg-type]
    return RequestHandler(queue, dispatcher, grant, settings, "e1", 0.0), dispatcher


def test_a_subscribe_is_acked_then_gets_its_history() -> None:
    requests, dispatcher = handler()
    for i in range(5):
        dispatcher.publish(trade(i))
    answer = requests.receive(
        b'{"op":"subscribe","id":7,"channels":["trades"],"symbols":["x:*"],"history":2}', 1.0)
    assert answer.replies == ({"type": "ack", "id": 7, "op": "subscribe",
                               "channels": ("trades",), "symbols": ("x:*",)},)
    assert [m.seq for m in answer.initial] == [4, 5] and answer.close is None
    assert dispatcher.subscriptions[requests.queue] == {("trades", "x:*")}


def test_recovery_with_since_needs_the_servers_epoch() -> None:
    requests, dispatcher = handler()
    for i in range(5):
        dispatcher.publish(trade(i))
    answer = requests.receive(
        b'{"op":"subscribe","id":1,"channels":["trades"],"symbols":["*"],'
        b'"since":{"trades:x:A-B":2},"epoch":"e1"}', 1.0)
    assert answer.replies[0]["recovered"] == {"trades:x:A-B": True}
    assert answer.replies[0]["epoch"] == "e1"
    assert [m.seq for m in answer.initial] == [3, 4, 5]
    other, dispatcher = handler()
    for i in range(5):
        dispatcher.publish(trade(i))
    answer = other.receive(
        b'{"op":"subscribe","id":1,"channels":["trades"],"symbols":["*"],"history":1,'
        b'"since":{"trades:x:A-B":2},"epoch":"another"}', 1.0)
    assert answer.replies[0]["recovered"] == {"trades:x:A-B": False}
    assert [m.seq for m in answer.initial] == [5]  # the history asked for instead


def test_a_grant_and_the_subscription_limit_are_errors_and_subscribe_nothing() -> None:
    grant = Grant("desk", frozenset({"trades"}), frozenset({"binance:*"}))
    requests, dispatcher = handler(grant, max_subscriptions=2)
    answer = requests.receive(
        b'{"op":"subscribe","id":1,"channels":["trades"],"symbols":["coinbase:*"]}', 0.0)
    assert answer.replies[0]["code"] == FORBIDDEN and answer.replies[0]["id"] == 1
    answer = requests.receive(
        b'{"op":"subscribe","id":2,"channels":["trades"],'
        b'"symbols":["binance:A-B","binance:C-D","binance:E-F"]}', 0.0)
    assert answer.replies[0]["code"] == TOO_MANY_SUBSCRIPTIONS
    assert requests.queue not in dispatcher.subscriptions


def test_unsubscribe_drops_the_throttle_and_malformed_input_is_an_error_reply() -> None:
    requests, _ = handler()
    requests.receive(b'{"op":"subscribe","id":1,"channels":["ticker"],"symbols":["*"],'
                     b'"throttle_ms":250}', 0.0)
    assert requests.queue.throttles == {("ticker", "*"): 0.25}
    answer = requests.receive('{"op":"unsubscribe","id":2,"channels":["ticker"],"symbols":["*"]}',
                              0.0)
    assert answer.replies[0]["op"] == "unsubscribe" and requests.queue.throttles == {}
    for text in (b"\xff\xfe", b"[]", b'{"op":"ping","id":[1]}', b'{"id":3}'):
        [error] = requests.receive(text, 0.0).replies
        assert error["type"] == "error" and error["code"] in (INVALID_JSON, INVALID_REQUEST)
    assert requests.receive(b'{"op":"ping","id":"p"}', 0.0).replies == (
        {"type": "pong", "id": "p"},)


def test_the_rate_limit_refuses_then_closes_and_forgives_a_client_that_slows_down() -> None:
    requests, _ = handler(max_messages_per_second=2, rate_limit_grace=1.0)
    ping = b'{"op":"ping","id":1}'
    assert [requests.receive(ping, 0.0).replies[0]["type"] for _ in range(3)] == \
        ["pong", "pong", "error"]
    assert requests.receive(ping, 0.0).replies[0]["code"] == RATE_LIMITED
    assert requests.receive(ping, 0.5).replies[0]["type"] == "pong"  # a token came back
    assert requests.receive(ping, 0.5).replies[0]["code"] == RATE_LIMITED
    assert requests.receive(ping, 1.0).replies[0]["type"] == "pong"
    answer = requests.receive(ping, 1.0)  # still above the rate a second after the first
    assert answer.close == Close(CLOSE_RATE_LIMITED, "rate limited") and not answer.replies
    assert requests.rate_limit.refused == 4
    calm, _ = handler(max_messages_per_second=2, rate_limit_grace=1.0)
    for _ in range(3):
        calm.receive(ping, 0.0)
    assert calm.receive(ping, 5.0).replies[0]["type"] == "pong"  # full bucket: forgiven
    assert calm.receive(ping, 5.0).replies[0]["type"] == "pong"
    assert calm.rate_limit.over_since is None


def test_a_granted_publisher_is_paced_by_the_dispatcher_not_the_request_rate() -> None:
    publisher = Grant("desk", frozenset({"*"}), frozenset({"*"}),
                      PublishGrant("desk", frozenset({"signals"}), frozenset({"*"})))
    requests, _ = handler(publisher, max_messages_per_second=2, rate_limit_grace=1.0)
    body = b'{"op":"publish","id":1,"channel":"signals","source":"s","key":"k","data":{}}'
    answers = [requests.receive(body, 0.0) for _ in range(10)]
    assert all(a.publish is not None and a.close is None for a in answers)
    assert requests.rate_limit.refused == 0
    ping = b'{"op":"ping","id":1}'  # other requests still count
    assert [requests.receive(ping, 0.0).replies[0]["type"] for _ in range(3)] == \
        ["pong", "pong", "error"]
    subscriber, _ = handler(max_messages_per_second=2)  # EVERYTHING: no publish grant
    [error] = subscriber.receive(body, 0.0).replies
    assert error["code"] == FORBIDDEN and subscriber.rate_limit.tokens == 1
