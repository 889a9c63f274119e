"""Binance as the emulator plays it.

- WebSocket: ``/stream?streams=a/b/c`` (combined stream; also ``/ws/a/b``) gets only
  the recorded frames of the streams it names. ``SUBSCRIBE`` requests
  (``{"method":"SUBSCRIBE","params":[...],"id":1}``) add streams and are answered
  ``{"result":null,"id":1}``, as Binance does. The path may start with the
  exchange's host (``/stream.binance.com/ws/0``: ccxt.pro's URLs rebased on the
  emulator keep it, since ccxt tells a market's type from its URL); a path segment
  that is not a stream name (ccxt's stream index ``0``) names nothing. As on
  Binance, a combined-stream connection gets ``{"stream":...,"data":{...}}`` and a
  raw one (``/ws``) gets the event alone.
- ``<symbol>@trade`` (raw trades, what ccxt.pro's ``watch_trades`` subscribes) is
  served from the recorded ``aggTrade`` frames, since the capture has no raw
  trades: each aggTrade becomes one trade event ``{"e":"trade","E","s","t","p",
  "q","T","m","M"}`` with ``t`` = the aggregate trade id ``a`` (so the ids are the
  ones the native collector publishes, and the dispatcher's de-duplication works
  across native, poll and watch), ``p``/``q``/``T``/``m``/``M``/``E`` as recorded
  (``q``: the aggregate's whole quantity); the raw trade ids ``f``..``l`` it
  aggregates are dropped. On the real exchange ``@trade`` ids are raw trade ids,
  which differ from aggTrade ids.
- REST: ``/api/v3/exchangeInfo`` as recorded; ``/api/v3/depth?symbol=X&limit=N``
  from the book as it stands at this moment of the replay: the recorded snapshot
  with every depth event of the tape since applied (its ``lastUpdateId`` is the
  last applied ``u``).
- Looping (``--loop``; ``prepare_loop`` then ``shift`` per frame, pass ``k`` >= 1).
  Per symbol, pass ``k`` adds ``k`` spans to every id: order book update ids (depth
  ``U``/``u``, bookTicker ``u``) by ``last u - first U + 2`` (one id more than the
  recording used, see below), aggregate trade ids ``a`` by their span, trade ids
  (``f``/``l``, kline ``f``/``L``) by theirs, and every exchange time (``E``,
  ``T``, kline ``t``/``T``) by ``k`` periods in ms (``tape.loop_period``). So pass
  ``k``'s first depth event has ``U`` = the last ``u`` of pass ``k-1`` + 1.
  Books: the depth events recorded up to the REST snapshot's ``lastUpdateId`` L
  were made against a book nobody has; in pass 0 a collector drops them by
  Binance's procedure. Later passes replace them with one depth event, played
  where the symbol's first one was, that turns the venue's current book into the
  recorded snapshot (levels in excess set to ``0.00000000``, missing or changed
  ones set) and takes their whole id range, from the reserved id on (``first U -
  1``, shifted) to the last of them; the events after L then apply exactly as
  recorded (the first of them straddles L, and applies to the snapshot as in pass
  0). The emulated REST depth is the venue's book, so it follows: after that event
  it is the recorded snapshot with its ids shifted.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from daemon.book import L2Book
from daemon.replay.capture import Capture, Received
from daemon.replay.tape import loop_period


class _Book:
    __slots__ = ("book", "last_update_id")

    def __init__(self, body: dict[str, Any]) -> None:
        self.book = L2Book()
        self.book.load(body["bids"], body["asks"])
        self.last_update_id = int(body["lastUpdateId"])


class BinanceVenue:
    """Emulated Binance (or Binance.US: ``exchange``) over the given captures."""

    def __init__(self, captures: list[Capture], exchange: str = "binance") -> None:
        self.exchange = exchange
        self.static: dict[str, bytes] = {}
        self.books: dict[str, _Book] = {}
        for capture in captures:
            for response in capture.rest:
                path = urlsplit(response.url).path
                if path == "/api/v3/depth":
                    query = parse_qs(urlsplit(response.url).query)
                    symbol = query["symbol"][0].upper()
                    self.books.setdefault(symbol, _Book(orjson.loads(response.body)))
                else:
                    self.static.setdefault(path, response.body.encode())
        # played by the tape so far, for REST (see ``rest``): kept as raw frame text
        # and parsed only when a REST request asks for them
        self._book_tickers: dict[str, str] = {}  # NKNUSDT -> its latest bookTicker frame
        self._agg_frames: dict[str, list[str]] = {}  # NKNUSDT -> aggTrade frames in order
        self._agg_trades: dict[str, list[dict[str, Any]]] = {}  # the parsed prefix of those
        self._symbol_ids: frozenset[str] | None = None  # exchangeInfo's, parsed when asked
        # looping (module doc), from prepare_loop: per symbol, what a pass adds to its ids
        self._update_span: dict[str, int] = {}
        self._agg_span: dict[str, int] = {}
        self._trade_span: dict[str, int] = {}
        self._period_ms = 0
        self._once: set[Received] = set()  # depth events replaced in later passes
        #: first depth frame of a symbol -> (symbol, first id, last id) of the event
        #: that brings the book back to the recorded snapshot, before shifting
        self._resets: dict[Received, tuple[str, int, int]] = {}
        self._snapshots: dict[str, tuple[list[Any], list[Any]]] = {}  # the recorded REST books

    def subscriptions(self, captures: list[Capture]) -> tuple[list[str], list[str]]:
        """``(symbols, channels)`` the recorded connections subscribed, as tickwire
        names (``NKN-USDT``; ``trades``, ``book``, ``ticker``)."""
        from daemon.exchanges.binance import parse_markets

        info = self.static.get("/api/v3/exchangeInfo")
        markets = parse_markets(info) if info else {}
        kinds = {"aggTrade": "trades", "trade": "trades", "bookTicker": "ticker", "depth": "book"}
        symbols: dict[str, None] = {}
        channels: dict[str, None] = {}
        for capture in captures:
            for conn in capture.connections:
                parts = urlsplit(conn.url)
                for stream in self.open(f"{parts.path}?{parts.query}"):
                    native, _, kind = stream.partition("@")
                    channel = kinds.get(kind.partition("@")[0])
                    symbol = markets.get(native.upper())
                    if channel and symbol:
                        symbols[symbol] = None
                        channels[channel] = None
        return list(symbols), list(channels)

    def greeting(self, path: str = "/") -> list[str]:
        """Binance sends nothing unprompted on a new connection."""
        return []

    # -- WebSocket ------------------------------------------------------------------

    def open(self, path: str) -> set[str]:
        """The routing keys (stream names) a new connection to ``path`` gets."""
        parts = urlsplit(path)
        if parts.path.rstrip("/").endswith("/stream"):
            names = parse_qs(parts.query).get("streams", [""])[0]
            return {s for s in names.split("/") if "@" in s}
        if "/ws/" in parts.path:
            return {s for s in parts.path.split("/ws/", 1)[1].split("/") if "@" in s}
        return set()

    def deliver(self, path: str, keys: set[str], key: str, text: str) -> str | None:
        """The text a connection opened on ``path`` with streams ``keys`` gets of a
        frame of stream ``key`` (module doc): the frame as recorded on a combined
        stream, its event alone on a raw one, and an ``aggTrade`` as a ``@trade``
        event to a connection that subscribed that; ``None`` when not subscribed."""
        if key in keys:
            return _bare_event(text) if _is_raw(path) else text
        if key.endswith("@aggTrade"):
            trade_key = key[:-9] + "@trade"
            if trade_key in keys:
                event = trade_from_agg_trade(orjson.loads(text)["data"])
                if _is_raw(path):
                    return orjson.dumps(event).decode()
                return orjson.dumps({"stream": trade_key, "data": event}).decode()
        return None

    def on_client_message(self, keys: set[str], text: str) -> list[str]:
        """Answer a client frame; ``SUBSCRIBE`` / ``UNSUBSCRIBE`` change ``keys``."""
        try:
            request = orjson.loads(text)
            method, params, request_id = request["method"], request.get("params", []), request["id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return ['{"error":{"code":2,"msg":"Invalid request"}}']
        if method == "SUBSCRIBE":
            keys.update(params)
        elif method == "UNSUBSCRIBE":
            keys.difference_update(params)
        elif method != "LIST_SUBSCRIPTIONS":
            return [orjson.dumps({"error": {"code": 1, "msg": "Invalid method"}, "id": request_id}).decode()]
        return [orjson.dumps({"result": None, "id": request_id}).decode()]

    def route(self, frame: Received) -> str | None:
        """Advance the emulated books by one tape frame; return its routing key."""
        text = frame.text
        start = text.find('"stream":"')
        if start < 0:
            return None
        end = text.index('"', start + 10)
        stream = text[start + 10 : end]
        if "@depth" in stream:
            data = orjson.loads(text)["data"]
            state = self.books.get(data["s"])
            if state is not None and int(data["u"]) > state.last_update_id:
                state.book.apply(data["b"], data["a"])
                state.last_update_id = int(data["u"])
        elif stream.endswith("@bookTicker"):  # raw text: parsed only when REST asks
            self._book_tickers[stream[:-11].upper()] = text
        elif stream.endswith("@aggTrade"):
            self._agg_frames.setdefault(stream[:-9].upper(), []).append(text)
        return stream

    # -- looping ----------------------------------------------------------------------

    def prepare_loop(self, tape: list[Received]) -> float:
        """Learn, from the whole tape and the recorded REST books (before anything
        plays), the spans to shift by and the depth events to replace in later
        passes (module doc); return the period of a pass in seconds."""
        depth: dict[str, list[tuple[Received, int, int]]] = {}
        update_ids: dict[str, list[int]] = {}
        agg_ids: dict[str, list[int]] = {}
        trade_ids: dict[str, list[int]] = {}
        times: list[float] = []
        for frame in tape:
            try:
                data = orjson.loads(frame.text)["data"]
                symbol, kind = data["s"], data.get("e")
                if kind == "depthUpdate":
                    depth.setdefault(symbol, []).append((frame, int(data["U"]), int(data["u"])))
                elif kind == "aggTrade":
                    agg_ids.setdefault(symbol, []).append(int(data["a"]))
                    trade_ids.setdefault(symbol, []).extend((int(data["f"]), int(data["l"])))
                    times.append(int(data["T"]) / 1000)
                elif kind is None and "u" in data:  # bookTicker
                    update_ids.setdefault(symbol, []).append(int(data["u"]))
                if "E" in data:
                    times.append(int(data["E"]) / 1000)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # not a stream frame: played unchanged
        for symbol, events in depth.items():
            first, last = events[0][1], events[-1][2]
            self._update_span[symbol] = last - first + 2
            state = self.books.get(symbol)
            if state is None:
                continue  # no recorded snapshot: no book to bring back
            before = [event for event in events if event[2] <= state.last_update_id]
            self._once.update(event[0] for event in before)
            self._resets[events[0][0]] = (symbol, first - 1, before[-1][2] if before else first - 1)
            bids, asks = state.book.levels()
            self._snapshots[symbol] = (list(bids), list(asks))
        for symbol, ids in update_ids.items():
            self._update_span.setdefault(symbol, max(ids) - min(ids) + 1)
        for spans, ids_of in ((self._agg_span, agg_ids), (self._trade_span, trade_ids)):
            for symbol, ids in ids_of.items():
                spans[symbol] = max(ids) - min(ids) + 1
        period = loop_period(tape, times)
        self._period_ms = round(period * 1000)
        return period

    def shift(self, frame: Received, pass_number: int) -> list[str]:
        """The frames pass ``pass_number`` (>= 1) plays for recorded ``frame``
        (module doc): the frame with its ids and times shifted, preceded by the
        book-restoring depth event at a symbol's first depth frame; nothing for a
        depth event that one replaces."""
        out: list[str] = []
        reset = self._resets.get(frame)
        if reset is not None:
            out.append(self._back_to_snapshot(frame, *reset, pass_number))
        if frame not in self._once:
            out.append(self._shifted(frame.text, pass_number))
        return out

    def _shifted(self, text: str, k: int) -> str:
        try:
            frame = orjson.loads(text)
            data = frame["data"]
            symbol = data["s"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return text
        ms = k * self._period_ms
        updates = k * self._update_span.get(symbol, 0)
        trades = k * self._trade_span.get(symbol, 0)
        kind = data.get("e")
        if "E" in data:
            data["E"] += ms
        if kind == "depthUpdate":
            data["U"] += updates
            data["u"] += updates
        elif kind == "aggTrade":
            data["a"] += k * self._agg_span.get(symbol, 0)
            data["f"] += trades
            data["l"] += trades
            data["T"] += ms
        elif kind == "kline":
            kline = data["k"]
            kline["t"] += ms
            kline["T"] += ms
            for key in ("f", "L"):
                if kline.get(key, -1) >= 0:
                    kline[key] += trades
        elif kind is None and "u" in data:  # bookTicker
            data["u"] += updates
        return orjson.dumps(frame).decode()

    def _back_to_snapshot(
        self, frame: Received, symbol: str, first: int, last: int, k: int
    ) -> str:
        """The depth event, ids ``first``..``last`` shifted to pass ``k``, that turns
        the venue's book of ``symbol`` into the recorded snapshot."""
        recorded = orjson.loads(frame.text)
        target = L2Book()
        target.load(*self._snapshots[symbol])
        current = self.books[symbol].book
        changes: list[list[list[str]]] = []
        for have, want in ((current.bids, target.bids), (current.asks, target.asks)):
            side = [[price, "0.00000000"] for key, (price, _) in have.items() if key not in want]
            side += [[price, size] for key, (price, size) in want.items()
                     if have.get(key) != (price, size)]
            changes.append(side)
        shift = k * self._update_span[symbol]
        data = {
            "e": "depthUpdate", "E": recorded["data"]["E"] + k * self._period_ms, "s": symbol,
            "U": first + shift, "u": last + shift, "b": changes[0], "a": changes[1],
        }
        return orjson.dumps({"stream": recorded["stream"], "data": data}).decode()

    def corrupt_checksum(self, text: str) -> str:
        """Binance depth events carry no checksum: corrupt the update id instead."""
        frame = orjson.loads(text)
        frame["data"]["U"] = int(frame["data"]["U"]) + 1_000_000
        return orjson.dumps(frame).decode()

    # -- REST -----------------------------------------------------------------------

    def rest(self, target: str) -> tuple[int, bytes]:
        """Answer a REST GET of ``target`` (path and query).

        Besides ``exchangeInfo`` and ``depth``: ``/api/v3/ticker/bookTicker``
        (``symbol=X``, ``symbols=["X","Y"]`` or all) from the latest ``bookTicker``
        frame the tape has played, and ``/api/v3/aggTrades`` (``symbol``, ``fromId``
        or ``startTime``/``endTime``, ``limit``) from the ``aggTrade`` frames played
        so far, both in Binance's documented REST formats and errors.
        """
        parts = urlsplit(target)
        if parts.path == "/api/v3/ticker/bookTicker":
            return self._rest_book_ticker(parse_qs(parts.query))
        if parts.path == "/api/v3/aggTrades":
            return self._rest_agg_trades(parse_qs(parts.query))
        if parts.path == "/api/v3/depth":
            query = parse_qs(parts.query)
            symbol = query.get("symbol", [""])[0].upper()
            state = self.books.get(symbol)
            if state is None:
                return 400, b'{"code":-1121,"msg":"Invalid symbol."}'
            limit = int(query.get("limit", ["100"])[0])
            bids, asks = state.book.levels()
            return 200, orjson.dumps(
                {
                    "lastUpdateId": state.last_update_id,
                    "bids": [list(level) for level in bids[:limit]],
                    "asks": [list(level) for level in asks[:limit]],
                }
            )
        body = self.static.get(parts.path)
        if body is None:
            return 404, b'{"code":-1,"msg":"not in the capture"}'
        return 200, body

    def _known_symbol(self, symbol: str) -> bool:
        if self._symbol_ids is None:
            info = self.static.get("/api/v3/exchangeInfo")
            listed = orjson.loads(info)["symbols"] if info else []
            self._symbol_ids = frozenset(entry["symbol"] for entry in listed)
        return symbol in self._symbol_ids or symbol in self._book_tickers

    def _book_ticker(self, symbol: str) -> dict[str, str]:
        """Binance's bookTicker answer for ``symbol``: the latest played frame; an
        empty book (zeros, as Binance answers one) before the first."""
        text = self._book_tickers.get(symbol)
        if text is None:
            zero = "0.00000000"
            return {"symbol": symbol, "bidPrice": zero, "bidQty": zero, "askPrice": zero,
                    "askQty": zero}
        d = orjson.loads(text)["data"]
        return {"symbol": d["s"], "bidPrice": d["b"], "bidQty": d["B"], "askPrice": d["a"],
                "askQty": d["A"]}

    def _rest_book_ticker(self, query: dict[str, list[str]]) -> tuple[int, bytes]:
        if "symbol" in query:
            symbol = query["symbol"][0].upper()
            if not self._known_symbol(symbol):
                return 400, _INVALID_SYMBOL
            return 200, orjson.dumps(self._book_ticker(symbol))
        if "symbols" in query:
            try:
                symbols = [str(s).upper() for s in orjson.loads(query["symbols"][0])]
            except (orjson.JSONDecodeError, TypeError):
                return 400, b'{"code":-1100,"msg":"Illegal characters found in a parameter."}'
            if not all(self._known_symbol(s) for s in symbols):
                return 400, _INVALID_SYMBOL
        else:  # all symbols: here, those the tape has played a bookTicker of
            symbols = list(self._book_tickers)
        return 200, orjson.dumps([self._book_ticker(s) for s in symbols])

    def _agg_trades_of(self, symbol: str) -> list[dict[str, Any]]:
        """The aggTrades played so far for ``symbol``, in REST form: the frames not
        parsed yet are parsed now."""
        frames = self._agg_frames.get(symbol, [])
        parsed = self._agg_trades.setdefault(symbol, [])
        for text in frames[len(parsed):]:
            d = orjson.loads(text)["data"]
            parsed.append({k: d[k] for k in ("a", "p", "q", "f", "l", "T", "m", "M") if k in d})
        return parsed

    def _rest_agg_trades(self, query: dict[str, list[str]]) -> tuple[int, bytes]:
        """Binance's rules: ``fromId`` (inclusive) or ``startTime``/``endTime``
        (inclusive, at most one hour apart), not both; the oldest ``limit`` trades
        from there, or the newest ``limit`` with neither; ``limit`` 500 by default,
        at most 1000."""
        symbol = query.get("symbol", [""])[0].upper()
        if not symbol:
            return 400, (b'{"code":-1102,"msg":"Mandatory parameter \'symbol\' was not sent,'
                         b' was empty/null, or malformed."}')
        if not self._known_symbol(symbol):
            return 400, _INVALID_SYMBOL
        try:
            limit = min(max(int(query.get("limit", ["500"])[0]), 1), 1000)
            from_id = int(query["fromId"][0]) if "fromId" in query else None
            start = int(query["startTime"][0]) if "startTime" in query else None
            end = int(query["endTime"][0]) if "endTime" in query else None
        except ValueError:
            return 400, b'{"code":-1100,"msg":"Illegal characters found in a parameter."}'
        if from_id is not None and (start is not None or end is not None):
            return 400, b'{"code":-1128,"msg":"Combination of optional parameters invalid."}'
        if start is not None and end is not None and end - start > 3_600_000:
            return 400, b'{"code":-1127,"msg":"More than 1 hours between startTime and endTime."}'
        trades = self._agg_trades_of(symbol)
        if from_id is not None:
            page = [t for t in trades if t["a"] >= from_id][:limit]
        elif start is not None or end is not None:
            low, high = start if start is not None else 0, end if end is not None else 1 << 62
            page = [t for t in trades if low <= t["T"] <= high][:limit]
        else:
            page = trades[-limit:]
        return 200, orjson.dumps(page)


_INVALID_SYMBOL = b'{"code":-1121,"msg":"Invalid symbol."}'


def trade_from_agg_trade(agg: dict[str, Any]) -> dict[str, Any]:
    """A recorded ``aggTrade`` event as a ``@trade`` event (module doc: ``t`` is the
    aggregate id ``a``; ``f``/``l`` dropped; the rest as recorded)."""
    trade: dict[str, Any] = {"e": "trade", "E": agg.get("E"), "s": agg["s"], "t": agg["a"],
                             "p": agg["p"], "q": agg["q"], "T": agg["T"], "m": agg["m"]}
    if "M" in agg:
        trade["M"] = agg["M"]
    return trade


@lru_cache(maxsize=256)
def _is_raw(path: str) -> bool:
    """Whether a connection to ``path`` is a raw stream (``/ws``: events alone)."""
    return not urlsplit(path).path.rstrip("/").endswith("/stream")


def _bare_event(text: str) -> str:
    """The event of a combined-stream frame, as a raw stream sends it."""
    try:
        return orjson.dumps(orjson.loads(text)["data"]).decode()
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return text
