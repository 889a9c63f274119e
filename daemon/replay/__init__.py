"""Capture replay: read recorded exchange traffic and serve it as the exchange would."""
