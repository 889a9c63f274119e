"""Kraken WebSocket v2 as the venue plays it: translated from the v1 recording.

   ``.../ticker``, ``.../status``, ``.../heartbeat``, ``.../ping``): a connection
   whose path ends in ``/v2`` gets the v2 dialect, *translated from the v1
   recording* (rule 8). Requests are told apart by their shape: v2 ones carry a
   ``method`` (``subscribe`` / ``unsubscribe`` with ``params.channel`` and
   ``params.symbol``; ``ping``). A v2 subscription adds the same routing keys as
   its v1 twin (``book:XBT/CHF``...), so the tape routes one way for both.
8. The v2 translation (``deliver``, per connection; the same text for every v2
   connection of one frame):

   - symbols: v2 names pairs ``BTC/CHF`` where v1 says ``XBT/CHF`` (``XBT`` ->
     ``BTC``, ``XDG`` -> ``DOGE``, Kraken's documented v2 change);
   - numbers: v2 sends prices and quantities as JSON numbers. The venue writes
     the recorded v1 decimal strings as number literals, digits kept
     (``"0.05120"`` -> ``0.05120``), so a client that parses decimals gets the
     v1 strings back, precision included;
   - book: ``{"channel":"book","type":"snapshot"|"update","data":[{"symbol",
     "bids":[{"price","qty"}],"asks":[...],"checksum"(,"timestamp")}]}``, one
     message per recorded book frame. v2 checksums every snapshot as well as every
     update; the checksum is computed here from the venue's book after the frame,
     by the v2 rule: CRC32 of the top 10 asks (low to high) then bids (high to
     low), each price then quantity written at the pair's precision with the
     ``.`` removed and leading zeros stripped. The recorded v1 strings are
     written at that precision, so it is the v1 algorithm over the same levels
     (and equals the recorded ``c`` wherever v1 had one). ``timestamp``: the
     latest level time of the update, RFC 3339 with microseconds;
   - trade: ``{"channel":"trade","type":"update","data":[{"symbol","side","price",
     "qty","ord_type","trade_id","timestamp"}]}``, one message per recorded trade
     frame. v1 has no trade ids; ``trade_id`` is the id REST ``/0/public/Trades``
     gives the same trade (its play order within the pair, from 1), so a client
     that recovers trades from REST deduplicates them by id across both;
   - ticker: ``{"channel":"ticker","type":"snapshot"|"update","data":[{"symbol",
     "bid","bid_qty","ask","ask_qty","last","volume","vwap","low","high",
     "change","change_pct"}]}`` from the recorded v1 ticker (``*_qty``: the lot
     volume; 24-hour figures), a snapshot of the latest one on subscribe. Every
     recorded ticker frame is sent, whatever ``event_trigger`` asked (v1 had no
     such choice);
   - heartbeat ``{"channel":"heartbeat"}``; on connect the v2 ``status`` update
     instead of v1's ``systemStatus``; ``ping`` -> ``pong``; a subscription is
     acknowledged per symbol with ``{"method":"subscribe","result":{...},
     "success":true,...}`` (refusals, as in rule 3, with ``"success":false`` and
     Kraken's v2 ``error`` text), its snapshot after the acknowledgement.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import orjson

from daemon.replay.venues.kraken.common import (
    CHECKSUM_LEVELS,
    DEFAULT_DEPTH,
    SYSTEM_STATUS,
    KrakenLevel,
    checksum,
    dumps,
    is_data,
    loads,
)

if TYPE_CHECKING:
    from daemon.replay.venues.kraken.v1 import KrakenVenue


class V2Dialect:
    """The v2 side of one ``KrakenVenue`` (rules 7 and 8): the v2 greeting, the v2
    text of each tape frame (the same for every v2 connection of one frame), and
    the answers to v2 requests. It reads the venue's state (books, trades,
    tickers, recorded subscriptions) and keeps none of its own but a cache."""

    def __init__(self, venue: KrakenVenue) -> None:
        self.venue = venue
        #: v2 symbol -> wsname
        self.pairs = {v2_symbol(wsname): wsname for wsname in venue.pairs}
        self._frame: dict[str, str | None] = {}  # this frame's v2 text by routing key

    def next_frame(self) -> None:
        """A new tape frame is routed: forget the last one's translations."""
        self._frame = {}

    def greeting(self) -> list[str]:
        """v2's ``status`` update, with a connection id of its own."""
        status = self.venue.system_status or SYSTEM_STATUS
        number = (int(status.get("connectionID", 0)) + self.venue.next_connection_id()) % 2**64
        data = {"api_version": "v2", "connection_id": number, "system": "online",
                "version": "2.0.0"}
        return [dumps({"channel": "status", "data": [data], "type": "update"})]

    def text(self, key: str, text: str) -> str | None:
        """The v2 translation (rule 8) of the frame routed to ``key`` whose v1 text
        is ``text`` (``None``: it has no v2 form); made once per frame."""
        if key not in self._frame:
            try:
                self._frame[key] = self._translate(key, text)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                    InvalidOperation):
                self._frame[key] = None  # recorded garbage has no v2 form
        return self._frame[key]

    def _translate(self, key: str, text: str) -> str | None:
        if key == "heartbeat":
            return '{"channel":"heartbeat"}'
        kind, _, pair = key.partition(":")
        if kind == "book-snapshot":
            return self.book(pair, "snapshot")
        message = loads(text)
        if not is_data(message):
            return None
        payload = message[1:-2]
        if kind == "book":
            asks = [lv for part in payload for lv in part.get("a", [])]
            bids = [lv for part in payload for lv in part.get("b", [])]
            recorded = next((part["c"] for part in payload if "c" in part), None)
            return self.book(pair, "update", asks, bids, recorded)
        if kind == "trade":
            entries = payload[0]
            ids = [t.id for t in self.venue.trades.get(pair, [])[-len(entries):]]
            if len(ids) != len(entries):
                return None
            rows = [
                "{" + ",".join((
                    f'"symbol":{_quote(v2_symbol(pair))}',
                    f'"side":{_quote(_V2_SIDES[entry[3]])}',
                    f'"price":{_number(entry[0])}', f'"qty":{_number(entry[1])}',
                    f'"ord_type":{_quote(_V2_ORDER_TYPES.get(entry[4], "limit"))}',
                    f'"trade_id":{trade_id}', f'"timestamp":{_quote(rfc3339(entry[2]))}',
                )) + "}"
                for entry, trade_id in zip(entries, ids, strict=True)
            ]
            return '{"channel":"trade","type":"update","data":[' + ",".join(rows) + "]}"
        if kind == "ticker":
            return _v2_ticker(pair, payload[0], "update")
        return None

    def book(self, pair: str, kind: str, asks: list[KrakenLevel] | None = None,
             bids: list[KrakenLevel] | None = None, recorded: str | None = None) -> str:
        """A v2 book message of ``pair``: a snapshot of the venue's book, or an
        update of these v1 levels, with the checksum of the book as it now stands
        (``recorded``: the recorded v1 ``c``, which equals it unless a fault
        corrupted it)."""
        book = self.venue.books[pair]
        top_asks, top_bids = book.levels(CHECKSUM_LEVELS)
        fields = [f'"symbol":{_quote(v2_symbol(pair))}']
        if kind == "snapshot":
            asks, bids = book.levels()
        assert asks is not None and bids is not None
        fields.append('"bids":[' + ",".join(_v2_level(lv) for lv in bids) + "]")
        fields.append('"asks":[' + ",".join(_v2_level(lv) for lv in asks) + "]")
        value = int(recorded) if recorded is not None else checksum(top_asks, top_bids)
        fields.append(f'"checksum":{value}')
        if kind == "update":
            times = [Decimal(lv[2]) for lv in (*asks, *bids)]
            if times:
                fields.append(f'"timestamp":{_quote(rfc3339(str(max(times))))}')
        return ('{"channel":"book","type":"' + kind + '","data":[{' + ",".join(fields)
                + "}]}")

    def request(self, keys: set[str], request: dict[str, Any]) -> list[str]:
        """Answer a v2 request: ``subscribe`` / ``unsubscribe`` (they change
        ``keys``) and ``ping``."""
        method, req_id = request.get("method"), request.get("req_id")
        echo = {} if req_id is None else {"req_id": req_id}
        now = _now()
        stamps = {"time_in": now, "time_out": now}
        if method == "ping":
            return [dumps({"method": "pong", **echo, **stamps})]
        params = request.get("params")
        if method not in ("subscribe", "unsubscribe"):
            return [dumps({"error": f"Unsupported method: {method!r}", "method": method,
                            "success": False, **echo, **stamps})]
        if (not isinstance(params, dict) or not isinstance(params.get("channel"), str)
                or not isinstance(params.get("symbol"), list) or not params["symbol"]):
            return [dumps({"error": "EGeneral:Invalid arguments", "method": method,
                            "success": False, **echo, **stamps})]
        name, depth = params["channel"], params.get("depth", DEFAULT_DEPTH)
        event = method
        sub = {"name": name, **({"depth": depth} if name == "book" else {})}
        replies: list[str] = []
        snapshots: list[str] = []
        for symbol in dict.fromkeys(params["symbol"]):
            pair = self.pairs.get(symbol) if isinstance(symbol, str) else None

            def refuse(why: str, symbol: Any = symbol) -> None:
                replies.append(dumps({"error": f"{why} {symbol}", "method": method,
                                       "success": False, "symbol": symbol, **echo, **stamps}))

            refusal = ("Currency pair not supported" if pair is None
                       else self.venue.refusal(event, name, pair, sub))
            if refusal is not None:
                refuse(refusal)
                continue
            assert pair is not None
            key = f"{name}:{pair}"
            result = {"channel": name, "symbol": symbol}
            if event == "unsubscribe":
                if key not in keys:
                    refuse("Subscription Not Found")
                    continue
                keys.difference_update({key, f"book-snapshot:{pair}"})
                if keys <= {"heartbeat"}:
                    keys.discard("heartbeat")
                replies.append(dumps({"method": method, "result": result, "success": True,
                                       **echo, **stamps}))
                continue
            if key in keys:
                refuse("Already subscribed")
                continue
            keys.update({key, "heartbeat"})
            if name == "book":
                result.update(depth=depth, snapshot=True)
                if pair in self.venue.books:
                    snapshots.append(self.book(pair, "snapshot"))
                else:
                    keys.add(f"book-snapshot:{pair}")  # the tape's snapshot is yet to come
            elif name == "ticker":
                result.update(event_trigger=params.get("event_trigger", "trades"),
                              snapshot=True)
                latest = loads(self.venue.tickers[pair]) if pair in self.venue.tickers else None
                if latest is not None and is_data(latest):
                    snapshots.append(_v2_ticker(pair, latest[1], "snapshot"))
            elif name == "trade":
                result.update(snapshot=False)
            replies.append(dumps({"method": method, "result": result, "success": True,
                                   **echo, **stamps}))
        return replies + snapshots


