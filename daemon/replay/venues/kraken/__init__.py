"""Kraken (WebSocket v1, WebSocket v2 and REST) as the emulator plays it.

``KrakenVenue`` (``v1.py``) is the venue: it learns the recording, keeps the state
the tape builds (books, trades, tickers) and speaks Kraken WebSocket v1, the
dialect of the recording; ``v2.py`` translates that state and the tape into
WebSocket v2 for connections on a ``/v2`` path (what ccxt.pro speaks); ``rest.py``
answers REST; ``common.py`` holds what they share: names, the book (the
production ``L2Book`` and checksum; its docstring says why the emulator may share
them) and JSON helpers. Each module's docstring has its rules, numbered as one
list.
"""

from daemon.replay.venues.kraken.common import Book, PairNames, RecordedTrade
from daemon.replay.venues.kraken.v1 import KrakenVenue
from daemon.replay.venues.kraken.v2 import is_v2, rfc3339, v2_symbol

__all__ = ["Book", "KrakenVenue", "PairNames", "RecordedTrade", "is_v2", "rfc3339", "v2_symbol"]
