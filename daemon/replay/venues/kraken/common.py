"""What the Kraken venue's v1, v2 and REST parts share: names, limits, the book,
recorded trades and JSON helpers.

The book is the production one (``daemon.book.L2Book``: levels by price, each side
cut to the subscribed depth after every message, Kraken's rule) and so is the
checksum (``daemon.exchanges.kraken.checksum``). The emulator can share them with
the code it tests because neither is what the tests check that code against:
Kraken's own checksums, recorded in every update of the captures, check
``checksum`` and every book the venue builds from them (pass 0 plays them as
recorded; a collector verifies each), and the protocol and replay tests compare
the books with plain-dict computations of their own (``tests/test_kraken_protocol.py``,
``tests/test_replay_kraken.py``). What stays the venue's is the level *time* Kraken
keeps beside each price (a v1 level is ``[price, volume, time]``), which the
production book has no use for.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import attrs
import orjson

from daemon.book import L2Book
from daemon.exchanges.kraken import CHECKSUM_LEVELS, checksum

__all__ = ["CHECKSUM_LEVELS", "checksum"]

ASSET_PAIRS = "/0/public/AssetPairs"
#: Not recorded: derived from the pairs (ccxt's ``load_markets`` asks for it).
ASSETS = "/0/public/Assets"
TRADES = "/0/public/Trades"
DEPTH = "/0/public/Depth"
#: Book depth Kraken v1 uses when a subscription names none.
DEFAULT_DEPTH = 10
#: Most trades (and book levels) one REST answer holds, as on Kraken.
MAX_TRADES = 1000
MAX_DEPTH = 500
#: Kraken subscription name -> tickwire channel.
CHANNELS = {"book": "book", "trade": "trades", "ticker": "ticker"}

SORTED = orjson.OPT_SORT_KEYS  # Kraken's event frames list their keys in order
SYSTEM_STATUS: dict[str, Any] = {
    "connectionID": 1, "event": "systemStatus", "status": "online", "version": "1.8.3"
}

#: A v1 book level as the venue holds it: ``[price, volume, time]`` strings.
KrakenLevel = list[str]


@attrs.frozen
class PairNames:
    """The names of one Kraken pair: REST key, ``altname`` and ``wsname``."""

    rest: str
    altname: str
    wsname: str


class Book:
    """One pair's book as Kraken holds it: ``L2Book`` (price and volume strings by
    price, each side cut to ``depth`` after every message) and the time of each
    level's last change (the third field of a v1 level, an epoch-seconds string)."""

    __slots__ = ("book", "times", "depth")

    def __init__(self, depth: int) -> None:
        self.book = L2Book(depth)
        self.times: dict[str, str] = {}  # price string -> time of its last change
        self.depth = depth

    @property
    def asks(self) -> dict[Decimal, tuple[str, str]]:
        """Asks by ``Decimal`` price: ``(price, volume)`` strings (a copy)."""
        return self.book.asks

    @property
    def bids(self) -> dict[Decimal, tuple[str, str]]:
        """Bids by ``Decimal`` price: ``(price, volume)`` strings (a copy)."""
        return self.book.bids

    def apply(self, asks: Sequence[Sequence[Any]], bids: Sequence[Sequence[Any]]) -> None:
        """Apply v1 levels ``[price, volume, time(, "r")]`` in order (volume zero
        removes), then cut both sides to ``depth``.

        Raises ``ValueError`` (``daemon.book.BookError``), ``IndexError`` or
        ``TypeError`` on a level that is not that with decimal strings."""
        times = self.times
        sides: list[list[tuple[str, str]]] = [[], []]
        for side, levels in zip(sides, (asks, bids), strict=True):
            for level in levels:
                price, volume, time = level[0], level[1], level[2]
                side.append((price, volume))
                times[price] = time
        self.book.apply(sides[1], sides[0])
        if len(times) > 4 * self.depth + 64:  # forget the times of levels long gone
            kept = {*self.book.ask_side.size, *self.book.bid_side.size}  # price strings
            self.times = {price: time for price, time in times.items() if price in kept}

    def levels(self, count: int | None = None) -> tuple[list[KrakenLevel], list[KrakenLevel]]:
        """The best ``count`` (default: all) asks, ascending, and bids, descending,
        as ``[price, volume, time]``."""
        bids, asks = self.book.levels() if count is None else self.book.top(count)
        times = self.times
        return ([[p, v, times[p]] for p, v in asks], [[p, v, times[p]] for p, v in bids])


@attrs.frozen
class RecordedTrade:
    """One trade the tape played: v1's fields, and ``id``, its play order within
    the pair from 1 (what REST and v2 give as its id)."""

    price: str
    volume: str
    time: str
    side: str
    ordertype: str
    misc: str
    id: int

    @property
    def time_ns(self) -> int:
        """The trade's time in epoch nanoseconds."""
        return int(Decimal(self.time) * 1_000_000_000)


def dumps(obj: Any) -> str:
    """JSON text with sorted keys, as Kraken's event frames are."""
    return orjson.dumps(obj, option=SORTED).decode()


def loads(text: str | bytes) -> Any:
    """Parsed JSON, or ``None`` for text that is not JSON."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def is_data(message: Any) -> bool:
    """Whether ``message`` is a v1 data array ``[channelID, payload..., name, pair]``."""
    return (
        isinstance(message, list) and len(message) >= 4
        and isinstance(message[-2], str) and isinstance(message[-1], str)
    )
