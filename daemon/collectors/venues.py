"""The native exchanges: their public URLs, market metadata and protocol classes.

The one table that ties an exchange id to its sans-IO protocol module.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from daemon.config import ExchangeConfig
from daemon.exchanges.base import ExchangeFeed


@attrs.frozen
class Venue:
    """How to reach one native exchange.

    ``rest_url`` / ``ws_url``: public base URLs (config may override them);
    ``markets_target``: REST path of the market metadata; ``parse_markets``: body ->
    ``{native id: BASE-QUOTE}``; ``make_feed(config, markets)``: the protocol object.
    """

    exchange: str
    rest_url: str
    ws_url: str
    markets_target: str
    parse_markets: Callable[[str], dict[str, str]]
    make_feed: Callable[[ExchangeConfig, dict[str, str]], ExchangeFeed]


def _binance(exchange: str, rest_url: str, ws_url: str) -> Venue:
    from daemon.exchanges import binance

    return Venue(
        exchange=exchange,
        rest_url=rest_url,
        ws_url=ws_url,
        markets_target=binance.MARKETS_TARGET,
        parse_markets=binance.parse_markets,
        make_feed=lambda cfg, markets: binance.BinanceFeed(
            cfg.symbols, cfg.channels, markets, exchange=exchange
        ),
    )


def _coinbase() -> Venue:
    from daemon.exchanges import coinbase

    return Venue(
        exchange="coinbase",
        rest_url="https://api.exchange.coinbase.com",
        ws_url="wss://ws-feed.exchange.coinbase.com",
        markets_target=coinbase.MARKETS_TARGET,
        parse_markets=coinbase.parse_markets,
        # level2_batch: the public form of level2 (level2 itself now needs an
        # authenticated connection); the same snapshot and l2update messages
        make_feed=lambda cfg, markets: coinbase.CoinbaseFeed(
            cfg.symbols, cfg.channels, markets, book_channel="level2_batch"
        ),
    )


def _kraken() -> Venue:
    from daemon.exchanges import kraken

    return Venue(
        exchange="kraken",
        rest_url="https://api.kraken.com",
        ws_url="wss://ws.kraken.com",
        markets_target=kraken.MARKETS_TARGET,
        parse_markets=kraken.parse_markets,
        make_feed=lambda cfg, markets: kraken.KrakenFeed(
            cfg.symbols, cfg.channels, markets, depth=cfg.depth
        ),
    )


def venue(exchange: str) -> Venue:
    """The venue of a native exchange id; raises ``KeyError`` for any other."""
    if exchange == "binance":
        return _binance("binance", "https://api.binance.com", "wss://stream.binance.com:9443")
    if exchange == "binanceus":
        return _binance("binanceus", "https://api.binance.us", "wss://stream.binance.us:9443")
    if exchange == "coinbase":
        return _coinbase()
    if exchange == "kraken":
        return _kraken()
    raise KeyError(exchange)
