"""The polling fallback: a circuit breaker around a native feed.

While the native WebSocket feed is up (state ``subscribed``) the breaker is
``closed`` and nothing else runs. When the feed has been down for
``fallback_after`` seconds without a break, the breaker ``open``s: a ccxt REST
``PollCollector`` serves the feed's symbols (trades and tickers) under the same
exchange id. As soon as the native feed is ``subscribed`` again the breaker closes
and the poller is cancelled. Trades that both bring are delivered once: the
dispatcher drops a trade id its stream already carried. Each transition is a
``FeedState`` on the ``system`` channel (``fallback``, then ``native``) and a
counter.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from functools import partial

import trio

from daemon.collectors.base import Collector
from daemon.collectors.poll import PollCollector
from daemon.events import FeedState
from daemon.supervise import Backoff, supervise

log = logging.getLogger(__name__)

#: ccxt's id for each native exchange's REST API, where the two differ (ccxt's
#: ``coinbase`` is the Advanced Trade API; the native feed is the Exchange API).
CCXT_IDS = {"coinbase": "coinbaseexchange"}


class Fallback:
    """The breaker of one native (or watch) collector; ``make_poller()`` builds the
    poller; ``after``: seconds the feed must be down before polling starts."""

    def __init__(
        self,
        native: Collector,
        make_poller: Callable[[], PollCollector],
        after: float,
    ) -> None:
        self.native = native
        self.make_poller = make_poller
        self.after = after
        self.state = "closed"
        self.transitions: Counter[str] = Counter()
        self.poller: PollCollector | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the native feed until cancelled."""
        task_status.started()
        while True:
            await self._wait_down_for(self.after)
            async with trio.open_nursery() as nursery:
                self.poller = self.make_poller()
                await self._transition("open", "fallback",
                                       f"native feed down for {self.after:g}s: polling through ccxt")
                reconnect = self.native.reconnect
                nursery.start_soon(partial(
                    supervise, f"fallback poller {self.native.exchange}", self.poller.run,
                    Backoff(reconnect.base, reconnect.cap), reconnect.healthy_after,
                ))
                while self.native.state != "subscribed":
                    await self.native.wait_state_change()
                nursery.cancel_scope.cancel()
            self.poller.out.close()
            self.poller = None
            await self._transition("closed", "native", "native feed back: polling stopped")

    async def _wait_down_for(self, seconds: float) -> None:
        while True:
            while self.native.state == "subscribed":
                await self.native.wait_state_change()
            with trio.move_on_after(seconds):
                while self.native.state != "subscribed":
                    await self.native.wait_state_change()
                continue  # back up in time
            return

    async def _transition(self, state: str, event_state: str, detail: str) -> None:
        self.state = state
        self.transitions[state] += 1
        log.warning("%s: %s", self.native.exchange, detail)
        now = time.time()
        await self.native.out.send(FeedState(
            exchange=self.native.exchange, symbol="*", ts=now, recv_ts=now,
            state=event_state, detail=detail,
        ))
