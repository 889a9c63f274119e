"""The bridge: an asyncio library (ccxt.pro) in a worker thread, feeding trio.

ccxt.pro is asyncio-only; tickwire is trio. The two meet here:

1. One worker thread per exchange runs its own asyncio event loop
   (``asyncio.new_event_loop()``), and in it the bridge's ``work`` coroutine
   (``adapter.watch``: the ccxt.pro exchange object is created, used and closed
   inside that loop only).
2. ``work`` hands each item to trio with ``Bridge.put`` (items are
   ``messages.BridgeItem``; the copy of what ccxt returned is made before the
   watch's next await, since ccxt mutates its books and trade lists in place).
3. The hand-off (``HandOff``) puts each item into a bounded trio memory channel
   (``buffer``) without a round trip between the threads: the worker takes one of
   ``buffer`` slots (a ``threading.Semaphore``), then schedules the item's
   ``send_nowait`` in trio (``TrioToken.run_sync_soon``, in order); trio gives the
   slot back when it receives the item (``taken``). With every slot taken the
   worker thread blocks, and with it the whole asyncio loop: ccxt reads no socket
   until trio has taken an item, so backpressure reaches the exchange's TCP window
   and nothing is dropped (ccxt's caches only fill while its loop runs, and it
   does not run while blocked).

Stopping: the trio side closes the hand-off, so a worker waiting for a slot
raises ``ClosedResourceError``, and calls ``stop`` (``call_soon_threadsafe``
sets the loop's stop event); either ends ``work`` (its task group), then the loop
cancels what is left, shuts down its async generators and default executor, and
closes. The worker's last act is ``done()`` (the trio side closes the channel's
sending end). The trio side joins the thread (``WatchCollector._join``).

A frame the library cannot parse kills that connection's receive loop (an
exception in an asyncio callback): the loop's exception handler counts it
(``malformed``) and the library's keepalive declares the connection dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

import trio

log = logging.getLogger(__name__)

#: Seconds between a waiting worker's looks at whether the hand-off was closed.
HAND_OFF_POLL = 0.05
#: Prefix of the worker threads' names.
THREAD_PREFIX = "tickwire-watch"

T = TypeVar("T")


class _Stopped(Exception):
    """The trio side is gone or asked to stop: the worker winds down."""


class HandOff(Generic[T]):
    """Items from a worker thread to trio, in order, at most ``bound`` in trio's
    hands (see the module doc, 3). ``__call__`` runs in the worker: it blocks while
    every slot is taken and raises ``trio.ClosedResourceError`` once ``close`` was
    called (or ``trio.RunFinishedError`` once trio is gone). ``taken`` and
    ``close`` run in trio. ``waiting``: the worker waits for a slot."""

    def __init__(self, send: trio.MemorySendChannel[T], bound: int) -> None:
        self._send = send
        self._token = trio.lowlevel.current_trio_token()
        self._slots = threading.Semaphore(bound)
        self._bound = bound
        self._closed = False
        self.waiting = False

    def __call__(self, item: T) -> None:
        while not self._slots.acquire(timeout=HAND_OFF_POLL):
            self.waiting = True
            if self._closed:
                raise trio.ClosedResourceError
        self.waiting = False
        if self._closed:
            raise trio.ClosedResourceError
        self._token.run_sync_soon(self._deliver, item)

    def _deliver(self, item: T) -> None:
        try:
            self._send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the collector is stopping: the worker is told by ``close``
        except trio.WouldBlock:  # cannot happen: a slot is held for each item
            log.error("bridge: an item found the channel full (a bug); it was not sent")

    def taken(self) -> None:
        """trio received an item: its slot is free."""
        self._slots.release()

    def close(self) -> None:
        """No more items: a waiting worker raises ``ClosedResourceError``."""
        self._closed = True
        self._slots.release(self._bound)  # whoever waits wakes and sees it


class Bridge(Generic[T]):
    """One asyncio loop in one worker thread running ``work(put)``.

    ``name`` names the thread (``THREAD_PREFIX-name``) and the log lines;
    ``hand_off(item)`` (a ``HandOff``) blocks while trio holds as many items as the
    bound (and raises once the collector stopped or trio is gone); ``done()`` is
    called last, from the worker thread. After the thread ends, ``error`` holds
    what ended it, if anything but a stop; ``malformed`` counts frames the library
    could not parse."""

    def __init__(
        self,
        name: str,
        work: Callable[[Callable[[T], None]], Coroutine[Any, Any, None]],
        hand_off: Callable[[T], object],
        done: Callable[[], object],
    ) -> None:
        self.name = name
        self._work = work
        self._hand_off = hand_off
        self._done = done
        self.thread = threading.Thread(
            target=self._thread_main, name=f"{THREAD_PREFIX}-{name}", daemon=True
        )
        self.error: BaseException | None = None
        self.malformed = 0
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def start(self) -> None:
        """Start the worker thread."""
        self.thread.start()

    def stop(self) -> None:
        """Ask the worker to wind down (from any thread); returns at once."""
        self._stop.set()
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(stopping.set)

    def put(self, item: T) -> None:
        """Hand ``item`` to trio, from the worker's loop; blocks this thread (and its
        loop) while trio is full. Raises (an internal ``_Stopped``) once the trio
        side stopped: ``work`` ends with it."""
        if self._stop.is_set():
            raise _Stopped
        try:
            self._hand_off(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError,
                trio.Cancelled) as exc:
            raise _Stopped from exc

    # -- the thread ------------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's own: ccxt and aiohttp may ask
        loop.set_exception_handler(self._on_loop_error)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - handed to the trio side
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            self.error = exc
        finally:
            try:
                # what the library left running (its spawned fetches, closes)
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                with contextlib.suppress(Exception):  # trio has finished: nobody to tell
                    self._done()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, json.JSONDecodeError):  # orjson's is one too
            self.malformed += 1
            log.warning("%s: ccxt could not parse a frame (%s): that connection is "
                        "watched again once its keepalive fails", self.name, exc)
            return
        log.error("%s: asyncio: %s", self.name, context.get("message"), exc_info=exc)

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        if self._stop.is_set():
            return
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._until_stopped())
                await self._work(self.put)
        except* _Stopped:
            pass

    async def _until_stopped(self) -> None:
        assert self._stopping is not None
        await self._stopping.wait()
        raise _Stopped
