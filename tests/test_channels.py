"""The channel-policy table, and the dispatcher and sessions reading it."""

from __future__ import annotations

import pytest

from daemon.channels import POLICIES, ChannelPolicy, Retention, policy_of
from daemon.dispatch import Dispatcher, Message
from daemon.events import CHANNELS, Ticker, Trade


class Recorder:
    def __init__(self) -> None:
        self.got: list[Message] = []

    def deliver(self, message: Message) -> None:
        self.got.append(message)


def trade(i: int) -> Trade:
    return Trade(exchange="x", symbol="A-B", ts=1.0, recv_ts=1.0, id=str(i), price="1",
                 size="1", side="buy")


def ticker(bid: str) -> Ticker:
    return Ticker(exchange="x", symbol="A-B", ts=1.0, recv_ts=1.0, bid=bid, bid_size="1",
                  ask="2", ask_size="1")


def test_every_channel_has_a_policy_and_each_is_lossless_or_conflates() -> None:
    assert set(POLICIES) == set(CHANNELS)
    assert {c for c, p in POLICIES.items() if p.lossless} == {"trades", "system", "whales",
                                                                "bars"}
    assert {c for c, p in POLICIES.items() if p.conflates} == {"book", "ticker", "status",
                                                                 "quote", "views"}
    assert policy_of("declared-later").lossless  # an unknown channel loses nothing
    with pytest.raises(ValueError, match="lossless or conflates"):
        ChannelPolicy(name="bad", lossless=True, conflates=True, late_joiner="history",
                      retention=Retention(1, 1.0))


def test_the_dispatcher_serves_late_joiners_by_the_table() -> None:
    dispatcher = Dispatcher(8, {})  # no retention configured: the table's defaults
    for i in range(5):
        dispatcher.publish(trade(i))
    dispatcher.publish(ticker("1"))
    dispatcher.publish(ticker("1.5"))
    assert dispatcher.streams["trades:x:A-B"].retention == POLICIES["trades"].retention
    assert dispatcher.streams["ticker:x:A-B"].policy is POLICIES["ticker"]
    history, _ = dispatcher.subscribe(Recorder(), ["trades"], ["*"], history=3)
    assert [m.seq for m in history] == [3, 4, 5]  # lossless: history
    latest, _ = dispatcher.subscribe(Recorder(), ["ticker"], ["*"], history=3)
    assert [m.seq for m in latest] == [2]  # state: the latest only
