"""Client authentication and authorization, sans-IO.

Tokens are configured as SHA-256 hashes (``auth.tokens``), never as tokens, and a
token is never logged. A client presents its token as ``Authorization: Bearer
TOKEN`` or ``?token=TOKEN``; each token grants a set of channels and symbol
patterns, and may grant publishing (``publish``: channels and sources; never
implied by a subscriber's grant). A browser's ``Origin`` must be in
``auth.origins`` when that list is set (a request with several ``Origin`` headers
never gets here: ``connection.check_upgrade`` refuses it with 400, so the one
judged is the only one sent).

Authentication is ``on``, ``off``, or ``auto``: on when the server listens on a
non-loopback address (``daemon.config.is_loopback``, which the config check and the
exposure warnings, ``daemon.tls``, use too).
"""

from __future__ import annotations

import hashlib
import hmac

import attrs

from daemon.broadcast.connection import Handshake, Rejection
from daemon.config import AuthConfig, is_loopback
from daemon.publish.message import ANYONE, PublishGrant


@attrs.frozen
class Grant:
    """What one client may subscribe to: channel names (``*``: all) and symbol
    patterns (``*``, ``EXCHANGE:*``, ``EXCHANGE:BASE-QUOTE``); ``publish``: what it
    may publish (``None``: nothing)."""

    name: str
    channels: frozenset[str]
    symbols: frozenset[str]
    publish: PublishGrant | None = None

    def allows(self, channel: str, pattern: str) -> bool:
        """Whether subscribing ``channel`` x ``pattern`` stays within the grant: a
        pattern is allowed when a granted pattern covers all it can match."""
        if "*" not in self.channels and channel not in self.channels:
            return False
        if "*" in self.symbols or pattern in self.symbols:
            return True
        exchange, _, symbol = pattern.partition(":")
        return symbol != "*" and f"{exchange}:*" in self.symbols


EVERYTHING = Grant("anonymous", frozenset({"*"}), frozenset({"*"}))


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (RFC 6750, section
    2.1), or ``None``."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


class Authenticator:
    """Checks handshakes and publishers' tokens against ``config``;
    ``listen_host`` decides ``auto``. ``anonymous_publish``: a client let in
    without a token may publish (``publish.allow_loopback_anonymous`` on a
    loopback address)."""

    def __init__(self, config: AuthConfig, listen_host: str,
                 anonymous_publish: bool = False) -> None:
        if config.enabled == "auto":
            self.enabled = not is_loopback(listen_host)
        else:
            self.enabled = config.enabled == "on"
        self.origins = frozenset(config.origins)
        self.anonymous = (attrs.evolve(EVERYTHING, publish=ANYONE)
                          if anonymous_publish and is_loopback(listen_host) else EVERYTHING)
        self.grants = {
            token.sha256: Grant(
                token.name, frozenset(token.channels), frozenset(token.symbols),
                PublishGrant(token.name, frozenset(token.publish.channels),
                             frozenset(token.publish.sources))
                if token.publish is not None else None)
            for token in config.tokens
        }

    def grant_of(self, token: str) -> Grant | None:
        """The grant of ``token``, or ``None`` for an unknown one (compared in
        constant time; the token itself is never stored or logged)."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        for known, grant in self.grants.items():
            if hmac.compare_digest(known, digest):
                found = grant
        return found

    def check(self, handshake: Handshake) -> Grant | Rejection:
        """The client's grant, or why its upgrade is refused (403 for an Origin not
        allowed, 401 for a missing or unknown token)."""
        origin = handshake.headers.get("origin")
        if self.origins and origin is not None and origin not in self.origins:
            return Rejection(403, "origin not allowed")
        if not self.enabled:
            return self.anonymous
        token = bearer(handshake.headers.get("authorization"))
        if token is None and handshake.query.get("token"):
            token = handshake.query["token"][0]
        if not token:
            return Rejection(401, "a token is required")
        grant = self.grant_of(token)
        return grant if grant is not None else Rejection(401, "unknown token")
