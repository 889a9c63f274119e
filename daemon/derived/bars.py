"""Trade bars (OHLCV), sans-IO: trades in, ``Bar`` events out.

Theory of operation
-------------------
1. A trade goes to the bucket ``[open_time, open_time + interval)`` of its
   **exchange** time ``ts``, ``open_time`` a multiple of the interval since the
   Unix epoch (so ``1m`` bars start on UTC minutes). Prices and sizes are read as
   ``Decimal`` from the decimal strings: no float drift. ``open`` is the price of
   the earliest trade by ``ts`` (the first received among equal times),
   ``close`` of the latest; ``high``/``low`` keep the price string as sent;
   ``vwap`` is ``sum(price x size) / volume`` to 28 significant digits (Python's
   decimal default), the sums exact.
2. A bar closes on the clock: once the exchange time *now* is past its end plus
   ``grace`` (``close_due(now)``), whether or not another trade came. *Now* is
   the caller's (``ExchangeClock``: the daemon's clock mapped to the exchange's
   time by the trades seen). Bars close in order, one per interval from the
   first trade on: an interval without a trade is a bar with the previous close
   and zero volume (``empty="carry"``) or no bar (``"skip"``).
3. A trade whose bar was already published is **late**: the bar is made again
   with it and published with ``revision`` N (its Nth correction). The last
   ``KEPT`` closed bars are kept for that; a trade older than those is counted
   in ``too_late`` (and logged by the caller), never silently dropped. With
   ``carry``, the empty bars published after it carried its close: when the late
   trade changed that close, each of them (up to the next bar with trades, or the
   bar in progress) is published again at the new price with its own next
   ``revision`` (``take_repriced``), and the bars still to come carry it too. A
   carried bar whose price did not change is not published again.
4. ``partial()`` is the bar in progress, ``"partial": true``.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from decimal import Context, Decimal
from typing import TYPE_CHECKING, Any

import attrs

from daemon.config import interval_seconds
from daemon.events import Bar, Event

if TYPE_CHECKING:
    from daemon.dispatch import Stream

#: Closed bars kept per series for revisions by late trades.
KEPT = 100
#: Bars one ``close_due`` call makes at most (a long silence carried at 1 s is many
#: empty bars: made a thousand at a time, the task stays responsive).
MOST_PER_CALL = 1000
#: Exact sums and products (far more digits than any price x size has).
_EXACT = Context(prec=60)
#: The VWAP's division: Python's default precision.
_DIVIDE = Context(prec=28)
_ZERO = Decimal(0)


def parse(price: str, size: str) -> tuple[Decimal, Decimal]:
    """A trade's price and size as ``Decimal``s; raises ``decimal.InvalidOperation``
    (an ``ArithmeticError``) for one that is not a decimal string, ``ValueError``
    for one that is not finite or is negative."""
    p = Decimal(price)
    s = Decimal(size)
    if not (p.is_finite() and s.is_finite()) or p < 0 or s < 0:
        raise ValueError(f"not a price and size: {price!r} {size!r}")
    return p, s


@attrs.define(slots=True)
class Bucket:
    """The trades of one interval so far (``open_time``: epoch s)."""

    open_time: float
    open: str = ""
    open_ts: float = math.inf
    high: str = ""
    high_d: Decimal = _ZERO
    low: str = ""
    low_d: Decimal = _ZERO
    close: str = ""
    close_ts: float = -math.inf
    volume: Decimal = _ZERO
    buy: Decimal = _ZERO
    sell: Decimal = _ZERO
    notional: Decimal = _ZERO
    count: int = 0
    #: the price of a bar without trades (``carry``: the close before it)
    carried: str = ""
    #: times published: 0 not yet, 1 once (revision 0), N+1 after revision N
    published: int = 0

    def add(self, ts: float, price: str, size: str, side: str,
            parsed: tuple[Decimal, Decimal] | None = None) -> None:
        """Add one trade (``parsed``: its price and size from ``parse``, if done
        already); raises what ``parse`` raises."""
        p, s = parsed if parsed is not None else parse(price, size)
        if self.count == 0 or p > self.high_d:
            self.high, self.high_d = price, p
        if self.count == 0 or p < self.low_d:
            self.low, self.low_d = price, p
        if ts < self.open_ts:
            self.open, self.open_ts = price, ts
        if ts >= self.close_ts:
            self.close, self.close_ts = price, ts
        self.volume = _EXACT.add(self.volume, s)
        if side == "buy":
            self.buy = _EXACT.add(self.buy, s)
        else:
            self.sell = _EXACT.add(self.sell, s)
        self.notional = _EXACT.add(self.notional, _EXACT.multiply(p, s))
        self.count += 1


class BarSeries:
    """The bars of one ``exchange``, ``symbol`` and interval (see the module
    docstring). ``interval``: its name (``1m``); ``seconds``: its length;
    ``grace``: seconds after its end a bar waits for late trades; ``empty``:
    ``carry`` or ``skip``. Times are exchange epoch seconds."""

    def __init__(self, exchange: str, symbol: str, interval: str, seconds: int,
                 grace: float, empty: str) -> None:
        self.exchange = exchange
        self.symbol = symbol
        self.interval = interval
        self.seconds = seconds
        self.grace = grace
        self.carry = empty == "carry"
        #: buckets not yet published, by open time
        self.open: dict[float, Bucket] = {}
        #: the last ``KEPT`` published buckets, by open time
        self.closed: OrderedDict[float, Bucket] = OrderedDict()
        #: open time of the next bar to publish (None: none pending)
        self.cursor: float | None = None
        #: intervals opening before this are decided (published, carried or skipped)
        self.horizon = -math.inf
        self.last_close: str | None = None
        #: the bar in progress changed since ``partial()`` last made it
        self.changed = False
        self.trades = 0
        self.late = 0
        self.too_late = 0
        self.bars = 0
        self.empty = 0
        self.revisions = 0
        #: the ``close`` the computation's heap holds for this series (``BarsComputation``)
        self.queued = math.inf
        #: carried bars re-priced by late trades, not yet taken (``take_repriced``)
        self.repriced: list[Bar] = []

    def bucket_of(self, ts: float) -> float:
        """The open time of the bucket of exchange time ``ts``."""
        return math.floor(ts / self.seconds) * self.seconds

    def trade(self, ts: float, price: str, size: str, side: str,
              parsed: tuple[Decimal, Decimal] | None = None) -> Bar | None:
        """Add one trade (``parsed``: ``parse(price, size)`` if done already);
        returns the revised bar when it is late (else None); the carried bars
        after it whose price that changed wait in ``take_repriced``. Raises
        ``ArithmeticError`` or ``ValueError`` for a price or size that is not a
        decimal string (``parse``): nothing is changed then."""
        if parsed is None:
            parsed = parse(price, size)
        open_time = self.bucket_of(ts)
        if open_time >= self.horizon:
            bucket = self.open.get(open_time)
            if bucket is None:
                bucket = Bucket(open_time)
                bucket.add(ts, price, size, side, parsed)
                self.open[open_time] = bucket
            else:
                bucket.add(ts, price, size, side, parsed)
            if self.cursor is None or open_time < self.cursor:
                self.cursor = open_time
            self.trades += 1
            self.changed = True
            return None
        # late: its interval was published (or carried empty, or skipped)
        bucket = self.closed.get(open_time)
        if bucket is None:
            if open_time < next(iter(self.closed), math.inf):
                self.too_late += 1
                return None
            bucket = Bucket(open_time, published=1)  # a skipped interval
            bucket.add(ts, price, size, side, parsed)
            self._keep(bucket)
        else:
            bucket.add(ts, price, size, side, parsed)
        self.trades += 1
        self.late += 1
        self.revisions += 1
        revision = bucket.published
        bucket.published += 1
        if self.carry:
            self._reprice(bucket)
        elif bucket.open_time == next(reversed(self.closed)):
            self.last_close = bucket.close
        return self._bar(bucket, revision)

    def _reprice(self, bucket: Bucket) -> None:
        """``bucket`` was revised: the carried bars after it (up to the next bar
        with trades) carry its close; each whose price that changes is revised
        (``repriced``), and when they reach the bar in progress, so is
        ``last_close``."""
        price = bucket.close
        at = bucket.open_time + self.seconds
        while (after := self.closed.get(at)) is not None:
            if after.count or after.carried == price:
                return  # a bar of its own trades, or carried bars at this price already
            after.carried = price
            self.repriced.append(self._bar(after, after.published))
            after.published += 1
            self.revisions += 1
            at += self.seconds
        if at >= self.horizon and self.last_close != price:
            self.last_close = price
            if self.cursor is not None and self.cursor not in self.open:
                self.changed = True  # the bar in progress is carried: its price changed

    def take_repriced(self) -> list[Bar]:
        """The carried bars re-priced by late trades since the last call, in order
        (module docstring, rule 3)."""
        repriced, self.repriced = self.repriced, []
        return repriced

    def next_close(self) -> float:
        """The exchange time at which the next bar closes (``math.inf``: none)."""
        if self.cursor is None:
            return math.inf
        return self.cursor + self.seconds + self.grace

    def close_due(self, now: float, most: int = MOST_PER_CALL) -> list[Bar]:
        """The bars whose end plus ``grace`` is at or before exchange time ``now``,
        in order (empty intervals per ``empty``), at most ``most`` (the rest are
        still due: ``next_close`` says so)."""
        bars: list[Bar] = []
        seconds = self.seconds
        while (self.cursor is not None and self.cursor + seconds + self.grace <= now
               and len(bars) < most):
            cursor = self.cursor
            bucket = self.open.pop(cursor, None)
            if bucket is None and self.carry:
                bucket = Bucket(cursor, carried=self.last_close or "")
                self.empty += 1
            if bucket is not None:
                bucket.published = 1
                self._keep(bucket)
                bars.append(self._bar(bucket, 0))
                self.bars += 1
                if bucket.count:
                    self.last_close = bucket.close
            self.horizon = cursor + seconds
            if self.carry or cursor + seconds in self.open:
                self.cursor = cursor + seconds
            else:  # skip: on to the next interval with a trade, if any
                self.cursor = min(self.open) if self.open else None
                if self.cursor is None:
                    self.horizon = max(self.horizon, self.bucket_of(now - self.grace))
        return bars

    def partial(self) -> Bar | None:
        """The bar in progress (the one at ``cursor``), ``partial``; None when it
        has no trade and nothing to carry."""
        self.changed = False
        if self.cursor is None:
            return None
        bucket = self.open.get(self.cursor)
        if bucket is None:
            if not self.carry or self.last_close is None:
                return None
            bucket = Bucket(self.cursor, carried=self.last_close)
        return self._bar(bucket, 0, partial=True)

    def _keep(self, bucket: Bucket) -> None:
        self.closed[bucket.open_time] = bucket
        self.closed.move_to_end(bucket.open_time)
        while len(self.closed) > KEPT:
            self.closed.popitem(last=False)

    def _bar(self, bucket: Bucket, revision: int, partial: bool = False) -> Bar:
        close_time = float(bucket.open_time + self.seconds)
        if bucket.count:
            prices = (bucket.open, bucket.high, bucket.low, bucket.close)
            vwap: str | None = str(_DIVIDE.divide(bucket.notional, bucket.volume)) \
                if bucket.volume else None
        else:
            carried = bucket.carried
            prices = (carried, carried, carried, carried)
            vwap = None
        return Bar(
            exchange=self.exchange, symbol=self.symbol, interval=self.interval,
            ts=close_time, recv_ts=time.time(), open_time=float(bucket.open_time),
            close_time=close_time, open=prices[0], high=prices[1], low=prices[2],
            close=prices[3], volume=str(bucket.volume), buy_volume=str(bucket.buy),
            sell_volume=str(bucket.sell), count=bucket.count, vwap=vwap,
            revision=revision, partial=partial,
        )


class ExchangeClock:
    """An exchange's time *now*, from the daemon's clock: ``observe(ts, now)`` for
    each trade (``ts``: its exchange time, epoch s; ``now``: the daemon's clock,
    any monotonic seconds), and ``time(now)`` = ``now`` + the largest ``ts - now``
    seen, so it never goes back, follows the trades when they run ahead (a replay
    faster than real time) and runs on between them (a bar closes without a later
    trade). ``clock(time)`` maps an exchange time back to the daemon's clock."""

    def __init__(self) -> None:
        self.offset = -math.inf

    def observe(self, ts: float, now: float) -> None:
        """One trade of exchange time ``ts`` received at ``now``."""
        offset = ts - now
        if offset > self.offset:
            self.offset = offset

    def time(self, now: float) -> float:
        """The exchange's time at daemon time ``now`` (``-inf`` before any trade)."""
        return now + self.offset

    def clock(self, time: float) -> float:
        """The daemon time at which the exchange's time is ``time``."""
        return time - self.offset


