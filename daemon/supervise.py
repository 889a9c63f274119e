"""Supervision: restart with capped, jittered exponential backoff.

``Backoff`` gives "full jitter" delays (AWS architecture blog, "Exponential Backoff
And Jitter"): attempt n waits a uniform time in ``[0, min(cap, base * 2**n)]``.
``supervise`` restarts a non-critical task (a collector) when it fails, and resets
the backoff after a run that lasted ``healthy_after`` seconds. Critical tasks (the
dispatcher, the broadcast server) are not supervised: their failure ends the daemon.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import attrs
import trio

log = logging.getLogger(__name__)


@attrs.define
class Backoff:
    """Delays for retry n = 0, 1, 2, ... in seconds (see the module docstring)."""

    base: float
    cap: float
    rng: random.Random = attrs.field(factory=random.Random)
    attempt: int = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return min(self.cap, self.base * 2 ** min(self.attempt, 62))

    def next_delay(self) -> float:
        """The next delay, and count the attempt."""
        delay = self.rng.uniform(0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Back to the first delay, after a healthy run."""
        self.attempt = 0


async def supervise(
    name: str,
    run: Callable[[], Awaitable[object]],
    backoff: Backoff,
    healthy_after: float,
    on_failure: Callable[[BaseException], None] | None = None,
) -> None:
    """Run ``run()`` again and again: after it fails, wait ``backoff``; after a run of
    ``healthy_after`` seconds or more, start the backoff over. Returns when ``run``
    returns normally; cancellation ends it at once.

    Every ``Exception`` is restarted (the task is non-critical by definition), each
    logged with its traceback so that a bug is visible as one.
    """
    while True:
        started = trio.current_time()
        try:
            await run()
            return
        except Exception as exc:  # noqa: BLE001 - a non-critical task, logged below
            if on_failure is not None:
                on_failure(exc)
            if trio.current_time() - started >= healthy_after:
                backoff.reset()
            delay = backoff.next_delay()
            log.error("%s failed, restarting in %.2fs: %r", name, delay, exc, exc_info=exc)
            await trio.sleep(delay)
