"""The publish message, sans-IO: a publisher's JSON in, a ``Published`` event or a
``PublishError`` out.

Shape (docs/protocol.md "Publishing")::

    {"channel":"signals","source":"momentum","key":"BTC-USD","data":{"side":"buy"},
     "ts":1733400000.5,"idempotency_key":"sig-42","version":17}

``channel`` names a declared published channel (``daemon.channels``); ``source``
and ``key`` are plain names (the stream is ``channel:source:key``); ``data`` is a
JSON object of at most ``max_bytes`` encoded bytes, carried to clients unchanged;
``ts`` (optional) is the publisher's time in epoch seconds; ``idempotency_key``
(optional) makes a retry safe; ``version`` (optional, ``latest`` channels) orders
states. Unknown fields are refused, so a typo never passes silently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import attrs
import orjson

from daemon.channels import ChannelPolicy
from daemon.events import Published

#: Error codes of publish answers, with the HTTP status each is answered with.
INVALID_JSON = "invalid_json"
INVALID_FIELD = "invalid_field"
UNKNOWN_CHANNEL = "unknown_channel"
TOO_LARGE = "too_large"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
STALE = "stale"
BUSY = "busy"
HTTP_STATUS = {INVALID_JSON: 400, INVALID_FIELD: 400, UNKNOWN_CHANNEL: 404, TOO_LARGE: 413,
               UNAUTHORIZED: 401, FORBIDDEN: 403, STALE: 409, BUSY: 503}

#: A source: lower-case letters, digits, ``_ . -``; at most 64 characters.
SOURCE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
#: A key: letters, digits, ``_ . - /``; at most 128 characters (no ``:`` or ``*``).
KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$")
#: An idempotency key: 1 to 128 printable ASCII characters.
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")

FIELDS = frozenset({"channel", "source", "key", "data", "ts", "idempotency_key", "version"})


class PublishError(ValueError):
    """A publish that cannot be accepted: ``code`` (one of this module's codes),
    ``message`` for people, ``status`` the HTTP status it is answered with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = HTTP_STATUS[code]

    def answer(self) -> dict[str, Any]:
        """The error answer: ``{"ok": false, "code": ..., "message": ...}``."""
        return {"ok": False, "code": self.code, "message": self.message}


@attrs.frozen
class PublishGrant:
    """What a publisher may publish: ``channels`` and ``sources`` (``*``: any).
    ``name`` names it in logs (a token's name, ``admin`` for the Unix socket)."""

    name: str
    channels: frozenset[str]
    sources: frozenset[str]

    def allows(self, channel: str, source: str) -> bool:
        """Whether this grant covers publishing ``channel`` as ``source``."""
        return (("*" in self.channels or channel in self.channels)
                and ("*" in self.sources or source in self.sources))


#: The grant of a publisher the admin socket let in (its file mode and peer
#: credentials decide), or an anonymous one on loopback where configured.
ANYONE = PublishGrant("local", frozenset({"*"}), frozenset({"*"}))


def decode(body: bytes | str) -> Any:
    """Parse a JSON body; raises ``PublishError`` (``invalid_json``)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PublishError(INVALID_JSON, f"not JSON: {exc}") from None


def parse_publish(obj: Any, channels: Mapping[str, ChannelPolicy], max_bytes: int,
                  recv_ts: float) -> Published:
    """Validate one publish message (a parsed JSON value) received at ``recv_ts``
    (epoch s) against the declared ``channels``. Returns the ``Published`` event
    (without a receipt); raises ``PublishError`` with the first problem found."""
    if not isinstance(obj, dict):
        raise PublishError(INVALID_FIELD, "a publish message is a JSON object")
    extra = sorted(set(obj) - FIELDS)
    if extra:
        raise PublishError(INVALID_FIELD, f"unknown field {extra[0]!r}")
    channel = obj.get("channel")
    if not isinstance(channel, str):
        raise PublishError(INVALID_FIELD, "channel must be a string")
    policy = channels.get(channel)
    if policy is None or not policy.published:
        raise PublishError(UNKNOWN_CHANNEL, _unknown(channel, channels))
    source = _name(obj, "source", SOURCE, "lower-case letters, digits, _ . - (at most 64)")
    key = _name(obj, "key", KEY, "letters, digits, _ . - / (at most 128)")
    data = obj.get("data")
    if not isinstance(data, dict):
        raise PublishError(INVALID_FIELD, "data must be a JSON object")
    try:
        encoded = orjson.dumps(data)
    except orjson.JSONEncodeError:  # read (1,024 levels) but not writable (254)
        raise PublishError(INVALID_FIELD, "data is nested too deeply") from None
    if len(encoded) > max_bytes:
        raise PublishError(TOO_LARGE, f"data is {len(encoded)} bytes; at most {max_bytes}")
    ts = obj.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float)
                           or not math.isfinite(ts) or ts < 0):
        raise PublishError(INVALID_FIELD, "ts must be a time in epoch seconds")
    idempotency_key = obj.get("idempotency_key")
    if idempotency_key is not None and (not isinstance(idempotency_key, str)
                                        or not IDEMPOTENCY_KEY.fullmatch(idempotency_key)):
        raise PublishError(INVALID_FIELD,
                           "idempotency_key must be 1 to 128 printable ASCII characters")
    version = obj.get("version")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise PublishError(INVALID_FIELD, "version must be a non-negative integer")
        if policy.lossless:
            raise PublishError(INVALID_FIELD,
                               f"version applies to latest channels; {channel} is lossless")
    return Published(
        channel=channel, source=source, key=key, type=policy.message_type, data=encoded,
        ts=float(ts) if ts is not None else None, recv_ts=recv_ts,
        idempotency_key=idempotency_key, version=version,
    )


def accepted(seq: int, epoch: str, duplicate: bool = False) -> dict[str, Any]:
    """The answer to an accepted publish: ``{"ok": true, "seq": N, "epoch": "..."}``
    (and ``"duplicate": true`` for a repeated idempotency key)."""
    answer: dict[str, Any] = {"ok": True, "seq": seq, "epoch": epoch}
    if duplicate:
        answer["duplicate"] = True
    return answer


def _name(obj: dict[str, Any], field: str, pattern: re.Pattern[str], rule: str) -> str:
    value = obj.get(field)
    if not isinstance(value, str) or not pattern.fullmatch(value):  # ``$`` passes a final \n
        raise PublishError(INVALID_FIELD, f"{field} must be a name of {rule}")
    return value


def _unknown(channel: str, channels: Mapping[str, ChannelPolicy]) -> str:
    published = sorted(name for name, policy in channels.items() if policy.published)
    if channel in channels:
        return (f"{channel!r} is a market-data channel; publish to a declared channel: "
                f"{', '.join(published) or 'none is declared'}")
    return (f"unknown channel {channel!r}; declared channels are "
            f"{', '.join(published) or 'none'}")
