"""Exchange protocols, sans-IO: subscribe messages, frame -> events, book integrity.

Nothing here imports trio, trio-websocket or httpx. Each module is tested on the
recorded frames in ``shared/captures``; the collector tasks in ``daemon.collectors``
do the I/O around them.
"""
