"""Client requests, sans-IO: text frames in, requests or errors out (no server)."""

from __future__ import annotations

import pytest

from daemon.broadcast.protocol import (
    INVALID_JSON,
    INVALID_REQUEST,
    MAX_HISTORY,
    Ping,
    RequestError,
    Subscribe,
    Unsubscribe,
    parse_request,
)


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
