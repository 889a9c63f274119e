"""sd_notify: the daemon's side of systemd's ``Type=notify`` protocol.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket) and,
with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). A notification is
one datagram of ``KEY=VALUE`` lines. What tickwire sends, and when:

- ``READY=1`` once the dispatcher, the broadcast server, the admin socket and every
  feed have started (``App.run``), with ``STATUS=`` in the same datagram;
- ``STATUS=...`` a one-line summary, whenever it changes (the reporter);
- ``WATCHDOG=1`` every half watchdog interval, from the reporter's loop only: a
  wedged event loop stops the pings and systemd restarts the daemon;
- ``RELOADING=1`` with ``MONOTONIC_USEC=`` on SIGHUP, then ``READY=1`` when done;
- ``STOPPING=1`` when shutdown starts.

``MONOTONIC_USEC`` is ``CLOCK_MONOTONIC`` (``time.monotonic_ns() // 1000``), the
clock systemd compares it with; trio's clock has a random offset and is never used.

Sending never blocks and never raises: a notification that cannot be sent is
logged, the daemon goes on (systemd then acts on its own timeouts).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, as systemd wants ``MONOTONIC_USEC``."""
    return time.monotonic_ns() // 1000


def _address(value: str) -> str | bytes:
    """``NOTIFY_SOCKET`` as a socket address: ``@name`` is the abstract ``\\0name``."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET``; does nothing when it is unset.

    ``watchdog_interval``: seconds between ``WATCHDOG=1`` pings (half of
    ``WATCHDOG_USEC``), or ``None`` when systemd expects none (no ``WATCHDOG_USEC``,
    or ``WATCHDOG_PID`` names another process).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = _address(path) if path else None
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self.sent = 0
        self.failed = 0
        self._status = ""
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """Whether systemd listens (``$NOTIFY_SOCKET`` is set)."""
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; whether it
        was sent."""
        if self.address is None or not lines:
            return False
        message = "\n".join(lines).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._socket.sendto(message, self.address)
        except OSError as exc:
            self.failed += 1
            log.warning("sd_notify %s failed: %s", lines[0].split("=")[0], exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> None:
        """``READY=1``, with ``STATUS=status`` when it changed."""
        self.notify("READY=1", *self._status_lines(status))

    def status(self, status: str) -> None:
        """``STATUS=status``, sent only when it differs from the last one sent."""
        lines = self._status_lines(status)
        if lines:
            self.notify(*lines)

    def watchdog(self) -> None:
        """``WATCHDOG=1``: the event loop is alive."""
        self.notify("WATCHDOG=1")

    def reloading(self) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (a reload starts; ``ready`` ends it)."""
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self, status: str = "") -> None:
        """``STOPPING=1``, with ``STATUS=status`` when it changed."""
        self.notify("STOPPING=1", *self._status_lines(status))

    def _status_lines(self, status: str) -> list[str]:
        status = " ".join(status.split())  # one line
        if not status or status == self._status:
            return []
        self._status = status
        return [f"STATUS={status}"]

    def close(self) -> None:
        """Close the notification socket (a later notification opens another)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
