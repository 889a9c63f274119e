"""``tickwire tail``: a client that subscribes and prints events, one a line."""

from __future__ import annotations

import sys

import orjson
import trio_websocket


async def tail_events(url: str, channels: list[str], symbols: list[str], history: int = 0) -> None:
    """Subscribe to ``channels`` x ``symbols`` on ``url`` and write every message
    except the welcome and the ack to stdout, one JSON object a line (arrays are
    split). An ``error`` reply is written to stderr and ends the command (exit 1)."""
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message(orjson.dumps({
            "op": "subscribe", "id": 1, "channels": channels, "symbols": symbols,
            "history": history,
        }).decode())
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                sys.stderr.write(f"closed: {exc.reason.code} {exc.reason.reason or ''}\n")
                raise SystemExit(1) from None
            parsed = orjson.loads(message)
            for item in parsed if isinstance(parsed, list) else [parsed]:
                kind = item.get("type")
                if kind in ("welcome", "ack"):
                    continue
                if kind == "error":
                    sys.stderr.write(orjson.dumps(item).decode() + "\n")
                    raise SystemExit(1)
                sys.stdout.write(orjson.dumps(item).decode() + "\n")
            sys.stdout.flush()
