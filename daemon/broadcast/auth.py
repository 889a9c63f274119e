"""Client authentication and authorization, sans-IO.

Tokens are configured as SHA-256 hashes (``auth.tokens``), never as tokens, and a
token is never logged. A client presents its token as ``Authorization: Bearer
TOKEN`` or ``?token=TOKEN``; each token grants a set of channels and symbol
patterns. A browser's ``Origin`` must be in ``auth.origins`` when that list is set.

Authentication is ``on``, ``off``, or ``auto``: on when the server listens on a
non-loopback address.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

import attrs

from daemon.broadcast.connection import Handshake, Rejection
from daemon.config import AuthConfig


@attrs.frozen
class Grant:
    """What one client may subscribe to: channel names (``*``: all) and symbol
    patterns (``*``, ``EXCHANGE:*``, ``EXCHANGE:BASE-QUOTE``)."""

    name: str
    channels: frozenset[str]
    symbols: frozenset[str]

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


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Authenticator:
    """Checks handshakes against ``config``; ``listen_host`` decides ``auto``."""

    def __init__(self, config: AuthConfig, listen_host: str) -> None:
        if config.enabled == "auto":
            self.enabled = not is_loopback(listen_host)
        else:
            self.enabled = config.enabled == "on"
        self.origins = frozenset(config.origins)
        self.grants = {
            token.sha256: Grant(token.name, frozenset(token.channels), frozenset(token.symbols))
            for token in config.tokens
        }

    def check(self, handshake: Handshake) -> Grant | Rejection:
        """The client's grant, or why its upgrade is refused (403 for an Origin not
        allowed, 401 for a missing or unknown token)."""
        origin = handshake.headers.get("origin")
        if self.origins and origin is not None and origin not in self.origins:
            return Rejection(403, "origin not allowed")
        if not self.enabled:
            return EVERYTHING
        token = None
        authorization = handshake.headers.get("authorization", "")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            token = value.strip()
        elif handshake.query.get("token"):
            token = handshake.query["token"][0]
        if not token:
            return Rejection(401, "a token is required")
        digest = hashlib.sha256(token.encode()).hexdigest()
        for known, grant in self.grants.items():
            if hmac.compare_digest(known, digest):
                return grant
        return Rejection(401, "unknown token")