#: Asset names v1 uses where v2 uses the usual ticker.
_V2_ASSETS = {"XBT": "BTC", "XDG": "DOGE"}
_V2_SIDES = {"b": "buy", "s": "sell"}
_V2_ORDER_TYPES = {"l": "limit", "m": "market"}
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def is_v2(path: str) -> bool:
    """Whether a connection on ``path`` speaks v2 (``/v2``, or
    ``/ws.kraken.com/v2`` with the original host kept, as ccxt's URLs are)."""
    return path.split("?")[0].rstrip("/").endswith("/v2")


def v2_symbol(wsname: str) -> str:
    """v2's name of a v1 ``wsname``: ``XBT/CHF`` -> ``BTC/CHF``."""
    return "/".join(_V2_ASSETS.get(part, part) for part in wsname.split("/"))


def rfc3339(time: str) -> str:
    """A v1 time (epoch seconds as a decimal string, ``"1618678134.560619"``) as
    v2 writes times: ``2021-04-17T16:48:54.560619Z`` (microseconds)."""
    seconds, _, fraction = time.partition(".")
    if not seconds.isdigit() or (fraction and not fraction.isdigit()):
        raise ValueError(f"not a v1 time: {time!r}")
    when = datetime.fromtimestamp(int(seconds), UTC)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{(fraction + '000000')[:6]}Z"


