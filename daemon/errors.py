"""tickwire's own errors, and the one boundary that maps third-party errors to them.

"We closed it" and "the peer broke it" are different errors: ``FeedStale`` is our
decision (silence past ``stale_after``), ``FeedDisconnected`` the network's or the
exchange's. Only these are retried as network faults; anything else is a bug and
goes to the supervisor as one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import trio
import trio_websocket


class TickwireError(Exception):
    """Base of tickwire's errors."""


class StartupError(TickwireError):
    """The daemon cannot start, for a reason a person can fix: a busy or unassignable
    listen address, an unreadable capture, a missing file. Its message is one line
    that names the cause and what to do; the command line prints it and exits 2.
    Every listener's and loader's own start-up error derives from it."""


class FeedError(TickwireError):
    """A feed cannot go on with its current connection; it will reconnect."""


class FeedDisconnected(FeedError):
    """The exchange or the network closed or broke the connection, or refused it."""


class FeedStale(FeedError):
    """We closed a connection that was silent for longer than ``stale_after``."""


class FeedProtocolError(FeedError):
    """The exchange answered something unusable where an answer was required
    (market metadata, a REST status)."""


#: What the feed lifecycle retries after a backoff.
RETRYABLE = (FeedError,)


@contextmanager
def feed_errors(what: str) -> Iterator[None]:
    """Map trio-websocket, httpx and socket errors raised inside into ``FeedError``s,
    ``raise ... from exc`` so the cause stays in the log."""
    try:
        yield
    except trio_websocket.ConnectionClosed as exc:
        reason = exc.reason
        code, text = (reason.code, reason.reason or "") if reason is not None else ("?", "")
        raise FeedDisconnected(f"{what}: closed ({code} {text})") from exc
    except trio_websocket.ConnectionRejected as exc:
        raise FeedDisconnected(f"{what}: handshake rejected ({exc.status_code})") from exc
    except trio_websocket.HandshakeError as exc:
        raise FeedDisconnected(f"{what}: handshake failed ({exc!r})") from exc
    except httpx.HTTPStatusError as exc:
        raise FeedProtocolError(f"{what}: HTTP {exc.response.status_code}") from exc
    except httpx.HTTPError as exc:
        raise FeedDisconnected(f"{what}: {exc!r}") from exc
    except (OSError, trio.BrokenResourceError) as exc:
        raise FeedDisconnected(f"{what}: {exc!r}") from exc


@contextmanager
def ccxt_errors(what: str) -> Iterator[None]:
    """Map ccxt's errors raised inside (its sync API, run in a thread) into
    ``FeedError``s, ``raise ... from exc``:

    - ``NetworkError`` (timeouts, refused connections, HTTP 5xx, rate limiting, DDoS
      protection, maintenance) and any other ``OperationFailed`` -> ``FeedDisconnected``;
    - ``BadResponse`` (an unparsable body) and ``ExchangeError`` (the exchange
      answered with an error) -> ``FeedProtocolError``;
    - except ``NotSupported`` and ``ArgumentsRequired``: ccxt raises them before any
      request, for a call the exchange does not have or that lacks an argument;
      they are our bugs and propagate unchanged, as does anything not from ccxt.
    """
    import ccxt  # imported here: ccxt takes a while to import and only polling uses it

    try:
        yield
    except (ccxt.NotSupported, ccxt.ArgumentsRequired):
        raise
    except (ccxt.BadResponse, ccxt.ExchangeError) as exc:
        raise FeedProtocolError(f"{what}: {type(exc).__name__}: {_short(exc)}") from exc
    except ccxt.OperationFailed as exc:  # NetworkError and its kin: retry may help
        raise FeedDisconnected(f"{what}: {type(exc).__name__}: {_short(exc)}") from exc


def _short(exc: BaseException, limit: int = 300) -> str:
    """ccxt's messages carry the whole response body: cut them for the log."""
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def describe(exc: BaseException) -> str:
    """``exc``'s innermost cause as ``Type: message``, the message cut to 300
    characters: what status shows as a feed's last error, e.g.
    ``ConnectionRefusedError: [Errno 111] Connection refused``. Follows
    ``__cause__``, else ``__context__`` (libraries re-raise ``from None``), and an
    exception group's first member; a cause without a message is its ``repr``."""
    seen = {id(exc)}
    root = exc
    while True:
        inner = root.__cause__ or root.__context__
        while isinstance(inner, BaseExceptionGroup):  # trio's "all attempts failed"
            inner = inner.exceptions[0]
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        root = inner
    text = _short(root)
    return f"{type(root).__name__}: {text}" if text else repr(root)


class RedisUnavailable(TickwireError):
    """Redis (the cluster's engine) refused, broke or timed out a connection, or is
    loading its data; the caller reconnects with backoff (``daemon.supervise.retry``)."""


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Map coredis' connection, timeout and busy-loading errors (and socket errors)
    raised inside into ``RedisUnavailable``, ``raise ... from exc``. A Redis reply
    error (a bad command, a script error) is a bug and passes through."""
    import coredis.exceptions  # only in a cluster role: role "all" never imports coredis

    try:
        yield
    except (coredis.exceptions.ConnectionError, coredis.exceptions.ReadOnlyError,
            coredis.exceptions.ClusterDownError, TimeoutError, OSError) as exc:
        raise RedisUnavailable(f"{what}: {_short(exc) or type(exc).__name__}") from exc
    except coredis.exceptions.ResponseError as exc:
        if str(exc).startswith(("LOADING", "MASTERDOWN", "TRYAGAIN")):
            raise RedisUnavailable(f"{what}: {_short(exc)}") from exc
        raise
