"""Answering one client's requests, sans-IO: text frames in, an ``Answer`` out.

``RequestHandler.receive(text, now)`` applies the rate limit, parses the request
(``protocol.parse_request``), checks the client's grant and subscription limit,
subscribes or unsubscribes it at the dispatcher (itself sans-IO), sets throttles
on its ``ClientQueue`` (within ``server.min_throttle_ms`` and
``server.max_throttled``: what one client's throttles may cost), and returns
what the session must send: the replies (``ack``, ``pong``, ``error``:
docs/protocol.md "Requests"), then the initial messages of a subscribe (history,
recovery, snapshots), or a close; a ``publish`` the client's grant allows is
handed back for the session to await (``daemon.publish.publisher``). Time is
passed in (seconds, any monotonic clock); nothing here reads a socket or a clock.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from daemon.broadcast.auth import Grant
from daemon.broadcast.protocol import (
    FORBIDDEN,
    RATE_LIMITED,
    THROTTLE_TOO_LOW,
    TOO_MANY_SUBSCRIPTIONS,
    TOO_MANY_THROTTLED,
    UNKNOWN_CHANNEL,
    Ping,
    Publish,
    RequestError,
    Subscribe,
    Unsubscribe,
    parse_request,
)
from daemon.broadcast.queue import ClientQueue, throttle_patterns
from daemon.config import ServerConfig
from daemon.derived.views import Views, view_pattern
from daemon.dispatch import Dispatcher, Message

#: Close code for a client that stays above the request rate (docs/protocol.md).
CLOSE_RATE_LIMITED = 4029


@attrs.frozen
class Close:
    """The client must be closed with ``code`` (RFC 6455 section 7.4) and ``reason``."""

    code: int
    reason: str


@attrs.frozen
class Answer:
    """What one request asks the session to do, in order: queue ``replies`` (JSON
    objects), deliver ``initial`` messages past the queue's limit, or ``close``;
    or ``publish`` a message (the session awaits the publisher, then replies)."""

    replies: tuple[dict[str, Any], ...] = ()
    initial: tuple[Message, ...] = ()
    close: Close | None = None
    publish: Publish | None = None


class RateLimit:
    """A token bucket of ``rate`` requests per second (the burst is one second's
    worth). A client above the rate gets a ``rate_limited`` error per request;
    one that stays above it for ``grace`` seconds is closed (4029); one that slows
    down to half the bucket is forgiven."""

    def __init__(self, rate: float, grace: float, now: float) -> None:
        self.rate = rate
        self.grace = grace
        self.tokens = rate
        self.refilled = now
        self.over_since: float | None = None
        self.refused = 0

    def take(self, now: float) -> Answer | None:
        """None when a request may be served at ``now``, else the answer to give."""
        rate = self.rate
        self.tokens = min(rate, self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if self.tokens >= 1:
            self.tokens -= 1
            if self.tokens >= rate / 2:
                self.over_since = None
            return None
        self.refused += 1
        if self.over_since is None:
            self.over_since = now
        if now - self.over_since >= self.grace:
            return Answer(close=Close(CLOSE_RATE_LIMITED, "rate limited"))
        return Answer(replies=({"type": "error", "id": None, "code": RATE_LIMITED,
                                "message": f"more than {rate:g} requests per second"},))


class RequestHandler:
    """Answers the requests of the client whose messages wait in ``queue`` (its
    subscriber, as the dispatcher knows it). ``grant``: what its token allows;
    ``config``: ``max_subscriptions``, ``max_messages_per_second``,
    ``rate_limit_grace``, ``min_throttle_ms``, ``max_throttled`` (given to the
    queue too); ``epoch``: the server's, for recovery with ``since``; ``views``: the
    top-of-book views (``book`` with ``depth``, ``quote``; None: not served)."""

    def __init__(self, queue: ClientQueue, dispatcher: Dispatcher, grant: Grant,
                 config: ServerConfig, epoch: str, now: float,
                 views: Views | None = None) -> None:
        self.dispatcher = dispatcher
        self.views = views
        self.queue = queue
        queue.max_throttled = config.max_throttled
        self.grant = grant
        self.config = config
        self.epoch = epoch
        self.rate_limit = RateLimit(config.max_messages_per_second, config.rate_limit_grace, now)

    def receive(self, text: str | bytes, now: float) -> Answer:
        """Answer one client text frame received at ``now`` (never raises for bad
        input: a malformed request is an ``error`` reply with its ``id``)."""
        try:
            request = parse_request(text, self.dispatcher.channels)
        except RequestError as exc:
            request_error: RequestError | None = exc
        else:
            request_error = None
            if isinstance(request, Publish) and self.grant.publish is not None:
                # paced by the dispatcher, not the request rate: the session awaits
                # each publish before it reads the next frame (backpressure)
                return Answer(publish=request)
        refused = self.rate_limit.take(now)
        if refused is not None:
            return refused
        try:
            if request_error is not None:
                raise request_error
            if isinstance(request, Ping):
                return Answer(replies=({"type": "pong", "id": request.id},))
            if isinstance(request, Subscribe):
                return self._subscribe(request)
            if isinstance(request, Publish):
                raise RequestError(FORBIDDEN, "this token may not publish", request.id)
            return self._unsubscribe(request)
        except RequestError as exc:
            return Answer(replies=({"type": "error", "id": exc.request_id, "code": exc.code,
                                    "message": exc.message},))

    def _unsubscribe(self, request: Unsubscribe) -> Answer:
        self.dispatcher.unsubscribe(self.queue, request.channels, request.symbols)
        self.queue.unthrottle((c, s) for c in request.channels for s in request.symbols)
        # a book's views at any depth and interval, a quote at any interval
        held = self.dispatcher.subscriptions.get(self.queue, set())
        for channel, view_channel, tail in (("book", "views", r":\d+:\d+"),
                                            ("quote", "quote", r":\d+")):
            if channel in request.channels:
                for symbol in request.symbols:
                    shape = re.compile(re.escape(symbol) + tail)
                    patterns = [p for c, p in held if c == view_channel and shape.fullmatch(p)]
                    if patterns:
                        self.dispatcher.unsubscribe(self.queue, [view_channel], patterns)
        return Answer(replies=({"type": "ack", "id": request.id, "op": "unsubscribe",
                                "channels": request.channels, "symbols": request.symbols},))

    def _subscribe(self, request: Subscribe) -> Answer:
        for channel in request.channels:
            for symbol in request.symbols:
                if not self.grant.allows(channel, symbol):
                    raise RequestError(
                        FORBIDDEN, f"this token may not subscribe to {channel} {symbol}",
                        request.id)
        groups = self._groups(request)
        pairs = self.dispatcher.subscriptions.get(self.queue, set())
        new = {(c, s) for channels, symbols in groups for c in channels for s in symbols} - pairs
        if len(pairs) + len(new) > self.config.max_subscriptions:
            raise RequestError(
                TOO_MANY_SUBSCRIPTIONS,
                f"at most {self.config.max_subscriptions} channel x symbol pairs", request.id)
        # views are throttled where they are built; the others by the client's queue
        throttled = {(c, s) for c, s in new if c not in ("views", "quote")}
        if request.throttle_ms:
            self._check_throttle(request, throttled)
        since = request.since
        epoch_ok = request.epoch is None or request.epoch == self.epoch
        if request.throttle_ms:
            self.queue.throttle(throttled, request.throttle_ms / 1000)
        if self.views is not None:
            if request.depth and "book" in request.channels:
                self.views.want("book", request.depth, request.throttle_ms, request.symbols)
            if "quote" in request.channels:
                self.views.want("quote", 1, request.throttle_ms, request.symbols)
        initial: list[Message] = []
        recovered: dict[str, bool] = {}
        for channels, symbols in groups:
            messages, found = self.dispatcher.subscribe(
                self.queue, channels, symbols, request.history, since if epoch_ok else None)
            initial += messages
            recovered.update({k: v for k, v in found.items() if v or k not in recovered})
        ack: dict[str, Any] = {"type": "ack", "id": request.id, "op": "subscribe",
                               "channels": request.channels, "symbols": request.symbols}
        if request.depth:
            ack["depth"] = request.depth
        if since:
            ack["recovered"] = {key: recovered.get(key, False) for key in since}
            ack["epoch"] = self.epoch
        return Answer(replies=(ack,), initial=tuple(initial))

    def _groups(self, request: Subscribe) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """The request's channels x symbols as the dispatcher's (channels, patterns):
        ``book`` with ``depth`` and ``quote`` become ``views`` and ``quote`` patterns
        (``daemon.derived.views.view_pattern``); raises ``RequestError`` when this
        server builds no views."""
        depth, interval = request.depth, request.throttle_ms
        plain = tuple(c for c in request.channels
                      if c != "quote" and not (c == "book" and depth))
        groups = [(plain, request.symbols)] if plain else []
        viewed = [kind for kind in ("book", "quote") if kind in request.channels
                  and (kind == "quote" or depth)]
        if viewed and self.views is None:
            raise RequestError(UNKNOWN_CHANNEL, "this server builds no book views "
                               "(depth, quote)", request.id)
        for kind in viewed:
            channel = "views" if kind == "book" else "quote"
            groups.append(((channel,), tuple(view_pattern(kind, s, depth, interval)
                                             for s in request.symbols)))
        return groups

    def _check_throttle(self, request: Subscribe, new: set[tuple[str, str]]) -> None:
        """Refuse a throttle under ``min_throttle_ms``, or one that would make the
        client throttle more than ``max_throttled`` of the streams there are now
        (``ClientQueue`` holds to it for streams that appear later)."""
        floor = self.config.min_throttle_ms
        if request.throttle_ms < floor:
            raise RequestError(
                THROTTLE_TOO_LOW,
                f"throttle_ms must be 0 (no throttle) or at least {floor} (server.min_throttle_ms)",
                request.id)
        throttled = set(self.queue.throttles) | new
        count = sum(1 for stream in self.dispatcher.streams.values()
                    if stream.policy.conflates
                    and not throttled.isdisjoint(throttle_patterns(stream)))
        cap = self.config.max_throttled
        if count > cap:
            raise RequestError(
                TOO_MANY_THROTTLED,
                f"a client throttles at most {cap} streams (server.max_throttled); with this "
                f"subscription it would throttle {count}", request.id)
