"""Coinbase Exchange as the emulator plays it (feed recorded on ``ws-feed.pro.coinbase.com``).

Sources: Coinbase Exchange WebSocket and REST docs
(https://docs.cdp.coinbase.com/exchange/docs/websocket-overview,
``/products/{product_id}/trades``, ``/products/{product_id}/book``, pagination).

Theory of operation
-------------------
1. A connection starts with no routing keys: Coinbase subscribes by message.
   ``{"type":"subscribe","product_ids":[...],"channels":[...]}`` (a channel is a
   name, or ``{"name":..., "product_ids":[...]}``) adds the keys
   ``"<channel>:<product>"`` for ``level2`` (``level2_batch`` is keyed as
   ``level2``: same messages), ``ticker``, ``matches`` and ``heartbeat``;
   ``unsubscribe`` removes them (a channel without products: all its products).
   Both are answered with a ``subscriptions`` message listing what the connection
   now has. A request that names an unknown channel or product (when the capture
   lists products) changes nothing and is answered ``{"type":"error", ...}``.
2. The venue keeps one book per product: the recorded ``snapshot`` with every
   recorded ``l2update`` the tape has played since. A newly subscribed level2
   product gets a ``snapshot`` of that current book at once, *before* the
   ``subscriptions`` reply (see 4). While the tape has not yet reached the
   product's recorded snapshot there is no book: the connection then also gets the
   key ``"level2-snapshot:<product>"``, which is where ``route`` sends recorded
   snapshot frames, so it receives the recorded snapshot when the tape plays it,
   and a connection that already got the venue's snapshot does not get it twice.
3. ``route`` keys ``l2update`` as ``level2:<product>``, ``match`` and
   ``last_match`` as ``matches:<product>``, ``ticker`` as ``ticker:<product>``,
   ``heartbeat`` as ``heartbeat:<product>``; the recording's own ``subscriptions``
   frames (answers to the recorder's requests) are not routed. Every played
   match is kept for REST ``/products/<id>/trades``.
4. Ordering: a snapshot must reach the connection before any update built on
   it. The emulator queues replies one by one and the tape may run in between, so
   the snapshots come first among the replies.
5. Level2 has no checksum: ``corrupt_checksum`` makes a frame that crosses the
   book instead (a bid far above the best ask), which a Coinbase collector must
   detect as a corrupt book.
6. Looping (``--loop``; ``prepare_loop`` then ``shift`` per frame, pass ``k`` >= 1).
   Every pass must read as the continuation of the last one on a single
   connection, so:

   - per product, ``trade_id`` grows by the span of the recorded ``match`` ids
     (last - first + 1: pass ``k``'s first trade follows the last one of pass
     ``k-1``, no gap, no repeat) and ``sequence`` by the span of the recorded
     sequences (still increasing, per channel too); every ``time`` moves by ``k``
     periods (``tape.loop_period``), whole milliseconds, format kept;
   - what Coinbase sends only in answer to a subscription is not played again:
     ``last_match``, the ticker of a trade that is not among the recorded
     ``match`` frames (the product's last trade before the recording), and the
     ``subscriptions`` replies;
   - books: the recorded l2updates were made against the books that followed the
     recorded ``snapshot``, while pass ``k`` starts from the books pass ``k-1``
     left. A level2 client takes a ``snapshot`` as a new book at any time, but
     Coinbase never sends one unasked, so a pass does not either: where the
     recording has a product's ``snapshot``, later passes play instead one
     ``l2update`` that turns the venue's current book into that snapshot (every
     level it lacks set, every level it has in excess removed with size ``"0"``;
     nothing if they are equal). The l2updates that follow then apply exactly as
     recorded, and each pass ends with the recording's final books. An l2update
     recorded before its product's snapshot (none on the capture) is not played
     again: its book was unknown, and the snapshot's state replaces it anyway.

ccxt.pro (``coinbaseexchange``, ``tickwire replay --via ccxt``) speaks this same
feed: it subscribes one channel of one product per request (``level2`` signed,
with placeholder credentials the venue does not check), and the replay starts the
tape once the connections hold every key ``watch_keys`` names, as the recording
started with every subscription in place. Level2 is the whole book: the replay
gives such a collector a depth (``recorded_depth``) no book of a capture reaches.

REST: ``/products`` (and ``/products/<id>``) as recorded; ``/currencies`` derived
from them (ccxt's ``load_markets`` asks for it);
``/products/<id>/trades`` from the matches played so far, newest first, with
Coinbase's cursor parameters (``after``: older than that trade id, ``before``:
newer, ``limit`` up to 1000, default 100); ``/products/<id>/book?level=1|2`` from
the current book. Anything else: 404.
"""

