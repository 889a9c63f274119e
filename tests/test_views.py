"""Top-of-book views (``book`` with ``depth``, ``quote``) on the Coinbase capture:
the daemon's dispatcher, views task and request handlers (sans-IO clients, then
real WebSocket clients), against books computed here from the raw frames with
plain dicts (never ``L2Book`` or the Coinbase parser)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing
import trio_websocket

from daemon.broadcast.auth import EVERYTHING
from daemon.broadcast.protocol import INVALID_REQUEST, UNKNOWN_CHANNEL, RequestError, parse_request
from daemon.broadcast.queue import ClientQueue, QueueHooks
from daemon.broadcast.requests import RequestHandler
from daemon.config import ServerConfig
from daemon.derived.views import Views
from daemon.dispatch import Dispatcher, Message, Retention
from daemon.events import BookSnapshot, BookUpdate
from tests import broadcast_server
from tests.broadcast_server import coinbase_events
from tests.helpers import messages, receive_until, request

RETENTION = {"book": Retention(100, 60.0), "views": Retention(100, 60.0),
             "quote": Retention(100, 60.0)}
Top = tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]


class RawBooks:
    """The capture's level2 books, frame by frame, as plain ``{price: size}`` dicts
    keyed by the Decimal of the price (the string as last sent kept)."""

    def __init__(self) -> None:
        self.books: dict[str, tuple[dict[Decimal, tuple[str, str]], dict[Decimal, tuple[str, str]]]] = {}

    def apply(self, m: dict[str, Any]) -> str | None:
        """Apply one raw frame; the product whose book it changed, else None."""
        if m["type"] == "snapshot":
            self.books[m["product_id"]] = (
                {Decimal(p): (p, s) for p, s in m["bids"] if Decimal(s)},
                {Decimal(p): (p, s) for p, s in m["asks"] if Decimal(s)})
            return str(m["product_id"])
        if m["type"] == "l2update" and m["product_id"] in self.books:
            bids, asks = self.books[m["product_id"]]
            for side, price, size in m["changes"]:
                levels = bids if side == "buy" else asks
                if Decimal(size) == 0:
                    levels.pop(Decimal(price), None)
                else:
                    levels[Decimal(price)] = (price, size)
            return str(m["product_id"])
        return None

    def top(self, product: str, n: int) -> Top:
        bids, asks = self.books[product]
        return (tuple(bids[p] for p in sorted(bids, reverse=True)[:n]),
                tuple(asks[p] for p in sorted(asks)[:n]))


def raw_frames(captures: Path) -> list[dict[str, Any]]:
    frames = []
    for line in (captures / "COINBASE.ws.28.0").read_text().splitlines():
        head, sep, text = line.partition(": ")
        if sep and text.startswith("{"):
            frames.append(json.loads(text))
    return frames


def as_top(view: dict[str, Any]) -> Top:
    return (tuple((p, s) for p, s in view["bids"]), tuple((p, s) for p, s in view["asks"]))


def numeric(top: Top) -> tuple[list[tuple[Decimal, Decimal]], list[tuple[Decimal, Decimal]]]:
    return ([(Decimal(p), Decimal(s)) for p, s in top[0]],
            [(Decimal(p), Decimal(s)) for p, s in top[1]])


def client(dispatcher: Dispatcher, views: Views) -> tuple[RequestHandler, ClientQueue]:
    queue = ClientQueue(100_000, trio.current_time, QueueHooks(
        ready=list, wake=list, conflated=list, slow_consumer=list))
    return RequestHandler(queue, dispatcher, EVERYTHING, ServerConfig(), "e1",
                          trio.current_time(), views), queue


def views_of(queue: ClientQueue) -> list[dict[str, Any]]:
    return [orjson.loads(item.payload) for item in queue.items if isinstance(item, Message)]


async def test_depth_views_follow_the_top_levels_only(captures: Path, autojump_clock: Any
                                                      ) -> None:
    """Every Coinbase book event, each built into its views before the next: a
    depth-10 client gets a ``book_snapshot`` exactly when the top 10 levels
    changed (none when only deeper levels did), equal to the top 10 of the raw
    book; a quote client exactly when the best bid or offer changed; 100 depth-10
    clients cost what one costs (one build per change) and share each message."""
    frames = raw_frames(captures)
    events = [e for e in coinbase_events(captures) if isinstance(e, BookSnapshot | BookUpdate)]
    book_frames = [m for m in frames if m["type"] in ("snapshot", "l2update")]
    assert len(book_frames) == len(events) == 9729
    dispatcher = Dispatcher(1024, RETENTION)
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.serve)
        views = Views(dispatcher, dispatcher.open_source())
        await nursery.start(views.run)
        clients = [client(dispatcher, views) for _ in range(100)]
        for handler, _ in clients:
            answer = handler.receive(orjson.dumps(
                {"op": "subscribe", "id": 1, "channels": ["book"], "symbols": ["coinbase:*"],
                 "depth": 10}), trio.current_time())
            assert answer.replies[0]["depth"] == 10
        quote_handler, quotes = client(dispatcher, views)
        quote_handler.receive(orjson.dumps(
            {"op": "subscribe", "id": 1, "channels": ["quote"], "symbols": ["coinbase:*"]}), 0.0)
        raw = RawBooks()
        expected: dict[str, list[Top]] = {}
        expected_quotes: dict[str, list[Top]] = {}
        async with dispatcher.open_source() as source:
            for event, frame in zip(events, book_frames, strict=True):
                product = raw.apply(frame)
                assert product == event.symbol
                for n, into in ((10, expected), (1, expected_quotes)):
                    top = raw.top(product, n)
                    seen = into.setdefault(product, [])
                    if not seen or numeric(seen[-1]) != numeric(top):
                        seen.append(top)
                await source.send(event)
                await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    first = views_of(clients[0][1])
    got: dict[str, list[Top]] = {}
    for view in first:
        assert view["type"] == "book_snapshot" and view["depth"] == 10
        got.setdefault(view["symbol"], []).append(as_top(view))
    assert set(got) == set(expected) and len(expected) == 10
    for product, tops in expected.items():
        assert [numeric(t) for t in got[product]] == [numeric(t) for t in tops], product
        assert got[product][-1] == tops[-1]  # the last one: the exact strings too
    changes = sum(len(t) for t in expected.values())
    # 3,081 updates changed only deeper levels (or nothing): no message for them
    assert len(first) == changes == len(events) - 3081
    assert views.statistics().figures["builds"] == len(events) * 2  # depth 10 and quote
    for _, queue in clients[1:]:  # the same encoded messages for every client
        assert [m.payload for m in queue.items if isinstance(m, Message)] == \
            [m.payload for m in clients[0][1].items if isinstance(m, Message)]
    got_quotes: dict[str, list[tuple[str, str, str, str]]] = {}
    for quote in views_of(quotes):
        assert quote["type"] == "quote"
        got_quotes.setdefault(quote["symbol"], []).append(
            (quote["bid"], quote["bid_size"], quote["ask"], quote["ask_size"]))
    for product, tops in expected_quotes.items():
        assert [tuple(Decimal(x) for x in q) for q in got_quotes[product]] == [
            (*(Decimal(x) for x in t[0][0]), *(Decimal(x) for x in t[1][0])) for t in tops]


async def test_a_throttled_view_is_at_most_one_per_interval_and_ends_on_the_book(
        captures: Path, autojump_clock: Any) -> None:
    """The capture at its recorded pace, a depth-5 view at 250 ms: messages at
    least 250 ms apart, each a change, the last equal to the final top 5."""
    frames = raw_frames(captures)
    events = [e for e in coinbase_events(captures) if isinstance(e, BookSnapshot | BookUpdate)]
    dispatcher = Dispatcher(1024, RETENTION)
    arrivals: list[tuple[float, dict[str, Any]]] = []

    class Timed:
        def deliver(self, message: Message) -> None:
            arrivals.append((trio.current_time(), orjson.loads(message.payload)))

    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.serve)
        views = Views(dispatcher, dispatcher.open_source())
        await nursery.start(views.run)
        views.want("book", 5, 250, ("coinbase:SKL-USD",))
        dispatcher.subscribe(Timed(), ["views"], ["coinbase:SKL-USD:5:250"])
        base, t0 = trio.current_time(), events[0].recv_ts
        async with dispatcher.open_source() as source:
            for event in events:
                await trio.sleep_until(base + event.recv_ts - t0)
                await source.send(event)
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    raw = RawBooks()
    for m in frames:
        raw.apply(m)
    times = [at for at, _ in arrivals]
    assert len(times) > 20
    assert all(b - a >= 0.25 - 1e-9 for a, b in zip(times, times[1:], strict=False))
    tops = [numeric(as_top(v)) for _, v in arrivals]
    assert all(a != b for a, b in zip(tops, tops[1:], strict=False))
    assert as_top(arrivals[-1][1]) == raw.top("SKL-USD", 5)
    assert [v["seq"] for _, v in arrivals] == list(range(1, len(arrivals) + 1))


async def test_depth_over_websockets_late_joiners_and_unsubscribe(captures: Path) -> None:
    """Real clients: a depth-10 subscriber's last snapshot is the top 10 of the
    raw book at the end of the capture; a client that joins later gets the
    view's latest state at once; unsubscribing ``book`` ends the views; a
    full-book subscriber alongside still gets the whole book."""
    frames = raw_frames(captures)
    raw = RawBooks()
    for m in frames:
        raw.apply(m)
    events = [e for e in coinbase_events(captures) if isinstance(e, BookSnapshot | BookUpdate)]
    async with trio.open_nursery() as nursery:
        running = await broadcast_server.start(nursery, views=True)
        with trio.fail_after(30):
            async with trio_websocket.open_websocket_url(running.url) as ws, \
                    trio_websocket.open_websocket_url(running.url) as full:
                await ws.get_message()
                await full.get_message()
                await request(ws, {"op": "subscribe", "id": 1, "channels": ["book"],
                                   "symbols": ["coinbase:SKL-USD"], "depth": 10,
                                   "throttle_ms": 100})
                await request(full, {"op": "subscribe", "id": 1, "channels": ["book"],
                                     "symbols": ["coinbase:SKL-USD"]})
                await broadcast_server.publish(running, events)
                await broadcast_server.until_published(running, len(events))
                last: dict[str, Any] = {}
                while last.get("bids") is None or as_top(last) != raw.top("SKL-USD", 10):
                    for m in messages(await ws.get_message()):
                        if m["type"] == "book_snapshot":
                            last = m
                assert last["depth"] == 10 and last["interval_ms"] == 100
                async with trio_websocket.open_websocket_url(running.url) as late:
                    await late.get_message()
                    await request(late, {"op": "subscribe", "id": 2, "channels": ["book"],
                                         "symbols": ["coinbase:*"], "depth": 10,
                                         "throttle_ms": 100})
                    got = []
                    while len([m for m in got if m["type"] == "book_snapshot"]) < 1:
                        got += messages(await late.get_message())
                    snapshot = next(m for m in got if m["type"] == "book_snapshot")
                    assert snapshot["seq"] >= 1 and len(snapshot["bids"]) <= 10
                await request(ws, {"op": "unsubscribe", "id": 3, "channels": ["book"],
                                   "symbols": ["coinbase:SKL-USD"]})
                (ack,) = [m for m in messages(await ws.get_message()) if m["type"] == "ack"]
                assert ack["op"] == "unsubscribe"
                held = [pairs for sub, pairs in running.dispatcher.subscriptions.items()
                        if sub is not running.views and ("book", "coinbase:SKL-USD") in pairs]
                assert len(held) == 1  # only the full-book client's
                assert not [p for pairs in running.dispatcher.subscriptions.values()
                            for p in pairs if p[0] == "views" and "SKL-USD" in p[1]
                            and len(pairs) == 0]
                whole = []
                while not [m for m in whole if m["type"] == "book_snapshot"]:
                    whole += messages(await full.get_message())
        nursery.cancel_scope.cancel()
    assert running.views is not None
    running.views.prune()
    assert running.views.statistics().figures["demand"] == 0


async def until(condition: Any) -> None:
    """Wait until ``condition()`` (at most 10 s, checking every 10 ms)."""
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.01)


async def test_a_view_stops_with_its_last_client_and_starts_again(captures: Path) -> None:
    """Real clients on the Coinbase capture's books: A (depth 10) and B (depth 10
    and quote) of SKL-USD. When A unsubscribes B's views go on; when B
    disconnects the views stop at once (no demand, no view, no book subscription
    of the views, none of the next 4,000 book events read); when C asks for depth
    10 the view starts again and C's first snapshot is the top 10 of the book as
    it is then (never the one from before the stop), and follows the book."""
    frames = raw_frames(captures)
    events = [e for e in coinbase_events(captures) if isinstance(e, BookSnapshot | BookUpdate)]
    book_frames = [m for m in frames if m["type"] in ("snapshot", "l2update")]
    half, rest = 4000, 8000
    tops = []
    raw = RawBooks()
    for n, frame in enumerate(book_frames, 1):
        raw.apply(frame)
        if n in (half, rest, len(book_frames)):
            tops.append(raw.top("SKL-USD", 10))
    depth = {"op": "subscribe", "id": 1, "channels": ["book"], "symbols": ["coinbase:SKL-USD"],
             "depth": 10}
    async with trio.open_nursery() as nursery:
        running = await broadcast_server.start(nursery, views=True)
        views = running.views
        assert views is not None
        dispatcher = running.dispatcher

        def figures() -> dict[str, Any]:
            return views.statistics().figures  # type: ignore[union-attr]

        def views_of_books() -> list[str]:
            return [s.key for s in dispatcher.streams.values()
                    if s.channel == "book" and views in s.subscribers]

        with trio.fail_after(30):
            async with trio_websocket.open_websocket_url(running.url) as a:
                await a.get_message()
                async with trio_websocket.open_websocket_url(running.url) as b:
                    await b.get_message()
                    await request(a, depth)
                    await request(b, {**depth, "channels": ["book", "quote"]})
                    await receive_until(a, lambda m: m["type"] == "ack")
                    await receive_until(b, lambda m: m["type"] == "ack")
                    assert figures()["demand"] == 2  # depth 10 and the quote
                    await broadcast_server.publish(running, events[:half])
                    await broadcast_server.until_published(running, half)
                    got = await receive_until(
                        b, lambda m: m["type"] == "book_snapshot"
                        and as_top(m) == tops[0])
                    assert got[-1]["depth"] == 10
                    await request(a, {"op": "unsubscribe", "id": 2, "channels": ["book"],
                                      "symbols": ["coinbase:SKL-USD"]})
                    await receive_until(a, lambda m: m["type"] == "ack")
                    assert figures()["demand"] == 2 and figures()["views"] == 2
                    assert views_of_books() == ["book:coinbase:SKL-USD"]
                    subscribers = len(dispatcher.subscriptions)
                # B disconnected: the views stop as the server removes its subscriber
                await until(lambda: len(dispatcher.subscriptions) == subscribers - 1)
                assert figures()["demand"] == 0
                assert figures()["views"] == 0 and views_of_books() == []
                assert not [p for pairs in dispatcher.subscriptions.values() for p in pairs
                            if p[0] in ("views", "quote")]
                builds, received = figures()["builds"], views.received
                published = dispatcher.events
                await broadcast_server.publish(running, events[half:rest])
                await broadcast_server.until_published(running, published + rest - half)
                assert figures()["builds"] == builds and views.received == received
                async with trio_websocket.open_websocket_url(running.url) as c:
                    await c.get_message()
                    await request(c, {**depth, "id": 3})
                    got = await receive_until(c, lambda m: m["type"] == "book_snapshot")
                    assert as_top(got[-1]) == tops[1]  # the book now, not before the stop
                    assert figures()["demand"] == 1 and figures()["builds"] > builds
                    assert views_of_books() == ["book:coinbase:SKL-USD"]
                    await broadcast_server.publish(running, events[rest:])
                    await receive_until(c, lambda m: m["type"] == "book_snapshot"
                                        and as_top(m) == tops[2])
                    subscribers = len(dispatcher.subscriptions)
                await until(lambda: len(dispatcher.subscriptions) == subscribers - 1)
                assert figures()["demand"] == 0 and views_of_books() == []
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("text", "code", "message"), [
    ('{"op":"subscribe","channels":["book"],"symbols":["*"],"depth":0.5}', INVALID_REQUEST,
     "depth must be an integer from 1 to 1000"),
    ('{"op":"subscribe","channels":["book"],"symbols":["*"],"depth":1001}', INVALID_REQUEST,
     "depth must be an integer from 1 to 1000"),
    ('{"op":"subscribe","channels":["trades"],"symbols":["*"],"depth":10}', INVALID_REQUEST,
     "depth applies to the book channel"),
    ('{"op":"subscribe","channels":["views"],"symbols":["*"]}', UNKNOWN_CHANNEL,
     "unknown channel 'views'"),
    ('{"op":"subscribe","channels":["bars"],"symbols":["coinbase:BTC-USD:1x"]}',
     "invalid_symbol", "(and :INTERVAL)"),
])
def test_bad_view_requests_are_errors(text: str, code: str, message: str) -> None:
    with pytest.raises(RequestError) as error:
        parse_request(text)
    assert error.value.code == code and message in error.value.message


def test_a_server_without_views_refuses_depth() -> None:
    dispatcher = Dispatcher(8, {})
    queue = ClientQueue(10, lambda: 0.0, QueueHooks(ready=list, wake=list, conflated=list,
                                                     slow_consumer=list))
    handler = RequestHandler(queue, dispatcher, EVERYTHING, ServerConfig(), "e1", 0.0)
    answer = handler.receive('{"op":"subscribe","id":4,"channels":["quote"],"symbols":["*"]}', 0.0)
    assert answer.replies[0]["code"] == UNKNOWN_CHANNEL and answer.replies[0]["id"] == 4
    assert dispatcher.subscriptions.get(queue, set()) == set()
