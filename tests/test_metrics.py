"""The Prometheus endpoint of a real ``tickwire replay``: parsable, and its counters
equal what a client received."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import httpx
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_process import tickwire, write_config
from tests.helpers import messages, request

KRAKEN = ("KRAKEN.0", "KRAKEN.ws.48.0", "KRAKEN.ws.49.0", "KRAKEN.ws.50.0")


def scrape_values(text: str) -> dict[str, dict[tuple, float]]:
    """``{sample name: {sorted label items: value}}``."""
    values: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return values


async def test_prometheus_counters_match_what_a_client_received(
    captures: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "tickwire.toml", (
        f'[server]\nlisten = "127.0.0.1:0"\n[admin]\nsocket = "{tmp_path / "admin.sock"}"\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n'))
    async with tickwire("replay", *(str(captures / f) for f in KRAKEN), "--speed", "8",
                        "--config", str(config)) as daemon:
        port = int((await daemon.wait_for(r"listening on ws://127\.0\.0\.1:(\d+)")).group(1))
        metrics = int((await daemon.wait_for(r"serving http://127\.0\.0\.1:(\d+)/metrics")).group(1))
        received = 0
        payload = 0
        last_seq: dict[tuple[str, str, str], int] = {}
        trades = 0
        quiet_at = -1.0
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}") as ws, \
                httpx.AsyncClient() as http:
            await request(ws, {"op": "subscribe", "id": 1, "channels": ["trades", "book", "ticker"],
                               "symbols": ["kraken:*"], "history": 1000})
            with trio.fail_after(30):
                while True:
                    with trio.move_on_after(0.5) as idle:
                        frame = await ws.get_message()
                    if idle.cancelled_caught:
                        # the tape is over, nothing came for 0.5 s, and the daemon is
                        # quiet (no event since the last scrape, everything written)
                        if not any("every capture played" in line for line in daemon.lines):
                            continue
                        response = await http.get(f"http://127.0.0.1:{metrics}/metrics")
                        values = scrape_values(response.text)
                        (sent,) = values["tickwire_client_messages_sent_total"].values()
                        events = values["tickwire_dispatcher_events_total"][()]
                        if sent == received and events == quiet_at:
                            break
                        quiet_at = events
                        continue
                    payload += len(frame.encode() if isinstance(frame, str) else frame)
                    for m in messages(frame):
                        received += 1
                        if "seq" in m:
                            channel = "book" if m["type"].startswith("book") else m["type"]
                            channel = "trades" if channel == "trade" else channel
                            last_seq[(channel, m["exchange"], m["symbol"])] = m["seq"]
                            trades += m["type"] == "trade"
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")

    # every stream's counter is the last seq the client saw
    streams = values["tickwire_stream_events_total"]
    assert last_seq and {
        key: int(streams[(("channel", key[0]), ("exchange", key[1]), ("symbol", key[2]))])
        for key in last_seq
    } == last_seq
    # the client's counter is every message it received (welcome and ack included)
    assert int(sent) == received
    (written,) = values["tickwire_client_bytes_sent_total"].values()
    assert written >= payload  # frame headers on top
    # the feed's trades, less the duplicates the dispatcher dropped, reached the client
    feed_trades = values["tickwire_feed_trades_total"][(("exchange", "kraken"),)]
    duplicates = values["tickwire_dispatcher_duplicates_total"][()]
    assert feed_trades - duplicates == trades > 0
    checksums = values["tickwire_feed_checksums_total"]
    assert checksums[(("exchange", "kraken"), ("result", "ok"))] > 0
    assert checksums[(("exchange", "kraken"), ("result", "mismatch"))] == 0
    assert values["tickwire_feed_messages_total"][(("exchange", "kraken"),)] > 0
    assert values["tickwire_health"][()] in (0, 1)
    assert values["tickwire_clients"][()] == 1
    assert values["tickwire_dispatcher_buffer_size"][()] == 1024
    if "tickwire_delivery_latency_seconds_count" in values:  # the server measures it
        assert values["tickwire_delivery_latency_seconds_count"][()] > 0
        quantiles = values["tickwire_delivery_latency_seconds"]
        p50, p99, p999 = (quantiles[(("quantile", q),)] for q in ("0.5", "0.99", "0.999"))
        assert 0 < p50 <= p99 <= p999 < 5
