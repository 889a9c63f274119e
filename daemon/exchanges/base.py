"""What every exchange protocol hands back to its collector, and its counters.

Theory of operation
-------------------
An exchange protocol object (``BinanceFeed``, ``CoinbaseFeed``, ``KrakenFeed``)
holds the state of one WebSocket connection's worth of subscriptions. The
collector task (I/O) drives it:

1. ``feed.url(ws_base)`` is the URL to connect to;
2. after connecting, ``feed.on_open(now)`` resets every book to "not synced" and
   returns the frames to send (subscriptions): after a reconnect, every
   subscription is restored and every book resynced;
3. each text frame goes to ``feed.on_message(text, recv_ts)``;
4. Binance-style books ask for a REST snapshot with ``FetchSnapshot``; the collector
   GETs it and hands the body to ``feed.on_snapshot(symbol, body, recv_ts)``;
5. after a reconnect, or a jump in trade ids, ``FetchTrades`` asks for the REST
   trade history; its body goes to ``feed.on_trades(symbol, body, recv_ts)``.
   Live trades of that symbol wait until the recovered ones are out, and every
   trade id goes out once; what the history cannot cover is a ``Gap`` event.

Each call returns a list of outputs, in order: events for the dispatcher, frames
to ``Send``, snapshots to fetch, and ``Malformed`` notes for the log. The rules:

- A call never raises on bad exchange input. A frame that cannot be parsed is
  counted in ``stats.malformed`` and reported as ``Malformed``; where it belonged
  to a book, that book is resynced.
- A book is only published whole: while it resyncs, no ``BookUpdate`` of it goes
  out, and the new state goes out as one ``BookSnapshot``; clients keep the last
  good book until then.
- A ``BookUpdate`` is a complete delta: levels the exchange drops implicitly (a
  depth limit) are sent as explicit size-``"0"`` removals, so any consumer that
  applies the updates holds the same book.
- ``FeedState`` events announce every book state change (``resyncing``, ``synced``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    pass


@attrs.frozen
class Send:
    """A text frame to send on the exchange connection (subscribe, resubscribe)."""

    text: str


@attrs.frozen
class FetchSnapshot:
    """GET ``target`` (path and query) on the exchange's REST base URL and hand the
    body to ``on_snapshot(symbol, body, recv_ts)``."""

    symbol: str
    target: str


@attrs.frozen
class FetchTrades:
    """GET ``target`` (the exchange's REST trade history) and hand the body to
    ``on_trades(symbol, body, recv_ts)``: trades missed while disconnected, or
    behind a gap in trade ids, are recovered and delivered before the live ones."""

    symbol: str
    target: str


@attrs.frozen
class Malformed:
    """A frame the protocol could not use: why, and the frame (cut to 200 chars)."""

    reason: str
    text: str


Output = "Event | Send | FetchSnapshot | Malformed"


@attrs.define
class FeedStats:
    """Counters of one feed, all monotonically increasing (Prometheus counters).

    ``messages``: frames received; ``malformed``: frames skipped as unusable;
    ``trades``, ``tickers``, ``book_updates``, ``snapshots``: events produced;
    ``resyncs``: books that were found broken and rebuilt; ``gaps``: sequence gaps
    detected; ``checksum_ok`` / ``checksum_mismatch``: verified checksums;
    ``duplicates`` / ``out_of_order``: repeated or decreasing sequence numbers.
    """

    messages: int = 0
    malformed: int = 0
    trades: int = 0
    tickers: int = 0
    book_updates: int = 0
    snapshots: int = 0
    resyncs: int = 0
    gaps: int = 0
    checksum_ok: int = 0
    checksum_mismatch: int = 0
    duplicates: int = 0
    out_of_order: int = 0


def malformed(stats: FeedStats, reason: str, text: str) -> Malformed:
    """Count a malformed frame and describe it for the log."""
    stats.malformed += 1
    return Malformed(reason=reason, text=text[:200])


def normalize_symbol(base: str, quote: str) -> str:
    """``BASE-QUOTE`` in upper case: the one symbol form tickwire uses."""
    return f"{base.upper()}-{quote.upper()}"
