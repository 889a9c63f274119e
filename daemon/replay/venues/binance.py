"""Binance as the emulator plays it.

- WebSocket: ``/stream?streams=a/b/c`` (combined stream; also ``/ws/a/b``) gets only
  the recorded frames of the streams it names. ``SUBSCRIBE`` requests
  (``{"method":"SUBSCRIBE","params":[...],"id":1}``) add streams and are answered
  ``{"result":null,"id":1}``, as Binance does.
- REST: ``/api/v3/exchangeInfo`` as recorded; ``/api/v3/depth?symbol=X&limit=N``
  from the book as it stands at this moment of the replay: the recorded snapshot
  with every depth event of the tape since applied (its ``lastUpdateId`` is the
  last applied ``u``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from daemon.book import L2Book
from daemon.replay.capture import Capture, Received


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

    def greeting(self) -> list[str]:
        """Binance sends nothing unprompted on a new connection."""
        return []

    # -- WebSocket ------------------------------------------------------------------

    def open(self, path: str) -> set[str]:
        """The routing keys (stream names) a new connection to ``path`` gets."""
        parts = urlsplit(path)
        if parts.path.rstrip("/").endswith("/stream"):
            names = parse_qs(parts.query).get("streams", [""])[0]
            return {s for s in names.split("/") if s}
        if "/ws/" in parts.path:
            return {s for s in parts.path.split("/ws/", 1)[1].split("/") if s}
        return set()

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
