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
        return stream

    def corrupt_checksum(self, text: str) -> str:
        """Binance depth events carry no checksum: corrupt the update id instead."""
        frame = orjson.loads(text)
        frame["data"]["U"] = int(frame["data"]["U"]) + 1_000_000
        return orjson.dumps(frame).decode()

    # -- REST -----------------------------------------------------------------------

    def rest(self, target: str) -> tuple[int, bytes]:
        """Answer a REST GET of ``target`` (path and query)."""
        parts = urlsplit(target)
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