from __future__ import annotations

import contextlib
import logging
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import orjson
from sortedcontainers import SortedDict

from daemon.book import BookError, L2Book
from daemon.replay.capture import Capture, Received
from daemon.replay.tape import loop_period

log = logging.getLogger(__name__)

PRODUCTS_PATH = "/products"
#: Not recorded: derived from the products (ccxt's ``load_markets`` asks for it).
CURRENCIES_PATH = "/currencies"
#: Coinbase channel names accepted -> the channel they are keyed as.
CHANNELS = {
    "level2": "level2",
    "level2_batch": "level2",
    "ticker": "ticker",
    "matches": "matches",
    "heartbeat": "heartbeat",
}
#: Recorded Coinbase channel -> tickwire channel (``subscriptions``).
_TICKWIRE_CHANNEL = {"level2": "book", "ticker": "ticker", "matches": "trades"}
#: Key of recorded ``snapshot`` frames (see the module doc, rule 2).
SNAPSHOT_KEY = "level2-snapshot"
#: ``/products/<id>/trades``: default and largest ``limit``.
TRADES_LIMIT, TRADES_MAX_LIMIT = 100, 1000
#: Levels per side a depth-taking collector is given (``recorded_depth``): level2
#: is the whole book, and no book of a capture comes near this many levels.
FULL_BOOK_DEPTH = 100_000
#: ``/products/<id>/book?level=2``: levels per side (Coinbase: top 50).
BOOK_LEVEL2_DEPTH = 50
_NOT_FOUND = b'{"message":"NotFound"}'
#: The fields a looping pass shifts (rule 6): ``"trade_id":N`` (or ``"N"``),
#: ``"sequence":N`` and ``"time":"..."``.
_SHIFTED = re.compile(r'"(trade_id|sequence|time)":("[^"]*"|\d+)')
_PRODUCT = re.compile(r'"product_id":"([^"]*)"')
_FRACTION = re.compile(r"\.(\d+)")


@attrs.define
class _Spans:
    """How much one product's numbers grow per pass (rule 6)."""

    trade_ids: int = 0
    sequences: int = 0


def _shifted_time(text: str, shift: timedelta) -> str:
    """An ISO-8601 time moved by ``shift`` (whole milliseconds), written as Coinbase
    writes it (``2021-04-17T16:43:37.075687Z``: the same number of fraction digits,
    at least 3); ``text`` unchanged if it is not such a time."""
    try:
        when = datetime.fromisoformat(text) + shift
    except ValueError:
        return text
    if not text.endswith("Z") or when.tzinfo is None:
        return when.isoformat()
    fraction = _FRACTION.search(text)
    digits = max(len(fraction.group(1)) if fraction else 0, 3)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{when.microsecond:06d}"[: 20 + digits] + "Z"


def _iso(ts: float) -> str:
    return f"{datetime.fromtimestamp(ts, UTC):%Y-%m-%dT%H:%M:%S.%f}Z"


class _Rejected(ValueError):
    """A client request Coinbase would refuse: the ``reason`` of its error reply."""


def _error(message: str, reason: str = "") -> str:
    body = {"type": "error", "message": message}
    if reason:
        body["reason"] = reason
    return orjson.dumps(body).decode()


