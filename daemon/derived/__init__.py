"""Streams computed inside the daemon from other streams: large trades
(``whales``), trade bars (``bars``) and top-of-book views (``quote``, ``book``
with ``depth``). Each is a sans-IO computation (``whales``, ``bars``, ``views``)
run by a task (``runner``) that subscribes to its inputs at the dispatcher and
publishes its outputs back through a dispatcher source."""
