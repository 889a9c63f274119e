"""The dispatcher without sockets: what its subscribers of one moment share."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import trio
import trio.testing

from daemon.dispatch import Dispatcher, Message, Retention
from daemon.events import BookSnapshot, BookUpdate, Event
from tests.broadcast_server import coinbase_events


class Recorder:
    """A subscriber that keeps what it is given."""

    def __init__(self) -> None:
        self.got: list[Message] = []

    def deliver(self, message: Message) -> None:
        self.got.append(message)


def test_subscribers_of_one_moment_share_one_encoded_snapshot(captures: Path) -> None:
    events = [e for e in coinbase_events(captures) if isinstance(e, BookSnapshot | BookUpdate)]
    symbol = events[0].symbol
    dispatcher = Dispatcher(8, {"book": Retention(10, 60.0)})
    for event in events[:200]:
        dispatcher.publish(event)
    key = f"book:coinbase:{symbol}"
    first, _ = dispatcher.subscribe(Recorder(), ["book"], [f"coinbase:{symbol}"])
    second, _ = dispatcher.subscribe(Recorder(), ["book"], [f"coinbase:{symbol}"])
    assert first[0] is second[0]  # encoded once for both
    assert orjson.loads(first[0].payload)["seq"] == dispatcher.streams[key].seq
    conflated = dispatcher.streams[key].snapshot_message(conflated=True)
    assert conflated is not first[0] and orjson.loads(conflated.payload)["conflated"] is True

    update = next(e for e in events[200:] if e.symbol == symbol and isinstance(e, BookUpdate))
    dispatcher.publish(update)  # the book changed: a new snapshot, with the update in it
    third, _ = dispatcher.subscribe(Recorder(), ["book"], [f"coinbase:{symbol}"])
    assert third[0] is not first[0]
    snapshot = orjson.loads(third[0].payload)
    assert snapshot["seq"] == orjson.loads(first[0].payload)["seq"] + 1
    levels = {tuple(level) for level in snapshot["bids"] + snapshot["asks"]}
    changed = [level for level in update.bids + update.asks if level[1] != "0"]
    assert changed and all(tuple(level) in levels for level in changed)


def _events(outputs: list) -> list:
    return [o for o in outputs if isinstance(o, Event)]


async def test_a_source_that_shares_its_books_gives_the_snapshots_of_a_kept_copy(
        captures: Path) -> None:
    """A native collector's protocol shares its books (``Source.share_books``):
    on the Coinbase capture, every late joiner's snapshot equals, byte for byte,
    the one of a dispatcher that applies every update to its own copy; while a
    shared book resyncs there is none (never a stale book), and an update of that
    stream from a source that did not send its snapshot is rejected."""
    from daemon.exchanges.coinbase import parse_markets
    from daemon.replay.capture import read_capture
    from tests.test_coinbase_protocol import Recorded, new_feed, with_field

    conn = read_capture(captures / "COINBASE.ws.28.0").connections[0]
    (rest,) = read_capture(captures / "COINBASE.0").rest
    recorded = Recorded(opened=conn.opened, frames=tuple((r.ts, r.text) for r in conn.received),
                        products=tuple(orjson.loads(conn.sent[0][1])["product_ids"]),
                        markets=parse_markets(rest.body))
    sharing, keeping = new_feed(recorded), new_feed(recorded)
    shared, kept = Dispatcher(8, {}), Dispatcher(8, {})
    inlet = shared.open_source()
    inlet.share_books(sharing.book)
    compared = 0
    for i, (ts, text) in enumerate(recorded.frames):
        await inlet.publish(_events(sharing.on_message(text, ts)))
        for event in _events(keeping.on_message(text, ts)):
            kept.publish(event)
        if i % 50 == 0 or i == len(recorded.frames) - 1:
            for key, stream in kept.streams.items():
                if stream.channel == "book":
                    ours = shared.streams[key].snapshot_message()
                    theirs = stream.snapshot_message()
                    assert ours is not None and theirs is not None
                    assert ours.payload == theirs.payload
                    assert shared.streams[key].own_book is None  # no copy kept
                    compared += 1
    assert compared > 100

    # a frame that breaks a book: the shared book resyncs and no snapshot is given
    at = recorded.index("l2update")
    product = orjson.loads(recorded.frames[at][1])["product_id"]
    symbol = recorded.markets[product]
    broken = with_field(recorded.frames[at][1], changes="not a list")
    await inlet.publish(_events(sharing.on_message(broken, recorded.frames[-1][0])))
    stream = shared.streams[f"book:coinbase:{symbol}"]
    assert sharing.book(symbol) is None and stream.book is None
    assert stream.snapshot_message(conflated=True) is None
    initial, _ = shared.subscribe(Recorder(), ["book"], [f"coinbase:{symbol}"])
    assert initial == []
    # the snapshot that ends the resync: the book is shared again
    snapshot = next(text for _, text in recorded.frames
                    if orjson.loads(text).get("type") == "snapshot"
                    and orjson.loads(text)["product_id"] == product)
    await inlet.publish(_events(sharing.on_message(snapshot, recorded.frames[-1][0])))
    assert stream.book is sharing.book(symbol) is not None
    update = BookUpdate(exchange="coinbase", symbol=symbol, ts=1.0, recv_ts=1.0,
                        bids=(("1", "1"),), asks=())
    seq = stream.seq
    shared.publish(update)  # from another source (no shared books): a source's bug
    assert stream.seq == seq and shared.rejected == 1


async def test_events_sent_stay_in_order_with_a_publish_that_comes_between() -> None:
    """Two trades of one stream sent back to back while the dispatcher's task
    waits, then another source publishes in its own step: the sent ones keep
    their place (first, in order). With a trio memory channel the first was
    already handed to the waiting task, and the publish overtook it."""
    from daemon.events import Trade

    def trade(i: int, symbol: str = "BTC-USD") -> Trade:
        return Trade(exchange="coinbase", symbol=symbol, ts=float(i), recv_ts=float(i),
                     id=str(i), price="1", size="1", side="buy")

    dispatcher = Dispatcher(8, {"trades": Retention(10, 60.0)})
    recorder = Recorder()
    dispatcher.subscribe(recorder, ["trades"], ["*"])
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.serve)
        sender, publisher = dispatcher.open_source(), dispatcher.open_source()
        sender.send_nowait(trade(1))
        sender.send_nowait(trade(2))
        await publisher.publish([trade(3, "ETH-USD")])
        with trio.fail_after(5):
            while len(recorder.got) < 3:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [orjson.loads(m.payload)["id"] for m in recorder.got] == ["1", "2", "3"]


async def test_a_full_inbox_makes_senders_wait_in_order_and_a_closed_source_refuses() -> None:
    from daemon.events import Trade

    dispatcher = Dispatcher(2, {"trades": Retention(100, 60.0)})
    recorder = Recorder()
    dispatcher.subscribe(recorder, ["trades"], ["*"])
    source = dispatcher.open_source()
    trades = [Trade(exchange="kraken", symbol="BTC-USD", ts=1.0, recv_ts=1.0, id=str(i),
                    price="1", size="1", side="sell") for i in range(6)]
    source.send_nowait(trades[0])
    source.send_nowait(trades[1])
    with pytest.raises(trio.WouldBlock):
        source.send_nowait(trades[2])
    async with trio.open_nursery() as nursery:
        for t in trades[2:]:  # these wait for room, in this order
            nursery.start_soon(source.send, t)
            await trio.testing.wait_all_tasks_blocked()
        stats = dispatcher.statistics()
        assert (stats.buffer_used, stats.buffer_size, stats.tasks_waiting_send) == (2, 2, 4)
        await nursery.start(dispatcher.serve)
        with trio.fail_after(5):
            while len(recorder.got) < 6:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [orjson.loads(m.payload)["id"] for m in recorder.got] == [str(i) for i in range(6)]
    source.close()
    with pytest.raises(trio.ClosedResourceError):
        source.send_nowait(trades[0])
    with pytest.raises(trio.ClosedResourceError):
        await source.publish(trades[:1])
