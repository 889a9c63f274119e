"""The dispatcher without sockets: what its subscribers of one moment share."""

from __future__ import annotations

from pathlib import Path

import orjson

from daemon.dispatch import Dispatcher, Message, Retention
from daemon.events import BookSnapshot, BookUpdate
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
