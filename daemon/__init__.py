"""tickwire: normalized real-time market data from exchanges to WebSocket clients."""

__version__ = "0.1.0"
