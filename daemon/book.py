"""An L2 order book: price levels kept sorted, sans-IO.

Prices are compared as ``Decimal`` but every level keeps the strings the exchange
sent, so a snapshot puts on the wire exactly what came in. Exchange-specific
integrity rules (Binance update ids, Kraken checksums, Coinbase crossed books) live
in the exchange modules; this class only stores levels.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from operator import neg

from sortedcontainers import SortedDict

from daemon.events import Level, Levels


class BookError(ValueError):
    """A level whose price or size is not a decimal number."""


def _decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except (InvalidOperation, TypeError) as exc:
        raise BookError(f"not a decimal: {text!r}") from exc
    if not value.is_finite():
        raise BookError(f"not a finite decimal: {text!r}")
    return value


class L2Book:
    """Bids and asks of one symbol.

    ``depth``: when set, only the best ``depth`` levels of each side are kept after
    every change (Kraken's rule); ``None`` keeps everything.
    """

    __slots__ = ("bids", "asks", "depth")

    def __init__(self, depth: int | None = None) -> None:
        # key: Decimal price (negated order for bids), value: (price, size) strings
        self.bids: SortedDict = SortedDict(neg)
        self.asks: SortedDict = SortedDict()
        self.depth = depth

    def clear(self) -> None:
        """Remove every level."""
        self.bids.clear()
        self.asks.clear()

    def load(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        """Replace the whole book with a snapshot's levels (zero sizes are skipped).

        Raises ``BookError`` on a price or size that is not a decimal.
        """
        self.clear()
        self.apply(bids, asks)

    def apply(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        """Apply a delta: each ``(price, size)`` sets that level; size zero removes it.

        Raises ``BookError`` on a price or size that is not a decimal; the levels
        before the bad one are already applied, so the caller must resync.
        """
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for price, size in levels:
                key = _decimal(price)
                if _decimal(size).is_zero():
                    side.pop(key, None)
                else:
                    side[key] = (price, size)
        if self.depth is not None:
            self.truncate(self.depth)

    def truncate(self, depth: int) -> None:
        """Keep only the best ``depth`` levels of each side."""
        for side in (self.bids, self.asks):
            while len(side) > depth:
                side.popitem(-1)

    def best_bid(self) -> Level | None:
        """The highest bid ``(price, size)``, or ``None`` on an empty side."""
        return self.bids.peekitem(0)[1] if self.bids else None

    def best_ask(self) -> Level | None:
        """The lowest ask ``(price, size)``, or ``None`` on an empty side."""
        return self.asks.peekitem(0)[1] if self.asks else None

    def is_crossed(self) -> bool:
        """True when the best bid is at or above the best ask: the book is corrupt."""
        if not self.bids or not self.asks:
            return False
        best_bid: Decimal = self.bids.peekitem(0)[0]
        best_ask: Decimal = self.asks.peekitem(0)[0]
        return best_bid >= best_ask

    def top(self, n: int) -> tuple[Levels, Levels]:
        """The best ``n`` bids and asks, best first."""
        return (
            tuple(self.bids.values()[:n]),
            tuple(self.asks.values()[:n]),
        )

    def levels(self) -> tuple[Levels, Levels]:
        """All bids (descending) and asks (ascending) as ``((price, size), ...)``."""
        return tuple(self.bids.values()), tuple(self.asks.values())

    def __len__(self) -> int:
        return len(self.bids) + len(self.asks)
