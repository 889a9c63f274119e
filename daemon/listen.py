"""Opening a TCP listener, with a start-up error a person can act on.

``trio.open_tcp_listeners`` raises a bare ``OSError`` for a busy or unassignable
address; inside the daemon's nursery that became a 65-line exception group.
``open_listeners`` turns it into ``ListenError`` (a ``StartupError``): one line
that names the listener, the address, the cause and the setting to change.
"""

from __future__ import annotations

import errno
import socket

import trio

from daemon.errors import StartupError


class ListenError(StartupError):
    """A listener cannot bind its address; ``str()`` is one line for people:
    ``broadcast server: cannot listen on 127.0.0.1:8765: the address is in use
    (another process listens on it); stop it or change server.listen``."""


def _cause(exc: OSError, setting: str) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"the address is in use (another process listens on it); stop it or "
                f"change {setting}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"no interface of this machine has that address; change {setting} to "
                f"one of its addresses (0.0.0.0: all of them)")
    if exc.errno == errno.EACCES:
        return f"permission denied (a port below 1024 needs privileges); change {setting}"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror}); change {setting}"
    return f"{exc.strerror or exc}; change {setting}"


async def open_listeners(
    host: str, port: int, *, what: str, setting: str
) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners(port, host=host)``; raises ``ListenError`` naming
    ``what`` (e.g. ``"metrics"``) and ``setting`` (e.g. ``"metrics.listen"``) when
    the address cannot be bound (in use, not this machine's, privileged, unknown)."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError(
            f"{what}: cannot listen on {host}:{port}: {_cause(exc, setting)}") from exc
