"""Kraken (WebSocket v1 and REST) as the emulator plays it.

Theory of operation
-------------------
1. One venue serves every Kraken capture file as one exchange (``ws.kraken.com``
   and ``api.kraken.com``), whatever connection layout the collector picks: one
   connection for all channels or one per channel. Pairs are named by ``wsname``
   (``XBT/CHF``) on the WebSocket; REST accepts the REST name (``XXMRZUSD``), the
   ``altname`` (``XMRUSD``) or the ``wsname``, mapped through the recorded
   AssetPairs.
2. A connection starts with no routing keys: Kraken v1 subscribes by message.
   ``{"event":"subscribe","pair":[...],"subscription":{"name":N}}`` adds the key
   ``N:<pair>`` per pair (``book:XBT/CHF``, ``trade:XBT/CHF``, ``ticker:XBT/CHF``)
   and ``heartbeat``, and is answered per pair with a ``subscriptionStatus``
   carrying the channelID recorded for that (name, pair), as Kraken did (they are
   unique across the files). ``unsubscribe`` removes the key and answers
   ``status: unsubscribed``; ``ping`` gets ``pong`` (with ``reqid``). Subscribing
   to what the connection already has, or unsubscribing from what it has not, is
   an error ``subscriptionStatus`` (``Already subscribed``, ``Subscription Not
   Found``).
3. Only what was recorded is served: a pair or channel that was not recorded is
   answered with an error ``subscriptionStatus`` (Kraken's own words: ``Currency
   pair not supported``, ``Subscription name invalid``), and so is a book depth
   other than the recorded one (``Subscription depth not supported``, as Kraken
   answers an unsupported depth; Kraken's default depth is 10, so a book
   subscription without ``depth`` gets it too unless 10 was recorded). A frame that
   is not a JSON object with an ``event`` gets ``{"event":"error",...}``.
4. Each tape frame goes through ``route``, which keeps the venue's state: the books
   (the recorded snapshot, then every update, each side cut to the recorded depth
   after every message, as Kraken does), the latest ticker frame and every trade.
   A book snapshot frame is routed to ``book-snapshot:<pair>``, a key a connection
   holds only when it subscribed before the venue had that book; a connection that
   subscribes later gets, after its ``subscriptionStatus``, a snapshot built from
   the venue's current book instead. Either way a connection gets one snapshot,
   and it agrees with the updates that follow. A ticker subscription is answered
   the same way with the latest ticker frame played (Kraken sends the current
   ticker at once). ``heartbeat`` frames of every file go to every subscribed
   connection; ``systemStatus`` and ``subscriptionStatus`` frames go to nobody
   (the venue answers subscriptions itself).
5. The ``systemStatus`` greeting a real connection gets before anything else
   cannot come from ``on_client_message`` (it answers frames): ``greeting()``
   returns it for the emulator to send when a connection opens.
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
7. WebSocket v2 (``wss://ws.kraken.com/v2``, what ccxt.pro's ``kraken`` speaks;
   https://docs.kraken.com/api/docs/websocket-v2/book, ``.../trade``,
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
9. Looping (``--loop``; ``prepare_loop`` then ``shift`` per frame, pass ``k`` >= 1).
   v1 has no trade ids or sequence numbers: trades are told apart by their time
   (a collector keys them by it), so every time a frame carries (trade times,
   book level times) moves by ``k`` periods (``tape.loop_period`` over the
   recorded trade and update times: a pass's first trade is later than the last
   one's), as a decimal string with its digits kept. Books: where the recording
   has a pair's snapshot, later passes play instead one book *update* that turns
   the venue's current book into that snapshot (levels it has in excess removed
   with volume ``0.00000000``, then every level it lacks or holds at another
   volume set), with the checksum ``c`` of the result (Kraken's CRC32 over the top
   10 asks and bids, computed here), so the recorded updates that follow apply
   and check exactly as recorded. Kraken does not resend a snapshot unasked, so
   neither does a pass. Book updates recorded before their pair's snapshot (none
   on the captures) and the recorded ``systemStatus``/``subscriptionStatus``
   frames are not played again; tickers and heartbeats are, unchanged.
"""

from __future__ import annotations

import itertools
import re
import zlib
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from operator import neg
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import orjson
from sortedcontainers import SortedDict

