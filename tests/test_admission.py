"""The connection limits (``daemon.broadcast.admission``), without sockets: a
connection counts from ``admit`` to ``release``, and a burst passes no limit."""

from __future__ import annotations

import h11
import pytest

from daemon.broadcast.admission import (
    DESCRIPTORS,
    MAX_CONNECTIONS,
    PER_ADDRESS,
    QUIET,
    RETRY_AFTER,
    Admission,
    Refusal,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def admission(max_connections: int = 10, per_address: int = 1000, **kwargs) -> tuple[Admission, list[str], Clock]:
    lines: list[str] = []
    clock = Clock()
    return Admission(max_connections, per_address, clock=clock, notify=lines.append,
                     **kwargs), lines, clock


def test_a_burst_of_three_times_max_connections_admits_exactly_max_connections() -> None:
    limits, lines, _ = admission(max_connections=500)
    tickets = [limits.admit(f"10.0.{i % 7}.1") for i in range(1500)]
    admitted = [t for t in tickets if t.refusal is None]
    refused = [t for t in tickets if t.refusal is not None]
    assert len(admitted) == 500 == limits.connections
    assert {(t.refusal.status, t.refusal.limit, t.refusal.retry_after) for t in refused} == {
        (503, MAX_CONNECTIONS, RETRY_AFTER)}
    assert limits.refusing == 1000 and limits.refused == {MAX_CONNECTIONS: 1000}
    assert limits.at_limit == MAX_CONNECTIONS
    assert len(lines) == 1 and "at server.max_connections (500)" in lines[0]
    # a connection counts until it is closed: one leaves, one more is admitted
    limits.release(admitted[0])
    assert limits.at_limit is None
    assert limits.admit("10.0.0.1").refusal is None
    assert limits.admit("10.0.0.1").refusal is not None


def test_a_burst_from_one_address_admits_exactly_the_per_address_limit() -> None:
    limits, lines, _ = admission(max_connections=10_000, per_address=1000)
    tickets = [limits.admit("192.0.2.7") for _ in range(3000)]
    assert sum(t.refusal is None for t in tickets) == 1000
    assert {t.refusal.status for t in tickets if t.refusal} == {429}
    assert all(t.refusal.limit == PER_ADDRESS for t in tickets if t.refusal)
    assert limits.admit("192.0.2.8").refusal is None  # another address is not limited
    assert lines == ["broadcast: 192.0.2.7 has 1000 connections, at server.max_connections_per_ip "
                     "(1000): its new connections get 429 until some leave"]


def test_a_connection_counts_from_admit_to_release_once() -> None:
    limits, _, _ = admission(max_connections=2, per_address=2)
    a, b = limits.admit("192.0.2.1"), limits.admit("192.0.2.1")
    assert limits.connections == 2 and limits.per_address["192.0.2.1"] == 2
    refused = limits.admit("192.0.2.9")
    assert refused.refusal is not None and limits.refusing == 1
    limits.release(a)
    limits.release(a)  # twice: counted once
    limits.release(refused)
    assert limits.connections == 1 and limits.refusing == 0
    limits.release(b)
    assert limits.connections == 0 and not limits.per_address


def test_the_descriptor_budget_refuses_with_503_before_max_connections() -> None:
    limits, lines, _ = admission(max_connections=10_000, budget=136)
    assert limits.limit == 136
    tickets = [limits.admit(f"192.0.2.{i % 200}") for i in range(300)]
    assert sum(t.refusal is None for t in tickets) == 136
    assert {(t.refusal.status, t.refusal.limit) for t in tickets if t.refusal} == {(503, DESCRIPTORS)}
    assert limits.at_limit == DESCRIPTORS
    assert len(lines) == 1 and "descriptor budget (136" in lines[0]


def test_refusals_being_answered_are_bounded_by_the_budget_and_a_minimum() -> None:
    limits, _, _ = admission(max_connections=10, budget=100, min_refusing=4)
    for _ in range(10):
        limits.admit("192.0.2.1")
    # at max_connections, but with descriptors to spare: refusals use them
    refusals = [limits.admit("192.0.2.1") for _ in range(80)]
    assert limits.accepting
    refusals += [limits.admit("192.0.2.1") for _ in range(10)]
    assert limits.connections + limits.refusing == 100 and not limits.accepting
    limits.release(refusals.pop())
    assert limits.accepting
    # with the budget used up by clients, refusals get min_refusing descriptors more
    tight, _, _ = admission(max_connections=1000, budget=10, min_refusing=4)
    for _ in range(10):
        tight.admit("192.0.2.1")
    out = [tight.admit("192.0.2.1") for _ in range(4)]
    assert not tight.accepting
    tight.release(out[0])
    assert tight.accepting
    assert all(t.refusal is not None for t in out)
    # no budget (in-process servers): always accepting
    free, _, _ = admission(max_connections=1)
    for _ in range(100):
        free.admit("192.0.2.1")
    assert free.accepting


def test_state_lines_once_per_change_and_quiet_when_the_limit_flaps() -> None:
    limits, lines, clock = admission(max_connections=2)
    a = limits.admit("192.0.2.1")
    limits.admit("192.0.2.2")
    for _ in range(50):
        limits.admit("192.0.2.3")
    assert len(lines) == 1  # 50 refusals, one line
    limits.release(a)
    clock.now = 1.0
    a = limits.admit("192.0.2.1")
    assert lines[1] == "broadcast: admitting clients again (2 connections; 50 refused since the last such line)"
    # flapping within QUIET: no more lines, counted for the next one
    for second in range(2, 12):
        clock.now = float(second)
        limits.admit("192.0.2.3")
        limits.release(a)
        a = limits.admit("192.0.2.1")
    assert len(lines) == 2
    clock.now = QUIET + 5
    limits.admit("192.0.2.3")
    limits.release(a)
    limits.admit("192.0.2.1")
    assert len(lines) == 4
    assert lines[3].endswith("(2 connections; 11 refused since the last such line)")


@pytest.mark.parametrize("refusal", [Refusal(MAX_CONNECTIONS, 503, "too many connections"),
                                     Refusal(PER_ADDRESS, 429, "too many connections from this address")])
def test_a_refusal_is_a_complete_http_response_with_retry_after(refusal: Refusal) -> None:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.receive_data(refusal.response())
    response = client.next_event()
    assert isinstance(response, h11.Response)
    assert response.status_code == refusal.status
    headers = dict(response.headers)
    assert headers[b"retry-after"] == str(RETRY_AFTER).encode()
    assert headers[b"connection"] == b"close"
    body = client.next_event()
    assert isinstance(body, h11.Data) and body.data == f"{refusal.reason}\n".encode()
    assert isinstance(client.next_event(), h11.EndOfMessage)
