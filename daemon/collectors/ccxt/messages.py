"""The messages the ccxt.pro bridge hands from its worker thread to trio.

Each is a small attrs class (slotted; built in the worker, read once in trio), in
the order the watches produced them. Times: ``recv_ts``/``now`` are Unix epoch
seconds; ``stamp`` is ccxt's exchange time in milliseconds (``None``: unknown).
Trades and tickers are copies of ccxt's dicts (ccxt mutates its own in place).
"""

from __future__ import annotations

from typing import Any

import attrs

from daemon.collectors.ccxt.books import Side


@attrs.define(slots=True)
class TradesBatch:
    """Trades of ``symbol`` from a watch result or a REST recovery page (``since``:
    the ``since`` (ms) the page was asked with; ``None`` for a live batch or a
    newest page)."""

    symbol: str
    trades: list[dict[str, Any]]
    recv_ts: float
    since: int | None = None


@attrs.define(slots=True)
class WholeBook:
    """A whole copy of ``symbol``'s book (``{price: size}`` per side)."""

    symbol: str
    bids: Side
    asks: Side
    stamp: int | None
    recv_ts: float


@attrs.define(slots=True)
class BookChanges:
    """The levels of ``symbol``'s book that changed since the last copy or changes:
    ``{price: size now}``, size 0.0 for a removed level."""

    symbol: str
    bids: Side
    asks: Side
    stamp: int | None
    recv_ts: float


@attrs.define(slots=True)
class BookLost:
    """``symbol``'s book watch failed (``gap``: ccxt found a sequence or checksum gap);
    the next copy is whole."""

    symbol: str
    gap: bool
    detail: str
    now: float


@attrs.define(slots=True)
class TickerUpdate:
    """The latest ccxt ticker of ``symbol``."""

    symbol: str
    ticker: dict[str, Any]
    recv_ts: float


@attrs.define(slots=True)
class TradesGap:
    """Trades of ``symbol`` may be missing and cannot be recovered (``detail``: why)."""

    symbol: str
    detail: str
    now: float


@attrs.define(slots=True)
class StateChange:
    """The feed's connection state changed (``error``: the cause of a failure,
    ``Type: message``, for status)."""

    state: str
    detail: str
    error: str | None = None


BridgeItem = TradesBatch | WholeBook | BookChanges | BookLost | TickerUpdate | TradesGap | StateChange
