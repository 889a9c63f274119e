"""Kraken WebSocket v1 as the emulator plays it, and the venue that holds the state
(books, trades, tickers) its v1, v2 (``v2.py``) and REST (``rest.py``) sides serve.

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
6. REST: ``rest.py``. 7-8. WebSocket v2: ``v2.py`` (a connection whose path ends
   in ``/v2``; ``deliver`` and ``greeting`` hand it the v2 forms).
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
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

import orjson

from daemon.replay.capture import Capture, Received
from daemon.replay.tape import loop_period
from daemon.replay.venues.kraken.common import (
    ASSET_PAIRS,
    CHANNELS,
    CHECKSUM_LEVELS,
    DEFAULT_DEPTH,
    SYSTEM_STATUS,
    Book,
    PairNames,
    RecordedTrade,
    checksum,
    dumps,
    is_data,
    loads,
)
from daemon.replay.venues.kraken.rest import KrakenRest
from daemon.replay.venues.kraken.v2 import V2Dialect, is_v2


def _error(message: str) -> str:
    return dumps({"event": "error", "errorMessage": message})


class KrakenVenue:
    """Emulated Kraken over the given captures (see the module docstring).

    After construction: ``pairs`` (by wsname), ``recorded_depth``; as the tape plays:
    ``books`` (by wsname, from the pair's recorded snapshot on), ``trades``.
    """

    exchange = "kraken"

    def __init__(self, captures: list[Capture]) -> None:
        self.static: dict[str, bytes] = {}
        self.pairs: dict[str, PairNames] = {}
        self.names: dict[str, str] = {}  # REST name, altname or wsname -> wsname
        self._recorded: dict[tuple[str, str], dict[str, Any]] = {}  # (name, pair) -> status
        self.system_status: dict[str, Any] | None = None  # the first one recorded
        self._connection_ids = itertools.count()
        depths: list[int] = []
        fallback: dict[tuple[str, str], dict[str, Any]] = {}
        for capture in captures:
            for response in capture.rest:
                path = urlsplit(response.url).path
                self.static.setdefault(path, response.body.encode())
            for conn in capture.connections:
                for _, text in conn.sent:
                    request = loads(text)
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
        self.trades: dict[str, list[RecordedTrade]] = {}
        self.tickers: dict[str, str] = {}  # pair -> latest ticker frame played
        self.v2 = V2Dialect(self)  # rules 7-8
        self._rest = KrakenRest(self)  # rule 6
        # looping (rule 9), from prepare_loop
        self._once: set[Received] = set()  # recorded frames later passes leave out
        self._period = Decimal(0)

    def _learn(self, text: str, fallback: dict[tuple[str, str], dict[str, Any]]) -> None:
        """Recorded channelIDs from ``subscriptionStatus`` frames (else from data)."""
        message = loads(text)
        if isinstance(message, dict):
            event = message.get("event")
            if event == "systemStatus" and self.system_status is None:
                self.system_status = message
            elif event == "subscriptionStatus" and message.get("status") == "subscribed":
                name = (message.get("subscription") or {}).get("name")
                if isinstance(name, str) and isinstance(message.get("pair"), str):
                    message.pop("reqid", None)  # the recorder's; replies echo the client's
                    self._recorded.setdefault((name, message["pair"]), message)
        elif is_data(message):
            channel_name, pair = message[-2], message[-1]
            name, _, depth = channel_name.partition("-")
            sub = {"name": name, **({"depth": int(depth)} if name == "book" and depth else {})}
            fallback.setdefault((name, pair), {
                "channelID": message[0], "channelName": channel_name, "event": "subscriptionStatus",
                "pair": pair, "status": "subscribed", "subscription": sub,
            })

    def _load_pairs(self, body: bytes) -> None:
        doc = loads(body)
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
                self.names.setdefault(alias, wsname)

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
            request = loads(text)
            if not isinstance(request, dict) or request.get("event") != "subscribe":
                continue
            name = (request.get("subscription") or {}).get("name")
            channel = CHANNELS.get(name) if isinstance(name, str) else None
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

    def greeting(self, path: str = "/") -> list[str]:
        """What Kraken sends first on every new connection on ``path``: the recorded
        ``systemStatus`` with a connectionID of its own; on a v2 path, v2's
        ``status`` update instead."""
        if is_v2(path):
            return self.v2.greeting()
        status = dict(self.system_status or SYSTEM_STATUS)
        number = int(status.get("connectionID", 0)) + self.next_connection_id()
        status["connectionID"] = number % 2**64  # Kraken's ids are unsigned 64-bit
        return [dumps(status)]

    def next_connection_id(self) -> int:
        """A number to add to the recorded connectionID: 0, 1, 2, ..."""
        return next(self._connection_ids)

    def on_client_message(self, keys: set[str], text: str) -> list[str]:
        """Answer a client frame; ``subscribe`` / ``unsubscribe`` change ``keys``."""
        request = loads(text)
        if isinstance(request, dict) and "method" in request:
            return self.v2.request(keys, request)
        if not isinstance(request, dict):
            return [_error("Malformed request")]
        reqid = request.get("reqid")
        if reqid is not None and (isinstance(reqid, bool) or not isinstance(reqid, int)):
            return [_error("Malformed request: reqid must be an integer")]
        echo = {} if reqid is None else {"reqid": reqid}
        event = request.get("event")
        if event == "ping":
            return [dumps({"event": "pong", **echo})]
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
            refusal = self.refusal(event, name, pair, sub)
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
                statuses.append(dumps({**recorded, "status": "unsubscribed", **echo}))
                continue
            if key in keys:
                statuses.append(self._status_error(pair, sub, "Already subscribed", echo))
                continue
            keys.update({key, "heartbeat"})
            statuses.append(dumps({**recorded, "status": "subscribed", **echo}))
            if name == "book":
                if pair in self.books:
                    snapshots.append(self.snapshot_frame(pair))
                else:
                    keys.add(f"book-snapshot:{pair}")  # the tape's snapshot is yet to come
            elif name == "ticker" and pair in self.tickers:
                snapshots.append(self.tickers[pair])
        return statuses + snapshots

    def refusal(self, event: str, name: str, pair: str, sub: dict[str, Any]) -> str | None:
        """Why Kraken (as recorded) would refuse ``name`` for ``pair``, or ``None``."""
        if not any(n == name for n, _ in self._recorded):
            return "Subscription name invalid"
        if (name, pair) not in self._recorded:
            return "Currency pair not supported"
        depth = sub.get("depth", DEFAULT_DEPTH)
        if event == "subscribe" and name == "book" and depth != self.recorded_depth:
            return "Subscription depth not supported"
        return None

    def _status_error(
        self, pair: str, sub: dict[str, Any], message: str, echo: dict[str, Any]
    ) -> str:
        return dumps({
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

    # -- v1 or v2, by the connection's path (rules 7-8: v2.py) ---------------------------

    def greeting_for(self, path: str) -> list[str]:
        """What a new connection on ``path`` gets first (``greeting``)."""
        return self.greeting(path)

    def deliver(self, path: str, keys: set[str], key: str, text: str) -> str | None:
        """The text a connection on ``path`` with ``keys`` gets of the frame routed
        to ``key`` (``None``: nothing): the frame as recorded on v1, its v2
        translation on v2."""
        if key not in keys:
            return None
        if not is_v2(path):
            return text
        return self.v2.text(key, text)

    def route(self, frame: Received) -> str | None:
        """Advance the venue by one tape frame; return its routing key (module
        docstring, rule 4). A frame the venue cannot read goes to nobody."""
        self.v2.next_frame()
        message = loads(frame.text)
        if isinstance(message, dict):
            return "heartbeat" if message.get("event") == "heartbeat" else None
        if not is_data(message):
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
                self.tickers[pair] = frame.text
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            pass  # recorded garbage is still delivered; the venue keeps its last state
        return f"{name}:{pair}"

    def _on_book(self, pair: str, payload: list[Any]) -> str:
        first = payload[0] if payload and isinstance(payload[0], dict) else {}
        if "as" in first or "bs" in first:
            book = Book(self.recorded_depth)
            book.apply(first.get("as", []), first.get("bs", []))
            self.books[pair] = book
            return f"book-snapshot:{pair}"
        current = self.books.get(pair)
        if current is not None:
            asks = [lv for part in payload for lv in part.get("a", [])]
            bids = [lv for part in payload for lv in part.get("b", [])]
            current.apply(asks, bids)
        return f"book:{pair}"

    def _on_trades(self, pair: str, payload: list[Any]) -> None:
        trades = self.trades.setdefault(pair, [])
        for entry in payload[0]:
            price, volume, time, side, ordertype, misc = entry[:6]
            Decimal(time)  # a time that is not a number would break the REST answer
            trades.append(RecordedTrade(price=price, volume=volume, time=time, side=side,
                                        ordertype=ordertype, misc=misc, id=len(trades) + 1))

    def corrupt_checksum(self, text: str) -> str:
        """``text`` with a wrong book checksum (``"c"``); other frames unchanged."""
        message = loads(text)
        if not is_data(message):
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
            message = loads(frame.text)
            if isinstance(message, dict):
                if message.get("event") in ("systemStatus", "subscriptionStatus"):
                    self._once.add(frame)
                continue
            if not is_data(message):
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
        message = loads(frame.text)
        if not is_data(message):
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

    def _back_to_snapshot(self, message: list[Any], moved: Decimal, ts: float) -> list[str]:
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
            changes += [[level[0], level[1], _moved(target.times[level[0]], moved)]
                        for price, level in want.items() if have.get(price) != level]
            if changes:
                parts[key] = changes
        if not parts:
            return []
        asks, bids = target.levels(CHECKSUM_LEVELS)
        crc = str(checksum(asks, bids))
        body = [{"a": parts["a"]}, {"b": parts["b"], "c": crc}] if len(parts) == 2 else [
            {**parts, "c": crc}
        ]
        return [orjson.dumps([message[0], *body, message[-2], pair]).decode()]

    # -- REST (rest.py) -----------------------------------------------------------------

    def rest(self, target: str) -> tuple[int, bytes]:
        """Answer a REST GET of ``target`` (path and query)."""
        return self._rest.answer(target)


def _moved(time: str, by: Decimal) -> str:
    """A decimal time string moved by ``by`` seconds, its fraction digits kept."""
    return str(Decimal(time) + by)

