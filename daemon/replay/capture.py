"""Reader of cryptofeed's raw capture format (the files in ``shared/captures``).

One record per line:

- ``URL <-> T``: a WebSocket connection to URL opened at Unix time T;
- ``URL <- T: MESSAGE``: MESSAGE sent by the client (a subscription);
- ``T: MESSAGE``: MESSAGE received at T, exactly as the exchange sent it;
- ``URL -> T: BODY``: a REST GET of URL answered with BODY (``X.0``, ``X.http.*``);
- ``configuration: JSON``: channels and symbols the recorder subscribed.

Pure parsing: no I/O beyond reading the file, no trio.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import attrs


class CaptureError(ValueError):
    """A line of a capture file that fits none of the record forms."""


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
    configuration: dict | None

    @property
    def urls(self) -> list[str]:
        """Every URL the file names (connections, then REST requests)."""
        return [c.url for c in self.connections] + [r.url for r in self.rest]


def read_capture(path: str | os.PathLike) -> Capture:
    """Parse one capture file.

    Raises ``CaptureError`` (with file and line number) on a line of no known form,
    and ``OSError`` when the file cannot be read.
    """
    import orjson  # local: the only use

    path = Path(path)
    connections: list[Connection] = []
    rest: list[RestResponse] = []
    configuration = None
    current: dict | None = None

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

    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            try:
                if line.startswith("configuration: "):
                    configuration = orjson.loads(line[len("configuration: ") :])
                elif line[0].isdigit():
                    ts, text = line.split(": ", 1)
                    if current is None:
                        raise CaptureError("a received frame before any connection line")
                    current["received"].append(Received(float(ts), text))
                else:
                    url, arrow, rest_of_line = line.split(" ", 2)
                    if arrow == "<->":
                        close_current()
                        current = {
                            "url": url,
                            "opened": float(rest_of_line),
                            "sent": [],
                            "received": [],
                        }
                    elif arrow == "<-":
                        ts, text = rest_of_line.split(": ", 1)
                        if current is None:
                            raise CaptureError("a sent frame before any connection line")
                        current["sent"].append((float(ts), text))
                    elif arrow == "->":
                        ts, body = rest_of_line.split(": ", 1)
                        rest.append(RestResponse(url=url, ts=float(ts), body=body))
                    else:
                        raise CaptureError(f"unknown direction {arrow!r}")
            except (ValueError, orjson.JSONDecodeError) as exc:
                raise CaptureError(f"{path}:{lineno}: {exc}") from exc
    close_current()
    return Capture(
        path=path, connections=tuple(connections), rest=tuple(rest), configuration=configuration
    )


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
