"""The dispatcher's bounded input queue, in arrival order, with backpressure.

Why not a ``trio`` memory channel: the dispatcher's events come in two ways, a
source's ``send`` (queued, published by the dispatcher's task) and a source's
``publish`` (published in the caller's step, after whatever is queued). A memory
channel hands a value to a waiting receiver directly and that receiver only
runs later: meanwhile the value is in no queue, so a ``publish`` in between
overtook it, and two events of one stream sent back to back reached clients in
the wrong order (seen with derived bars at full speed, issue 18). Here an event
stays in the queue until it is taken, synchronously, by whichever publishes
first: nothing is ever in flight.

``Inbox(size)``: ``put_nowait`` raises ``trio.WouldBlock`` when ``size`` events
are queued; ``put`` waits for room (backpressure: a source that waits stops
reading its socket), senders in the order they came: a slot that frees up is
reserved for the first waiting sender, which wakes the next once it has queued
its event (trio runs tasks woken together in any order, so they are woken one
by one); ``take`` removes up to ``n`` events, oldest first; ``wait`` returns
once an event is queued. Its figures are a frozen ``InboxStatistics``.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import attrs
import trio

T = TypeVar("T")


@attrs.frozen
class InboxStatistics:
    """``queued``: events waiting; ``size``: the bound; ``tasks_waiting_put``:
    senders waiting for room."""

    queued: int
    size: int
    tasks_waiting_put: int


class Inbox(Generic[T]):
    """A bounded FIFO of events shared by every source (module docstring)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"an inbox holds at least one event, not {size}")
        self.size = size
        self.items: deque[T] = deque()
        self._room = trio.lowlevel.ParkingLot()  # senders waiting for room
        self._reserved = 0  # free slots promised to a woken sender
        self._queued = trio.lowlevel.ParkingLot()  # the taker waiting for an event

    def __len__(self) -> int:
        return len(self.items)

    def put_nowait(self, item: T) -> None:
        """Queue ``item``; ``trio.WouldBlock`` if the inbox is full or senders
        already wait or were woken (they come first)."""
        if len(self.items) >= self.size or self._room or self._reserved:
            raise trio.WouldBlock
        self.items.append(item)
        if self._queued:
            self._queued.unpark_all()

    async def put(self, item: T) -> None:
        """Queue ``item``, waiting for room first (in the order senders came)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if len(self.items) >= self.size or self._room or self._reserved:
            await self._room.park()  # woken with a slot reserved for this sender
            self._reserved -= 1
            self.items.append(item)
            self._wake_sender()
        else:
            self.items.append(item)
        if self._queued:
            self._queued.unpark_all()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def take(self, n: int) -> list[T]:
        """Remove and return up to ``n`` queued events, oldest first."""
        items = self.items
        if len(items) <= n:
            taken = list(items)
            items.clear()
        else:
            taken = [items.popleft() for _ in range(n)]
        if taken:
            self._wake_sender()
        return taken

    def _wake_sender(self) -> None:
        """Reserve a free slot for the first waiting sender and wake it."""
        if self._room and len(self.items) + self._reserved < self.size:
            self._reserved += 1
            self._room.unpark(count=1)

    async def wait(self) -> None:
        """Return once an event is queued (at once if one is)."""
        if self.items:
            await trio.lowlevel.checkpoint()
            return
        await self._queued.park()

    def statistics(self) -> InboxStatistics:
        """The figures now."""
        return InboxStatistics(queued=len(self.items), size=self.size,
                               tasks_waiting_put=len(self._room))
