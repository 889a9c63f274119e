"""An L2 order book: price levels kept sorted, sans-IO.

Prices are compared as ``Decimal`` but every level keeps the strings the exchange
sent, so a snapshot puts on the wire exactly what came in. Exchange-specific
integrity rules (Binance update ids, Kraken checksums, Coinbase crossed books) live
in the exchange modules; this class only stores levels.

How a side is kept (the exchange protocols apply every frame through it: it is on
the hot path of ingest):

1. ``size`` maps each price string as sent to its size string: a size change of
   an existing level, the most common update, is one ``dict`` lookup, and a price
   string seen before is not parsed again (it was checked when its level was
   made; a removal parses it again to find its place).
2. The prices are also kept in ascending order, in chunks of at most ``2 * CHUNK``
   (``prices``, with their ``Decimal`` values in parallel chunks ``keys`` and each
   chunk's largest key in ``maxes``): adding or removing a level is two
   bisections of ``Decimal`` keys and a move of at most one chunk, and the best
   levels are the ends. A ``Decimal`` is never hashed (hashing one with decimals
   costs more than parsing it), and a level holds no container of its own (only
   strings and ``Decimal`` values, which the garbage collector does not track).
3. A price sent in another spelling of a known price (``"1.50"`` for ``"1.5"``)
   is found by its key and takes the new spelling, as a ``dict`` keyed by
   ``Decimal`` would do.
4. A snapshot (``load``) builds each side in one pass, in the order sent when it
   is ascending or descending (the exchanges send it so: one comparison per
   level says so), else sorted once.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal, InvalidOperation
from itertools import chain
from operator import eq, gt, lt
from typing import Any

from daemon.events import Level, Levels

#: Levels per chunk of a side when it is built or split (a chunk splits above twice this).
CHUNK = 512


_finite = Decimal.is_finite


class BookError(ValueError):
    """A level whose price or size is not a decimal number."""


def _decimal(text: Any) -> Decimal:
    try:
        value = Decimal(text)
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise BookError(f"not a decimal: {text!r}") from exc
    if not value.is_finite():
        raise BookError(f"not a finite decimal: {text!r}")
    return value


class Side:
    """The levels of one side of a book, by price string and in ascending price
    order (module doc). Read the attributes; change them only through the methods.
    For bids the best level is the last one."""

    __slots__ = ("size", "prices", "keys", "maxes", "respelled")

    def __init__(self) -> None:
        self.size: dict[Any, Any] = {}  # price string -> size string
        self.prices: list[list[Any]] = []  # chunks of price strings, ascending
        self.keys: list[list[Decimal]] = []  # the same chunks' Decimals
        self.maxes: list[Decimal] = []  # the largest key of each chunk
        #: levels that took another spelling of their price (module doc, rule 3)
        self.respelled = 0

    def __len__(self) -> int:
        return len(self.size)

    def clear(self) -> None:
        """Remove every level."""
        self.size.clear()
        self.prices.clear()
        self.keys.clear()
        self.maxes.clear()

    def reset(self, prices: list[Any], keys: list[Decimal], sizes: list[Any]) -> None:
        """Hold exactly these levels: distinct keys in ascending order, with their
        price and size strings (the lists become the side's: do not change them)."""
        self.size = dict(zip(prices, sizes, strict=True))
        if len(keys) <= CHUNK:  # one chunk: the lists themselves (the caller's)
            self.prices, self.keys = ([prices], [keys]) if keys else ([], [])
        else:
            self.prices = [prices[i:i + CHUNK] for i in range(0, len(prices), CHUNK)]
            self.keys = [keys[i:i + CHUNK] for i in range(0, len(keys), CHUNK)]
        self.maxes = [chunk[-1] for chunk in self.keys]

    def set(self, price: Any, size: Any) -> None:
        """Apply one level: ``size`` zero removes it. Raises ``BookError`` on a price
        or size that is not a finite decimal (and changes nothing then)."""
        try:
            amount = Decimal(size)
        except (InvalidOperation, TypeError, ValueError) as exc:
            _decimal(price)  # a bad price is the fault named first
            raise BookError(f"not a decimal: {size!r}") from exc
        if amount and not amount.is_finite():
            _decimal(price)
            raise BookError(f"not a finite decimal: {size!r}")
        self.put(price, size, bool(amount))

    def put(self, price: Any, size: Any, nonzero: bool) -> None:
        """``set`` for a caller that checked ``size`` itself: ``nonzero`` says whether
        it is not zero. Raises ``BookError`` on a new price that is not a finite
        decimal (and changes nothing then)."""
        sizes = self.size
        try:
            known = price in sizes
        except TypeError as exc:  # unhashable
            raise BookError(f"not a decimal: {price!r}") from exc
        if known:
            if nonzero:
                sizes[price] = size
            else:
                self.remove(price)
            return
        key = _decimal(price)
        if nonzero:
            self.insert(price, size, key)
            return
        maxes = self.maxes  # size zero: a known price spelled differently goes
        i = bisect_left(maxes, key)
        if i < len(maxes):
            keys = self.keys[i]
            j = bisect_left(keys, key)
            if keys[j] == key:
                self.respelled += 1
                del sizes[self.prices[i][j]]
                self._delete(i, j)

    def insert(self, price: Any, size: Any, key: Decimal) -> None:
        """Add a level: ``price``, a price string that is not a key of ``size``,
        whose value is ``key`` (finite: the caller made it), with a ``size`` that
        is not zero. A known price in another spelling takes the new one (module
        doc, rule 3)."""
        maxes = self.maxes
        i = bisect_left(maxes, key)
        if i < len(maxes):
            keys = self.keys[i]
            j = bisect_left(keys, key)
            if keys[j] == key:  # a known price, spelled differently
                self.respelled += 1
                prices = self.prices[i]
                del self.size[prices[j]]
                prices[j] = price
                self.size[price] = size
                return
        elif not maxes:
            self.size[price] = size
            self.prices.append([price])
            self.keys.append([key])
            maxes.append(key)
            return
        else:  # above every level: the end of the last chunk
            i -= 1
            keys = self.keys[i]
            j = len(keys)
        self.size[price] = size
        prices = self.prices[i]
        keys.insert(j, key)
        prices.insert(j, price)
        if j == len(keys) - 1:
            maxes[i] = key
        if len(keys) > 2 * CHUNK:
            self.prices.insert(i + 1, prices[CHUNK:])
            self.keys.insert(i + 1, keys[CHUNK:])
            del prices[CHUNK:], keys[CHUNK:]
            maxes[i] = keys[-1]
            maxes.insert(i + 1, self.keys[i + 1][-1])

    def remove(self, price: Any) -> None:
        """Remove the level of ``price``, a key of ``size``."""
        del self.size[price]
        key = Decimal(price)  # checked when the level was made
        maxes = self.maxes
        i = bisect_left(maxes, key)
        keys = self.keys[i]
        j = bisect_left(keys, key)
        del keys[j], self.prices[i][j]  # ``_delete``, inline: on the hot path
        if not keys:
            del self.keys[i], self.prices[i], maxes[i]
        elif j == len(keys):
            maxes[i] = keys[-1]

    def _delete(self, i: int, j: int) -> None:
        keys = self.keys[i]
        del keys[j], self.prices[i][j]
        if not keys:
            del self.keys[i], self.prices[i], self.maxes[i]
        elif j == len(keys):
            self.maxes[i] = keys[-1]

    def lowest(self) -> Any:
        """The lowest price string, or ``None``."""
        return self.prices[0][0] if self.prices else None

    def highest(self) -> Any:
        """The highest price string, or ``None``."""
        return self.prices[-1][-1] if self.prices else None

    def first(self, n: int) -> list[Any]:
        """The ``n`` lowest price strings, ascending (fewer if there are fewer)."""
        chunks = self.prices
        if chunks and len(chunks[0]) >= n:
            return chunks[0][:n]
        out: list[Any] = []
        for chunk in chunks:
            out += chunk[:n - len(out)]
            if len(out) >= n:
                break
        return out

    def last(self, n: int) -> list[Any]:
        """The ``n`` highest price strings, descending (fewer if there are fewer)."""
        chunks = self.prices
        if chunks and len(chunks[-1]) >= n:
            return chunks[-1][:-n - 1:-1]
        out: list[Any] = []
        for chunk in reversed(chunks):
            out += chunk[:-(n - len(out)) - 1:-1]
            if len(out) >= n:
                break
        return out

    def pop_first(self, n: int) -> list[Level]:
        """Remove the ``n`` lowest levels; returns them, ascending."""
        out: list[Any] = []
        while n > 0 and self.prices:
            prices, keys = self.prices[0], self.keys[0]
            taken = prices[:n]
            del prices[:n], keys[:n]
            if not keys:
                del self.prices[0], self.keys[0], self.maxes[0]
            out += taken
            n -= len(taken)
        return self._forget(out)

    def pop_last(self, n: int) -> list[Level]:
        """Remove the ``n`` highest levels; returns them, descending."""
        out: list[Any] = []
        while n > 0 and self.prices:
            prices, keys = self.prices[-1], self.keys[-1]
            keep = max(len(prices) - n, 0)
            out += prices[:keep - 1 if keep else None:-1]
            n -= len(prices) - keep
            del prices[keep:], keys[keep:]
            if keys:
                self.maxes[-1] = keys[-1]
            else:
                del self.prices[-1], self.keys[-1], self.maxes[-1]
        return self._forget(out)

    def _forget(self, prices: list[Any]) -> list[Level]:
        size = self.size.pop
        return [(price, size(price)) for price in prices]

    def ascending(self) -> Iterator[Any]:
        """Every price string, lowest first."""
        return chain.from_iterable(self.prices)

    def descending(self) -> Iterator[Any]:
        """Every price string, highest first."""
        return chain.from_iterable(map(reversed, reversed(self.prices)))

    def mapping(self) -> dict[Decimal, Level]:
        """``{Decimal price: (price, size)}`` of every level (a new ``dict``)."""
        size = self.size
        return {Decimal(price): (price, size[price]) for price in self.ascending()}


#: ``bytes.translate`` table for ``_plain_nonzero``: digit 0 -> ``0``, digits 1-9 ->
#: ``1``, ``.`` and ``,`` as they are, any other byte -> ``x``.
_SIZE_BYTES = bytes(
    c if c in b".,0" else ord("1") if c in b"123456789" else ord("x") for c in range(256)
)


def _plain_nonzero(sizes: list[Any]) -> bool:
    """Whether every size is a string of ASCII digits, not all zero, with at most one
    dot: a finite decimal that is not zero, told without making a ``Decimal`` (a
    snapshot has thousands). Checked in bulk, on the sizes joined by commas: with
    the zeros and dots deleted, no size may be left empty; with the digits
    deleted, no two dots may be left side by side."""
    try:
        data = ",".join(sizes).encode("ascii").translate(_SIZE_BYTES)
    except (TypeError, UnicodeEncodeError):  # not all strings; not ASCII
        return False
    if b"x" in data or data.count(b",") != len(sizes) - 1:  # a size with a comma
        return False
    nonzero = data.translate(None, b"0.")
    return bool(nonzero) and b",," not in nonzero and nonzero[0] != 44 \
        and nonzero[-1] != 44 and b".." not in data.translate(None, b"01")


def _snapshot_side(
    levels: Iterable[Sequence[Any]],
) -> tuple[list[Any], list[Decimal], list[Any]]:
    """The prices, keys and sizes of a snapshot side in ascending price order: what
    applying the levels one by one to an empty side leaves. Raises ``BookError``
    (naming the first bad price or size, the price of a level first).

    Built in bulk (``map`` over the whole side; the sizes, when they are plain
    decimal strings, checked by ``_plain_nonzero``) rather than level by level;
    on any fault the levels are read one at a time to name the first one."""
    if not isinstance(levels, list | tuple):
        levels = list(levels)
    try:
        prices = [price for price, _ in levels]
        sizes = [size for _, size in levels]
        keys = [*map(Decimal, prices)]
        if not all(map(_finite, keys)):
            raise BookError("a price that is not finite")
        regular = _plain_nonzero(sizes)  # no zero size: nothing removed
        if not regular:
            amounts = [*map(Decimal, sizes)]
            if not all(map(_finite, amounts)):
                raise BookError("a size that is not finite")
            regular = all(amounts)
            if not regular:  # a removal: its size is kept as None
                sizes = [size if amount else None for size, amount in zip(sizes, amounts, strict=True)]
    except (InvalidOperation, TypeError, ValueError):  # BookError too
        for price, size in levels:  # the first fault, named as one level at a time does
            _decimal(price)
            _decimal(size)
        raise
    if regular:
        if all(map(lt, keys, keys[1:])):
            return prices, keys, sizes
        if all(map(gt, keys, keys[1:])):
            prices.reverse()
            keys.reverse()
            sizes.reverse()
            return prices, keys, sizes
    order = sorted(range(len(keys)), key=keys.__getitem__)
    ordered = [keys[n] for n in order]
    if regular and not any(map(eq, ordered, ordered[1:])):
        return [prices[n] for n in order], ordered, [sizes[n] for n in order]
    # a zero size, or one price twice: apply them in the order sent
    last: dict[Decimal, int] = {}
    for n, key in enumerate(keys):
        if sizes[n] is None:
            last.pop(key, None)
        else:
            last[key] = n
    order = sorted(last.values(), key=keys.__getitem__)
    return [prices[n] for n in order], [keys[n] for n in order], [sizes[n] for n in order]


class L2Book:
    """Bids and asks of one symbol.

    ``depth``: when set, only the best ``depth`` levels of each side are kept after
    every change (Kraken's rule); ``None`` keeps everything. ``bid_side`` and
    ``ask_side`` hold the levels (``Side``: by price string and in order, the best
    bid last, the best ask first); ``bids`` and ``asks`` are ``{Decimal price:
    (price, size)}`` copies, for code that compares books.
    """

    __slots__ = ("bid_side", "ask_side", "depth")

    def __init__(self, depth: int | None = None) -> None:
        self.bid_side = Side()
        self.ask_side = Side()
        self.depth = depth

    @property
    def bids(self) -> dict[Decimal, Level]:
        """Every bid as ``{Decimal price: (price, size)}`` (a new ``dict``)."""
        return self.bid_side.mapping()

    @property
    def asks(self) -> dict[Decimal, Level]:
        """Every ask as ``{Decimal price: (price, size)}`` (a new ``dict``)."""
        return self.ask_side.mapping()

    def clear(self) -> None:
        """Remove every level."""
        self.bid_side.clear()
        self.ask_side.clear()

    def load(
        self, bids: Iterable[Sequence[Any]], asks: Iterable[Sequence[Any]]
    ) -> tuple[Levels, Levels]:
        """Replace the whole book with a snapshot's levels, ``(price, size)`` pairs
        (tuples or lists; zero sizes are skipped). Returns ``levels()`` of the book
        loaded (made from the sorted snapshot, cheaper than asking for it).

        Raises ``BookError`` on a price or size that is not a decimal; the book is
        then empty.
        """
        self.clear()
        bid_prices, bid_keys, bid_sizes = _snapshot_side(bids)
        ask_prices, ask_keys, ask_sizes = _snapshot_side(asks)
        depth = self.depth
        if depth is not None:  # the best: the highest bids, the lowest asks
            cut = max(len(bid_keys) - depth, 0)
            del bid_prices[:cut], bid_keys[:cut], bid_sizes[:cut]
            del ask_prices[depth:], ask_keys[depth:], ask_sizes[depth:]
        levels = (tuple(zip(reversed(bid_prices), reversed(bid_sizes), strict=True)),
                  tuple(zip(ask_prices, ask_sizes, strict=True)))
        self.bid_side.reset(bid_prices, bid_keys, bid_sizes)
        self.ask_side.reset(ask_prices, ask_keys, ask_sizes)
        return levels

    def apply(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        """Apply a delta: each ``(price, size)`` sets that level; size zero removes it.

        Raises ``BookError`` on a price or size that is not a decimal; the levels
        before the bad one are already applied, so the caller must resync.
        """
        put = self.bid_side.set
        for price, size in bids:
            put(price, size)
        put = self.ask_side.set
        for price, size in asks:
            put(price, size)
        if self.depth is not None:
            self.truncate(self.depth)

    def truncate(self, depth: int) -> tuple[list[Level], list[Level]]:
        """Keep only the best ``depth`` levels of each side; returns the levels cut
        (bids, asks), each best first."""
        bids: list[Level] = []
        asks: list[Level] = []
        extra = len(self.bid_side.size) - depth
        if extra > 0:  # the lowest bids, ascending: reversed, best first
            bids = self.bid_side.pop_first(extra)
            bids.reverse()
        extra = len(self.ask_side.size) - depth
        if extra > 0:  # the highest asks, descending: reversed, best first
            asks = self.ask_side.pop_last(extra)
            asks.reverse()
        return bids, asks

    def best_bid(self) -> Level | None:
        """The highest bid ``(price, size)``, or ``None`` on an empty side."""
        price = self.bid_side.highest()
        return None if price is None else (price, self.bid_side.size[price])

    def best_ask(self) -> Level | None:
        """The lowest ask ``(price, size)``, or ``None`` on an empty side."""
        price = self.ask_side.lowest()
        return None if price is None else (price, self.ask_side.size[price])

    def is_crossed(self) -> bool:
        """True when the best bid is at or above the best ask: the book is corrupt."""
        bids, asks = self.bid_side.maxes, self.ask_side.keys
        return bool(bids and asks and bids[-1] >= asks[0][0])

    def top(self, n: int) -> tuple[Levels, Levels]:
        """The best ``n`` bids and asks, best first."""
        bids, asks = self.bid_side.last(n), self.ask_side.first(n)
        return (
            tuple(zip(bids, map(self.bid_side.size.__getitem__, bids), strict=True)),
            tuple(zip(asks, map(self.ask_side.size.__getitem__, asks), strict=True)),
        )

    def levels(self) -> tuple[Levels, Levels]:
        """All bids (descending) and asks (ascending) as ``((price, size), ...)``."""
        bids, asks = self.bid_side, self.ask_side
        return (
            tuple(zip(bids.descending(), map(bids.size.__getitem__, bids.descending()), strict=True)),
            tuple(zip(asks.ascending(), map(asks.size.__getitem__, asks.ascending()), strict=True)),
        )

    def __len__(self) -> int:
        return len(self.bid_side) + len(self.ask_side)