def _requested(request: dict[str, Any]) -> list[tuple[str, str | None]]:
    """``(channel, product)`` pairs a subscribe/unsubscribe names; ``product`` is
    ``None`` for a channel named without products. Channels keep the client's
    names. Raises ``_Rejected`` on a request of the wrong shape."""
    products = request.get("product_ids", [])
    channels = request.get("channels")
    if not isinstance(products, list) or not all(isinstance(p, str) for p in products):
        raise _Rejected("product_ids must be a list of strings")
    if not isinstance(channels, list) or not channels:
        raise _Rejected("channels must be a non-empty list")
    pairs: list[tuple[str, str | None]] = []
    for channel in channels:
        if isinstance(channel, str):
            name, own = channel, products
        elif isinstance(channel, dict) and isinstance(channel.get("name"), str):
            name, own = channel["name"], channel.get("product_ids", products)
            if not isinstance(own, list) or not all(isinstance(p, str) for p in own):
                raise _Rejected(f"product_ids of channel {name} must be a list of strings")
        else:
            raise _Rejected(f"not a channel: {channel!r}")
        pairs += [(name, p) for p in own] if own else [(name, None)]
    return pairs


def _far_above(price: str) -> str:
    """A decimal price ten times ``price`` (at least 1), written without exponent."""
    try:
        value = max(Decimal(price) * 10, Decimal(1))
    except InvalidOperation:
        value = Decimal(1_000_000)
    return format(value, "f")


