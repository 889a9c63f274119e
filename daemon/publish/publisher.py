"""The one code path behind every way in (HTTP, WebSocket, admin socket): a publish
message is checked, authorized, sent into the dispatcher as a source, and
answered with what the dispatcher did.

Theory of operation
-------------------
1. ``message.parse_publish`` validates the message against the declared channels
   (sans-IO); the caller's ``PublishGrant`` must allow its channel and source.
2. The ``Published`` event goes into the dispatcher's bounded input channel like
   a collector's events (``Dispatcher.open_source``). When the channel is full
   the publisher waits (backpressure) up to ``publish.timeout`` seconds, then
   answers ``busy`` (HTTP 503): the event was not sent, so nothing accepted is
   ever lost and nothing is half-published.
3. The dispatcher numbers the event in order with everything else, or finds its
   idempotency key already seen (``duplicate``: the first one's ``seq``) or its
   version not above the key's current one (``stale``), and settles the event's
   ``Receipt``; the publisher wakes and answers
   ``{"ok": true, "seq": N, "epoch": "..."}`` or the error.

Counters per channel and source (``accepted``, ``duplicate``, ``stale``,
``refused``) feed metrics and ``tickwire status``; a message whose channel is not
declared is counted under channel ``-``, so an unknown name never becomes a
metric series.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from daemon.channels import ChannelPolicy
from daemon.config import PublishConfig
from daemon.dispatch import Source
from daemon.events import Receipt
from daemon.publish.message import (
    BUSY,
    FORBIDDEN,
    SOURCE,
    STALE,
    PublishError,
    PublishGrant,
    accepted,
    decode,
    parse_publish,
)

log = logging.getLogger(__name__)

#: (channel, source) pairs counted apart at most; more are counted under ``-``.
MAX_COUNTED_PAIRS = 1000


@attrs.define
class PublishCounters:
    """Publishes of one channel and source: ``accepted`` (numbered), ``duplicate``
    (an idempotency key seen before), ``stale`` (a version not above the
    current), ``refused`` (invalid, not allowed, too large, busy)."""

    accepted: int = 0
    duplicate: int = 0
    stale: int = 0
    refused: int = 0


@attrs.frozen
class PublishFigures:
    """One channel and source's counts (see ``PublishCounters``)."""

    channel: str
    source: str
    accepted: int
    duplicate: int
    stale: int
    refused: int


@attrs.frozen
class PublisherStatistics:
    """Every channel and source's counts, and ``busy``: publishes answered 503
    because the dispatcher stayed full for ``publish.timeout``."""

    figures: tuple[PublishFigures, ...]
    busy: int


class Publisher:
    """Publishes into the dispatcher (see the module docstring).

    ``source``: from ``Dispatcher.open_source()``; ``channels``: every channel's
    policy (``Config.channel_table()``); ``config``: ``timeout``,
    ``max_message_bytes``; ``epoch``: the server's, put in every answer.
    """

    def __init__(self, source: Source, channels: Mapping[str, ChannelPolicy],
                 config: PublishConfig, epoch: str) -> None:
        self.source = source
        self.channels = channels
        self.config = config
        self.epoch = epoch
        self.counters: dict[tuple[str, str], PublishCounters] = {}
        self.busy = 0

    async def publish(self, obj: Any, grant: PublishGrant) -> dict[str, Any]:
        """Publish one parsed message as ``grant`` allows; returns the answer
        (``{"ok": true, ...}`` or ``{"ok": false, "code", "message"}``). Never
        raises for bad input."""
        try:
            return await self._publish(obj, grant)
        except PublishError as exc:
            self._count(obj, "stale" if exc.code == STALE else "refused")
            return exc.answer()

    async def publish_body(self, body: bytes | str, grant: PublishGrant) -> dict[str, Any]:
        """``publish`` for a JSON text (an ``invalid_json`` answer when it is not)."""
        try:
            obj = decode(body)
        except PublishError as exc:
            self._count(None, "refused")
            return exc.answer()
        return await self.publish(obj, grant)

    async def _publish(self, obj: Any, grant: PublishGrant) -> dict[str, Any]:
        event = parse_publish(obj, self.channels, self.config.max_message_bytes, time.time())
        if not grant.allows(event.channel, event.source):
            raise PublishError(FORBIDDEN, f"{grant.name} may not publish to "
                                          f"{event.channel} as {event.source}")
        done = trio.Event()
        receipt = Receipt(notify=done.set)
        event = attrs.evolve(event, receipt=receipt)
        sent = False
        with trio.move_on_after(self.config.timeout):
            await self.source.send(event)
            sent = True
        if not sent:  # not in the dispatcher's channel: nothing was accepted
            self.busy += 1
            raise PublishError(BUSY, f"the dispatcher stayed full for "
                                     f"{self.config.timeout:g} s; retry later")
        await done.wait()  # sent: the dispatcher settles it in order
        if receipt.outcome == "stale":
            raise PublishError(STALE, f"version {event.version} is not above the current "
                                      f"version {receipt.version} of {event.channel}:"
                                      f"{event.source}:{event.key}")
        duplicate = receipt.outcome == "duplicate"
        self._count(obj, "duplicate" if duplicate else "accepted")
        return accepted(receipt.seq, self.epoch, duplicate)

    def _count(self, obj: Any, outcome: str) -> None:
        channel = source = "-"
        if isinstance(obj, dict):
            name = obj.get("channel")
            policy = self.channels.get(name) if isinstance(name, str) else None
            if policy is not None and policy.published:
                channel = policy.name
                value = obj.get("source")
                if isinstance(value, str) and SOURCE.fullmatch(value):
                    source = value
        key = (channel, source)
        counters = self.counters.get(key)
        if counters is None:
            if len(self.counters) >= MAX_COUNTED_PAIRS:
                key = ("-", "-")
                counters = self.counters.setdefault(key, PublishCounters())
            else:
                counters = self.counters[key] = PublishCounters()
        setattr(counters, outcome, getattr(counters, outcome) + 1)

    def statistics(self) -> PublisherStatistics:
        """The counts so far, by channel and source."""
        return PublisherStatistics(
            figures=tuple(PublishFigures(channel, source, **attrs.asdict(c))
                          for (channel, source), c in sorted(self.counters.items())),
            busy=self.busy,
        )
