"""A broadcast server with its dispatcher on 127.0.0.1, for tests that talk to it
over real WebSockets, and the Coinbase capture's events to feed it."""

from __future__ import annotations

import ssl
from pathlib import Path

import attrs
import orjson
import trio

from daemon.broadcast.server import BroadcastServer
from daemon.config import AuthConfig, ServerConfig
from daemon.derived.views import Views
from daemon.dispatch import Dispatcher, Retention
from daemon.events import Ticker, Trade
from daemon.exchanges.coinbase import CoinbaseFeed, parse_markets
from daemon.replay.capture import read_capture

EPOCH = "test-epoch"
HELLO = {"type": "welcome", "server": "tickwire", "version": "test", "epoch": EPOCH}


@attrs.define
class Running:
    """A started server: its dispatcher, itself, and its ``ws://`` URL."""

    dispatcher: Dispatcher
    server: BroadcastServer
    url: str
    views: Views | None = None


async def start(nursery, retention=None, auth: AuthConfig | None = None,
                hello: dict | None = None, listen: str = "127.0.0.1:0",
                ssl_context: ssl.SSLContext | None = None, views: bool = False,
                **server) -> Running:
    """A dispatcher and a broadcast server in ``nursery``, listening on ``listen``
    (a free port by default; TLS with ``ssl_context``; with ``views``, the
    top-of-book views task too); ``server``: more ``ServerConfig`` fields."""
    dispatcher = Dispatcher(256, retention or {
        "trades": Retention(1000, 3600), "book": Retention(1000, 60),
        "ticker": Retention(100, 60), "system": Retention(100, 60)})
    config = ServerConfig(listen=listen, **server)
    built = Views(dispatcher, dispatcher.open_source()) if views else None
    broadcast = BroadcastServer(dispatcher, config, hello or HELLO, auth, ssl_context,
                                views=built)
    await nursery.start(dispatcher.serve)
    if built is not None:
        await nursery.start(built.run)
    port = await nursery.start(broadcast.serve)
    return Running(dispatcher, broadcast, f"{broadcast.scheme}://127.0.0.1:{port}", built)


def coinbase_events(captures: Path) -> list:
    """Every event the Coinbase capture gives, through the real protocol."""
    markets = parse_markets(read_capture(captures / "COINBASE.0").rest[0].body)
    conn = read_capture(captures / "COINBASE.ws.28.0").connections[0]
    products = orjson.loads(conn.sent[0][1])["product_ids"]
    feed = CoinbaseFeed([markets[p] for p in products], ["trades", "book", "ticker"], markets)
    feed.on_open(0.0)
    events = []
    for frame in conn.received:
        events += [o for o in feed.on_message(frame.text, frame.ts)
                   if isinstance(o, Trade | Ticker) or type(o).__name__.startswith("Book")]
    return events


async def publish(running: Running, events: list) -> None:
    """Feed ``events`` to the dispatcher as a source would."""
    async with running.dispatcher.open_source() as source:
        for event in events:
            await source.send(event)


async def until_published(running: Running, count: int) -> None:
    """Wait (at most 10 s) until the dispatcher has published ``count`` events."""
    with trio.fail_after(10):
        while running.dispatcher.events < count:
            await trio.sleep(0.01)
