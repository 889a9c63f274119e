"""Supervision and retry: the one loop that tries again with capped, jittered backoff.

``Backoff`` gives "full jitter" delays (AWS architecture blog, "Exponential Backoff
And Jitter"): attempt n waits a uniform time in ``[0, min(cap, base * 2**n)]``.

``retry`` is the one retry loop of the daemon: every reconnect, re-watch, poll,
market-metadata load and REST snapshot retry, and the supervisor, run through it.
It awaits ``attempt()`` until it returns and returns its value; an error in the
``retryable`` allowlist is followed by ``on_retry`` (the caller's state change,
awaited if it returns an awaitable) and a backoff delay; anything else propagates
at once, so a bug is never retried as if it were a network fault. The backoff
starts over after an attempt that lasted ``healthy_after`` seconds, or that called
``backoff.reset()`` itself (a caller that knows when it is healthy again, e.g.
``tickwire tail`` once subscribed). ``clock`` and ``sleep`` default to trio's; the
ccxt.pro bridge passes its asyncio loop's.

Logging: a failure that repeats is logged once, then at a lower rate
(``RetryLog``): the first failure of a run of failures, and each failure whose
kind or message differs from the previous one, are logged at the caller's level
(with its traceback when ``traceback`` is set); the same failure again is logged at
that level at most once per ``REPEAT_LOG_EVERY`` seconds, saying how many times it
happened since, and at ``DEBUG`` otherwise. An exchange that is down costs a line
a minute, not one per attempt.

``supervise`` restarts a non-critical task (a collector) when it fails: ``retry``
with every ``Exception`` retryable. Critical tasks (the dispatcher, the broadcast
server) are not supervised: their failure ends the daemon.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

from daemon.errors import describe

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between two log lines of the same repeating failure.
REPEAT_LOG_EVERY = 60.0


@attrs.define
class Backoff:
    """Delays for retry n = 0, 1, 2, ... in seconds (see the module docstring)."""

    base: float
    cap: float
    rng: random.Random = attrs.field(factory=random.Random)
    attempt: int = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 62))

    def next_delay(self) -> float:
        """The next delay, and count the attempt."""
        delay = self.rng.uniform(0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Back to the first delay, after a healthy run."""
        self.attempt = 0


@attrs.frozen
class Failure:
    """One failed attempt, as ``retry`` hands it to ``on_retry``.

    ``error``: what the attempt raised; ``delay``: seconds until the next attempt;
    ``failures``: failures in a row, 1 for the first (a healthy run starts over);
    ``cause``: ``error``'s innermost cause as ``Type: message``
    (``daemon.errors.describe``), what status shows as a feed's last error."""

    error: Exception
    delay: float
    failures: int
    cause: str


@attrs.define
class RetryLog:
    """The rate limit of one retry loop's log lines (see the module docstring).

    ``line(failure, now)`` returns the level to log ``failure`` at, and a suffix
    telling how many times it repeated since the last line logged at ``level``."""

    level: int = logging.WARNING
    every: float = REPEAT_LOG_EVERY
    _last: tuple[type[BaseException], str] | None = None
    _logged_at: float = -math.inf
    _repeats: int = 0

    def line(self, failure: Failure, now: float) -> tuple[int, str]:
        """The level of ``failure``'s line (``level`` or ``DEBUG``) and a suffix."""
        key = (type(failure.error), str(failure.error))
        if failure.failures == 1 or key != self._last:
            self._last, self._logged_at, self._repeats = key, now, 0
            return self.level, ""
        self._repeats += 1
        if now - self._logged_at >= self.every:
            repeats, self._repeats, self._logged_at = self._repeats, 0, now
            return self.level, f" (failed {repeats} times in {self.every:g}s; {failure.failures} in a row)"
        return logging.DEBUG, ""


async def retry(
    name: str,
    attempt: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    retryable: tuple[type[Exception], ...],
    healthy_after: float = math.inf,
    on_retry: Callable[[Failure], Awaitable[object] | None] | None = None,
    logger: logging.Logger = log,
    level: int = logging.WARNING,
    traceback: bool = False,
    clock: Callable[[], float] = trio.current_time,
    sleep: Callable[[float], Awaitable[object]] = trio.sleep,
) -> T:
    """Await ``attempt()`` until it returns, and return its value (see the module
    docstring): after an error that is an instance of ``retryable``, call
    ``on_retry(Failure)`` (awaiting what it returns, if awaitable), log
    ``"{name}: {error}; retry in {delay}s"`` (rate-limited, ``RetryLog``) and sleep
    ``backoff``'s next delay, in seconds of ``clock``; an attempt that lasted
    ``healthy_after`` seconds or more resets ``backoff`` and the count of failures,
    and so does an attempt that reset ``backoff`` itself.

    Raises what ``attempt`` raises outside ``retryable``, and cancellation, at once.
    """
    failures = 0
    lines = RetryLog(level)
    while True:
        started = clock()
        try:
            return await attempt()
        except retryable as exc:
            if clock() - started >= healthy_after or backoff.attempt == 0:
                backoff.reset()  # a healthy run, timed here or told by the attempt
                failures = 0
            failures += 1
            failure = Failure(exc, backoff.next_delay(), failures, describe(exc))
            if on_retry is not None:
                result = on_retry(failure)
                if inspect.isawaitable(result):
                    await result
            line_level, suffix = lines.line(failure, clock())
            logger.log(line_level, "%s: %s; retry in %.2fs%s", name, exc, failure.delay, suffix,
                       exc_info=exc if traceback and line_level != logging.DEBUG else None)
            await sleep(failure.delay)


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

    Every ``Exception`` is restarted (the task is non-critical by definition); the
    first failure of a kind is logged at ``ERROR`` with its traceback, so that a bug
    is visible as one, and its repeats at a lower rate (``retry``).
    """

    def failed(failure: Failure) -> None:
        if on_failure is not None:
            on_failure(failure.error)

    await retry(
        f"{name} failed, restarting", run, backoff, retryable=(Exception,),
        healthy_after=healthy_after, on_retry=failed, level=logging.ERROR, traceback=True,
    )
