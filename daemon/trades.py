"""The trade tracker: every trade of a symbol delivered once, in order, and what
could not be delivered reported as a ``Gap``. Sans-IO.

One class, ``TradeTracker``, used by the three exchange protocols (Binance
``aggTrade``, Coinbase ``matches``, Kraken v1 ``trade``) and by the ccxt poll and
watch collectors. What differs between them is data (``TradeRules``) and the
exchange's own REST paging, which stays in its module (a hook, ``history``, builds
the first ``FetchTrades``).

Theory of operation
-------------------
1. **Ids delivered.** Each trade has an id (``Trade.id``) and a *key*, its place
   in the symbol's history (``TradeRules.key``: Binance and Coinbase the integer id,
   Kraken ``(time, k)``, ccxt the trade's time in ms). The tracker keeps the newest
   key delivered (``last_key``) and, when ids do not order trades (ccxt: any
   exchange), the ids of the last ``memory`` trades (``seen``). A trade is already
   delivered when its id is in ``seen`` or its key is not above the newest key
   forgotten from ``seen`` (``forgotten``); with ``memory = 0`` every delivered
   trade is forgotten at once, so that rule is "not above the last key". Memory
   is bounded either way.
2. **Recovery window.** After a reconnect, or a jump in contiguous ids (a trade
   whose id is beyond ``last_key + 1``: ``TradeRules.contiguous``), ``recover()``
   opens a window: ``history(tracker)`` gives the ``FetchTrades`` of the first REST
   page (``None``: nothing to recover from, no window). While it is open, live
   trades are *held*. Pages read forward in time (Binance, Kraken) are delivered as
   they come (``recovered``); pages read backward (Coinbase, newest first) are
   kept (``found``) until the walk reaches back far enough. ``finish()`` closes
   the window: the found and held trades, merged in key order, each once.
3. **Gap reporting.** With contiguous ids, a hole between two trades delivered in
   a row after a recovery is a ``Gap`` with ``from_id``/``to_id``; an exchange
   whose ids say nothing (Kraken) reports its own gaps with ``gap()``, as the poll
   rules do (a full page that does not overlap what was delivered).
4. **Counters** (``FeedCounters``, shared with the feed): ``trades`` delivered;
   ``duplicates``: a live trade already delivered, or held and also recovered
   (a recovered trade at or below the window's floor is the expected overlap of a
   REST page, not counted); ``gaps``: a jump in contiguous ids, and every ``Gap``
   made by ``gap()``.

The ccxt poll rules (``since()``, ``page()``) are in the second half of the class;
``ccxt_trade_id``, ``decimal_text`` and ``ccxt_order`` read ccxt's unified trades.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

import attrs

from daemon.events import Event, Gap, Trade
from daemon.exchanges.base import FeedCounters, FetchTrades, Outputs

log = logging.getLogger(__name__)

#: ccxt: trade ids remembered per symbol, as a multiple of the page size.
SEEN_PAGES = 10
#: ccxt: full pages in a row fetched with ``since`` before jumping to the newest.
MAX_BEHIND = 3

# Raw-answer keys that may hold a trade's price and size as the exchange sent them.
_PRICE = ("p", "price", "px")
_SIZE = ("q", "qty", "size", "amount", "sz", "quantity", "volume", "v")


def integer_key(trade: Trade) -> int:
    """The key of an exchange whose trade ids are integers in trade order."""
    return int(trade.id)


@attrs.frozen
class TradeRules:
    """How one exchange's trades are told apart and ordered (module doc, rule 1).

    ``key``: a trade's place in its symbol's history (any ordered value);
    ``contiguous``: keys are integer ids that grow by exactly one per trade, so a
    jump means lost trades and a hole's ids are known; ``memory``: how many ids are
    remembered beside ``last_key``, for exchanges whose keys do not set trades
    apart (0: the key alone decides).
    """

    key: Callable[[Trade], Any] = integer_key
    contiguous: bool = False
    memory: int = 0



@attrs.define
class Recovery:
    """The recovery window of one symbol (module doc, rule 2): ``floor``, the key
    of the last trade delivered when it opened (``None``: none yet); ``held``, the
    live trades received meanwhile; ``found``, recovered trades kept by key until
    ``finish``."""

    floor: Any
    held: list[Trade] = attrs.Factory(list)
    found: dict[Any, Trade] = attrs.Factory(dict)


class TradeTracker:
    """The trades of one symbol (module docstring).

    ``exchange``, ``symbol``: what ``Gap`` events name; ``limit``: the REST page
    size (ccxt rules: also sets ``memory``); ``stats``: the counters to count in;
    ``rules``: ``TradeRules`` (default: ccxt's, ids remembered for ``SEEN_PAGES``
    pages, keyed by time); ``history``: builds the ``FetchTrades`` that starts a
    recovery, or ``None`` when there is nothing to recover from.
    """

    def __init__(
        self,
        exchange: str,
        symbol: str,
        limit: int,
        stats: FeedCounters,
        *,
        rules: TradeRules | None = None,
        history: Callable[[TradeTracker], FetchTrades | None] | None = None,
    ) -> None:
        self.exchange = exchange
        self.symbol = symbol
        self.limit = limit
        self.stats = stats
        self.rules = rules if rules is not None else TradeRules(
            key=_no_key, memory=SEEN_PAGES * limit
        )
        self.memory = self.rules.memory
        self.history = history
        self.seen: dict[str, Any] = {}  # id -> key (None: unknown), oldest first
        self.forgotten: Any = None  # the newest key dropped from `seen`
        self.last_key: Any = None  # key of the newest trade delivered
        self.last_id: str | None = None
        self.recovery: Recovery | None = None
        self.jump = False  # ccxt: the next poll asks for the newest page
        self.behind = 0  # ccxt: full `since` pages in a row
        #: ccxt: ``ccxt_order`` of the trade ``seed`` gave: it and every trade before
        #: it were delivered (by the previous owner)
        self.floor: tuple[int, int, int, str] | None = None
        #: ccxt: seeded, and no answer has reached back to the seed yet (rule 6)
        self.unproven = False

    # -- ids delivered (rule 1) -------------------------------------------------------

    @property
    def last_ts(self) -> int | None:
        """ccxt rules: the time (ms) of the newest trade delivered (its key)."""
        return self.last_key  # type: ignore[no-any-return]

    def delivered(self, trade_id: str, key: Any) -> bool:
        """Whether the trade ``trade_id`` with ``key`` was delivered already."""
        if trade_id in self.seen:
            return True
        return key is not None and self.forgotten is not None and key <= self.forgotten

    def _record(self, trade_id: str, key: Any) -> None:
        """Remember a trade as delivered (it was not: ``delivered`` said so)."""
        if not self.memory:  # key > forgotten == last_key: the new newest, forgotten at once
            self.forgotten = self.last_key = key
            self.last_id = trade_id
            return
        self.seen[trade_id] = key
        while len(self.seen) > self.memory:
            old_key = self.seen.pop(next(iter(self.seen)))
            if old_key is not None and (self.forgotten is None or old_key > self.forgotten):
                self.forgotten = old_key
        if key is not None and (self.last_key is None or key >= self.last_key):
            self.last_key, self.last_id = key, trade_id
        elif self.last_id is None:
            self.last_id = trade_id

    def deliver(
        self, trades: Iterable[Trade], now: float, *, overlap: bool = False, holes: bool = False
    ) -> list[Trade | Gap]:
        """``trades`` (in key order) that were not delivered yet; the others are
        dropped and counted as duplicates unless ``overlap`` (a REST page that
        reaches back over what was delivered, by design). ``holes``: with
        contiguous ids, a ``Gap`` before a trade whose id is beyond the next one."""
        out: list[Trade | Gap] = []
        key_of = self.rules.key
        for trade in trades:
            key = key_of(trade)
            if self.delivered(trade.id, key):
                if not overlap:
                    self.stats.duplicates += 1
                continue
            if holes and self.rules.contiguous and self.last_key is not None \
                    and key > self.last_key + 1:
                out.append(self._gap(now, "not in the exchange's trade history",
                                     str(self.last_key + 1), str(key - 1)))
            self._record(trade.id, key)
            self.stats.trades += 1
            out.append(trade)
        return out

    def seed(self, trade: Trade) -> None:
        """``trade`` is the newest delivered before this tracker existed (by the
        collector that owned the feed before this one, ``daemon.cluster``): it and
        older ones are not new, and a recovery reads the history after it. With
        the ccxt rules (rule 6 of the poll rules below), the next ``since`` is the
        trade's time, and the first answer must reach back to it."""
        if self.rules.key is _no_key:
            self._seed_ccxt(trade)
            return
        key = self.rules.key(trade)
        if not self.delivered(trade.id, key):
            self._record(trade.id, key)
        if key is not None and (self.forgotten is None or key > self.forgotten):
            self.forgotten = key  # and every older one: delivered (``delivered``)

    # -- recovery window (rule 2) -----------------------------------------------------

    @property
    def recovering(self) -> bool:
        """Whether a recovery window is open (live trades are held)."""
        return self.recovery is not None

    def live(
        self, trades: Sequence[Trade], now: float, keys: Sequence[Any] | None = None
    ) -> Outputs:
        """Trades received live, in the order received: the ones to deliver now.

        Repeats are dropped (``duplicates``); while a recovery runs, new trades are
        held; with contiguous ids, a trade beyond ``last_key + 1`` counts a gap and
        opens a recovery (the ``FetchTrades`` is returned and the trade held) when
        ``history`` can start one, else it is delivered after a ``Gap``. ``keys``:
        the trades' keys when the caller has them already, one per trade (else
        ``ValueError``); ``rules.key`` makes them when ``None``.
        """
        out: Outputs = []
        if keys is None:
            key_of = self.rules.key
            keys = [key_of(trade) for trade in trades]
        elif len(keys) != len(trades):  # (zip's strict=True, and zip, cost more)
            raise ValueError(f"{len(keys)} keys for {len(trades)} trades")
        seen, stats = self.seen, self.stats
        for i, trade in enumerate(trades):
            key = keys[i]
            forgotten = self.forgotten  # `delivered`, inline: this is the hot path
            if (seen and trade.id in seen) or (forgotten is not None and key <= forgotten):
                stats.duplicates += 1
                continue
            if self.recovery is not None:
                self.recovery.held.append(trade)
                continue
            if self.rules.contiguous and self.last_key is not None and key > self.last_key + 1:
                self.stats.gaps += 1
                fetch = self.recover()
                if fetch:
                    out += fetch
                    self.hold([trade])
                    continue
                out += self.deliver([trade], now, holes=True)
                continue
            if self.memory:
                self._record(trade.id, key)
            else:  # `_record`, inline
                self.forgotten = self.last_key = key
                self.last_id = trade.id
            stats.trades += 1
            out.append(trade)
        return out

    def recover(self) -> list[FetchTrades]:
        """Open a recovery window (a reconnect, or a jump): the ``FetchTrades`` of
        the first page, or ``[]`` when one is open already or ``history`` has
        nothing to recover from."""
        if self.recovery is not None or self.history is None:
            return []
        fetch = self.history(self)
        if fetch is None:
            return []
        self.recovery = Recovery(floor=self.last_key)
        return [fetch]

    def hold(self, trades: Iterable[Trade]) -> None:
        """Hold live trades until ``finish`` (a recovery window must be open)."""
        assert self.recovery is not None
        self.recovery.held.extend(trades)

    def recovered(self, trades: Iterable[Trade], now: float, *, keep: bool = False) -> list[Trade | Gap]:
        """A page of the REST history. Forward pages (oldest first) are delivered
        at once, in key order (a trade at or below what was delivered is overlap,
        not counted); with ``keep``, a page read backward is kept until ``finish``.
        """
        if keep:
            assert self.recovery is not None
            floor, key_of, found = self.recovery.floor, self.rules.key, self.recovery.found
            for trade in trades:
                key = key_of(trade)
                if floor is None or key > floor:
                    found.setdefault(key, trade)
            return []
        return self.deliver(sorted(trades, key=self.rules.key), now, overlap=True)

    def first_held(self) -> Any:
        """The smallest key among the held trades, or ``None``."""
        if self.recovery is None or not self.recovery.held:
            return None
        return min(self.rules.key(t) for t in self.recovery.held)

    def finish(self, now: float) -> list[Trade | Gap]:
        """Close the window: the found and held trades merged in key order, each
        once (a held trade also recovered counts as a duplicate), with a ``Gap``
        before each hole when ids are contiguous."""
        recovery, self.recovery = self.recovery, None
        if recovery is None:
            return []
        merged = dict(recovery.found)
        key_of = self.rules.key
        for trade in recovery.held:
            key = key_of(trade)
            if key in merged:
                self.stats.duplicates += 1  # live, and recovered too
            else:
                merged[key] = trade
        ordered = [merged[key] for key in sorted(merged)]
        return self.deliver(ordered, now, holes=True)

    def abandon(self) -> list[Trade]:
        """Forget the window (its answers died with the connection); returns the
        trades it held, for the caller to hold again or deliver."""
        recovery, self.recovery = self.recovery, None
        return recovery.held if recovery is not None else []

    # -- gaps (rule 3) ----------------------------------------------------------------

    def gap(self, now: float, detail: str, from_id: str = "", to_id: str = "") -> Gap:
        """A counted ``Gap`` of this symbol's trades (``now``: epoch s). It settles
        a seeded ccxt tracker's question (poll rule 6): what was missing is announced."""
        self.stats.gaps += 1
        self.unproven = False
        return self._gap(now, detail, from_id, to_id)

    def _gap(self, now: float, detail: str, from_id: str = "", to_id: str = "") -> Gap:
        return Gap(exchange=self.exchange, symbol=self.symbol, ts=now, recv_ts=now,
                   stream="trades", from_id=from_id, to_id=to_id, detail=detail)

    # -- the ccxt poll rules -----------------------------------------------------------
    #
    # 1. The first poll asks for the newest page (``since=None``); every later poll
    #    asks ``since`` = the time of the newest trade delivered. ccxt's ``since`` is
    #    inclusive, so an answer that covers the time since the last poll overlaps
    #    what was delivered (a trade seen before, or one not newer than it).
    # 2. Trades already delivered are dropped (``stats.duplicates``): ids are kept
    #    for the last ``SEEN_PAGES`` pages' worth of trades, and a trade not newer
    #    than the newest id forgotten counts as delivered, so memory is bounded.
    # 3. New trades go out ordered by time, then by id (numerically when numeric).
    # 4. An answer that is a full page (``len >= limit``), brings new trades, and
    #    does not overlap (rule 1) may hide trades between the last delivered and
    #    the first returned: a ``Gap`` goes out first (``from_id`` / ``to_id``: the
    #    missing id range when ids are numbers).
    # 5. A ``since`` answer that brings nothing new, or ``MAX_BEHIND`` full
    #    ``since`` pages in a row, make the next poll ask for the newest page
    #    instead: some exchanges bound a ``since`` window (ccxt asks Binance for one
    #    hour from ``since``, which never reaches the present after an hour without
    #    trades), and a feed that stays behind is cut short with a ``Gap`` (rule 4)
    #    rather than falling further behind.
    # 6. A tracker seeded with the previous owner's last trade (``seed``: a
    #    cluster's takeover) asks ``since`` = that trade's time, and treats it and
    #    every trade before it in delivery order (rule 3) as delivered (``floor``:
    #    trades in the same ms as it are told apart by id). Its first answer that
    #    brings anything must reach back to that trade (overlap, rule 1): the
    #    inclusive ``since`` returns it whenever the exchange's history still holds
    #    it. An answer with new trades and no overlap, full or not, is a ``Gap``
    #    (the history starts after the seed: the trades between are lost).

    def _seed_ccxt(self, trade: Trade) -> None:
        """``seed`` with the ccxt rules: ``trade`` (an event, ``ts`` = ccxt's ms
        timestamp / 1000) as the newest delivered (rule 6)."""
        stamp = math.floor(trade.ts * 1000 + 0.001)  # the ms ccxt gave (float error)
        if not self.delivered(trade.id, stamp):
            self._record(trade.id, stamp)
        order = ccxt_order({"id": trade.id, "timestamp": stamp})
        if self.floor is None or order > self.floor:
            self.floor = order
        if self.forgotten is None or stamp - 1 > self.forgotten:
            self.forgotten = stamp - 1  # every older ms: delivered (same ms: ``floor``)
        self.unproven = True

    def since(self) -> int | None:
        """ccxt: the ``since`` (ms) of the next ``fetch_trades`` call (rules 1, 5)."""
        return None if self.last_key is None or self.jump else self.last_ts

    def page(self, trades: list[dict[str, Any]], since: int | None, recv_ts: float) -> list[Event]:
        """ccxt: the events of one ``fetch_trades`` answer (ccxt's unified trade
        dicts) to a call with ``since`` (ms or ``None``), by the poll rules above."""
        new: list[dict[str, Any]] = []
        fresh: set[str] = set()
        overlap = False
        floor = self.floor
        for trade in trades:
            tid = ccxt_trade_id(trade)
            stamp = trade.get("timestamp")
            if tid in fresh or self.delivered(tid, stamp) or (
                    floor is not None and stamp == floor[0] and ccxt_order(trade) <= floor):
                overlap = True
                self.stats.duplicates += 1
                continue
            if stamp is not None and self.last_key is not None and stamp <= self.last_key:
                overlap = True
            fresh.add(tid)
            new.append(trade)
        new.sort(key=ccxt_order)
        full = len(trades) >= self.limit
        out: list[Event] = []  # trades and gaps, typed as the collectors publish them
        if new and self.last_id is not None and not overlap and (full or self.unproven):
            out.append(self._page_gap(ccxt_trade_id(new[0]), recv_ts))
        elif overlap:
            self.unproven = False  # the history reaches back to the seed (rule 6)
        for trade in new:
            event = self._ccxt_trade(trade, recv_ts)
            if event is not None:
                out.append(event)
        if since is None:
            self.jump, self.behind = False, 0
        elif not new:
            self.jump = True
        elif full:
            self.behind += 1
            if self.behind >= MAX_BEHIND:
                self.jump, self.behind = True, 0
        else:
            self.behind = 0
        return out

    def _ccxt_trade(self, trade: dict[str, Any], recv_ts: float) -> Trade | None:
        tid = ccxt_trade_id(trade)
        stamp = trade.get("timestamp")
        self._record(tid, stamp)
        info = trade.get("info")
        price = decimal_text(info, _PRICE, trade.get("price"))
        size = decimal_text(info, _SIZE, trade.get("amount"))
        side = trade.get("side")
        if price is None or size is None or side not in ("buy", "sell"):
            self.stats.malformed += 1
            log.warning("%s %s: skipped an unusable trade: %.200r",
                        self.exchange, self.symbol, trade)
            return None
        self.stats.trades += 1
        return Trade(
            exchange=self.exchange, symbol=self.symbol,
            ts=stamp / 1000 if stamp is not None else recv_ts, recv_ts=recv_ts,
            id=tid, price=price, size=size, side=side,
        )

    def _page_gap(self, first_new: str, recv_ts: float) -> Gap:
        last = self.last_id or ""
        from_id = to_id = ""
        if last.isdigit() and first_new.isdigit() and int(first_new) - int(last) > 1:
            from_id, to_id = str(int(last) + 1), str(int(first_new) - 1)
        reach = (f"the REST history did not reach back to trade {last}, the last one "
                 "delivered before this collector took the feed over" if self.unproven
                 else f"a full page of {self.limit} trades did not reach back to trade {last}")
        return self.gap(
            recv_ts, f"{reach}; trades between it and {first_new} may be missing",
            from_id, to_id,
        )


