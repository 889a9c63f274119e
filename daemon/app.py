"""The nursery tree: dispatcher, broadcast server and collectors under one root.

Startup is ordered with ``nursery.start``: the dispatcher first (so sources have
somewhere to send), then the broadcast server (listening), then one supervised
collector per exchange. The dispatcher and the server are critical: if either
raises, the root nursery ends and the daemon exits with the error. A collector is
not: it is restarted with backoff (``daemon.supervise``).
"""

from __future__ import annotations

import logging
import secrets
import time
from functools import partial
from typing import Any

import attrs
import trio

from daemon import __version__
from daemon.broadcast.server import BroadcastServer
from daemon.collectors.fallback import CCXT_IDS, Fallback
from daemon.collectors.native import NativeCollector
from daemon.collectors.poll import PollCollector
from daemon.collectors.venues import venue
from daemon.config import Config
from daemon.dispatch import Dispatcher, Retention
from daemon.supervise import Backoff, supervise

log = logging.getLogger(__name__)


def new_epoch() -> str:
    """A string that differs at every start of the daemon: start time and randomness."""
    return f"{int(time.time())}-{secrets.token_hex(4)}"


class App:
    """One daemon instance built from ``config``. After ``run`` has started:
    ``port`` is the broadcast server's port."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.epoch = new_epoch()
        self.started_at = time.time()
        self.dispatcher = Dispatcher(
            config.dispatch.buffer,
            {
                channel: Retention(retention.size, retention.max_age)
                for channel, retention in attrs.asdict(config.history, recurse=False).items()
            },
        )
        hello = {"type": "welcome", "server": "tickwire", "version": __version__, "epoch": self.epoch}
        self.server = BroadcastServer(self.dispatcher, config.server, hello, config.auth)
        self.collectors: dict[str, Any] = {}
        self.fallbacks: dict[str, Fallback] = {}
        self.port: int | None = None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the whole tree until cancelled; ``started(port)`` once everything has
        started and the server listens."""
        async with trio.open_nursery() as root:
            await root.start(self.dispatcher.serve)
            self.port = await root.start(self.server.serve)
            reconnect = self.config.reconnect
            for name, exchange in self.config.exchanges.items():
                collector: Any
                if exchange.mode == "poll":
                    collector = PollCollector(name, exchange, reconnect, self.dispatcher.open_source())
                else:
                    collector = NativeCollector(
                        venue(name), exchange, reconnect, self.dispatcher.open_source()
                    )
                self.collectors[name] = collector
                await root.start(partial(self._supervised, name, collector))
                if exchange.mode == "native" and exchange.fallback_after > 0:
                    fallback = Fallback(
                        collector,
                        partial(self._fallback_poller, name, exchange),
                        exchange.fallback_after,
                    )
                    self.fallbacks[name] = fallback
                    await root.start(fallback.run)
            log.info(
                "tickwire %s started: epoch %s, %d feeds, ws://%s:%d",
                __version__, self.epoch, len(self.collectors), self.config.server.host, self.port,
            )
            task_status.started(self.port)

    def _fallback_poller(self, name: str, exchange: Any) -> PollCollector:
        return PollCollector(
            name, exchange, self.config.reconnect, self.dispatcher.open_source(),
            ccxt_id=CCXT_IDS.get(name, name), label="fallback: ",
        )

    async def _supervised(
        self, name: str, collector: Any, *, task_status: trio.TaskStatus[None]
    ) -> None:
        first = True

        async def attempt() -> None:
            nonlocal first
            try:
                if first:
                    first = False
                    await collector.run(task_status=task_status)
                else:
                    await collector.run()
            except Exception as exc:
                await collector.set_state("failed", f"{type(exc).__name__}: {exc}")
                raise

        reconnect = self.config.reconnect
        async with collector.out:
            await supervise(
                f"collector {name}", attempt, Backoff(reconnect.base, reconnect.cap),
                reconnect.healthy_after,
            )
