"""TLS for clients: the server's ``ssl.SSLContext`` from ``[server.tls]``, its
reload on SIGHUP, and the start-up warning when tokens would travel in the clear.

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


def clear_text_warning(config: Config) -> str | None:
    """The warning for authentication on a non-loopback address without TLS
    (tokens travel in the clear), or ``None``."""
    host = config.server.host
    auth = config.auth.enabled == "on" or (config.auth.enabled == "auto"
                                           and not is_loopback(host))
    if not auth or is_loopback(host) or config.server.tls.on:
        return None
    return (f"authentication is on for {config.server.listen} without TLS: client tokens "
            "travel in the clear; set server.tls.cert and server.tls.key, or serve behind "
            "a TLS reverse proxy (README: TLS, and running behind a reverse proxy)")
