"""The channel policies: one table that the dispatcher and the broadcast sessions
both read.

A channel is either **lossless** (every event matters: ``trades``, ``system``,
and the derived ``whales`` and ``bars``) or **state** (only the latest state
matters: ``book``, ``ticker``, ``status``, the derived ``quote`` and the depth-N
book ``views``). From
that follow what a late joiner gets (``late_joiner``), what a full client queue
does (``conflates``: replace the backlog by the latest state, else close the
client with 4008) and whether ``throttle_ms`` applies. ``retention`` is the
default of ``history.<channel>`` (the configuration may override it).

The table is keyed by channel name and made of frozen records. Published
channels (the desk's own streams: ``signals``, ``executions``, ``portfolio``,
``trading_state`` and any ``[channels.NAME]`` of the configuration) are more rows
of the same table (``table()``): ``lossless`` ones keep history like ``trades``,
``latest`` ones keep each key's current value like ``ticker``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

import attrs

#: What a new subscriber of a stream gets before live events.
LateJoiner = Literal["history", "snapshot", "latest"]
#: The two policies a published channel may declare.
Kind = Literal["lossless", "latest"]
#: A published channel's name: a plain lower-case word.
NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@attrs.frozen
class Retention:
    """How much of a channel's streams is kept: the last ``size`` messages, none
    older than ``max_age`` seconds."""

    size: int
    max_age: float


@attrs.frozen(kw_only=True)
class ChannelPolicy:
    """How one channel's streams are served.

    ``name``: the channel; ``lossless``: every event must reach the client (a full
    queue closes it with 4008) rather than only the latest state; ``conflates``: a
    full queue replaces the stream's backlog by its latest state (a
    ``book_snapshot`` or the latest message, marked ``"conflated": true``), and
    ``throttle_ms`` applies; ``late_joiner``: ``history`` (up to the request's
    ``history`` retained messages), ``snapshot`` (the current book) or ``latest``
    (the last message); ``retention``: the default count and age of retained
    messages (``history.<channel>`` in the configuration overrides it);
    ``published``: a channel other processes publish into (``daemon.publish``),
    whose messages carry ``message_type`` as their ``type``.
    """

    name: str
    lossless: bool
    conflates: bool
    late_joiner: LateJoiner
    retention: Retention
    published: bool = False
    message_type: str = ""

    def __attrs_post_init__(self) -> None:
        if self.lossless == self.conflates:
            raise ValueError(f"channel {self.name}: a channel is lossless or conflates")


def _table(*policies: ChannelPolicy) -> Mapping[str, ChannelPolicy]:
    return MappingProxyType({policy.name: policy for policy in policies})


#: Every channel's policy, by name.
POLICIES: Mapping[str, ChannelPolicy] = _table(
    ChannelPolicy(name="trades", lossless=True, conflates=False, late_joiner="history",
                  retention=Retention(1000, 3600.0)),
    ChannelPolicy(name="book", lossless=False, conflates=True, late_joiner="snapshot",
                  retention=Retention(1000, 60.0)),
    ChannelPolicy(name="ticker", lossless=False, conflates=True, late_joiner="latest",
                  retention=Retention(100, 60.0)),
    ChannelPolicy(name="system", lossless=True, conflates=False, late_joiner="history",
                  retention=Retention(100, 86400.0)),
    ChannelPolicy(name="status", lossless=False, conflates=True, late_joiner="latest",
                  retention=Retention(100, 60.0)),
    # derived streams (daemon.derived): computed in the daemon from the rows above
    ChannelPolicy(name="whales", lossless=True, conflates=False, late_joiner="history",
                  retention=Retention(1000, 86400.0)),
    ChannelPolicy(name="bars", lossless=True, conflates=False, late_joiner="history",
                  retention=Retention(1000, 86400.0)),
    ChannelPolicy(name="quote", lossless=False, conflates=True, late_joiner="latest",
                  retention=Retention(100, 60.0)),
    ChannelPolicy(name="views", lossless=False, conflates=True, late_joiner="latest",
                  retention=Retention(100, 60.0)),
)

#: Channels no client names: a ``book`` subscription with ``depth`` is served from
#: ``views`` streams (``daemon.derived.views``).
INTERNAL = frozenset({"views"})

#: The policy of a channel the table does not name: lossless, as nothing is lost
#: by default.
DEFAULT = ChannelPolicy(name="*", lossless=True, conflates=False, late_joiner="history",
                        retention=Retention(100, 3600.0))


def policy_of(channel: str) -> ChannelPolicy:
    """The policy of ``channel`` (``DEFAULT`` for a channel the table does not name)."""
    return POLICIES.get(channel, DEFAULT)


def published(name: str, kind: Kind, retention: Retention, message_type: str = "message",
              ) -> ChannelPolicy:
    """The policy of a published channel: ``lossless`` (late joiners get history, a
    slow client is closed with 4008) or ``latest`` (late joiners get every key's
    current value, a slow client is conflated). Raises ``ValueError`` for a name
    that is not a plain word or is a market-data channel's."""
    if not NAME.match(name):
        raise ValueError(f"channel {name!r}: a channel name is a plain lower-case word")
    if name in POLICIES:
        raise ValueError(f"channel {name!r} is a market-data channel and cannot be declared")
    lossless = kind == "lossless"
    return ChannelPolicy(name=name, lossless=lossless, conflates=not lossless,
                         late_joiner="history" if lossless else "latest",
                         retention=retention, published=True, message_type=message_type)


#: The published channels every daemon has (the configuration may change their
#: retention or add others).
PUBLISHED: Mapping[str, ChannelPolicy] = _table(
    published("signals", "lossless", Retention(1000, 3600.0), "signal"),
    published("executions", "lossless", Retention(10_000, 86400.0), "execution"),
    published("portfolio", "latest", Retention(100, 3600.0), "portfolio"),
    published("trading_state", "latest", Retention(100, 3600.0), "trading_state"),
)


def table(declared: Mapping[str, ChannelPolicy] = MappingProxyType({})
          ) -> Mapping[str, ChannelPolicy]:
    """Every channel's policy: the market-data table, the default published
    channels, and ``declared`` ones (which replace a default of the same name)."""
    return _table(*POLICIES.values(), *{**PUBLISHED, **declared}.values())
