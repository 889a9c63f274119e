"""The event model: normalized, immutable market-data events.

Every event names its ``exchange`` (``binance``, ``coinbase``, ``kraken`` or a ccxt
id) and its ``symbol`` (``BASE-QUOTE``, e.g. ``BTC-USDT``). Prices and sizes are
decimal strings exactly as the exchange sent them, never floats. ``ts`` is the
exchange's time and ``recv_ts`` the time tickwire received the frame, both in Unix
epoch seconds (float).

Each class carries two class-level names: ``TYPE``, the ``type`` tag on the wire,
and ``CHANNEL``, the channel a client subscribes to. A stream is one
``CHANNEL:exchange:symbol``; the dispatcher numbers events per stream.

This module imports nothing else of the daemon: sources other than the collectors
(other processes, derived streams) produce these same classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import attrs

#: One price level: ``(price, size)`` as decimal strings.
Level = tuple[str, str]
#: Levels of one side, best first (bids descending, asks ascending).
Levels = tuple[Level, ...]

#: Channel names clients subscribe to, in the order the docs list them.
MARKET_CHANNELS = ("trades", "book", "ticker")


@attrs.frozen(kw_only=True)
class Trade:
    """One executed trade.

    ``id`` is the exchange's trade id as a string (Binance ``aggTrade`` id,
    Coinbase ``trade_id``, Kraken has none: a synthetic ``time-index`` id);
    ``side`` is the taker's side, ``"buy"`` or ``"sell"``.
    """

    TYPE: ClassVar[str] = "trade"
    CHANNEL: ClassVar[str] = "trades"

    exchange: str
    symbol: str
    ts: float
    recv_ts: float
    id: str
    price: str
    size: str
    side: str


@attrs.frozen(kw_only=True)
class BookSnapshot:
    """The whole L2 book of one symbol: the state every later update applies to.

    ``bids`` descending and ``asks`` ascending by price, each ``((price, size), ...)``.
    Sent when a book is first synced and again after every resync.
    """

    TYPE: ClassVar[str] = "book_snapshot"
    CHANNEL: ClassVar[str] = "book"

    exchange: str
    symbol: str
    ts: float
    recv_ts: float
    bids: Levels
    asks: Levels


@attrs.frozen(kw_only=True)
class BookUpdate:
    """A delta to an L2 book: each level replaces the size at its price.

    A size that is zero (``"0"``, ``"0.00000000"``) removes the level.
    """

    TYPE: ClassVar[str] = "book_update"
    CHANNEL: ClassVar[str] = "book"

    exchange: str
    symbol: str
    ts: float
    recv_ts: float
    bids: Levels
    asks: Levels


@attrs.frozen(kw_only=True)
class Ticker:
    """Best bid and offer (top of book) of one symbol."""

    TYPE: ClassVar[str] = "ticker"
    CHANNEL: ClassVar[str] = "ticker"

    exchange: str
    symbol: str
    ts: float
    recv_ts: float
    bid: str
    bid_size: str
    ask: str
    ask_size: str


@attrs.frozen(kw_only=True)
class FeedState:
    """A state change of a feed or of one of its books, on the ``system`` channel.

    ``symbol`` is ``"*"`` for the whole connection. ``state`` is one of
    ``connecting``, ``subscribed``, ``stale``, ``reconnecting``, ``resyncing``,
    ``synced``, ``failed``, ``fallback``; ``detail`` says why, for people.
    """

    TYPE: ClassVar[str] = "feed_state"
    CHANNEL: ClassVar[str] = "system"

    exchange: str
    symbol: str
    ts: float
    recv_ts: float
    state: str
    detail: str = ""


@attrs.frozen(kw_only=True)
class Gap:
    """Data that could not be recovered, on the ``system`` channel.

    ``stream`` names the channel that lost data (``trades``, ``book``); ``from_id``
    and ``to_id`` bound what is missing where the exchange's ids tell it.
    """

    TYPE: ClassVar[str] = "gap"
    CHANNEL: ClassVar[str] = "system"

    exchange: str
    symbol: str
    ts: float
    recv_ts: float
    stream: str
    from_id: str = ""
    to_id: str = ""
    detail: str = ""


@attrs.frozen(kw_only=True)
class ComponentHealth:
    """One daemon component as a ``Status`` event lists it (not an event itself).

    ``criticality``: ``critical`` (its failure makes the daemon unhealthy) or
    ``degraded`` (a feed: its failure makes the daemon degraded); ``health``:
    ``healthy``, ``degraded`` or ``unhealthy``; ``reason`` says why, for people.
    """

    name: str
    criticality: str
    health: str
    reason: str = ""


@attrs.frozen(kw_only=True)
class Status:
    """The daemon's health, every ``reporter.interval`` seconds, on the ``status``
    channel; ``exchange`` is ``"tickwire"`` and ``symbol`` ``"*"``.

    ``health``: ``healthy``, ``degraded`` or ``unhealthy``; ``uptime`` in seconds.
    """

    TYPE: ClassVar[str] = "status"
    CHANNEL: ClassVar[str] = "status"

    exchange: str
    symbol: str
    ts: float
    recv_ts: float
    health: str
    uptime: float
    components: tuple[ComponentHealth, ...] = ()


@attrs.frozen(kw_only=True)
class HealthChange:
    """A component's health changed, on the ``system`` channel (``exchange``
    ``"tickwire"``, ``symbol`` ``"*"``): ``component`` went from ``previous`` to
    ``health``; ``daemon`` is the daemon's health after the change."""

    TYPE: ClassVar[str] = "health_change"
    CHANNEL: ClassVar[str] = "system"

    exchange: str
    symbol: str
    ts: float
    recv_ts: float
    component: str
    criticality: str
    health: str
    previous: str
    daemon: str
    reason: str = ""


