"""The ccxt collectors' parts: ``watch`` mode (ccxt.pro over WebSocket) and what it
shares with ``poll`` mode (ccxt's REST API).

- ``common``: symbols, page sizes, tickers and book levels as decimal strings, the
  spot-only exchange object, the market check (``poll`` and ``watch``);
- ``overrides``: the one hook for URLs other than the exchange's own (tickwire's
  emulator): URL rebasing and placeholder credentials, nowhere else;
- ``bridge``: an asyncio library in a worker thread, feeding trio through a
  bounded hand-off;
- ``adapter``: the ccxt.pro exchange object and its watches, in the bridge's loop;
- ``messages``: what crosses the bridge;
- ``books``: ccxt's books as tickwire's book events.

The collectors themselves are ``daemon.collectors.watch`` and
``daemon.collectors.poll``.
"""
