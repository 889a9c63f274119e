"""The publish message parser (``daemon.publish.message.parse_publish``), sans-IO,
with Hypothesis: it never raises anything but ``PublishError`` and what it
accepts carries its data unchanged; and ``daemon.recent.Recent``, the
de-duplicator behind idempotency keys."""

from __future__ import annotations

import string
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.channels import table
from daemon.publish.message import (
    FIELDS,
    HTTP_STATUS,
    IDEMPOTENCY_KEY,
    KEY,
    SOURCE,
    PublishError,
    decode,
    parse_publish,
)
from daemon.recent import Recent

CHANNELS = table()
MAX_BYTES = 2048

#: JSON values as a JSON body can carry them (orjson's range: 64-bit integers,
#: finite floats, any text)
scalars = (st.none() | st.booleans() | st.text(max_size=20)
           | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)

names = st.sampled_from(["momentum", "desk1", "a", "risk.v2", "m-1", "x_y", "momentum\n"])
keys = st.sampled_from(["BTC-USD", "BTC", "account", "eth/usd", "k.1", "BTC-USD\n"])
channel_names = st.sampled_from([*CHANNELS, "candles", "", "Signals"])


def valid(channel: str = "signals", **fields: Any) -> dict[str, Any]:
    return {"channel": channel, "source": "momentum", "key": "BTC-USD",
            "data": {"side": "buy"}, **fields}


@st.composite
def messages(draw: st.DrawFn) -> Any:
    """A publish message, valid or broken one field at a time, or any JSON value."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(json_values)
    message: dict[str, Any] = {
        "channel": draw(channel_names), "source": draw(names | st.text(max_size=70)),
        "key": draw(keys | st.text(max_size=130)), "data": draw(json_objects),
    }
    for field in ("ts", "idempotency_key", "version"):
        if draw(st.booleans()):
            message[field] = draw(json_values | st.integers(-5, 2**40) | st.text(
                alphabet=string.printable, max_size=130))
    if kind == 2:  # one field replaced by anything, or dropped
        field = draw(st.sampled_from(sorted(FIELDS)))
        if draw(st.booleans()):
            message[field] = draw(json_values)
        else:
            message.pop(field, None)
    if kind == 3 and draw(st.booleans()):
        message[draw(st.text(max_size=8))] = draw(json_values)
    return message


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_parse_publish_raises_only_publish_errors_and_carries_data_unchanged(obj: Any) -> None:
    try:
        event = parse_publish(obj, CHANNELS, MAX_BYTES, 1.5)
    except PublishError as exc:
        assert exc.code in HTTP_STATUS and exc.status == HTTP_STATUS[exc.code]
        assert exc.message and exc.answer() == {"ok": False, "code": exc.code,
                                                "message": exc.message}
        return
    # accepted: every field checked, and the data round-trips
    assert isinstance(obj, dict) and set(obj) <= FIELDS
    assert orjson.loads(event.data) == obj["data"]
    assert len(event.data) <= MAX_BYTES
    policy = CHANNELS[obj["channel"]]
    assert policy.published and event.type == policy.message_type
    assert (event.channel, event.source, event.key) == (obj["channel"], obj["source"], obj["key"])
    assert event.recv_ts == 1.5 and event.idempotency_key == obj.get("idempotency_key")
    assert event.version == obj.get("version")
    assert event.version is None or not policy.lossless
    assert SOURCE.fullmatch(event.source) and KEY.fullmatch(event.key)
    assert event.idempotency_key is None or IDEMPOTENCY_KEY.fullmatch(event.idempotency_key)
    assert event.ts is None or event.ts == obj["ts"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_decode_raises_only_invalid_json(body: bytes | str) -> None:
    try:
        decode(body)
    except PublishError as exc:
        assert exc.code == "invalid_json" and exc.status == 400


@pytest.mark.parametrize(
    ("obj", "code"),
    [
        ([valid()], "invalid_field"),
        (valid(extra=1), "invalid_field"),
        (valid(channel="trades"), "unknown_channel"),
        (valid(channel="candles"), "unknown_channel"),
        (valid(source="Momentum"), "invalid_field"),
        (valid(source="a:b"), "invalid_field"),
        (valid(key="BTC:USD"), "invalid_field"),
        (valid(key="*"), "invalid_field"),
        (valid(source="momentum\n"), "invalid_field"),  # ``$`` alone would pass a final newline
        (valid(key="BTC-USD\n"), "invalid_field"),
        (valid(idempotency_key="sig-1\n"), "invalid_field"),
        (valid(data=[1]), "invalid_field"),
        (valid(data={"x": "y" * MAX_BYTES}), "too_large"),
        (valid(ts=True), "invalid_field"),
        (valid(ts=-1), "invalid_field"),
        (valid(idempotency_key=""), "invalid_field"),
        (valid(idempotency_key="a b"), "invalid_field"),
        (valid("portfolio", version=-1), "invalid_field"),
        (valid("portfolio", version=1.5), "invalid_field"),
        (valid(version=3), "invalid_field"),  # signals is lossless: no version
    ],
)
def test_each_problem_has_its_code(obj: Any, code: str) -> None:
    with pytest.raises(PublishError) as refused:
        parse_publish(obj, CHANNELS, MAX_BYTES, 1.0)
    assert refused.value.code == code


def test_market_data_channel_names_are_refused_as_such() -> None:
    with pytest.raises(PublishError, match="'trades' is a market-data channel") as refused:
        parse_publish(valid(channel="trades"), CHANNELS, MAX_BYTES, 1.0)
    assert refused.value.status == 404


def test_data_nested_deeper_than_the_encoder_takes_is_an_invalid_field() -> None:
    # orjson reads 1,024 levels but writes at most 254: such data must be refused
    # as input, not raise the encoder's TypeError (an HTTP 500)
    body = b'{"channel":"signals","source":"m","key":"k","data":' + b'{"a":' * 300 + b"1" + b"}" * 301
    obj = decode(body)
    with pytest.raises(PublishError) as refused:
        parse_publish(obj, CHANNELS, 1 << 20, 1.0)
    assert refused.value.code == "invalid_field" and "nested" in refused.value.message


def test_an_expired_key_added_again_is_the_newest() -> None:
    recent: Recent[int] = Recent(2, max_age=1.0)
    recent.add("a", 1, 0.0)
    recent.add("b", 2, 0.9)
    assert recent.get("a", 1.5) is None  # expired
    recent.add("a", 3, 1.5)  # a retry after the window: remembered again, as the newest
    recent.add("c", 4, 1.6)  # over the size: the oldest (b) goes, not the fresh a
    assert list(recent) == ["a", "c"]
    assert recent.get("a", 1.7) == 3 and recent.get("c", 1.7) == 4
    assert recent.get("b", 1.7) is None
