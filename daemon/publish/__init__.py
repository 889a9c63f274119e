"""Publishing: other processes put the desk's own messages (signals, executions,
portfolio, trading state) into declared channels, with the same guarantees as
market data.

- ``message``: the publish message and its answers, sans-IO;
- ``publisher``: the one code path behind every way in (into the dispatcher as a
  source, backpressure, counters);
- ``endpoint``: the HTTP listener (``POST /api/publish`` and ``/api/publish/batch``).

The WebSocket ``publish`` op (``daemon.broadcast``) and the admin socket's
``publish`` request (``daemon.admin``) call the same ``Publisher``; ``daemon.client``
is the Python client.
"""
