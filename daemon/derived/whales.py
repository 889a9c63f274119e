"""Large trades ("whales"), sans-IO: trades and tickers in, ``Whale`` events out.

A trade's notional is ``price x size`` in its quote currency (``BASE-QUOTE``),
exact in ``Decimal`` from the decimal strings. It is converted to USD with the
latest ticker (mid of bid and offer) of ``QUOTE-USD`` from any exchange, else of
``QUOTE-USDT`` or ``QUOTE-USDC``; USD, USDT and USDC themselves count 1:1. A
trade whose quote currency has no such ticker yet is not guessed at: it is
counted in ``unconvertible`` by quote currency (status shows it). A trade whose
USD notional is at or above its threshold is a ``Whale``. Thresholds (USD) come
from ``[derived.whales]``: per ``EXCHANGE:BASE-QUOTE``, else ``BASE-QUOTE``,
else ``EXCHANGE``, else ``threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from decimal import Context, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import attrs

from daemon.events import Event, Whale

if TYPE_CHECKING:
    from daemon.dispatch import Stream

#: Currencies counted as US dollars, 1:1, in the order their tickers are preferred.
STABLECOINS = ("USD", "USDT", "USDC")
_ONE = Decimal(1)
_EXACT = Context(prec=60)


def usd(amount: float) -> Decimal:
    """A configured USD amount as a ``Decimal``: ``100000.0`` -> ``100000``,
    ``2500.5`` -> ``2500.5`` (the shortest decimal of the float)."""
    return Decimal(int(amount)) if float(amount).is_integer() else Decimal(repr(float(amount)))


class UsdRates:
    """The latest USD price of each currency, from tickers of ``X-USD``, ``X-USDT``
    or ``X-USDC`` (any exchange; the latest ticker wins, ``X-USD`` preferred)."""

    def __init__(self) -> None:
        self._rates: dict[tuple[str, str], Decimal] = {}

    def ticker(self, symbol: str, bid: str, ask: str) -> bool:
        """Take one ticker; False when it says nothing about a USD rate (another
        quote, or a bid or ask that is not a positive decimal)."""
        base, _, quote = symbol.partition("-")
        if quote not in STABLECOINS:
            return False
        try:
            mid = _EXACT.divide(_EXACT.add(Decimal(bid), Decimal(ask)), Decimal(2))
        except (InvalidOperation, TypeError):
            return False
        if not mid.is_finite() or mid <= 0:
            return False
        self._rates[base, quote] = mid
        return True

    def rate(self, currency: str) -> Decimal | None:
        """USD per unit of ``currency``, or None when no ticker gives it."""
        if currency in STABLECOINS:
            return _ONE
        for quote in STABLECOINS:
            rate = self._rates.get((currency, quote))
            if rate is not None:
                return rate
        return None


@attrs.frozen
class WhaleStatistics:
    """``trades`` seen, ``whales`` found, ``unconvertible`` trades by quote
    currency, ``malformed`` trades (price or size not a decimal)."""

    trades: int
    whales: int
    unconvertible: dict[str, int]
    malformed: int


class Whales:
    """Finds the large trades (see the module docstring). ``threshold``: USD, the
    default; ``thresholds``: USD by ``EXCHANGE:BASE-QUOTE``, ``BASE-QUOTE`` or
    ``EXCHANGE``."""

    def __init__(self, threshold: Decimal, thresholds: Mapping[str, Decimal]) -> None:
        self.default = threshold
        self.thresholds = dict(thresholds)
        self.rates = UsdRates()
        self._threshold_of: dict[tuple[str, str], Decimal] = {}
        self.trades = 0
        self.whales = 0
        self.malformed = 0
        self.unconvertible: dict[str, int] = {}

    def threshold(self, exchange: str, symbol: str) -> Decimal:
        """The USD threshold of ``symbol`` on ``exchange``."""
        key = (exchange, symbol)
        found = self._threshold_of.get(key)
        if found is None:
            t = self.thresholds
            found = t.get(f"{exchange}:{symbol}", t.get(symbol, t.get(exchange, self.default)))
            self._threshold_of[key] = found
        return found

    def ticker(self, symbol: str, bid: str, ask: str) -> None:
        """Take a ticker (``UsdRates.ticker``)."""
        self.rates.ticker(symbol, bid, ask)

    def trade(self, trade: Mapping[str, Any]) -> Whale | None:
        """The ``Whale`` of one trade (a wire ``trade`` object: ``exchange``,
        ``symbol``, ``id``, ``price``, ``size``, ``side``, ``ts``, ``recv_ts``),
        or None. A trade whose price or size is not a decimal string is counted
        in ``malformed``; one whose quote has no USD rate in ``unconvertible``."""
        self.trades += 1
        price, size = trade["price"], trade["size"]
        try:
            notional = _EXACT.multiply(Decimal(price), Decimal(size))
        except (InvalidOperation, TypeError):
            self.malformed += 1
            return None
        if not notional.is_finite():
            self.malformed += 1
            return None
        exchange, symbol = trade["exchange"], trade["symbol"]
        quote = symbol.rpartition("-")[2]
        rate = self.rates.rate(quote)
        if rate is None:
            self.unconvertible[quote] = self.unconvertible.get(quote, 0) + 1
            return None
        usd = notional if rate is _ONE else _EXACT.multiply(notional, rate)
        threshold = self.threshold(exchange, symbol)
        if usd < threshold:
            return None
        self.whales += 1
        return Whale(
            exchange=exchange, symbol=symbol, ts=trade["ts"], recv_ts=trade["recv_ts"],
            id=trade["id"], price=price, size=size, side=trade["side"],
            notional=str(notional), notional_usd=str(usd), threshold=str(threshold),
        )

    def statistics(self) -> WhaleStatistics:
        """The counters so far."""
        return WhaleStatistics(self.trades, self.whales, dict(self.unconvertible),
                               self.malformed)


class WhalesComputation:
    """The ``whales`` derived stream (a ``runner.Computation``): the trade streams
    matching ``symbols``, and every ticker (for the USD rates)."""

    name = "whales"

    def __init__(self, threshold: Decimal, thresholds: Mapping[str, Decimal],
                 symbols: Sequence[str]) -> None:
        self.inputs: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
            (("ticker",), ("*",)), (("trades",), tuple(symbols)))
        self.whales = Whales(threshold, thresholds)

    def take(self, stream: Stream, payload: dict[str, Any], now: float) -> list[Event]:
        """A ticker updates the rates; a trade may be a whale."""
        if stream.channel == "ticker":
            self.whales.ticker(stream.symbol, payload.get("bid", ""), payload.get("ask", ""))
            return []
        try:
            whale = self.whales.trade(payload)
        except (KeyError, TypeError):
            self.whales.malformed += 1
            return []
        return [whale] if whale is not None else []

    def due(self) -> float:
        """Never: whales come from trades only."""
        return math.inf

    def tick(self, now: float) -> list[Event]:
        """Nothing."""
        return []

    def figures(self) -> dict[str, Any]:
        """``WhaleStatistics`` as a dict."""
        return attrs.asdict(self.whales.statistics())
