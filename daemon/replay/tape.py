"""The tape: every frame an exchange sent, over all its capture files, in time order,
and the faults a test can inject into it.

Frames are numbered from 1 in tape order; faults name frames by that number.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

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
