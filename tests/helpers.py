"""Test helpers shared by several test files: independent book computations and a
WebSocket client that collects what the server sends."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import trio
import trio_websocket


class ChannelSource:
    """A dispatcher ``Source`` over a bare memory channel, for a test that reads a
    collector's events itself: ``publish`` sends them one by one, so it waits
    while the channel is full (a dispatcher that does not keep up)."""

    def __init__(self, channel: trio.MemorySendChannel[Any]) -> None:
        self.channel = channel
        self.send = channel.send
        self.send_nowait = channel.send_nowait
        self.close = channel.close
        self.aclose = channel.aclose

    async def publish(self, events: Any, *, drained: bool = False) -> None:
        for event in events:
            await self.channel.send(event)

    def share_books(self, books: Any) -> None:
        """The test computes its own books from the events."""

    async def __aenter__(self) -> ChannelSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.channel.close()


def apply_levels(side: dict[str, str], levels: Any) -> None:
    """The simplest book: ``{Decimal-normalized price: size}``; size 0 removes."""
    for price, size, *_ in levels:
        key = str(Decimal(price).normalize())
        if Decimal(size) == 0:
            side.pop(key, None)
        else:
            side[key] = str(Decimal(size).normalize())


def as_plain(levels: Any) -> dict[str, str]:
    """Levels ``[[price, size], ...]`` as a plain normalized dict."""
    side: dict[str, str] = {}
    apply_levels(side, levels)
    return side


def consumer_books(events: Any, books: dict | None = None) -> dict:
    """Apply the ``BookSnapshot`` / ``BookUpdate`` events among ``events`` to untruncated
    ``L2Book``s per symbol, as a client would (into ``books`` when given); returns
    them. Other events are skipped."""
    from daemon.book import L2Book
    from daemon.events import BookSnapshot, BookUpdate

    books = {} if books is None else books
    for event in events:
        if isinstance(event, BookSnapshot):
            books[event.symbol] = L2Book()
            books[event.symbol].load(event.bids, event.asks)
        elif isinstance(event, BookUpdate):
            books[event.symbol].apply(event.bids, event.asks)
    return books


def final_books(events: Any) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """The books a stream of book events ends with, per symbol, as plain normalized
    ``(bids, asks)`` dicts (``consumer_books``)."""
    return {s: (as_plain(b.levels()[0]), as_plain(b.levels()[1]))
            for s, b in consumer_books(events).items()}


def messages(frame: str | bytes) -> list[dict[str, Any]]:
    """The messages of one server frame: an object or a JSON array of them."""
    parsed = orjson.loads(frame)
    return parsed if isinstance(parsed, list) else [parsed]


async def request(ws: trio_websocket.WebSocketConnection, body: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(body).decode())


async def receive_until(
    ws: trio_websocket.WebSocketConnection, predicate: Any, seconds: float = 10
) -> list[dict[str, Any]]:
    """Collect messages until one satisfies ``predicate`` (included); bounded in time."""
    got: list[dict[str, Any]] = []
    with trio.fail_after(seconds):
        while True:
            for message in messages(await ws.get_message()):
                got.append(message)
                if predicate(message):
                    return got
