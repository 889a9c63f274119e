"""The tape: every frame an exchange sent, over all its capture files, in time order,
and the faults a test can inject into it.

Frames are numbered from 1 in tape order; faults name frames by that number.
A looping tape (``--loop``) plays again every ``loop_period``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence

import attrs

from daemon.replay.capture import Capture, Received


@attrs.frozen
class Faults:
    """Faults to inject, each keyed by tape frame number (1-based).

    ``close``: close every connection that would get frame N, before it (N is lost
    to them); ``drop``: frame N is sent to nobody (the emulator's own books still
    apply it); ``corrupt_checksum``: frame N's book checksum is altered;
    ``malformed``: frame N is replaced by a frame that is not valid JSON;
    ``repeat``: frame N is sent twice;
    ``stall``: before frame N, send nothing for the given seconds (connections stay
    open).
    """

    close: frozenset[int] = frozenset()
    drop: frozenset[int] = frozenset()
    corrupt_checksum: frozenset[int] = frozenset()
    malformed: frozenset[int] = frozenset()
    repeat: frozenset[int] = frozenset()
    stall: dict[int, float] = attrs.field(factory=dict)

    def __bool__(self) -> bool:
        return bool(
            self.close or self.drop or self.corrupt_checksum or self.malformed or self.repeat
            or self.stall
        )


NO_FAULTS = Faults()


def merge_frames(captures: Iterable[Capture]) -> list[Received]:
    """All received frames of these captures merged by recorded time (stable)."""
    streams = [
        [frame for conn in capture.connections for frame in conn.received] for capture in captures
    ]
    return list(heapq.merge(*streams, key=lambda frame: frame.ts))


def loop_period(tape: Sequence[Received], exchange_times: Iterable[float] = ()) -> float:
    """The period of one pass of ``tape`` when it loops, in seconds: the longer of its
    recorded span and the span of the exchange times its frames carry
    (``exchange_times``, epoch s), plus the mean gap between frames, rounded up to
    the millisecond. Shifting every time of pass ``k`` by ``k`` periods keeps them
    all increasing from one pass to the next."""
    if not tape:
        return 0.0
    span = tape[-1].ts - tape[0].ts
    times = list(exchange_times)
    if times:
        span = max(span, max(times) - min(times))
    gap = span / (len(tape) - 1) if len(tape) > 1 else 1.0
    return math.ceil((span + max(gap, 0.001)) * 1000) / 1000
