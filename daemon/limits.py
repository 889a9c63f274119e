"""Open-file descriptors: the daemon's limit, what it keeps for itself, the clients'
budget.

Every client connection costs one descriptor, its socket (the writer writes on it;
nothing is duplicated). At start (``tickwire run``, ``tickwire replay``) the daemon
raises its soft ``RLIMIT_NOFILE`` to the hard limit and logs both in one line
(``prepare``). Besides its clients it needs descriptors of its own, ``reserve``:
the sum of the figures below for its configuration. The clients get the rest, the
*descriptor budget* ``soft - reserve``: the broadcast server admits no connection
beyond it (503, ``daemon.broadcast.admission``), so the admin socket, the feeds
and the other listeners always find a descriptor. ``check-config`` and the start
warn in one line when ``server.max_connections`` plus the reserve exceed the
limit (``warning``).

If the reserve is too small anyway (something took more descriptors than counted
here), ``accept`` fails with EMFILE. The broadcast server then stops accepting
clients, logs one line, and closes ``Spares``, descriptors held for that moment,
so that the admin socket can still answer (``tickwire status``); it takes them
back, and accepts clients again, once descriptors are free.
"""

from __future__ import annotations

import errno
import logging
import os
import resource

import attrs

from daemon.broadcast.admission import MIN_REFUSING
from daemon.config import Config

log = logging.getLogger(__name__)

# What the daemon keeps for itself (``reserve``), in descriptors:
#: standard streams (log lines go to stderr), trio's epoll and wake-up socket pair,
#: the signal wake-up, the sd_notify socket, Python's own, the files read at start
#: and at a reload (config, TLS certificate and key), the broadcast listeners
BASE = 32
#: the admin socket: its listener and the requests it serves at once (``tickwire
#: status``, ``clients``, ``publish``)
ADMIN = 16
#: each other listener (the metrics endpoint, the publish listener): its socket and
#: the requests it serves at once
LISTENER = 16
#: each exchange: its WebSocket, its REST connections (book snapshots, trade pages,
#: ccxt's pool), its polling fallback's; under ``tickwire replay``, the emulator's
#: end of each of them, or the pipes to its process
EXCHANGE = 8
#: connections being refused at once (answered 503 or 429, then closed) once the
#: budget is used up (``admission.MIN_REFUSING``)
REFUSING = MIN_REFUSING
#: ``Spares``: let go when ``accept`` fails for lack of descriptors
SPARES = 8
#: what the figures above miss
MARGIN = 32

#: ``accept`` errors that mean "no descriptor (or memory) for a new connection"
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def reserve(config: Config) -> int:
    """Descriptors the daemon needs for itself with ``config`` (module docstring)."""
    listeners = (1 if config.metrics.listen else 0) + (1 if config.publish.listen else 0)
    return (BASE + ADMIN + LISTENER * listeners + EXCHANGE * len(config.exchanges)
            + REFUSING + SPARES + MARGIN)


@attrs.frozen
class OpenFiles:
    """The open-file limit: ``soft`` now, ``hard``, and ``was`` (the soft limit
    before ``raise_limit``), in descriptors."""

    soft: int
    hard: int
    was: int


def _finite(limit: int) -> int:
    """``limit``, with ``RLIM_INFINITY`` as the kernel's ceiling (``fs.nr_open``)."""
    if limit != resource.RLIM_INFINITY:
        return limit
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def current() -> OpenFiles:
    """The open-file limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OpenFiles(_finite(soft), _finite(hard), _finite(soft))


def raise_limit() -> OpenFiles:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit. Raises ``OSError`` when
    the system refuses (a seccomp filter, for one): the limit stays."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _finite(hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return OpenFiles(_finite(soft), target, _finite(soft))
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return OpenFiles(target, target, soft)


def warning(config: Config, limit: int, whose: str = "") -> str | None:
    """The warning when ``server.max_connections`` plus the reserve exceed ``limit``
    (descriptors), or ``None``; ``whose`` describes the limit (default: "the
    open-file limit (LIMIT)")."""
    kept = reserve(config)
    if config.server.max_connections + kept <= limit:
        return None
    return (f"server.max_connections ({config.server.max_connections}) and the {kept} "
            f"descriptors the daemon keeps for itself exceed {whose or f'the open-file limit ({limit})'}: "
            f"at most {max(0, limit - kept)} clients can connect, the others get 503; raise "
            "the limit (ulimit -n; under systemd LimitNOFILE=, 65536 in the shipped unit) "
            "or lower server.max_connections")


def prepare(config: Config) -> int:
    """At start: raise the soft limit to the hard one, log both (one line), warn
    when ``server.max_connections`` does not fit (one line). Returns the clients'
    descriptor budget (``soft - reserve``)."""
    kept = reserve(config)
    try:
        files = raise_limit()
    except OSError as exc:
        files = current()
        log.warning("descriptors: cannot raise the soft open-file limit %d to the hard "
                    "limit %d (%s); %d kept for the daemon, %d for clients", files.soft,
                    files.hard, os.strerror(exc.errno or 0) if exc.errno else exc, kept,
                    max(0, files.soft - kept))
    else:
        change = (f"raised from {files.was} to {files.soft}" if files.was != files.soft
                  else f"{files.soft}")
        log.info("descriptors: open-file limit %s (hard limit %d); %d kept for the daemon, "
                 "%d for clients (server.max_connections %d)", change, files.hard, kept,
                 max(0, files.soft - kept), config.server.max_connections)
    line = warning(config, files.soft,
                   f"the open-file limit ({files.soft}; hard limit {files.hard})")
    if line:
        log.warning("descriptors: %s", line)
    return max(0, files.soft - kept)


class Spares:
    """``count`` descriptors held (``/dev/null``), to let go of when the process has
    no other: see the module docstring."""

    def __init__(self, count: int = SPARES) -> None:
        self.count = count
        self._held: list[int] = []

    @property
    def held(self) -> bool:
        """Whether all ``count`` are held."""
        return len(self._held) >= self.count

    def hold(self, headroom: int = 0) -> bool:
        """Take descriptors until ``count`` are held, and check that ``headroom``
        more are free (opened and closed at once). ``False`` when the process lacks
        them: then none is held, so they stay free for others."""
        try:
            while len(self._held) < self.count + headroom:
                self._held.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            self.release()
            if exc.errno in CAPACITY_ERRNOS:
                return False
            raise
        while len(self._held) > self.count:
            os.close(self._held.pop())
        return True

    def release(self) -> None:
        """Close every descriptor held."""
        while self._held:
            os.close(self._held.pop())