@attrs.define(eq=False)
class Receipt:
    """What the dispatcher did with one ``Published`` event, filled in when it has
    handled it: ``outcome`` ``accepted`` (numbered ``seq``), ``duplicate`` (its
    idempotency key was seen within the window: ``seq`` is the first one's) or
    ``stale`` (its ``version`` is not above the key's current ``version``).
    ``notify`` is called once, when the outcome is set (the publisher wakes)."""

    notify: Callable[[], None] | None = None
    outcome: str = ""
    seq: int = 0
    version: int | None = None

    def settle(self, outcome: str, seq: int, version: int | None = None) -> None:
        """Set the outcome and call ``notify``."""
        self.outcome, self.seq, self.version = outcome, seq, version
        if self.notify is not None:
            self.notify()


@attrs.frozen(kw_only=True)
class Published:
    """A desk's own message, published by another process into a declared channel
    (signals, executions, portfolio, trading state): stream
    ``channel:source:key``.

    ``data``: the publisher's JSON object, encoded (carried unchanged to clients);
    ``type``: the channel's message type (``signal``, ``execution``,
    ``portfolio``, ``trading_state`` or ``message``); ``ts``: the publisher's time
    (epoch s) or None; ``recv_ts``: when tickwire received it; ``idempotency_key``
    and ``version``: see docs/protocol.md "Publishing"; ``receipt``: where the
    dispatcher says what it did (not part of the message).
    """

    TYPE: ClassVar[str] = "message"
    CHANNEL: ClassVar[str] = ""  # each message names its own (``channel``)

    channel: str
    source: str
    key: str
    type: str
    data: bytes
    ts: float | None
    recv_ts: float
    idempotency_key: str | None = None
    version: int | None = None
    receipt: Receipt | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def exchange(self) -> str:
        """The stream's second part: the publishing ``source``."""
        return self.source

    @property
    def symbol(self) -> str:
        """The stream's third part: the ``key``."""
        return self.key


@attrs.frozen(kw_only=True)
class Whale:
    """A large trade (``daemon.derived.whales``), on the ``whales`` channel: a trade
    whose notional (``price`` x ``size``, in the quote currency) converted to USD is
    at or above ``threshold`` (USD).

    The trade's own fields as the exchange gave them (``id``, ``price``, ``size``,
    ``side``, ``ts``); ``notional``: in the quote currency; ``notional_usd``: in
    USD (decimal strings); ``threshold``: the threshold it met, USD; ``recv_ts``:
    when tickwire received the trade.
    """

    TYPE: ClassVar[str] = "whale"
    CHANNEL: ClassVar[str] = "whales"

    exchange: str
    symbol: str
    ts: float
    recv_ts: float
    id: str
    price: str
    size: str
    side: str
    notional: str
    notional_usd: str
    threshold: str


