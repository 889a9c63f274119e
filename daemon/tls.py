"""TLS for clients: the server's ``ssl.SSLContext`` from ``[server.tls]``, its
reload on SIGHUP, and the warnings for a risky exposure (``exposure_warnings``:
tokens in the clear, auth off on a public address), logged at start and printed
by ``tickwire check-config``.

One context serves the WebSocket listener (``wss://``) and the metrics endpoint
(``https://``). ``reload`` loads the new certificate into that same context:
OpenSSL copies a context's certificate into each connection when it is created,
so new connections get the new certificate and open ones keep theirs (RFC 8446
has no notion of changing a certificate mid-connection).
"""

from __future__ import annotations

import logging
import ssl

from daemon.config import Config, TlsConfig, is_loopback
from daemon.errors import StartupError

log = logging.getLogger(__name__)


class TlsError(StartupError):
    """The certificate or key cannot be loaded; one line naming the file and the
    setting (``server.tls.cert`` / ``server.tls.key``)."""


def _load(context: ssl.SSLContext, tls: TlsConfig) -> None:
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except ssl.SSLError as exc:
        raise TlsError(f"TLS: {tls.cert} and {tls.key} are not a PEM certificate chain and "
                       f"its private key ({exc.reason or exc}); check server.tls.cert and "
                       "server.tls.key") from exc
    except OSError as exc:
        raise TlsError(f"TLS: cannot read {exc.filename or tls.cert}: {exc.strerror}; check "
                       "server.tls.cert and server.tls.key") from exc


def server_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The server's context (TLS 1.2 or later, Python's secure defaults), or
    ``None`` when TLS is off. Raises ``TlsError`` when the files cannot be used."""
    if not tls.on:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, tls)
    return context


def reload(context: ssl.SSLContext, tls: TlsConfig) -> None:
    """Load ``tls``'s certificate and key into ``context`` again (SIGHUP): new
    connections use them. Raises ``TlsError``; the context then keeps the
    certificate it had."""
    if tls.on:
        _load(context, tls)


def exposure_warnings(config: Config) -> list[str]:
    """What ``config`` exposes on the network that an operator should know, one
    line each (none for loopback listeners): the daemon logs them at start and
    ``tickwire check-config`` prints them; neither refuses the configuration.

    - ``server.listen`` not loopback with ``auth.enabled = "off"``: anyone who
      reaches the address gets every stream;
    - ``server.listen`` not loopback with authentication on and no TLS: client
      tokens travel in the clear;
    - ``publish.listen`` not loopback without TLS: publishers' tokens and
      messages travel in the clear;
    - ``publish.allow_loopback_anonymous`` with a ``publish.listen`` that is not
      loopback: it applies on a loopback address only, so it is ignored there (a
      token is required).
    """
    server, publish = config.server, config.publish
    warnings = []
    public = not is_loopback(server.host)
    auth = config.auth.enabled == "on" or (config.auth.enabled == "auto" and public)
    tls = server.tls.on
    proxy = "or serve behind a TLS reverse proxy (README: TLS, and running behind a reverse proxy)"
    if public and not auth:
        warnings.append(
            f'authentication is off (auth.enabled = "off") for server.listen {server.listen}, '
            "which is not a loopback address: anyone who can reach it gets every stream; "
            'set auth.enabled = "auto" and add [[auth.tokens]], or listen on 127.0.0.1')
    elif public and not tls:
        warnings.append(
            f"authentication is on for {server.listen} without TLS: client tokens travel in "
            f"the clear; set server.tls.cert and server.tls.key, {proxy}")
    publish_public = bool(publish.listen) and not is_loopback(publish.host)
    if publish_public and not tls:
        warnings.append(
            f"publish.listen {publish.listen} is not a loopback address and has no TLS: "
            "publishers' tokens and messages travel in the clear; set server.tls.cert and "
            f"server.tls.key (the publish listener uses them), {proxy}")
    if publish_public and publish.allow_loopback_anonymous:
        warnings.append(
            f"publish.allow_loopback_anonymous is ignored for publish.listen {publish.listen}: "
            "it applies on a loopback address only, and elsewhere a publisher needs a token "
            "with a publish grant")
    return warnings
