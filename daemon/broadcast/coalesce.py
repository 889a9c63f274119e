"""The coalescing window: when the server writes what the dispatcher delivered.

The dispatcher tells the coalescer (``daemon.dispatch.FanOut``) when a publish
step begins (``begin``, before its last event) and ends (``end``). Every session
it reached has marked itself (``mark``); ``end`` writes them all now if the window
after the last write has passed, else at its end (``serve``), with whatever more
the window brings. The window counts from the end of a write and lasts
``WRITE_DUTY`` times what the write took, at most ``max_write_delay_ms``: writing
to one client adds no delay; writing to many leaves the feeds twice that time to
be read, and what they bring meanwhile goes in one write.

A step is written at once (``now``), in the publishing source's step, when the
window has passed or when that source says its input is drained (a collector
whose socket holds no unread byte, ``FeedSocket.backlog``) and no other task is
ready to run: at a moderate rate an event leaves without waiting for the idle
check's two passes of the run loop. In such a step a session whose queue is
empty writes the step's last event as it is delivered (``ClientQueue.deliver``
hands it to the session: the frame is built once, ``Message.frame``), so the
first client's write does not wait for the delivery to the last; a session with
something queued takes the event behind it, and ``end`` writes it with the
rest. The events before the last one of a step are queued, so a read that
brought several events still reaches each client in one write. A feed that is
behind has bytes waiting and says so, and its events keep coalescing.

"No other task is ready" is counted by an instrument (``Steps``, trio's public
``trio.abc.Instrument`` API, installed while ``serve`` runs): tasks scheduled
minus tasks stepped, the coalescer's own task left out (while it waits for the
idle process it is ready at every pass, and would hold back every step). That
sees the tasks still to run in the current pass of the run loop as well as in
the next; ``trio.lowlevel.current_statistics().tasks_runnable`` sees only the
next, and counts the I/O manager's registered descriptors one by one on each
call (6.8 us with 200 clients, once per publish step). Without ``serve`` (a
coalescer in a test) the count stays 0.

When the window is open, the write waits for its end or for the process to be
idle (``until_idle``): no other task ran over two passes of the run loop (three
steps of the coalescer's own) and none is ready. One pass is not enough: trio
shuffles each pass, so a task that runs before the coalescer in one pass and
after it in the next is not seen between them; over two passes it is. That is
learnt with trio's supported APIs, not ``trio.testing.wait_all_tasks_blocked``
(for tests). The cost: two instrument calls per task step (scheduled, stepped)
while the server runs, and one extra task step per pass while a window is open.

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


class Steps(trio.abc.Instrument):
    """Counts, for the coalescer (module docstring), the steps of every task but
    one (``me``: the coalescer's own) and how many of them are ready to run:
    scheduled and not yet stepped, in this pass of the run loop or the next
    (trio's ``Instrument`` API).

    ``ready`` is 0 or more; ``steps`` counts up over the instrument's life. A
    task scheduled before the instrument was installed is not counted
    (``ready`` does not go below 0 when it steps)."""

    def __init__(self, me: trio.lowlevel.Task | None = None) -> None:
        self.me = me
        self.ready = 0
        self.steps = 0

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        if task is not self.me:
            self.ready += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is not self.me:
            self.steps += 1
            if self.ready:
                self.ready -= 1


class Coalescer:
    """Marks sessions with something queued and writes them (module docstring):
    the dispatcher's ``FanOut``.

    ``max_delay``: the longest window, seconds. ``writes``: write passes so far
    (a step that wrote to at least one client); ``sent_now``: events a session
    wrote as they were delivered (in a step written at once). ``now``: the step
    being published is written at once (read by ``ClientQueue.deliver``).
    """

    def __init__(self, max_delay: float) -> None:
        self.max_delay = max_delay
        self.dirty: set[Flushable] = set()
        self.writes = 0
        self.sent_now = 0
        self.now = False
        #: during a write, the frames built per queue of messages; ``None`` between
        self.cache: WriteCache | None = None
        self.steps = Steps()
        self._next_write = -math.inf  # trio time before which a write waits
        self._write_pending = False
        self._write_wanted = trio.Event()
        self._began = 0.0  # perf_counter at the start of a step written at once
        self._sent_before = 0

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

    def begin(self, drained: bool) -> None:
        """A publish step's last event is about to be delivered: the step is
        written at once (``now``) if the window has passed, or if the source says
        it has nothing more to read (``drained``) and no other task is ready."""
        if trio.current_time() >= self._next_write or (drained and not self.steps.ready):
            self.now = True
            self._began = time.perf_counter()
            self._sent_before = self.sent_now
        else:
            self.now = False

    def end(self) -> None:
        """The step is delivered: in a step written at once, write every marked
        session now; else at the window's end or once the process is idle."""
        if self.now:
            self.now = False
            if self.dirty:
                self._write(self._began)
            elif self.sent_now != self._sent_before:
                self.writes += 1
                self._window(self._began)
        elif self.dirty and not self._write_pending:
            self._write_pending = True
            self._write_wanted.set()

    def flush(self, drained: bool = False) -> None:
        """``begin(drained)`` and ``end()`` with nothing delivered between: write
        what earlier deliveries marked, now or later (see ``begin``)."""
        if self.dirty:
            self.begin(drained)
            self.end()

    def _write(self, started: float | None = None) -> None:
        if started is None:
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
        self._window(started)

    def _window(self, started: float) -> None:
        """The next window: ``WRITE_DUTY`` times the write that began at
        ``started`` (perf_counter), at most ``max_delay``."""
        took = time.perf_counter() - started
        self._next_write = trio.current_time() + min(self.max_delay, took * WRITE_DUTY)

    async def serve(self) -> None:
        """Write at the end of each window that held an event, or once no other
        task is ready to run; count the ready tasks (``Steps``) meanwhile. Runs
        until cancelled."""
        self.steps = Steps(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(self.steps)
        try:
            while True:
                await self._write_wanted.wait()
                self._write_wanted = trio.Event()
                with trio.move_on_at(self._next_write):
                    await until_idle(self.steps)
                self._write_pending = False
                if self.dirty:
                    self._write()
        finally:
            trio.lowlevel.remove_instrument(self.steps)


async def until_idle(steps: Steps) -> None:
    """Return once a whole pass of trio's run loop ran no task but this one and
    left none ready to run (see the module docstring); ``steps``: an installed
    ``Steps`` of this task."""
    quiet = 0
    while quiet < 2:
        before = steps.steps
        await trio.lowlevel.checkpoint()
        idle = steps.steps == before and not steps.ready
        quiet = quiet + 1 if idle else 0
