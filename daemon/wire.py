"""The wire encoding: events to and from JSON, in one place.

One cattrs converter (its orjson preconf) unstructures events; the ``type`` tag and
the per-stream ``seq`` are added here. Every event is encoded once by the
dispatcher and the same bytes go to every client.

Shape of an encoded event (see docs/protocol.md)::

    {"type":"trade","exchange":"binance","symbol":"NKN-USDT","ts":1633998523.963,
     "recv_ts":1633998523.957,"id":"15683430","price":"0.35280000","size":"58.00000000",
     "side":"buy","seq":17}
"""

from __future__ import annotations

from typing import Any

import orjson
from cattrs.preconf.orjson import make_converter

from daemon.events import EVENT_TYPES, MarketEvent

converter = make_converter()
_BY_TYPE: dict[str, type[MarketEvent]] = {cls.TYPE: cls for cls in EVENT_TYPES}


def event_dict(event: MarketEvent, seq: int, **extra: Any) -> dict[str, Any]:
    """The wire object of ``event`` as a dict: ``type``, the event's fields, ``seq``."""
    body: dict[str, Any] = {"type": event.TYPE}
    body.update(converter.unstructure(event))
    body["seq"] = seq
    if extra:
        body.update(extra)
    return body


def encode_event(event: MarketEvent, seq: int, **extra: Any) -> bytes:
    """Serialize ``event`` with its stream ``seq`` as UTF-8 JSON bytes.

    ``extra`` adds fields (e.g. ``conflated=True``) after ``seq``.
    """
    return orjson.dumps(event_dict(event, seq, **extra))


def encode(message: dict[str, Any]) -> bytes:
    """Serialize a control message (``welcome``, ``ack``, ``error``, ``pong``)."""
    return orjson.dumps(message)


def decode_event(obj: dict[str, Any]) -> tuple[MarketEvent, int]:
    """Turn a wire object back into ``(event, seq)``.

    Raises ``KeyError`` for an unknown ``type`` and cattrs' ``ClassValidationError``
    for missing or mistyped fields.
    """
    cls = _BY_TYPE[obj["type"]]
    fields = {k: v for k, v in obj.items() if k not in ("type", "seq", "conflated")}
    for side in ("bids", "asks"):
        if side in fields:
            fields[side] = tuple(tuple(level) for level in fields[side])
    return converter.structure(fields, cls), int(obj.get("seq", 0))