class CoinbaseVenue:
    """Emulated Coinbase Exchange over the given captures (see the module doc).

    ``books``: product id -> current ``L2Book`` (from the first recorded snapshot
    on); ``trades``: product id -> ``{trade_id: REST trade object}`` in id order.
    """

    exchange = "coinbase"
    #: the depth a replay gives collectors that take one (level2 is the whole book)
    recorded_depth = FULL_BOOK_DEPTH

    def __init__(self, captures: list[Capture]) -> None:
        self.products_body: bytes | None = None
        self.products: dict[str, bytes] = {}  # product id -> its JSON object
        for capture in captures:
            for response in capture.rest:
                if urlsplit(response.url).path == PRODUCTS_PATH and self.products_body is None:
                    self.products_body = response.body.encode()
        if self.products_body is not None:
            for product in orjson.loads(self.products_body):
                if isinstance(product, dict) and isinstance(product.get("id"), str):
                    self.products[product["id"]] = orjson.dumps(product)
        self.books: dict[str, L2Book] = {}
        self.trades: dict[str, SortedDict] = {}
        self.sequence: dict[str, int] = {}  # product id -> last match/ticker sequence
        self.tickers: dict[str, dict[str, Any]] = {}  # product id -> last ticker frame
        # looping (rule 6), from prepare_loop
        self._spans: dict[str, _Spans] = {}
        self._once: set[Received] = set()  # recorded frames later passes leave out
        self._period = 0.0

    def subscriptions(self, captures: list[Capture]) -> tuple[list[str], list[str]]:
        """``(symbols, channels)`` the recorded connections subscribed, as tickwire
        names (``BTC-USD``; ``book``, ``ticker``, ``trades``)."""
        from daemon.exchanges.coinbase import parse_markets

        markets = parse_markets(self.products_body) if self.products_body else {}
        symbols: dict[str, None] = {}
        channels: dict[str, None] = {}
        for capture in captures:
            for conn in capture.connections:
                for _, text in conn.sent:
                    try:
                        request = orjson.loads(text)
                        if not isinstance(request, dict) or request.get("type") != "subscribe":
                            continue
                        pairs = _requested(request)
                    except (orjson.JSONDecodeError, _Rejected):
                        continue
                    for name, product in pairs:
                        channel = _TICKWIRE_CHANNEL.get(CHANNELS.get(name, ""))
                        symbol = markets.get(product) if product else None
                        if channel and symbol:
                            symbols[symbol] = None
                            channels[channel] = None
        return list(symbols), list(channels)

    def watch_keys(self, symbols: list[str], channels: list[str]) -> set[str]:
        """The routing keys a connection holds once subscribed to ``channels``
        (tickwire names) of ``symbols`` (``BASE-QUOTE``): ``"matches:SKL-GBP"``..."""
        from daemon.exchanges.coinbase import parse_markets

        markets = parse_markets(self.products_body) if self.products_body else {}
        product_of = {symbol: product for product, symbol in markets.items()}
        names = {tickwire: name for name, tickwire in _TICKWIRE_CHANNEL.items()}
        return {
            f"{names[channel]}:{product_of.get(symbol, symbol)}"
            for symbol in symbols for channel in channels if channel in names
        }

    # -- WebSocket ------------------------------------------------------------------

    def greeting(self, path: str = "/") -> list[str]:
        """Coinbase sends nothing unprompted on a new connection."""
        return []

    def deliver(self, path: str, keys: set[str], key: str, text: str) -> str | None:
        """Every connection that subscribed to ``key`` gets the frame as recorded."""
        return text if key in keys else None

    def open(self, path: str) -> set[str]:
        """A new connection has no keys: it subscribes by message."""
        return set()

    def on_client_message(self, keys: set[str], text: str) -> list[str]:
        """Answer a client frame; ``subscribe`` / ``unsubscribe`` change ``keys``."""
        try:
            request = orjson.loads(text)
        except orjson.JSONDecodeError:
            return [_error("Malformed JSON", "the message is not JSON")]
        if not isinstance(request, dict):
            return [_error("Malformed JSON", "the message is not a JSON object")]
        kind = request.get("type")
        if kind not in ("subscribe", "unsubscribe"):
            return [_error("Failed to subscribe", "type has to be either subscribe or unsubscribe")]
        try:
            pairs = self._checked(_requested(request), kind)
        except _Rejected as exc:
            return [_error(f"Failed to {kind}", str(exc))]
        replies: list[str] = []
        if kind == "subscribe":
            for channel, product in pairs:
                key = f"{channel}:{product}"
                if key in keys:
                    continue
                keys.add(key)
                if channel == "level2" and product is not None:  # _checked: never None
                    book = self.books.get(product)
                    if book is None:
                        keys.add(f"{SNAPSHOT_KEY}:{product}")
                    else:
                        replies.append(self._snapshot(product, book))
        else:
            for channel, product in pairs:
                if product is None:
                    keys.difference_update([k for k in keys if k.startswith(channel + ":")])
                    if channel == "level2":
                        keys.difference_update(
                            [k for k in keys if k.startswith(SNAPSHOT_KEY + ":")]
                        )
                else:
                    keys.discard(f"{channel}:{product}")
                    if channel == "level2":
                        keys.discard(f"{SNAPSHOT_KEY}:{product}")
        replies.append(self._subscriptions(keys))
        return replies

    def _checked(
        self, pairs: list[tuple[str, str | None]], kind: str
    ) -> list[tuple[str, str | None]]:
        """Pairs with channels keyed as ``CHANNELS`` says; raises ``_Rejected`` for an
        unknown channel, or for a subscription without products or to a product the
        capture does not list."""
        out = []
        for name, product in pairs:
            channel = CHANNELS.get(name)
            if channel is None:
                raise _Rejected(f"{name} is not a valid channel")
            if kind == "subscribe":
                if product is None:
                    raise _Rejected(f"no product ids for channel {name}")
                if self.products and product not in self.products:
                    raise _Rejected(f"{product} is not a valid product")
            out.append((channel, product))
        return out

    def _snapshot(self, product: str, book: L2Book) -> str:
        bids, asks = book.levels()
        return orjson.dumps(
            {"type": "snapshot", "product_id": product, "bids": bids, "asks": asks}
        ).decode()

    @staticmethod
    def _subscriptions(keys: set[str]) -> str:
        by_channel: dict[str, list[str]] = {}
        for key in sorted(keys):
            channel, _, product = key.partition(":")
            if channel in CHANNELS:
                by_channel.setdefault(channel, []).append(product)
        channels = [{"name": name, "product_ids": ids} for name, ids in by_channel.items()]
        return orjson.dumps({"type": "subscriptions", "channels": channels}).decode()

    def route(self, frame: Received) -> str | None:
        """Advance the venue by one tape frame; return its routing key (or ``None``)."""
        text = frame.text
        start = text.find('"type":"')
        if start < 0:
            return None
        start += 8
        kind = text[start : text.find('"', start)]
        if kind == "subscriptions":
            return None
        try:
            msg = orjson.loads(text)
            product = msg["product_id"]
            if kind == "l2update":
                book = self.books.get(product)
                if book is not None:  # before the first snapshot: nothing to apply to
                    changes = msg["changes"]
                    book.apply(
                        [(c[1], c[2]) for c in changes if c[0] == "buy"],
                        [(c[1], c[2]) for c in changes if c[0] == "sell"],
                    )
                return f"level2:{product}"
            if kind == "snapshot":
                book = L2Book()
                book.load([lv[:2] for lv in msg["bids"]], [lv[:2] for lv in msg["asks"]])
                self.books[product] = book
                return f"{SNAPSHOT_KEY}:{product}"
            if kind in ("match", "last_match"):
                self._record_trade(product, msg)
                return f"matches:{product}"
            if kind == "ticker":
                self._record_sequence(product, msg.get("sequence"))
                self.tickers[product] = msg
                return f"ticker:{product}"
            if kind == "heartbeat":
                return f"heartbeat:{product}"
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError, BookError) as exc:
            log.warning("coinbase venue: cannot use a recorded %s frame: %r", kind, exc)
        return None

    def _record_trade(self, product: str, msg: dict[str, Any]) -> None:
        trade_id = msg["trade_id"]
        trades = self.trades.setdefault(product, SortedDict())
        trades.setdefault(
            trade_id,
            {
                "time": msg["time"],
                "trade_id": trade_id,
                "price": msg["price"],
                "size": msg["size"],
                "side": msg["side"],
            },
        )
        self._record_sequence(product, msg.get("sequence"))

    def _record_sequence(self, product: str, sequence: object) -> None:
        if type(sequence) is int and sequence > self.sequence.get(product, -1):
            self.sequence[product] = sequence

    def corrupt_checksum(self, text: str) -> str:
        """Coinbase level2 carries no checksum: return a frame that crosses the book.

        An ``l2update`` gets its first ``buy`` change (or an added one) moved to ten
        times the current best ask (size ``1`` if it was a removal), so applying it
        leaves best bid > best ask; a ``snapshot`` gets such a bid added (a crossed
        snapshot, which a collector may accept as the exchange's state). Other
        frames are returned unchanged.
        """
        try:
            msg = orjson.loads(text)
            kind, product = msg.get("type"), msg.get("product_id")
        except (orjson.JSONDecodeError, AttributeError):
            return text
        if kind not in ("l2update", "snapshot"):
            return text
        book = self.books.get(product)
        ask = book.best_ask() if book is not None else None
        if ask is None and kind == "snapshot" and msg.get("asks"):
            ask = msg["asks"][0]
        price = _far_above(ask[0] if ask else "100000")
        if kind == "snapshot":
            msg["bids"] = [[price, "1"], *msg.get("bids", [])]
            return orjson.dumps(msg).decode()
        changes = msg.get("changes") or []
        for change in changes:
            if change[0] == "buy":
                change[1] = price
                if Decimal(change[2]) == 0:
                    change[2] = "1"
                break
        else:
            changes.append(["buy", price, "1"])
        msg["changes"] = changes
        return orjson.dumps(msg).decode()

    # -- looping ----------------------------------------------------------------------

    def prepare_loop(self, tape: list[Received]) -> float:
        """Learn, from the whole tape, the spans to shift by and the frames not to play
        again (rule 6); return the period of a pass in seconds."""
        decoded: list[tuple[Received, dict[str, Any]]] = []
        for frame in tape:
            try:
                msg = orjson.loads(frame.text)
            except orjson.JSONDecodeError:
                continue
            if isinstance(msg, dict):
                decoded.append((frame, msg))
        match_ids: dict[str, list[int]] = {}
        for _, msg in decoded:
            if msg.get("type") == "match" and type(msg.get("trade_id")) is int:
                match_ids.setdefault(msg["product_id"], []).append(msg["trade_id"])
        booked: set[str] = set()
        sequences: dict[str, list[int]] = {}
        times: list[float] = []
        for frame, msg in decoded:
            kind, product = msg.get("type"), msg.get("product_id")
            if not isinstance(product, str):
                product = ""  # no product: a frame of the connection (subscriptions)
            once = (
                kind in ("subscriptions", "last_match")
                or (kind == "ticker" and msg.get("trade_id") not in match_ids.get(product, ()))
                or (kind == "l2update" and product not in booked)
            )
            if kind == "snapshot":
                booked.add(product)
            if once:
                self._once.add(frame)
                continue
            if type(msg.get("sequence")) is int:
                sequences.setdefault(product, []).append(msg["sequence"])
            if isinstance(msg.get("time"), str):
                with contextlib.suppress(ValueError):
                    times.append(datetime.fromisoformat(msg["time"]).timestamp())
        for product in set(match_ids) | set(sequences):
            ids, seqs = match_ids.get(product), sequences.get(product)
            self._spans[product] = _Spans(
                trade_ids=max(ids) - min(ids) + 1 if ids else 0,
                sequences=max(seqs) - min(seqs) + 1 if seqs else 0,
            )
        self._period = loop_period(tape, times)
        return self._period

    def shift(self, frame: Received, pass_number: int) -> list[str]:
        """The frames pass ``pass_number`` (>= 1) plays for recorded ``frame``
        (rule 6): none, the frame shifted, or for a ``snapshot`` the ``l2update``
        that brings the current book back to it."""
        if frame in self._once:
            return []
        text = frame.text
        start = text.find('"type":"') + 8
        if start >= 8 and text.startswith("snapshot", start):
            return self._back_to_snapshot(text, frame.ts + pass_number * self._period)
        found = _PRODUCT.search(text)
        spans = self._spans.get(found.group(1), _Spans()) if found else _Spans()
        moved = timedelta(milliseconds=round(pass_number * self._period * 1000))

        def replace(match: re.Match[str]) -> str:
            name, value = match.group(1), match.group(2)
            if name == "time":
                quoted = value[1:-1] if value.startswith('"') else value
                return f'"time":"{_shifted_time(quoted, moved)}"'
            span = spans.trade_ids if name == "trade_id" else spans.sequences
            if value.startswith('"'):
                digits = value[1:-1]
                if not digits.isdigit():
                    return match.group(0)
                return f'"{name}":"{int(digits) + pass_number * span}"'
            return f'"{name}":{int(value) + pass_number * span}'

        return [_SHIFTED.sub(replace, text)]

    def _back_to_snapshot(self, text: str, ts: float) -> list[str]:
        """The ``l2update`` that turns the product's current book into the recorded
        snapshot ``text`` (nothing when they are equal)."""
        try:
            msg = orjson.loads(text)
            product = msg["product_id"]
            target = L2Book()
            target.load([lv[:2] for lv in msg["bids"]], [lv[:2] for lv in msg["asks"]])
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError, BookError):
            return [text]  # not a usable snapshot: played as recorded
        current = self.books.get(product) or L2Book()
        changes: list[list[str]] = []
        for name, have, want in (("buy", current.bids, target.bids),
                                 ("sell", current.asks, target.asks)):
            changes += [[name, price, "0"] for key, (price, _) in have.items() if key not in want]
            changes += [[name, price, size] for key, (price, size) in want.items()
                        if have.get(key) != (price, size)]
        if not changes:
            return []
        update = {"type": "l2update", "product_id": product, "changes": changes, "time": _iso(ts)}
        return [orjson.dumps(update).decode()]

    # -- REST -----------------------------------------------------------------------

    def rest(self, target: str) -> tuple[int, bytes]:
        """Answer a REST GET of ``target`` (path and query)."""
        parts = urlsplit(target)
        path = parts.path.rstrip("/")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if path == PRODUCTS_PATH:
            if self.products_body is None:
                return 404, _NOT_FOUND
            return 200, self.products_body
        if path == CURRENCIES_PATH:
            return 200, self._currencies()
        segments = path.split("/")
        if len(segments) < 3 or segments[1] != "products":
            return 404, _NOT_FOUND
        product = segments[2]
        known = product in self.products or product in self.books or product in self.trades
        if not known:
            return 404, _NOT_FOUND
        if len(segments) == 3 and product in self.products:
            return 200, self.products[product]
        if len(segments) == 4 and segments[3] == "trades":
            return self._rest_trades(product, query)
        if len(segments) == 4 and segments[3] == "book":
            return self._rest_book(product, query)
        if len(segments) == 4 and segments[3] == "ticker":
            return self._rest_ticker(product)
        return 404, _NOT_FOUND

    def _rest_ticker(self, product: str) -> tuple[int, bytes]:
        """``/products/<id>/ticker`` (Coinbase Exchange's shape: ``trade_id``,
        ``price``, ``size``, ``time``, ``bid``, ``ask``, ``volume``): from the last
        ticker frame played, else the book's best bid and offer and the last trade
        played; 404 before any of them."""
        ticker = self.tickers.get(product)
        if ticker is not None:
            body = {"trade_id": ticker.get("trade_id"), "price": ticker.get("price"),
                    "size": ticker.get("last_size"), "time": ticker.get("time"),
                    "bid": ticker.get("best_bid"), "ask": ticker.get("best_ask"),
                    "volume": ticker.get("volume_24h")}
            return 200, orjson.dumps(body)
        book = self.books.get(product)
        trades = self.trades.get(product)
        if book is None and not trades:
            return 404, _NOT_FOUND
        last = trades.peekitem(-1)[1] if trades else {}
        bid = book.best_bid() if book is not None else None
        ask = book.best_ask() if book is not None else None
        return 200, orjson.dumps({
            "trade_id": last.get("trade_id"), "price": last.get("price"),
            "size": last.get("size"), "time": last.get("time"),
            "bid": bid[0] if bid else None, "ask": ask[0] if ask else None, "volume": "0"})

    def _currencies(self) -> bytes:
        """``/currencies``: the recorded products' base and quote currencies, online,
        with their smallest increment as precision (Coinbase's fields, fewer)."""
        currencies: dict[str, dict[str, Any]] = {}
        for body in self.products.values():
            product = orjson.loads(body)
            for side, increment in (("base_currency", "base_increment"),
                                    ("quote_currency", "quote_increment")):
                code = product.get(side)
                if isinstance(code, str) and code not in currencies:
                    currencies[code] = {
                        "id": code, "name": code, "status": "online", "message": "",
                        "max_precision": product.get(increment) or "0.00000001",
                        "details": {"type": "crypto"},
                    }
        return orjson.dumps(list(currencies.values()))

    def _rest_trades(self, product: str, query: dict[str, str]) -> tuple[int, bytes]:
        """Trades newest first: ``after=ID`` older than ID, ``before=ID`` newer than
        ID (the ``limit`` nearest to it), else the latest ``limit``."""
        try:
            limit = int(query.get("limit", TRADES_LIMIT))
            after = int(query["after"]) if "after" in query else None
            before = int(query["before"]) if "before" in query else None
        except ValueError:
            return 400, b'{"message":"Invalid cursor or limit"}'
        if not 1 <= limit <= TRADES_MAX_LIMIT:
            return 400, b'{"message":"Invalid limit"}'
        trades = self.trades.get(product, SortedDict())
        if before is not None:
            newer = trades.irange(minimum=before, inclusive=(False, True))
            page = [trades[i] for i, _ in zip(newer, range(limit), strict=False)][::-1]
        else:
            older = trades.irange(maximum=after, inclusive=(True, False), reverse=True)
            page = [trades[i] for i, _ in zip(older, range(limit), strict=False)]
        return 200, orjson.dumps(page)

    def _rest_book(self, product: str, query: dict[str, str]) -> tuple[int, bytes]:
        """Level 1 (best bid and ask) or 2 (top 50): ``[price, size, num_orders]``;
        a level2 feed does not tell the number of orders, so it is given as 1."""
        level = query.get("level", "1")
        if level not in ("1", "2"):
            return 400, b'{"message":"Invalid level: the emulator has levels 1 and 2"}'
        book = self.books.get(product)
        bids, asks = book.top(1 if level == "1" else BOOK_LEVEL2_DEPTH) if book else ((), ())
        return 200, orjson.dumps(
            {
                "bids": [[price, size, 1] for price, size in bids],
                "asks": [[price, size, 1] for price, size in asks],
                "sequence": self.sequence.get(product, 0),
            }
        )
