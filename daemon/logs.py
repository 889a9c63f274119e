"""Logging: one event per line on stderr, as logfmt ``key=value`` pairs.

A line::

    ts=2024-05-01T12:00:00.123Z level=warning logger=daemon.health msg="health: ..."

Values with spaces, quotes or ``=`` are quoted with JSON escapes, so a message or a
traceback (``exc=...``) never spans lines. Under systemd (``$JOURNAL_STREAM`` names
our stderr) each line starts with its syslog priority (``<4>``), which journald
records as the entry's level, and carries no timestamp (journald has its own).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

#: syslog priorities of logging levels (journald's ``PRIORITY``).
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
              logging.CRITICAL: 2}
LEVELS = ("debug", "info", "warning", "error")
NOISY = ("httpx", "httpcore", "trio-websocket", "ccxt", "hpack")


def _value(text: str) -> str:
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)


class LogfmtFormatter(logging.Formatter):
    """One record, one line (see the module docstring); ``journal`` adds the
    ``<priority>`` prefix and leaves out the timestamp."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        """``record`` as one logfmt line."""
        parts = []
        if self.journal:
            prefix = f"<{PRIORITIES.get(record.levelno, 6)}>"
        else:
            prefix = ""
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            parts.append(f"ts={stamp}.{int(record.msecs):03d}Z")
        parts.append(f"level={record.levelname.lower()}")
        parts.append(f"logger={record.name}")
        parts.append(f"msg={_value(record.getMessage())}")
        if record.exc_info:
            parts.append(f"exc={_value(self.formatException(record.exc_info))}")
        elif record.stack_info:
            parts.append(f"stack={_value(self.formatStack(record.stack_info))}")
        return prefix + " ".join(parts)


def _journal(stream: TextIO) -> bool:
    """Whether ``stream`` is systemd's journal stream (``$JOURNAL_STREAM`` is its
    ``device:inode``)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return value == f"{info.st_dev}:{info.st_ino}"


def journal_stderr() -> bool:
    """Whether stderr is systemd's journal (then a line meant for people is logged,
    with its priority, rather than printed)."""
    return _journal(sys.stderr)


def setup_logging(level: str = "info") -> None:
    """Send every log record to stderr, one line each, at ``level`` and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(journal=_journal(sys.stderr)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """Change the level of the whole daemon (on reload)."""
    logging.getLogger().setLevel(level.upper())