class BarsComputation:
    """The ``bars`` derived stream (a ``runner.Computation``): every trade stream
    matching ``symbols``, one ``BarSeries`` per interval, each exchange's
    ``ExchangeClock``; partial bars at most every ``partial_ms``. Built from
    ``[derived.bars]`` (``BarsConfig``).

    The next closes are kept in a heap per exchange (``heapq``), keyed by each
    series' ``next_close`` on the exchange's time: one exchange's clock maps all
    of its times to the daemon's by the same offset, so its heap's order holds
    while the offset moves. A trade costs ``O(log n)`` (a push when it opens an
    earlier bar than its series had pending), ``due`` ``O(exchanges)``, and a
    tick pops only the series that are due (``n``: the series)."""

    name = "bars"

    def __init__(self, intervals: Sequence[str], grace: float, empty: str, partial_ms: int,
                 symbols: Sequence[str]) -> None:
        self.inputs: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
            (("trades",), tuple(symbols)),)
        self.intervals = [(name, interval_seconds(name)) for name in intervals]
        self.grace = grace
        self.empty = empty
        self.partial_every = partial_ms / 1000
        self.series: dict[tuple[str, str], list[BarSeries]] = {}
        self.clocks: dict[str, ExchangeClock] = {}
        #: per exchange, (next close on its time, series number, series); an entry
        #: is live while its close is the series' ``queued`` (else it is skipped)
        self.closes: dict[str, list[tuple[float, int, BarSeries]]] = {}
        #: series whose bar in progress changed since its last partial bar
        self.changed: dict[BarSeries, None] = {}
        self.next_partial = -math.inf
        self.malformed = 0
        self.partials = 0
        self._numbered = 0

    def take(self, stream: Stream, payload: dict[str, Any], now: float) -> list[Event]:
        """One trade: into each interval's bar; revised bars of late trades."""
        key = (stream.exchange, stream.symbol)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = [
                BarSeries(stream.exchange, stream.symbol, name, seconds, self.grace, self.empty)
                for name, seconds in self.intervals]
        try:
            ts = float(payload["ts"])
            if not math.isfinite(ts):
                raise ValueError(ts)
            price, size, side = payload["price"], payload["size"], payload["side"]
            parsed = parse(price, size)  # once for every interval
        except (KeyError, TypeError, ValueError, ArithmeticError):
            self.malformed += 1
            return []
        clock = self.clocks.get(stream.exchange)
        if clock is None:
            clock = self.clocks[stream.exchange] = ExchangeClock()
            self.closes[stream.exchange] = []
        clock.observe(ts, now)
        heap = self.closes[stream.exchange]
        revised: list[Event] = []
        for s in series:
            bar = s.trade(ts, price, size, side, parsed)  # parsed, ts finite: no error
            if bar is not None:
                revised.append(bar)
                revised += s.take_repriced()
            if s.changed:
                self.changed[s] = None
            if s.cursor is not None and s.cursor + s.seconds + s.grace < s.queued:
                self._queue(heap, s)
        return revised

    def _queue(self, heap: list[tuple[float, int, BarSeries]], s: BarSeries) -> None:
        """Push ``s``'s next close when it is earlier than the one it has queued."""
        close = s.next_close()
        if close < s.queued:
            s.queued = close
            self._numbered += 1
            heapq.heappush(heap, (close, self._numbered, s))

    def due(self) -> float:
        """The earliest next close of any series (on the daemon's clock) and, when
        some bar changed, of the next partial bars."""
        due = self.next_partial if self.changed else math.inf
        for exchange, heap in self.closes.items():
            while heap and heap[0][0] != heap[0][2].queued:
                heapq.heappop(heap)  # superseded by an earlier close of its series
            if heap:
                due = min(due, self.clocks[exchange].clock(heap[0][0]))
        return due

    def tick(self, now: float) -> list[Event]:
        """The bars closed by ``now`` (each series due, in order of its close),
        then the partial bars if due."""
        events: list[Event] = []
        for exchange, heap in self.closes.items():
            exchange_now = self.clocks[exchange].time(now)
            popped = []
            while heap and heap[0][0] <= exchange_now:
                close, _, s = heapq.heappop(heap)
                if close != s.queued:
                    continue  # superseded
                s.queued = math.inf
                events += s.close_due(exchange_now)
                popped.append(s)
            for s in popped:  # after the loop: one with more due waits for the next tick
                self._queue(heap, s)
        if now >= self.next_partial and self.changed:
            sent = False
            for s in self.changed:
                bar = s.partial()
                if bar is not None:
                    events.append(bar)
                    self.partials += 1
                    sent = True
            self.changed.clear()
            if sent:
                self.next_partial = now + self.partial_every
        return events

    def figures(self) -> dict[str, Any]:
        """Counters summed over the series: trades, bars, empty bars, late trades
        (revisions), trades too late to revise, partial bars, malformed trades."""
        every = [s for series in self.series.values() for s in series]
        return {
            "series": len(every), "trades": sum(s.trades for s in every),
            "bars": sum(s.bars for s in every), "empty": sum(s.empty for s in every),
            "late": sum(s.late for s in every), "too_late": sum(s.too_late for s in every),
            "partials": self.partials, "malformed": self.malformed,
        }
