"""Reader of cryptofeed's raw capture format (the files in ``shared/captures``).

One record per line:

- ``URL <-> T``: a WebSocket connection to URL opened at Unix time T;
- ``URL <- T: MESSAGE``: MESSAGE sent by the client (a subscription);
- ``T: MESSAGE``: MESSAGE received at T, exactly as the exchange sent it;
- ``URL -> T: BODY``: a REST GET of URL answered with BODY (``X.0``, ``X.http.*``);
- ``configuration: JSON``: channels and symbols the recorder subscribed.

Pure parsing: no I/O beyond reading the file (and listing a folder given as the
captures, ``capture_paths``), no trio.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from daemon.errors import StartupError

#: What a person should do about a file that is not a capture (the end of the line).
CAPTURE_FORMAT = ("give tickwire capture files (X.0, X.ws.*, X.http.*: "
                  "tests/captures/README.md says what they hold)")

#: Names of files that are clearly not captures (case-insensitive patterns): a folder
#: of captures holds its README and licence, which ``tests/captures/*`` names too.
NOT_CAPTURES = ("README*", "LICENSE*", "*.md")

log = logging.getLogger(__name__)


class CaptureError(StartupError, ValueError):
    """A capture file that cannot be read, or a line of it that fits none of the
    record forms; ``str()`` is one line naming the file (and line) and what to do.
    Also raised for a set of captures that cannot be replayed together."""


@attrs.frozen
class Received:
    """A frame the exchange sent: receive time (epoch s) and the text as sent."""

    ts: float
    text: str


@attrs.frozen
class Connection:
    """One recorded WebSocket connection: its URL, open time, what the client sent
    (``(ts, text)`` pairs) and every frame received, in order."""

    url: str
    opened: float
    sent: tuple[tuple[float, str], ...]
    received: tuple[Received, ...]


@attrs.frozen
class RestResponse:
    """A recorded REST answer: the full request URL, its time, and the body text."""

    url: str
    ts: float
    body: str

    @property
    def target(self) -> str:
        """Path and query of the request (``/api/v3/depth?symbol=X&limit=1000``)."""
        parts = urlsplit(self.url)
        return parts.path + (f"?{parts.query}" if parts.query else "")


@attrs.frozen
class Capture:
    """Everything one capture file holds."""

    path: Path
    connections: tuple[Connection, ...]
    rest: tuple[RestResponse, ...]
    configuration: dict[str, Any] | None

    @property
    def urls(self) -> list[str]:
        """Every URL the file names (connections, then REST requests)."""
        return [c.url for c in self.connections] + [r.url for r in self.rest]


def is_not_a_capture(name: str) -> bool:
    """Whether a file name is one of ``NOT_CAPTURES`` (``README.md``, ``LICENSE.x``)."""
    return any(fnmatch.fnmatchcase(name.upper(), pattern.upper()) for pattern in NOT_CAPTURES)


def capture_paths(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The capture files among ``paths``, in order: a folder stands for the files in
    it (sorted by name; hidden files and subfolders left out), and a file named as
    one of ``NOT_CAPTURES`` is skipped with a debug log line. Any other file is kept,
    to be read (and refused, if it is no capture) by ``read_capture``.

    Raises ``CaptureError`` (one line) when no file is left.
    """
    found: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            inside = sorted(p for p in given.iterdir() if p.is_file() and not p.name.startswith("."))
        else:
            inside = [given]
        for path in inside:
            if is_not_a_capture(path.name):
                log.debug("%s: skipped, not a capture (%s)", path, ", ".join(NOT_CAPTURES))
            else:
                found.append(path)
    if not found:
        names = ", ".join(str(p) for p in paths)
        raise CaptureError(f"no capture file among {names} ({', '.join(NOT_CAPTURES)} "
                           f"files are not captures); {CAPTURE_FORMAT}")
    return found


def read_capture(path: str | os.PathLike[str]) -> Capture:
    """Parse one capture file.

    Raises ``CaptureError``, one line naming the file (and the line) and what to do,
    when the file cannot be read, is not text, or has a line of no known form.
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return _parse(path, f)
    except OSError as exc:
        raise CaptureError(f"cannot read capture {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CaptureError(f"{path}: not a capture file (not UTF-8 text); "
                           f"{CAPTURE_FORMAT}") from exc


def _parse(path: Path, lines: Iterable[str]) -> Capture:
    import orjson  # local: the only use

    connections: list[Connection] = []
    rest: list[RestResponse] = []
    configuration = None
    current: dict[str, Any] | None = None

    def close_current() -> None:
        if current is not None:
            connections.append(
                Connection(
                    url=current["url"],
                    opened=current["opened"],
                    sent=tuple(current["sent"]),
                    received=tuple(current["received"]),
                )
            )

    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line:
            continue
        try:
            if line.startswith("configuration: "):
                configuration = orjson.loads(line[len("configuration: ") :])
            elif line[0].isdigit():
                ts, text = _split(line, ": ")
                if current is None:
                    raise ValueError("a received frame before any connection line")
                current["received"].append(Received(float(ts), text))
            else:
                url, arrow, rest_of_line = _split(line, " ", 3)
                if arrow == "<->":
                    close_current()
                    current = {
                        "url": url,
                        "opened": float(rest_of_line),
                        "sent": [],
                        "received": [],
                    }
                elif arrow == "<-":
                    ts, text = _split(rest_of_line, ": ")
                    if current is None:
                        raise ValueError("a sent frame before any connection line")
                    current["sent"].append((float(ts), text))
                elif arrow == "->":
                    ts, body = _split(rest_of_line, ": ")
                    rest.append(RestResponse(url=url, ts=float(ts), body=body))
                else:
                    raise ValueError("a line of no known form")
        except (ValueError, orjson.JSONDecodeError) as exc:
            shown = line if len(line) <= 40 else line[:40] + "..."
            raise CaptureError(f"{path}:{lineno}: not a capture file ({exc}: {shown!r}); "
                               f"{CAPTURE_FORMAT}") from exc
    close_current()
    return Capture(
        path=path, connections=tuple(connections), rest=tuple(rest), configuration=configuration
    )


def _split(text: str, separator: str, parts: int = 2) -> list[str]:
    """``text.split(separator, parts - 1)``, exactly ``parts`` of them, else
    ``ValueError``."""
    split = text.split(separator, parts - 1)
    if len(split) != parts:
        raise ValueError("a line of no known form")
    return split


_HOSTS = {
    "binance.com": "binance",
    "binance.us": "binanceus",
    "coinbase.com": "coinbase",
    "kraken.com": "kraken",
}


def exchange_of(url: str) -> str | None:
    """The exchange id a recorded URL belongs to (``binance``, ``binanceus``,
    ``coinbase``, ``kraken``), or ``None`` for a host tickwire does not know."""
    host = urlsplit(url).hostname or ""
    for suffix, exchange in _HOSTS.items():
        if host == suffix or host.endswith("." + suffix):
            return exchange
    return None