def _no_key(trade: Trade) -> Any:
    """ccxt rules: trades are handed over as ccxt dicts (``page``), never keyed here."""
    raise TypeError("ccxt trades go through TradeTracker.page")


# -- ccxt's unified trades ----------------------------------------------------------------


def ccxt_trade_id(trade: dict[str, Any]) -> str:
    """The exchange's trade id of a ccxt trade; for an exchange without ids, one
    made of what the trade is (time, price, amount, side): identical trades in one
    ms collapse."""
    tid = trade.get("id")
    if tid is not None and tid != "":
        return str(tid)
    fields = (trade.get(key) for key in ("timestamp", "price", "amount", "side"))
    return ":".join(map(str, fields))


def ccxt_order(trade: dict[str, Any]) -> tuple[int, int, int, str]:
    """The delivery order of ccxt trades: by time, then by id (numerically when
    numeric, numbers first)."""
    tid = ccxt_trade_id(trade)
    stamp = trade.get("timestamp") or 0
    return (stamp, 0, int(tid), "") if tid.isdigit() else (stamp, 1, 0, tid)


def decimal_text(info: Any, keys: tuple[str, ...], value: Any) -> str | None:
    """``value`` (ccxt's float) as a decimal string: the raw string under one of
    ``keys`` in ``info`` (the exchange's raw answer) if it parses to the same number,
    else the float written in plain positional notation from its shortest ``repr``
    (``6.37e-06`` -> ``"0.00000637"``). ``None`` for a missing or non-finite value."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return None
    if isinstance(info, dict):
        for key in keys:
            raw = info.get(key)
            if isinstance(raw, str):
                try:
                    if float(raw) == value:
                        return raw
                except ValueError:
                    continue
    return format(Decimal(repr(value)), "f")
