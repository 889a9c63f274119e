"""Which connections the broadcast server takes: the connection limits, sans-IO.

Theory of operation
-------------------
1. A connection counts from the moment it is accepted until it is closed: its TLS
   and WebSocket handshakes count, and so does a client refused later (401, 403).
   The server calls ``admit`` right after ``accept`` and ``release`` once the
   socket is closed.
2. ``admit`` checks and counts in one synchronous call. Nothing can run between the
   check and the count (trio switches tasks only at an ``await``), so no burst of
   connections passes a limit: of 3 x ``max_connections`` concurrent connections
   exactly ``max_connections`` are admitted.
3. The limits, in this order: ``max_connections`` (``server.max_connections``), the
   descriptor budget (the soft ``RLIMIT_NOFILE`` minus what the daemon keeps for
   itself: ``daemon.limits``), both refused with 503, and ``max_per_address``
   (``server.max_connections_per_ip``), refused with 429. Every refusal carries
   ``Retry-After`` (``RETRY_AFTER`` seconds).
4. A refused connection is answered and then closed by the server; while it is
   answered it holds a descriptor too (``refusing``). Refusals use the budget's
   free descriptors and, beyond them, at most ``min_refusing`` of the reserve:
   while both are used, ``accepting`` is false and the server leaves new
   connections in the kernel's backlog until a refusal or a connection ends.
5. The server logs state changes, not connections: ``notify`` gets one line when
   new clients start being refused for a limit and one when a client is admitted
   again (the count refused meanwhile), and one when an address reaches its limit.
   A state entered again within ``QUIET`` seconds of its last line is not
   logged (``QuietLines``): the next line counts what happened meanwhile, and
   ``tickwire status`` shows the state now.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import attrs

#: Seconds a refused client is told to wait (``Retry-After``).
RETRY_AFTER = 5
#: Connections being refused at once beyond the budget's free descriptors.
MIN_REFUSING = 32
#: Seconds within which a limit reached again is not logged again.
QUIET = 60.0

#: the reasons of the refusals (``Refusal.limit``)
MAX_CONNECTIONS = "max_connections"
DESCRIPTORS = "descriptors"
PER_ADDRESS = "max_connections_per_ip"

_REASONS = {
    MAX_CONNECTIONS: (503, "too many connections"),
    DESCRIPTORS: (503, "too many connections (open-file limit)"),
    PER_ADDRESS: (429, "too many connections from this address"),
}
_PHRASES = {429: "Too Many Requests", 503: "Service Unavailable"}


@attrs.frozen
class Refusal:
    """Why a connection is refused: ``limit`` (one of ``MAX_CONNECTIONS``,
    ``DESCRIPTORS``, ``PER_ADDRESS``), the HTTP ``status`` and a one-line
    ``reason``, and ``retry_after`` seconds."""

    limit: str
    status: int
    reason: str
    retry_after: int = RETRY_AFTER

    def response(self) -> bytes:
        """The whole HTTP response: status line, ``Retry-After``, the reason as a
        one-line plain-text body, ``Connection: close``."""
        body = f"{self.reason}\n".encode()
        return (
            f"HTTP/1.1 {self.status} {_PHRASES.get(self.status, 'Refused')}\r\n"
            f"Retry-After: {self.retry_after}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + body


class QuietLines:
    """State lines for ``notify``, each with a ``key`` (the state): a line whose key
    had a line less than ``quiet`` seconds ago (``clock``) is not sent."""

    def __init__(self, clock: Callable[[], float], notify: Callable[[str], None],
                 quiet: float = QUIET) -> None:
        self.clock = clock
        self.notify = notify
        self.quiet = quiet
        self._last: dict[str, float] = {}

    def line(self, key: str, line: str) -> bool:
        """Send ``line`` unless ``key`` had one within ``quiet``; whether it was sent."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.quiet:
            return False
        self._last[key] = now
        if len(self._last) > 4096:  # keys of addresses: forget the quiet ones
            self._last = {k: t for k, t in self._last.items() if now - t < self.quiet}
        self.notify(line)
        return True


@attrs.define(eq=False)
class Ticket:
    """One accepted connection: its ``address``, and ``refusal`` (``None``: it is
    admitted and counts against the limits). ``release`` it once, when it is
    closed."""

    address: str
    refusal: Refusal | None
    released: bool = False


