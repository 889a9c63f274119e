"""Logging: one event per line on stderr, ``key=value`` pairs (journald-friendly)."""

from __future__ import annotations

import logging
import sys

FORMAT = "level=%(levelname)s logger=%(name)s msg=%(message)r"


def setup_logging(level: str = "info") -> None:
    """Send every log record to stderr, one line each, at ``level`` and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "trio-websocket", "ccxt"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