@attrs.frozen(kw_only=True)
class Bar:
    """A trade bar (OHLCV, ``daemon.derived.bars``) on the ``bars`` channel, stream
    ``bars:EXCHANGE:SYMBOL:INTERVAL``.

    ``interval``: as configured (``1s``, ``1m``, ``5m``); ``open_time`` and
    ``close_time``: the bucket ``[open_time, close_time)`` in exchange time, epoch
    seconds aligned to multiples of the interval in UTC; ``ts``: ``close_time``;
    ``recv_ts``: when the bar was made; ``open``, ``high``, ``low``, ``close``: the
    trades' prices as sent; ``volume``, ``buy_volume``, ``sell_volume`` (by the
    taker's side), ``vwap`` (``None`` for a bar without trades, whose prices are the
    previous close): decimal strings; ``count``: trades; ``revision``: 0 when first
    published, N for the Nth correction by late trades; ``partial``: the bar in
    progress (not numbered: it carries the ``seq`` of the last closed bar).
    """

    TYPE: ClassVar[str] = "bar"
    CHANNEL: ClassVar[str] = "bars"

    exchange: str
    symbol: str
    interval: str
    ts: float
    recv_ts: float
    open_time: float
    close_time: float
    open: str
    high: str
    low: str
    close: str
    volume: str
    buy_volume: str
    sell_volume: str
    count: int
    vwap: str | None
    revision: int = 0
    partial: bool = False

    @property
    def stream_symbol(self) -> str:
        """The stream's third part: ``SYMBOL:INTERVAL``."""
        return f"{self.symbol}:{self.interval}"


@attrs.frozen(kw_only=True)
class BookView:
    """The top ``depth`` levels of a book (``daemon.derived.views``), sent as a
    ``book_snapshot`` with ``depth`` to the clients that subscribed to ``book`` with
    ``"depth": N``: stream ``views:EXCHANGE:SYMBOL:DEPTH:INTERVAL_MS``, one per book,
    depth and interval, shared by every client that asks the same.

    ``bids``/``asks`` as in ``BookSnapshot`` (at most ``depth`` each); ``ts`` and
    ``recv_ts``: those of the book's last update; ``interval_ms``: at most one
    view per interval (the subscription's ``throttle_ms``).
    """

    TYPE: ClassVar[str] = "book_snapshot"
    CHANNEL: ClassVar[str] = "views"

    exchange: str
    symbol: str
    ts: float
    recv_ts: float
    bids: Levels
    asks: Levels
    depth: int
    interval_ms: int

    @property
    def stream_symbol(self) -> str:
        """The stream's third part: ``SYMBOL:DEPTH:INTERVAL_MS``."""
        return f"{self.symbol}:{self.depth}:{self.interval_ms}"


@attrs.frozen(kw_only=True)
class Quote:
    """Best bid and offer from the book (the depth-1 view, ``daemon.derived.views``),
    on the ``quote`` channel, stream ``quote:EXCHANGE:SYMBOL:INTERVAL_MS``: sent
    when the best bid or offer changed, at most once per ``interval_ms``. A side
    without a level has empty strings."""

    TYPE: ClassVar[str] = "quote"
    CHANNEL: ClassVar[str] = "quote"

    exchange: str
    symbol: str
    ts: float
    recv_ts: float
    bid: str
    bid_size: str
    ask: str
    ask_size: str
    interval_ms: int

    @property
    def stream_symbol(self) -> str:
        """The stream's third part: ``SYMBOL:INTERVAL_MS``."""
        return f"{self.symbol}:{self.interval_ms}"


#: Events computed in the daemon from other streams (``daemon.derived``) whose
#: stream has more parts than ``exchange:symbol`` (``stream_symbol``).
Keyed = Bar | BookView | Quote
KEYED_TYPES: tuple[type[Keyed], ...] = (Bar, BookView, Quote)

#: Events the collectors and the reporter produce (market data and health).
MarketEvent = (Trade | BookSnapshot | BookUpdate | Ticker | FeedState | Gap | Status | HealthChange
               | Whale | Bar | BookView | Quote)
#: Everything a source may send the dispatcher.
Event = MarketEvent | Published
EVENT_TYPES: tuple[type[MarketEvent], ...] = (
    Trade, BookSnapshot, BookUpdate, Ticker, FeedState, Gap, Status, HealthChange,
    Whale, Bar, BookView, Quote,
)
#: Every channel name an event can be published on.
CHANNELS: tuple[str, ...] = tuple(dict.fromkeys(cls.CHANNEL for cls in EVENT_TYPES))


def stream_key(event: Event) -> str:
    """The stream an event belongs to: ``"CHANNEL:exchange:symbol"`` (a published
    message's: ``"channel:source:key"``)."""
    if isinstance(event, Published):
        return f"{event.channel}:{event.source}:{event.key}"
    if isinstance(event, Keyed):
        return f"{event.CHANNEL}:{event.exchange}:{event.stream_symbol}"
    return f"{event.CHANNEL}:{event.exchange}:{event.symbol}"