class Admission:
    """The connection limits of one server (see the module docstring).

    ``budget``: descriptors the clients may use (``None``: no such limit; it can be
    set later, before the server accepts). ``clock``: seconds, for the quiet period
    of the log lines; ``notify``: takes each state line.
    """

    def __init__(
        self,
        max_connections: int,
        max_per_address: int,
        *,
        budget: int | None = None,
        min_refusing: int = MIN_REFUSING,
        clock: Callable[[], float],
        notify: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.budget = budget
        self.min_refusing = min_refusing
        #: admitted connections now (handshakes included)
        self.connections = 0
        #: refused connections being answered now
        self.refusing = 0
        #: admitted connections by address
        self.per_address: Counter[str] = Counter()
        #: refusals so far, by limit
        self.refused: Counter[str] = Counter()
        #: the limit new clients are refused for since the last admission (``None``: none)
        self.full: str | None = None
        #: refusals for the total limits since the last "admitting again" line
        self._unreported = 0
        #: the state lines, quiet when a state comes back soon (the server's too)
        self.lines = QuietLines(clock, notify)
        self._limited: set[str] = set()

    @property
    def limit(self) -> int:
        """Connections admitted at most: ``max_connections`` or the budget."""
        if self.budget is None:
            return self.max_connections
        return max(0, min(self.max_connections, self.budget))

    @property
    def at_limit(self) -> str | None:
        """The limit the connections are at now (a new client would be refused for
        it), or ``None``."""
        if self.connections >= self.max_connections:
            return MAX_CONNECTIONS
        if self.budget is not None and self.connections >= self.budget:
            return DESCRIPTORS
        return None

    @property
    def accepting(self) -> bool:
        """Whether the server may accept another connection now: a refusal would
        find a descriptor (point 4)."""
        if self.refusing < self.min_refusing or self.budget is None:
            return True
        return self.connections + self.refusing < self.budget

    def admit(self, address: str) -> Ticket:
        """Check and count a connection just accepted from ``address`` (an IP), in
        one step: a ``Ticket`` admitted, or refused with its ``Refusal``."""
        limit = self.at_limit
        if limit is None and self.per_address[address] >= self.max_per_address:
            limit = PER_ADDRESS
        if limit is None:
            self.connections += 1
            self.per_address[address] += 1
            if self.full is not None:
                self._reopened()
            return Ticket(address, None)
        self.refusing += 1
        self.refused[limit] += 1
        if limit == PER_ADDRESS:
            self._address_limited(address)
        else:
            self._filled(limit)
        status, reason = _REASONS[limit]
        return Ticket(address, Refusal(limit, status, reason))

    def release(self, ticket: Ticket) -> None:
        """The connection of ``ticket`` is closed (a second call does nothing)."""
        if ticket.released:
            return
        ticket.released = True
        if ticket.refusal is not None:
            self.refusing -= 1
            return
        self.connections -= 1
        address = ticket.address
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]
        if self.per_address[address] < self.max_per_address:
            self._limited.discard(address)

    # -- the state lines ---------------------------------------------------------------

    def _line(self, key: str, line: str) -> bool:
        return self.lines.line(key, line)

    def _filled(self, limit: str) -> None:
        self._unreported += 1
        if self.full == limit:
            return
        self.full = limit
        if limit == MAX_CONNECTIONS:
            what = f"server.max_connections ({self.max_connections})"
        else:
            what = (f"the descriptor budget ({self.budget}: the open-file limit less what "
                    "the daemon keeps for itself)")
        self._line("full", f"broadcast: {self.connections} connections, at {what}: new "
                           "clients get 503 until some leave")

    def _reopened(self) -> None:
        self.full = None
        if self._line("open", f"broadcast: admitting clients again ({self.connections} "
                              f"connections; {self._unreported} refused since the last "
                              "such line)"):
            self._unreported = 0

    def _address_limited(self, address: str) -> None:
        if address in self._limited:
            return
        self._limited.add(address)
        self._line(f"address {address}",
                   f"broadcast: {address} has {self.per_address[address]} connections, at "
                   f"server.max_connections_per_ip ({self.max_per_address}): its new "
                   "connections get 429 until some leave")
