"""Kraken's REST API as the venue plays it (v1 and v2 clients alike).

6. REST: ``/0/public/AssetPairs`` as recorded (``?pair=`` filters it);
   ``/0/public/Assets`` derived from the recorded pairs (ccxt's ``load_markets``
   asks for it: each pair's ``base`` and ``quote`` with the ``altname`` its
   ``wsname`` gives, ``lot_decimals`` as the base's decimals);
   ``/0/public/Trades?pair=X&since=T`` from the trades the tape has played, for
   recovery after a reconnect (ids are the play order within the pair, from 1);
   ``/0/public/Depth?pair=X&count=N`` from the current book (``503
   EService:Unavailable`` before the pair's recorded snapshot has played). Any
   other path is ``404 {"error":["EGeneral:Unknown method"]}``; request errors are
   Kraken's ``EQuery:``/``EGeneral:`` messages in a 200 answer, as Kraken sends them.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import orjson

from daemon.replay.venues.kraken.common import (
    ASSET_PAIRS,
    ASSETS,
    DEPTH,
    MAX_DEPTH,
    MAX_TRADES,
    TRADES,
)

if TYPE_CHECKING:
    from daemon.replay.venues.kraken.v1 import KrakenVenue

_UNKNOWN_METHOD = (404, b'{"error":["EGeneral:Unknown method"]}')
_UNKNOWN_PAIR = (200, b'{"error":["EQuery:Unknown asset pair"]}')


class KrakenRest:
    """The REST answers of one ``KrakenVenue``, from its recorded answers and the
    state the tape has built (books, trades)."""

    def __init__(self, venue: KrakenVenue) -> None:
        self.venue = venue

    def answer(self, target: str) -> tuple[int, bytes]:
        """Answer a REST GET of ``target`` (path and query)."""
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == TRADES:
            return self._rest_trades(query)
        if parts.path == DEPTH:
            return self._rest_depth(query)
        if parts.path == ASSETS and ASSET_PAIRS in self.venue.static:
            return 200, self._assets()
        body = self.venue.static.get(parts.path)
        if body is None:
            return _UNKNOWN_METHOD
        if parts.path == ASSET_PAIRS and "pair" in query:
            return self._rest_asset_pairs(body, query["pair"])
        return 200, body

    def _assets(self) -> bytes:
        """``/0/public/Assets`` from the recorded AssetPairs (rule 6)."""
        result = orjson.loads(self.venue.static[ASSET_PAIRS]).get("result") or {}
        assets: dict[str, dict[str, Any]] = {}
        for pair in result.values():
            wsname = pair.get("wsname") if isinstance(pair, dict) else None
            if not isinstance(wsname, str) or wsname.count("/") != 1:
                continue
            names = wsname.split("/")
            decimals = (pair.get("lot_decimals", 8), pair.get("cost_decimals",
                                                              pair.get("pair_decimals", 8)))
            for asset, altname, places in zip((pair.get("base"), pair.get("quote")), names,
                                              decimals, strict=True):
                if isinstance(asset, str) and asset not in assets:
                    assets[asset] = {"aclass": "currency", "altname": altname,
                                     "decimals": places, "display_decimals": places,
                                     "status": "enabled"}
        return orjson.dumps({"error": [], "result": assets})

    def _rest_asset_pairs(self, body: bytes, wanted: str) -> tuple[int, bytes]:
        result = orjson.loads(body)["result"]
        names = [self.venue.names.get(name) for name in wanted.split(",")]
        known = [name for name in names if name is not None]
        if len(known) != len(names):
            return _UNKNOWN_PAIR
        chosen = {self.venue.pairs[w].rest: result[self.venue.pairs[w].rest] for w in known}
        return 200, orjson.dumps({"error": [], "result": chosen})

    def _rest_trades(self, query: dict[str, str]) -> tuple[int, bytes]:
        wsname = self.venue.names.get(query.get("pair", ""))
        if wsname is None:
            return _UNKNOWN_PAIR
        try:
            since = _since_ns(query["since"]) if "since" in query else None
            count = int(query.get("count", MAX_TRADES))
        except (ValueError, InvalidOperation):
            return 200, b'{"error":["EGeneral:Invalid arguments"]}'
        count = max(1, min(count, MAX_TRADES))
        trades = self.venue.trades.get(wsname, [])
        if since is None:
            chosen = trades[-count:]
        else:
            chosen = [t for t in trades if t.time_ns > since][:count]
        last = chosen[-1].time_ns if chosen else (since or 0)
        rows = [
            [t.price, t.volume, float(t.time), t.side, t.ordertype, t.misc, t.id] for t in chosen
        ]
        result = {self.venue.pairs[wsname].rest: rows, "last": str(last)}
        return 200, orjson.dumps({"error": [], "result": result})

    def _rest_depth(self, query: dict[str, str]) -> tuple[int, bytes]:
        wsname = self.venue.names.get(query.get("pair", ""))
        if wsname is None:
            return _UNKNOWN_PAIR
        book = self.venue.books.get(wsname)
        if book is None:
            return 503, b'{"error":["EService:Unavailable"]}'  # its snapshot has not played
        try:
            count = max(1, min(int(query.get("count", 100)), MAX_DEPTH))
        except ValueError:
            return 200, b'{"error":["EGeneral:Invalid arguments"]}'
        asks, bids = book.levels(count)

        def rows(levels: list[list[str]]) -> list[list[Any]]:
            return [[price, volume, int(Decimal(time))] for price, volume, time in levels]

        result = {self.venue.pairs[wsname].rest: {"asks": rows(asks), "bids": rows(bids)}}
        return 200, orjson.dumps({"error": [], "result": result})


def _since_ns(value: str) -> int:
    """``since`` in ns: Kraken takes ns, or seconds (a value below 10**12)."""
    number = Decimal(value)
    if not number.is_finite() or number < 0:
        raise ValueError(value)
    return int(number * 1_000_000_000) if number < 10**12 else int(number)

