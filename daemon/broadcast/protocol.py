"""The client protocol, sans-IO: client text frames to validated requests.

Client ops (see docs/protocol.md)::

    {"op":"subscribe","id":1,"channels":["trades","book"],"symbols":["binance:*"],"history":100,
     "since":{"trades:binance:NKN-USDT":1234},"epoch":"...","throttle_ms":250,"depth":10}
    {"op":"unsubscribe","id":2,"channels":["trades"],"symbols":["binance:*"]}
    {"op":"ping","id":3}
    {"op":"publish","id":4,"channel":"signals","source":"momentum","key":"BTC-USD","data":{...}}

Market-data channels take ``exchange:BASE-QUOTE`` symbols; published channels
(``daemon.channels``: signals, executions, portfolio, trading_state, declared ones)
take ``source:key``; both take ``*`` for a part or the whole. A ``publish`` is
checked here only for its ``id``: its fields are the publish message's, checked
by ``daemon.publish.message``.

``parse_request`` raises ``RequestError`` with a machine ``code`` and a message for
people; the session answers it with an ``error`` and stays open.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs
import orjson

from daemon.channels import INTERNAL, ChannelPolicy, table
from daemon.dispatch import KEY_PATTERN, SYMBOL_PATTERN

#: A ``bars`` subscription's symbol: a market symbol pattern, and optionally one
#: interval (``coinbase:BTC-USD:1m``, ``coinbase:*:1m``); without it, every interval.
BARS_PATTERN = re.compile(r"^(\*|[a-z0-9_.]+:(\*|[A-Z0-9.]+-[A-Z0-9.]+)(:[1-9][0-9]{0,5}[smhd])?)$")

#: Error codes of ``error`` replies.
INVALID_JSON = "invalid_json"
INVALID_REQUEST = "invalid_request"
UNKNOWN_OP = "unknown_op"
UNKNOWN_CHANNEL = "unknown_channel"
INVALID_SYMBOL = "invalid_symbol"
FORBIDDEN = "forbidden"
RATE_LIMITED = "rate_limited"
TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
#: ``throttle_ms`` under ``server.min_throttle_ms`` (checked by ``requests.py``)
THROTTLE_TOO_LOW = "throttle_too_low"
#: more throttled streams than ``server.max_throttled``
TOO_MANY_THROTTLED = "too_many_throttled"

#: The most retained messages a subscribe may ask for (more is an error, not clamped).
MAX_HISTORY = 1000
#: The deepest book view a subscribe may ask for (``depth``).
MAX_DEPTH = 1000


class RequestError(ValueError):
    """A client frame that cannot be served: ``code``, ``message`` and the request's
    ``id`` when it could be read."""

    def __init__(self, code: str, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@attrs.frozen
class Subscribe:
    """Subscribe to ``channels`` x ``symbols``; ``history``: retained trades to send;
    ``since``: ``{stream: last seq seen}`` to recover, with the ``epoch`` it was seen
    in; ``throttle_ms``: at most one book or ticker message per stream per interval;
    ``depth``: the ``book`` streams as views of their top N levels
    (``daemon.derived.views``), 0: whole books."""

    id: Any
    channels: tuple[str, ...]
    symbols: tuple[str, ...]
    history: int = 0
    since: dict[str, int] = attrs.field(factory=dict)
    epoch: str | None = None
    throttle_ms: int = 0
    depth: int = 0


@attrs.frozen
class Unsubscribe:
    """Stop ``channels`` x ``symbols``."""

    id: Any
    channels: tuple[str, ...]
    symbols: tuple[str, ...]


@attrs.frozen
class Ping:
    """Application-level ping; answered with ``pong``."""

    id: Any


@attrs.frozen
class Publish:
    """Publish ``message`` (the publish message's fields, unchecked) into a
    published channel; answered with ``ack`` and its ``seq``, or an ``error``."""

    id: Any
    message: dict[str, Any]


Request = Subscribe | Unsubscribe | Ping | Publish

#: The channels of a daemon without declared ones.
DEFAULT_CHANNELS = table()


def parse_request(text: str | bytes,
                  channels: Mapping[str, ChannelPolicy] = DEFAULT_CHANNELS) -> Request:
    """Validate one client frame against ``channels`` (every channel's policy);
    raises ``RequestError`` (see the module docstring)."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise RequestError(INVALID_JSON, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError(INVALID_REQUEST, "a request is a JSON object")
    request_id = obj.get("id")
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, int | str)
    ):
        raise RequestError(INVALID_REQUEST, "id must be an integer or a string")
    op = obj.get("op")
    if op == "ping":
        _only(obj, {"op", "id"}, request_id)
        return Ping(id=request_id)
    if op == "publish":
        return Publish(id=request_id,
                       message={k: v for k, v in obj.items() if k not in ("op", "id")})
    if op in ("subscribe", "unsubscribe"):
        allowed = {"op", "id", "channels", "symbols"} | (
            {"history", "since", "epoch", "throttle_ms", "depth"} if op == "subscribe" else set()
        )
        _only(obj, allowed, request_id)
        names = _strings(obj, "channels", request_id)
        for channel in names:
            if channel not in channels or channel in INTERNAL:
                raise RequestError(
                    UNKNOWN_CHANNEL,
                    f"unknown channel {channel!r}; channels are "
                    f"{', '.join(c for c in channels if c not in INTERNAL)}",
                    request_id,
                )
        symbols = _strings(obj, "symbols", request_id)
        for channel in names:
            published = channels[channel].published
            pattern = KEY_PATTERN if published else (
                BARS_PATTERN if channel == "bars" else SYMBOL_PATTERN)
            for symbol in symbols:
                if not pattern.match(symbol):
                    use = ("SOURCE:KEY, SOURCE:* or *" if published
                           else "EXCHANGE:BASE-QUOTE, EXCHANGE:* or *" + (
                               " (and :INTERVAL)" if channel == "bars" else ""))
                    raise RequestError(
                        INVALID_SYMBOL, f"invalid symbol {symbol!r} for {channel}; use {use}",
                        request_id)
        if op == "unsubscribe":
            return Unsubscribe(id=request_id, channels=names, symbols=symbols)
        history = obj.get("history", 0)
        if (isinstance(history, bool) or not isinstance(history, int)
                or not 0 <= history <= MAX_HISTORY):
            raise RequestError(INVALID_REQUEST,
                               f"history must be an integer from 0 to {MAX_HISTORY}", request_id)
        since = obj.get("since", {})
        if not isinstance(since, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in since.items()
        ):
            raise RequestError(
                INVALID_REQUEST, "since must map stream names to sequence numbers", request_id)
        epoch = obj.get("epoch")
        if epoch is not None and not isinstance(epoch, str):
            raise RequestError(INVALID_REQUEST, "epoch must be a string", request_id)
        if since and epoch is None:
            raise RequestError(INVALID_REQUEST, "since needs the epoch it was seen in", request_id)
        throttle = obj.get("throttle_ms", 0)
        if isinstance(throttle, bool) or not isinstance(throttle, int) or not 0 <= throttle <= 60_000:
            raise RequestError(
                INVALID_REQUEST, "throttle_ms must be an integer from 0 to 60000", request_id)
        depth = obj.get("depth", 0)
        if (isinstance(depth, bool) or not isinstance(depth, int)
                or not 0 <= depth <= MAX_DEPTH):
            raise RequestError(
                INVALID_REQUEST, f"depth must be an integer from 1 to {MAX_DEPTH}", request_id)
        if depth and "book" not in names:
            raise RequestError(INVALID_REQUEST, "depth applies to the book channel", request_id)
        return Subscribe(
            id=request_id, channels=names, symbols=symbols, history=history,
            since=since, epoch=epoch, throttle_ms=throttle, depth=depth,
        )
    if op is None:
        raise RequestError(INVALID_REQUEST, "missing op", request_id)
    raise RequestError(
        UNKNOWN_OP, f"unknown op {op!r}; ops are subscribe, unsubscribe, ping, publish",
        request_id)


def _only(obj: dict[str, Any], allowed: set[str], request_id: Any) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise RequestError(INVALID_REQUEST, f"unknown field {extra[0]!r}", request_id)


def _strings(obj: dict[str, Any], key: str, request_id: Any) -> tuple[str, ...]:
    value = obj.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RequestError(INVALID_REQUEST, f"{key} must be a non-empty list of strings", request_id)
    return tuple(dict.fromkeys(value))