from daemon.replay.capture import Capture, Received
from daemon.replay.tape import loop_period

ASSET_PAIRS = "/0/public/AssetPairs"
#: Not recorded: derived from the pairs (ccxt's ``load_markets`` asks for it).
ASSETS = "/0/public/Assets"
TRADES = "/0/public/Trades"
DEPTH = "/0/public/Depth"
#: Book depth Kraken v1 uses when a subscription names none.
DEFAULT_DEPTH = 10
#: Most trades (and book levels) one REST answer holds, as on Kraken.
MAX_TRADES = 1000
MAX_DEPTH = 500
#: Kraken subscription name -> tickwire channel.
CHANNELS = {"book": "book", "trade": "trades", "ticker": "ticker"}

_SORTED = orjson.OPT_SORT_KEYS  # Kraken's event frames list their keys in order
_SYSTEM_STATUS = {
    "connectionID": 1, "event": "systemStatus", "status": "online", "version": "1.8.3"
}
_UNKNOWN_METHOD = (404, b'{"error":["EGeneral:Unknown method"]}')
_UNKNOWN_PAIR = (200, b'{"error":["EQuery:Unknown asset pair"]}')


@attrs.frozen
class PairNames:
    """The names of one Kraken pair: REST key, ``altname`` and ``wsname``."""

    rest: str
    altname: str
    wsname: str


class Book:
    """One pair's book as Kraken holds it: ``[price, volume, time]`` strings by price,
    each side cut to ``depth`` after every message."""

    __slots__ = ("asks", "bids", "depth")

    def __init__(self, depth: int) -> None:
        self.asks: SortedDict = SortedDict()
        self.bids: SortedDict = SortedDict(neg)
        self.depth = depth

    def apply(self, asks: list, bids: list) -> None:
        """Apply levels in order (volume zero removes), then cut both sides.

        Raises ``ValueError`` (or ``TypeError``) on a level that is not
        ``[price, volume, time(, "r")]`` with decimal strings."""
        for side, levels in ((self.asks, asks), (self.bids, bids)):
            for level in levels:
                price, volume, time = level[0], level[1], level[2]
                try:
                    key, size = Decimal(price), Decimal(volume)
                except InvalidOperation as exc:
                    raise ValueError(f"not a decimal level: {level!r}") from exc
                if size.is_zero():
                    side.pop(key, None)
                else:
                    side[key] = [price, volume, time]
        for side in (self.asks, self.bids):
            while len(side) > self.depth:
                side.popitem(-1)

    def levels(self, count: int | None = None) -> tuple[list[list[str]], list[list[str]]]:
        """The best ``count`` (default: all) asks, ascending, and bids, descending."""
        return list(self.asks.values()[:count]), list(self.bids.values()[:count])


@attrs.frozen
class _Trade:
    price: str
    volume: str
    time: str
    side: str
    ordertype: str
    misc: str
    id: int

    @property
    def time_ns(self) -> int:
        return int(Decimal(self.time) * 1_000_000_000)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj, option=_SORTED).decode()


def _error(message: str) -> str:
    return _dumps({"event": "error", "errorMessage": message})


def _since_ns(value: str) -> int:
    """``since`` in ns: Kraken takes ns, or seconds (a value below 10**12)."""
    number = Decimal(value)
    if not number.is_finite() or number < 0:
        raise ValueError(value)
    return int(number * 1_000_000_000) if number < 10**12 else int(number)