def _number(text: Any) -> str:
    """A v1 decimal string as a JSON number literal, digits kept; ``ValueError``
    for anything else."""
    if not isinstance(text, str) or not _NUMBER.fullmatch(text):
        raise ValueError(f"not a decimal: {text!r}")
    return text


def _quote(text: str) -> str:
    return orjson.dumps(text).decode()


def _v2_level(level: KrakenLevel) -> str:
    return f'{{"price":{_number(level[0])},"qty":{_number(level[1])}}}'


def _v2_ticker(pair: str, ticker: dict[str, Any], kind: str) -> str:
    """A v2 ticker message from a v1 ticker payload (``a``/``b``: ``[price,
    wholeLotVolume, lotVolume]``; ``c``: last trade; 24-hour ``v``, ``p``, ``l``,
    ``h``, ``o``)."""
    last, opened = Decimal(ticker["c"][0]), Decimal(ticker["o"][1])
    change = last - opened
    pct = (change / opened * 100).quantize(Decimal("0.01")) if opened else Decimal(0)
    fields = (
        f'"symbol":{_quote(v2_symbol(pair))}',
        f'"bid":{_number(ticker["b"][0])}', f'"bid_qty":{_number(ticker["b"][2])}',
        f'"ask":{_number(ticker["a"][0])}', f'"ask_qty":{_number(ticker["a"][2])}',
        f'"last":{_number(ticker["c"][0])}', f'"volume":{_number(ticker["v"][1])}',
        f'"vwap":{_number(ticker["p"][1])}', f'"low":{_number(ticker["l"][1])}',
        f'"high":{_number(ticker["h"][1])}', f'"change":{format(change, "f")}',
        f'"change_pct":{format(pct, "f")}',
    )
    return '{"channel":"ticker","type":"' + kind + '","data":[{' + ",".join(fields) + "}]}"


def _now() -> str:
    """The time now as v2 writes ``time_in`` / ``time_out``."""
    return f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%S.%f}Z"
