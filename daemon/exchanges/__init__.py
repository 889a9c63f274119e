"""Exchange protocols, sans-IO: subscribe messages, frame -> events, book integrity.

Nothing here imports trio, trio-websocket or httpx. ``base`` holds the contract a
collector drives (``ExchangeFeed``, its outputs and ``FeedStatistics``); each of
``binance``, ``coinbase`` and ``kraken`` implements it, with the shared L2 book
(``daemon.book``) and trade tracker (``daemon.trades``). Each module is tested on
the recorded frames in ``tests/captures``; the collector tasks in
``daemon.collectors`` do the I/O around them.
"""
