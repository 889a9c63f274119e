"""The coalescing window: when the server writes what the dispatcher delivered.

The dispatcher calls ``flush`` after each batch of events. Every session it
reached has marked itself (``mark``); ``flush`` writes them all now if the window
after the last write has passed, else at its end (``serve``), with whatever more
the window brings. The window counts from the end of a write and lasts
``WRITE_DUTY`` times what the write took, at most ``max_write_delay_ms``: writing
to one client adds no delay; writing to many leaves the feeds twice that time to
be read, and what they bring meanwhile goes in one write.

The window ends early once no other task is ready to run (the feeds are read,
the process would wait): waiting longer would save nothing. It ends at once, in
the publishing source's step, when that source says its input is drained (a
collector whose socket holds no unread byte, ``FeedSocket.backlog``) and trio's
run queue is empty: at a moderate rate an event leaves without waiting for the
idle check's two passes of the run loop. A feed that is behind has bytes waiting
and says so, and its events keep coalescing; a task trio runs later in the same
pass is not seen (``tasks_runnable`` counts the next pass), and its events take
the next write. That is learnt with
trio's supported APIs, not ``trio.testing.wait_all_tasks_blocked`` (for tests):
while the window is open, an instrument (``trio.lowlevel.add_instrument``)
counts the steps of other tasks, and the coalescer yields once per pass of the
run loop (``checkpoint``); when no other task ran over two passes (three steps
of its own) and ``trio.lowlevel.current_statistics().tasks_runnable`` is 0,
every other task waits (for I/O polled meanwhile, or for a timer). One pass is
not enough: trio shuffles each pass, so a task that runs before the coalescer in
one pass and after it in the next is not seen between them, nor in
``tasks_runnable``; over two passes it is. The
cost while a window is open: one extra task step per pass of the run loop, and
one instrument call per task step; none between windows.

During a write, ``cache`` lets sessions whose queues hold the same messages share
the bytes built for the first of them (``daemon.broadcast.frames``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

import trio

from daemon.broadcast.frames import WriteCache

#: The coalescing window after a write is this many times what the write took (at
#: most ``max_write_delay_ms``): writing then takes at most a third of the time.
WRITE_DUTY = 2.0


class Flushable(Protocol):
    """A session, as the coalescer sees it."""

    def flush(self) -> None:
        """Write what is queued, without blocking."""


class Coalescer:
    """Marks sessions with something queued and writes them (module docstring).

    ``max_delay``: the longest window, seconds. ``writes``: write passes so far.
    """

    def __init__(self, max_delay: float) -> None:
        self.max_delay = max_delay
        self.dirty: set[Flushable] = set()
        self.writes = 0
        #: during a write, the frames built per queue of messages; ``None`` between
        self.cache: WriteCache | None = None
        self._next_write = -math.inf  # trio time before which a write waits
        self._write_pending = False
        self._write_wanted = trio.Event()

    def mark(self, session: Flushable) -> None:
        """``session`` has something queued for the next write."""
        self.dirty.add(session)

    def marker(self, session: Flushable) -> Callable[[], None]:
        """``mark(session)`` as a call without arguments, the cheapest there is
        (it runs once per client per message): ``dirty`` is one set for the
        coalescer's life, emptied in place by each write."""
        return partial(self.dirty.add, session)

    def discard(self, session: Flushable) -> None:
        """``session`` is gone."""
        self.dirty.discard(session)

    def flush(self, drained: bool = False) -> None:
        """Write now if the window has passed, or if the source that published
        says it has nothing more to read (``drained``) and no other task is ready
        to run; else at the window's end or once the process is idle (called by
        the dispatcher after each batch of events)."""
        if not self.dirty:
            return
        if trio.current_time() >= self._next_write or (
                drained and not trio.lowlevel.current_statistics().tasks_runnable):
            self._write()
        elif not self._write_pending:
            self._write_pending = True
            self._write_wanted.set()

    def _write(self) -> None:
        started = time.perf_counter()
        dirty = list(self.dirty)
        self.dirty.clear()
        self.writes += 1
        self.cache = WriteCache()
        try:
            for session in dirty:
                session.flush()
        finally:
            self.cache = None
        took = time.perf_counter() - started
        self._next_write = trio.current_time() + min(self.max_delay, took * WRITE_DUTY)

    async def serve(self) -> None:
        """Write at the end of each window that held an event, or once no other
        task is ready to run. Runs until cancelled."""
        while True:
            await self._write_wanted.wait()
            self._write_wanted = trio.Event()
            with trio.move_on_at(self._next_write):
                await until_idle()
            self._write_pending = False
            if self.dirty:
                self._write()


class _OthersRan(trio.abc.Instrument):
    """Counts the steps of tasks other than ``me`` (trio's public instrument API)."""

    def __init__(self, me: trio.lowlevel.Task) -> None:
        self.me = me
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is not self.me:
            self.steps += 1


async def until_idle() -> None:
    """Return once a whole pass of trio's run loop ran no task but this one and
    left none ready to run (see the module docstring)."""
    others = _OthersRan(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(others)
    try:
        quiet = 0
        while quiet < 2:
            others.steps = 0
            await trio.lowlevel.checkpoint()
            idle = not others.steps and not trio.lowlevel.current_statistics().tasks_runnable
            quiet = quiet + 1 if idle else 0
    finally:
        trio.lowlevel.remove_instrument(others)