class KrakenVenue:
    """Emulated Kraken over the given captures (see the module docstring).

    After construction: ``pairs`` (by wsname), ``recorded_depth``; as the tape plays:
    ``books`` (by wsname, from the pair's recorded snapshot on), ``trades``.
    """

    exchange = "kraken"

    def __init__(self, captures: list[Capture]) -> None:
        self.static: dict[str, bytes] = {}
        self.pairs: dict[str, PairNames] = {}
        self._names: dict[str, str] = {}  # REST name, altname or wsname -> wsname
        self._recorded: dict[tuple[str, str], dict[str, Any]] = {}  # (name, pair) -> status
        self._system_status: dict[str, Any] | None = None  # the first one recorded
        self._connection_ids = itertools.count()
        depths: list[int] = []
        fallback: dict[tuple[str, str], dict[str, Any]] = {}
        for capture in captures:
            for response in capture.rest:
                path = urlsplit(response.url).path
                self.static.setdefault(path, response.body.encode())
            for conn in capture.connections:
                for _, text in conn.sent:
                    request = _loads(text)
                    sub = request.get("subscription") if isinstance(request, dict) else None
                    if isinstance(sub, dict) and sub.get("name") == "book":
                        depths.append(int(sub.get("depth", DEFAULT_DEPTH)))
                for frame in conn.received:
                    self._learn(frame.text, fallback)
        for key, status in fallback.items():
            self._recorded.setdefault(key, status)
        self.recorded_depth: int = depths[0] if depths else DEFAULT_DEPTH
        if ASSET_PAIRS in self.static:
            self._load_pairs(self.static[ASSET_PAIRS])
        self.books: dict[str, Book] = {}
        self.trades: dict[str, list[_Trade]] = {}
        self._tickers: dict[str, str] = {}  # pair -> latest ticker frame played
        # v2 (rules 7-8): v2 symbol -> wsname; this frame's v2 text by routing key
        self._v2_pairs = {v2_symbol(wsname): wsname for wsname in self.pairs}
        self._v2_frame: dict[str, str | None] = {}
        # looping (rule 9), from prepare_loop
        self._once: set[Received] = set()  # recorded frames later passes leave out
        self._period = Decimal(0)

    def _learn(self, text: str, fallback: dict[tuple[str, str], dict[str, Any]]) -> None:
        """Recorded channelIDs from ``subscriptionStatus`` frames (else from data)."""
        message = _loads(text)
        if isinstance(message, dict):
            event = message.get("event")
            if event == "systemStatus" and self._system_status is None:
                self._system_status = message
            elif event == "subscriptionStatus" and message.get("status") == "subscribed":
                name = (message.get("subscription") or {}).get("name")
                if isinstance(name, str) and isinstance(message.get("pair"), str):
                    message.pop("reqid", None)  # the recorder's; replies echo the client's
                    self._recorded.setdefault((name, message["pair"]), message)
        elif _is_data(message):
            channel_name, pair = message[-2], message[-1]
            name, _, depth = channel_name.partition("-")
            sub = {"name": name, **({"depth": int(depth)} if name == "book" and depth else {})}
            fallback.setdefault((name, pair), {
                "channelID": message[0], "channelName": channel_name, "event": "subscriptionStatus",
                "pair": pair, "status": "subscribed", "subscription": sub,
            })

    def _load_pairs(self, body: bytes) -> None:
        doc = _loads(body)
        result = doc.get("result") if isinstance(doc, dict) else None
        if not isinstance(result, dict):
            return
        for rest_name, pair in result.items():
            wsname = pair.get("wsname") if isinstance(pair, dict) else None
            if not wsname:
                continue  # dark-pool pairs (.d) have no WebSocket name
            names = PairNames(rest=rest_name, altname=pair.get("altname", rest_name), wsname=wsname)
            self.pairs[wsname] = names
            for alias in (names.wsname, names.altname, names.rest):
                self._names.setdefault(alias, wsname)

    def subscriptions(self, captures: list[Capture]) -> tuple[list[str], list[str]]:
        """``(symbols, channels)`` the recorded connections subscribed, as tickwire
        names (``BTC-CHF``; ``book``, ``trades``, ``ticker``), channels in the order
        they were recorded subscribing (the book first on these captures)."""
        from daemon.exchanges.kraken import parse_markets

        body = self.static.get(ASSET_PAIRS)
        markets = parse_markets(body.decode()) if body else {}
        requests = sorted(
            (ts, text) for capture in captures for conn in capture.connections
            for ts, text in conn.sent
        )
        symbols: dict[str, None] = {}
        channels: dict[str, None] = {}
        for _, text in requests:
            request = _loads(text)
            if not isinstance(request, dict) or request.get("event") != "subscribe":
                continue
            channel = CHANNELS.get((request.get("subscription") or {}).get("name"))
            pairs = [markets[p] for p in request.get("pair") or () if p in markets]
            if channel and pairs:
                channels[channel] = None
                symbols.update(dict.fromkeys(pairs))
        return list(symbols), list(channels)

    def watch_keys(self, symbols: list[str], channels: list[str]) -> set[str]:
        """The routing keys a connection holds once subscribed to ``channels``
        (tickwire names) of ``symbols`` (``BASE-QUOTE``): ``"book:XBT/CHF"``..."""
        from daemon.exchanges.kraken import parse_markets

        body = self.static.get(ASSET_PAIRS)
        markets = parse_markets(body.decode()) if body else {}
        wsname = {symbol: pair for pair, symbol in markets.items() if pair in self.pairs}
        names = {tickwire: name for name, tickwire in CHANNELS.items()}
        return {f"{names[channel]}:{wsname[symbol]}" for symbol in symbols
                for channel in channels if channel in names and symbol in wsname}

    # -- WebSocket ------------------------------------------------------------------

    def open(self, path: str) -> set[str]:
        """No keys: a Kraken v1 connection subscribes by message, whatever its path."""
        return set()

    def greeting(self) -> list[str]:
        """What Kraken sends first on every new connection: the recorded
        ``systemStatus`` with a connectionID of its own."""
        status = dict(self._system_status or _SYSTEM_STATUS)
        number = int(status.get("connectionID", 0)) + next(self._connection_ids)
        status["connectionID"] = number % 2**64  # Kraken's ids are unsigned 64-bit
        return [_dumps(status)]

    def on_client_message(self, keys: set[str], text: str) -> list[str]:
        """Answer a client frame; ``subscribe`` / ``unsubscribe`` change ``keys``."""
        request = _loads(text)
        if isinstance(request, dict) and "method" in request:
            return self._v2_request(keys, request)
        if not isinstance(request, dict):
            return [_error("Malformed request")]
        reqid = request.get("reqid")
        if reqid is not None and (isinstance(reqid, bool) or not isinstance(reqid, int)):
            return [_error("Malformed request: reqid must be an integer")]
        echo = {} if reqid is None else {"reqid": reqid}
        event = request.get("event")
        if event == "ping":
            return [_dumps({"event": "pong", **echo})]
        if event in ("subscribe", "unsubscribe"):
            return self._subscription(keys, event, request, echo)
        if event is None:
            return [_error("Malformed request: no event")]
        return [_error("Unsupported event")]

    def _subscription(
        self, keys: set[str], event: str, request: dict[str, Any], echo: dict[str, Any]
    ) -> list[str]:
        sub, pairs = request.get("subscription"), request.get("pair")
        if not isinstance(sub, dict) or not isinstance(sub.get("name"), str):
            return [_error("Malformed request: subscription must name a channel")]
        if not isinstance(pairs, list) or not pairs or not all(isinstance(p, str) for p in pairs):
            return [_error("Malformed request: pair must be a non-empty list of pairs")]
        name = sub["name"]
        statuses: list[str] = []
        snapshots: list[str] = []
        for pair in dict.fromkeys(pairs):
            refusal = self._refusal(event, name, pair, sub)
            if refusal is not None:
                statuses.append(self._status_error(pair, sub, refusal, echo))
                continue
            key = f"{name}:{pair}"
            recorded = self._recorded[(name, pair)]
            if event == "unsubscribe":
                if key not in keys:
                    statuses.append(self._status_error(pair, sub, "Subscription Not Found", echo))
                    continue
                keys.difference_update({key, f"book-snapshot:{pair}"})
                if keys <= {"heartbeat"}:
                    keys.discard("heartbeat")
                statuses.append(_dumps({**recorded, "status": "unsubscribed", **echo}))
                continue
            if key in keys:
                statuses.append(self._status_error(pair, sub, "Already subscribed", echo))
                continue
            keys.update({key, "heartbeat"})
            statuses.append(_dumps({**recorded, "status": "subscribed", **echo}))
            if name == "book":
                if pair in self.books:
                    snapshots.append(self.snapshot_frame(pair))
                else:
                    keys.add(f"book-snapshot:{pair}")  # the tape's snapshot is yet to come
            elif name == "ticker" and pair in self._tickers:
                snapshots.append(self._tickers[pair])
        return statuses + snapshots

    def _refusal(self, event: str, name: str, pair: str, sub: dict[str, Any]) -> str | None:
        """Why Kraken (as recorded) would refuse ``name`` for ``pair``, or ``None``."""
        if not any(n == name for n, _ in self._recorded):
            return "Subscription name invalid"
        if (name, pair) not in self._recorded:
            return "Currency pair not supported"
        depth = sub.get("depth", DEFAULT_DEPTH)
        if event == "subscribe" and name == "book" and depth != self.recorded_depth:
            return "Subscription depth not supported"
        return None

    def _status_error(self, pair: str, sub: dict[str, Any], message: str, echo: dict) -> str:
        return _dumps({
            "errorMessage": message, "event": "subscriptionStatus", "pair": pair,
            "status": "error", "subscription": sub, **echo,
        })

    def snapshot_frame(self, pair: str) -> str:
        """The book snapshot frame of ``pair`` as Kraken would send it now (its
        recorded channelID and channel name); ``KeyError`` before the recorded
        snapshot has played."""
        book = self.books[pair]
        recorded = self._recorded[("book", pair)]
        asks, bids = book.levels()
        return orjson.dumps(
            [recorded["channelID"], {"as": asks, "bs": bids}, recorded["channelName"], pair]
        ).decode()

    # -- WebSocket v2 (rules 7 and 8) -------------------------------------------------

    def greeting_for(self, path: str) -> list[str]:
        """What a new connection on ``path`` gets first: v2's ``status`` update on a
        v2 path, else v1's ``systemStatus`` (``greeting``)."""
        if not is_v2(path):
            return self.greeting()
        status = self._system_status or _SYSTEM_STATUS
        number = (int(status.get("connectionID", 0)) + next(self._connection_ids)) % 2**64
        data = {"api_version": "v2", "connection_id": number, "system": "online",
                "version": "2.0.0"}
        return [_dumps({"channel": "status", "data": [data], "type": "update"})]

    def deliver(self, path: str, keys: set[str], key: str, text: str) -> str | None:
        """The text a connection on ``path`` with ``keys`` gets of the frame routed
        to ``key`` (``None``: nothing): the frame as recorded on v1, its v2
        translation (rule 8) on v2."""
        if key not in keys:
            return None
        if not is_v2(path):
            return text
        if key not in self._v2_frame:
            try:
                self._v2_frame[key] = self._v2_translate(key, text)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                    InvalidOperation):
                self._v2_frame[key] = None  # recorded garbage has no v2 form
        return self._v2_frame[key]

    def _v2_translate(self, key: str, text: str) -> str | None:
        if key == "heartbeat":
            return '{"channel":"heartbeat"}'
        kind, _, pair = key.partition(":")
        if kind == "book-snapshot":
            return self._v2_book(pair, "snapshot")
        message = _loads(text)
        if not _is_data(message):
            return None
        payload = message[1:-2]
        if kind == "book":
            asks = [lv for part in payload for lv in part.get("a", [])]
            bids = [lv for part in payload for lv in part.get("b", [])]
            recorded = next((part["c"] for part in payload if "c" in part), None)
            return self._v2_book(pair, "update", asks, bids, recorded)
        if kind == "trade":
            entries = payload[0]
            ids = [t.id for t in self.trades.get(pair, [])[-len(entries):]]
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

    def _v2_book(self, pair: str, kind: str, asks: list | None = None,
                 bids: list | None = None, checksum: str | None = None) -> str:
        """A v2 book message of ``pair``: a snapshot of the venue's book, or an
        update of these v1 levels, with the checksum of the book as it now stands
        (``checksum``: the recorded v1 ``c``, which equals it unless a fault
        corrupted it)."""
        book = self.books[pair]
        top_asks, top_bids = book.levels(_CHECKSUM_LEVELS)
        fields = [f'"symbol":{_quote(v2_symbol(pair))}']
        if kind == "snapshot":
            asks, bids = book.levels()
        assert asks is not None and bids is not None
        fields.append('"bids":[' + ",".join(_v2_level(lv) for lv in bids) + "]")
        fields.append('"asks":[' + ",".join(_v2_level(lv) for lv in asks) + "]")
        value = int(checksum) if checksum is not None else _checksum(top_asks, top_bids)
        fields.append(f'"checksum":{value}')
        if kind == "update":
            times = [Decimal(lv[2]) for lv in (*asks, *bids)]
            if times:
                fields.append(f'"timestamp":{_quote(rfc3339(str(max(times))))}')
        return ('{"channel":"book","type":"' + kind + '","data":[{' + ",".join(fields)
                + "}]}")

    def _v2_request(self, keys: set[str], request: dict[str, Any]) -> list[str]:
        """Answer a v2 request: ``subscribe`` / ``unsubscribe`` (they change
        ``keys``) and ``ping``."""
        method, req_id = request.get("method"), request.get("req_id")
        echo = {} if req_id is None else {"req_id": req_id}
        now = _now()
        stamps = {"time_in": now, "time_out": now}
        if method == "ping":
            return [_dumps({"method": "pong", **echo, **stamps})]
        params = request.get("params")
        if method not in ("subscribe", "unsubscribe"):
            return [_dumps({"error": f"Unsupported method: {method!r}", "method": method,
                            "success": False, **echo, **stamps})]
        if (not isinstance(params, dict) or not isinstance(params.get("channel"), str)
                or not isinstance(params.get("symbol"), list) or not params["symbol"]):
            return [_dumps({"error": "EGeneral:Invalid arguments", "method": method,
                            "success": False, **echo, **stamps})]
        name, depth = params["channel"], params.get("depth", DEFAULT_DEPTH)
        event = method
        sub = {"name": name, **({"depth": depth} if name == "book" else {})}
        replies: list[str] = []
        snapshots: list[str] = []
        for symbol in dict.fromkeys(params["symbol"]):
            pair = self._v2_pairs.get(symbol) if isinstance(symbol, str) else None

            def refuse(why: str, symbol: Any = symbol) -> None:
                replies.append(_dumps({"error": f"{why} {symbol}", "method": method,
                                       "success": False, "symbol": symbol, **echo, **stamps}))

            refusal = ("Currency pair not supported" if pair is None
                       else self._refusal(event, name, pair, sub))
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
                replies.append(_dumps({"method": method, "result": result, "success": True,
                                       **echo, **stamps}))
                continue
            if key in keys:
                refuse("Already subscribed")
                continue
            keys.update({key, "heartbeat"})
            if name == "book":
                result.update(depth=depth, snapshot=True)
                if pair in self.books:
                    snapshots.append(self._v2_book(pair, "snapshot"))
                else:
                    keys.add(f"book-snapshot:{pair}")  # the tape's snapshot is yet to come
            elif name == "ticker":
                result.update(event_trigger=params.get("event_trigger", "trades"),
                              snapshot=True)
                latest = _loads(self._tickers[pair]) if pair in self._tickers else None
                if _is_data(latest):
                    snapshots.append(_v2_ticker(pair, latest[1], "snapshot"))
            elif name == "trade":
                result.update(snapshot=False)
            replies.append(_dumps({"method": method, "result": result, "success": True,
                                   **echo, **stamps}))
        return replies + snapshots

    def route(self, frame: Received) -> str | None:
        """Advance the venue by one tape frame; return its routing key (module
        docstring, rule 4). A frame the venue cannot read goes to nobody."""
        self._v2_frame = {}
        message = _loads(frame.text)
        if isinstance(message, dict):
            return "heartbeat" if message.get("event") == "heartbeat" else None
        if not _is_data(message):
            return None
        name = message[-2].partition("-")[0]
        pair = message[-1]
        payload = message[1:-2]
        try:
            if name == "book":
                return self._on_book(pair, payload)
            if name == "trade":
                self._on_trades(pair, payload)
            elif name == "ticker":
                self._tickers[pair] = frame.text
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            pass  # recorded garbage is still delivered; the venue keeps its last state
        return f"{name}:{pair}"

    def _on_book(self, pair: str, payload: list) -> str:
        first = payload[0] if payload and isinstance(payload[0], dict) else {}
        if "as" in first or "bs" in first:
            book = Book(self.recorded_depth)
            book.apply(first.get("as", []), first.get("bs", []))
            self.books[pair] = book
            return f"book-snapshot:{pair}"
        book = self.books.get(pair)
        if book is not None:
            asks = [lv for part in payload for lv in part.get("a", [])]
            bids = [lv for part in payload for lv in part.get("b", [])]
            book.apply(asks, bids)
        return f"book:{pair}"

    def _on_trades(self, pair: str, payload: list) -> None:
        trades = self.trades.setdefault(pair, [])
        for entry in payload[0]:
            price, volume, time, side, ordertype, misc = entry[:6]
            Decimal(time)  # a time that is not a number would break the REST answer
            trades.append(_Trade(price=price, volume=volume, time=time, side=side,
                                 ordertype=ordertype, misc=misc, id=len(trades) + 1))

    def corrupt_checksum(self, text: str) -> str:
        """``text`` with a wrong book checksum (``"c"``); other frames unchanged."""
        message = _loads(text)
        if not _is_data(message):
            return text
        for part in message[1:-2]:
            if isinstance(part, dict) and isinstance(part.get("c"), str) and part["c"].isdigit():
                part["c"] = str((int(part["c"]) + 1) % 2**32)
                return orjson.dumps(message).decode()
        return text

    # -- looping ----------------------------------------------------------------------

    def prepare_loop(self, tape: list[Received]) -> float:
        """Learn, from the whole tape, the frames not to play again and the period of
        a pass (rule 9); return the period in seconds."""
        booked: set[str] = set()
        times: list[float] = []
        for frame in tape:
            message = _loads(frame.text)
            if isinstance(message, dict):
                if message.get("event") in ("systemStatus", "subscriptionStatus"):
                    self._once.add(frame)
                continue
            if not _is_data(message):
                continue
            name, pair, payload = message[-2].partition("-")[0], message[-1], message[1:-2]
            try:
                if name == "trade":
                    times += [float(entry[2]) for entry in payload[0]]
                elif name == "book":
                    if "as" in payload[0] or "bs" in payload[0]:
                        booked.add(pair)
                    elif pair not in booked:
                        self._once.add(frame)
                    else:
                        times += [float(lv[2]) for part in payload
                                  for lv in part.get("a", []) + part.get("b", [])]
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                pass  # recorded garbage: shifted as far as it can be
        period = loop_period(tape, times)
        self._period = Decimal(round(period * 1000)) / 1000
        return period

    def shift(self, frame: Received, pass_number: int) -> list[str]:
        """The frames pass ``pass_number`` (>= 1) plays for recorded ``frame``
        (rule 9): none, the frame with its times moved, or for a book snapshot the
        update that brings the current book back to it."""
        if frame in self._once:
            return []
        message = _loads(frame.text)
        if not _is_data(message):
            return [frame.text]
        name, payload = message[-2].partition("-")[0], message[1:-2]
        moved = self._period * pass_number
        try:
            if name == "trade":
                for entry in payload[0]:
                    entry[2] = _moved(entry[2], moved)
            elif name == "book":
                first = payload[0]
                if "as" in first or "bs" in first:
                    return self._back_to_snapshot(message, moved, frame.ts)
                for part in payload:
                    for level in part.get("a", []) + part.get("b", []):
                        level[2] = _moved(level[2], moved)
            else:
                return [frame.text]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, InvalidOperation):
            return [frame.text]  # recorded garbage is played as recorded
        return [orjson.dumps(message).decode()]

    def _back_to_snapshot(self, message: list, moved: Decimal, ts: float) -> list[str]:
        """The book update that turns the pair's current book into the recorded
        snapshot ``message`` (nothing when they are equal), with its checksum."""
        pair, snapshot = message[-1], message[1]
        target = Book(self.recorded_depth)
        target.apply(snapshot.get("as", []), snapshot.get("bs", []))
        current = self.books.get(pair) or Book(self.recorded_depth)
        removed_at = _moved(f"{ts:.6f}", moved)
        parts: dict[str, list[list[str]]] = {}
        for key, have, want in (("a", current.asks, target.asks), ("b", current.bids, target.bids)):
            changes = [[level[0], "0.00000000", removed_at]
                       for price, level in have.items() if price not in want]
            changes += [[level[0], level[1], _moved(level[2], moved)]
                        for price, level in want.items()
                        if (have.get(price) or [None, None])[:2] != level[:2]]
            if changes:
                parts[key] = changes
        if not parts:
            return []
        asks, bids = target.levels(_CHECKSUM_LEVELS)
        checksum = str(_checksum(asks, bids))
        body = [{"a": parts["a"]}, {"b": parts["b"], "c": checksum}] if len(parts) == 2 else [
            {**parts, "c": checksum}
        ]
        return [orjson.dumps([message[0], *body, message[-2], pair]).decode()]

    # -- REST -----------------------------------------------------------------------

    def rest(self, target: str) -> tuple[int, bytes]:
        """Answer a REST GET of ``target`` (path and query)."""
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == TRADES:
            return self._rest_trades(query)
        if parts.path == DEPTH:
            return self._rest_depth(query)
        if parts.path == ASSETS and ASSET_PAIRS in self.static:
            return 200, self._assets()
        body = self.static.get(parts.path)
        if body is None:
            return _UNKNOWN_METHOD
        if parts.path == ASSET_PAIRS and "pair" in query:
            return self._rest_asset_pairs(body, query["pair"])
        return 200, body

    def _assets(self) -> bytes:
        """``/0/public/Assets`` from the recorded AssetPairs (rule 6)."""
        result = orjson.loads(self.static[ASSET_PAIRS]).get("result") or {}
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
        names = [self._names.get(name) for name in wanted.split(",")]
        if None in names:
            return _UNKNOWN_PAIR
        chosen = {self.pairs[w].rest: result[self.pairs[w].rest] for w in names}
        return 200, orjson.dumps({"error": [], "result": chosen})

    def _rest_trades(self, query: dict[str, str]) -> tuple[int, bytes]:
        wsname = self._names.get(query.get("pair", ""))
        if wsname is None:
            return _UNKNOWN_PAIR
        try:
            since = _since_ns(query["since"]) if "since" in query else None
            count = int(query.get("count", MAX_TRADES))
        except (ValueError, InvalidOperation):
            return 200, b'{"error":["EGeneral:Invalid arguments"]}'
        count = max(1, min(count, MAX_TRADES))
        trades = self.trades.get(wsname, [])
        if since is None:
            chosen = trades[-count:]
        else:
            chosen = [t for t in trades if t.time_ns > since][:count]
        last = chosen[-1].time_ns if chosen else (since or 0)
        rows = [
            [t.price, t.volume, float(t.time), t.side, t.ordertype, t.misc, t.id] for t in chosen
        ]
        result = {self.pairs[wsname].rest: rows, "last": str(last)}
        return 200, orjson.dumps({"error": [], "result": result})

    def _rest_depth(self, query: dict[str, str]) -> tuple[int, bytes]:
        wsname = self._names.get(query.get("pair", ""))
        if wsname is None:
            return _UNKNOWN_PAIR
        book = self.books.get(wsname)
        if book is None:
            return 503, b'{"error":["EService:Unavailable"]}'  # its snapshot has not played
        try:
            count = max(1, min(int(query.get("count", 100)), MAX_DEPTH))
        except ValueError:
            return 200, b'{"error":["EGeneral:Invalid arguments"]}'
        asks, bids = book.levels(count)

        def rows(levels: list[list[str]]) -> list[list[Any]]:
            return [[price, volume, int(Decimal(time))] for price, volume, time in levels]

        result = {self.pairs[wsname].rest: {"asks": rows(asks), "bids": rows(bids)}}
        return 200, orjson.dumps({"error": [], "result": result})


#: Levels per side in Kraken's book checksum.
_CHECKSUM_LEVELS = 10


def _checksum(asks: list[list[str]], bids: list[list[str]]) -> int:
    """Kraken's v1 book checksum: CRC32 of the top 10 asks (ascending) then bids
    (descending), each as price then volume, dot removed, leading zeros stripped."""
    text = "".join(
        level[0].replace(".", "").lstrip("0") + level[1].replace(".", "").lstrip("0")
        for level in [*asks, *bids]
    )
    return zlib.crc32(text.encode())


def _moved(time: str, by: Decimal) -> str:
    """A decimal time string moved by ``by`` seconds, its fraction digits kept."""
    return str(Decimal(time) + by)


def _loads(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _is_data(message: Any) -> bool:
    """Whether ``message`` is a v1 data array ``[channelID, payload..., name, pair]``."""
    return (
        isinstance(message, list) and len(message) >= 4
        and isinstance(message[-2], str) and isinstance(message[-1], str)
    )


# -- v2 helpers (rule 8) --------------------------------------------------------------

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


def _v2_level(level: list) -> str:
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
