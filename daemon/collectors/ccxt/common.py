"""What the ccxt collectors share (``poll`` over ccxt's REST API, ``watch`` over
ccxt.pro): symbols, page sizes, tickers and book levels as decimal strings, the
exchange object with spot markets only, and the check of the configured markets.
ccxt is imported only by ``make_exchange``.

Decimal strings: ccxt turns prices and sizes into floats; ``daemon.trades.decimal_text``
(the one place, shared with the trade tracker) takes a value as the exchange sent
it from the raw answer (``info``) when a raw string there parses to the same float,
else writes the float in plain positional notation from its shortest ``repr``
(``6.37e-06`` -> ``"0.00000637"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from daemon.events import Ticker
from daemon.trades import decimal_text

#: ccxt's per-request timeout (ms): a worker thread never outlives it by much.
TIMEOUT_MS = 10_000
#: Trades asked per ``fetch_trades`` call; exchanges whose maximum is known.
TRADES_LIMIT = 100
TRADES_LIMITS = {"binance": 1000, "binanceus": 1000}

# Raw-answer keys that may hold a value as the exchange sent it, most specific first.
BID_KEYS = ("bidPrice", "bid", "best_bid", "bidPx", "b")
BID_SIZE_KEYS = ("bidQty", "bidSize", "bid_size", "bidSz", "bidVolume", "best_bid_size", "B")
ASK_KEYS = ("askPrice", "ask", "best_ask", "askPx", "a")
ASK_SIZE_KEYS = ("askQty", "askSize", "ask_size", "askSz", "askVolume", "best_ask_size", "A")


def ccxt_symbol(symbol: str) -> str:
    """``BASE-QUOTE`` -> ccxt's unified spot symbol ``BASE/QUOTE``."""
    base, _, quote = symbol.partition("-")
    return f"{base}/{quote}"


def trades_limit(exchange_id: str) -> int:
    """Trades to ask per ``fetch_trades`` call of ccxt's ``exchange_id``."""
    return TRADES_LIMITS.get(exchange_id, TRADES_LIMIT)


def level_text(value: float) -> str:
    """A ccxt float as a decimal string (``decimal_text`` without a raw answer);
    raises ``ValueError`` for a non-finite value."""
    text = decimal_text(None, (), value)
    if text is None:
        raise ValueError(f"not a finite number: {value!r}")
    return text


def ticker_event(
    exchange: str, symbol: str, ticker: Mapping[str, Any], recv_ts: float
) -> Ticker | None:
    """A ``Ticker`` from a ccxt ticker (``fetch_ticker`` / ``fetch_bids_asks``), or
    ``None`` when it lacks a side or a size (ccxt gives ``None`` for an empty side)."""
    info = ticker.get("info")
    bid = decimal_text(info, BID_KEYS, ticker.get("bid"))
    bid_size = decimal_text(info, BID_SIZE_KEYS, ticker.get("bidVolume"))
    ask = decimal_text(info, ASK_KEYS, ticker.get("ask"))
    ask_size = decimal_text(info, ASK_SIZE_KEYS, ticker.get("askVolume"))
    if bid is None or bid_size is None or ask is None or ask_size is None:
        return None
    if not ticker.get("bid") or not ticker.get("ask"):
        return None
    stamp = ticker.get("timestamp")
    return Ticker(
        exchange=exchange, symbol=symbol, ts=stamp / 1000 if stamp else recv_ts, recv_ts=recv_ts,
        bid=bid, bid_size=bid_size, ask=ask, ask_size=ask_size,
    )


def watch_ticker_event(exchange: str, symbol: str, ticker: Mapping[str, Any],
                       recv_ts: float) -> Ticker | None:
    """A ``Ticker`` from a ccxt.pro ticker, as the poll mode makes it
    (``ticker_event``); a ticker with both prices but no sizes (Coinbase's 2021
    ``ticker`` channel had none) has sizes ``""``, as the native collector writes
    them. ``None`` when a price is missing."""
    event = ticker_event(exchange, symbol, ticker, recv_ts)
    if event is not None or ticker.get("bidVolume") is not None or ticker.get(
            "askVolume") is not None:
        return event
    bare = ticker_event(exchange, symbol, {**ticker, "bidVolume": 0.0, "askVolume": 0.0},
                        recv_ts)
    return None if bare is None else attrs.evolve(bare, bid_size="", ask_size="")


def spot_only(api: Any) -> None:
    """Make ccxt's exchange object ``api`` (REST or ccxt.pro) load spot markets only:
    tickwire's ``BASE-QUOTE`` are spot symbols, and for Binance this loads
    ``/api/v3/exchangeInfo`` alone (not the futures' and options' infos)."""
    markets_option = api.options.get("fetchMarkets")
    if isinstance(markets_option, dict) and "types" in markets_option:
        markets_option["types"] = ["spot"]
    elif isinstance(markets_option, list) and "spot" in markets_option:
        api.options["fetchMarkets"] = ["spot"]


def check_markets(exchange: str, markets: Mapping[str, str], listed: Iterable[str]) -> None:
    """Raise ``ValueError`` naming each ``BASE-QUOTE`` of ``markets`` (-> ccxt symbol)
    whose ccxt symbol is not ``listed`` (ccxt's loaded markets): a configuration
    error, which the supervisor reports (it is not retried as a network fault)."""
    known = set(listed)
    missing = [symbol for symbol, market in markets.items() if market not in known]
    if missing:
        raise ValueError(f"{exchange} lists no market {', '.join(missing)}")


def make_exchange(exchange_id: str, rest_url: str = "") -> Any:
    """ccxt's sync (REST) exchange object for ``exchange_id``: our timeout, ccxt's
    throttle off (the poller's is in trio), spot markets only, REST URLs rebased on
    ``rest_url`` (``overrides.override_urls``). Raises ``ValueError`` for an id ccxt
    does not know."""
    import ccxt

    from daemon.collectors.ccxt.overrides import override_urls

    if exchange_id not in ccxt.exchanges:
        raise ValueError(f"ccxt knows no exchange {exchange_id!r}")
    api = getattr(ccxt, exchange_id)({"timeout": TIMEOUT_MS, "enableRateLimit": False})
    spot_only(api)
    override_urls(api, exchange_id, rest_url)
    return api
