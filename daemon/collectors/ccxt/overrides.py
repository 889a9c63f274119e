"""The one hook for exchange URLs other than the exchange's own: tickwire's
emulator.

``tickwire replay`` (and the tests) point a section's ``rest_url`` / ``ws_url`` at
the exchange emulator on 127.0.0.1. ccxt knows only the exchanges' own URLs, and
ccxt.pro expects what the real exchanges require, so a ccxt exchange object is
bent in exactly one place, ``override_urls``, and only when a URL is overridden;
nothing else in the ccxt collectors knows about the emulator:

- every REST URL in ccxt's ``urls["api"]`` is rebased on ``rest_url`` (the path
  kept), for ``poll`` and ``watch`` alike;
- every WebSocket URL is rebased on ``ws_url`` with the exchange's host kept as
  the first path segment (``wss://stream.binance.com:9443/ws`` ->
  ``ws://127.0.0.1:5001/stream.binance.com/ws``): ccxt tells a market's type from
  its URL, and the emulator routes by that segment;
- ccxt.pro signs some public subscriptions (Coinbase Exchange's ``level2``:
  ``watch_order_book`` calls ``authenticate()``): an exchange in ``SIGNS_PUBLIC``
  without credentials gets placeholders, which the emulator does not check and a
  real exchange would refuse. Only with an overridden WebSocket URL (ccxt.pro):
  credentials change what other exchanges' ``load_markets`` asks for.
"""

from __future__ import annotations

from typing import Any

#: ccxt ids whose ccxt.pro signs public subscriptions: ``coinbaseexchange`` signs
#: ``level2`` (``watch_order_book`` calls ``authenticate()``).
SIGNS_PUBLIC = frozenset({"coinbaseexchange"})
#: The ``secret`` given to ccxt.pro on overridden URLs: base64, as Coinbase's HMAC
#: key must be.
PLACEHOLDER_SECRET = "dGlja3dpcmUtZW11bGF0b3I="


def rebase_rest(urls: Any, base: str) -> Any:
    """Every URL in ccxt's ``urls["api"]`` (a string or nested dicts) with its scheme
    and host replaced by ``base``, the path kept: ``https://api.binance.com/api/v3``
    -> ``http://127.0.0.1:5000/api/v3``."""
    if isinstance(urls, dict):
        return {key: rebase_rest(value, base) for key, value in urls.items()}
    if isinstance(urls, str) and "://" in urls:
        rest = urls.split("://", 1)[1]
        path = rest[rest.index("/"):] if "/" in rest else ""
        return base.rstrip("/") + path
    return urls


def rebase_urls(urls: Any, rest_url: str, ws_url: str) -> Any:
    """ccxt's ``urls["api"]`` (a string or nested dicts) with every ``http(s)`` URL
    rebased on ``rest_url`` (``rebase_rest``) and every ``ws(s)`` URL on ``ws_url``
    with the original host kept as the first path segment (module docstring). An
    empty base keeps the URL."""
    if isinstance(urls, dict):
        return {key: rebase_urls(value, rest_url, ws_url) for key, value in urls.items()}
    if not isinstance(urls, str) or "://" not in urls:
        return urls
    scheme, rest = urls.split("://", 1)
    if scheme in ("ws", "wss"):
        if not ws_url:
            return urls
        hostport, slash, path = rest.partition("/")
        return f"{ws_url.rstrip('/')}/{hostport.split(':')[0]}{slash}{path}"
    return rebase_rest(urls, rest_url) if rest_url else urls


def override_urls(api: Any, exchange_id: str, rest_url: str = "", ws_url: str = "") -> None:
    """The hook: point ccxt's (or ccxt.pro's) exchange object ``api`` of
    ``exchange_id`` at ``rest_url`` / ``ws_url`` and give it what the emulator
    needs (module docstring). Does nothing when both are empty (the real exchange)."""
    if not rest_url and not ws_url:
        return
    api.urls["api"] = rebase_urls(api.urls["api"], rest_url, ws_url)
    if ws_url and exchange_id in SIGNS_PUBLIC:
        for field, required in api.requiredCredentials.items():
            if required and not getattr(api, field, None):
                setattr(api, field, PLACEHOLDER_SECRET if field == "secret" else
                        f"tickwire-emulator-{field}")
