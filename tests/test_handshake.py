"""The WebSocket port's answers to what is not a valid handshake (RFC 6455
section 4.2.1, 4.2.2 and 4.4; RFC 9110): the request judged sans-IO
(``connection.check_request``), then the documented status of each against a
real server on 127.0.0.1 over raw TCP; and the close codes the server sends on a
protocol error (1002) and invalid UTF-8 (1007), each in docs/protocol.md's
table."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import hypothesis.strategies as st
import pytest
import trio
import trio_websocket
from hypothesis import given, settings

from daemon.broadcast import connection, requests, session
from daemon.broadcast.connection import check_request, valid_key
from daemon.config import AuthConfig
from tests.broadcast_server import start

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's example nonce
PROTOCOL = Path(__file__).parent.parent / "docs" / "protocol.md"


def handshake(method: bytes = b"GET", key: bytes | None = KEY, version: bytes | None = b"13",
              extra: bytes = b"", http: bytes = b"HTTP/1.1",
              upgrade: bytes | None = b"websocket", connection: bytes | None = b"Upgrade") -> bytes:
    """A client's opening handshake, valid unless told otherwise (``None``: the
    header is left out)."""
    lines = [method + b" /stream?x=1 " + http, b"Host: 127.0.0.1"]
    for name, value in ((b"Upgrade", upgrade), (b"Connection", connection),
                        (b"Sec-WebSocket-Key", key), (b"Sec-WebSocket-Version", version)):
        if value is not None:
            lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


PLAIN_GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"

#: (name, request, status, a header the answer must carry, words of the reason)
CASES = [
    ("plain HTTP GET", PLAIN_GET, 426, (b"upgrade", b"websocket"), "WebSocket endpoint"),
    ("plain HTTP POST", b"POST /api HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}", 426,
     (b"upgrade", b"websocket"), "WebSocket endpoint"),
    ("an upgrade to h2c", b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
     b"Upgrade: h2c\r\n\r\n", 426, (b"upgrade", b"websocket"), "WebSocket endpoint"),
    ("wrong version", handshake(version=b"8"), 426, (b"sec-websocket-version", b"13"),
     "version 13"),
    ("two versions", handshake(extra=b"Sec-WebSocket-Version: 8\r\n"), 426,
     (b"sec-websocket-version", b"13"), "version 13"),
    ("no version", handshake(version=None), 400, (b"sec-websocket-version", b"13"),
     "missing header Sec-WebSocket-Version"),
    ("bad key: too short", handshake(key=b"c2hvcnQ="), 400, None, "Sec-WebSocket-Key"),
    ("bad key: not base64", handshake(key=b"!!!!!!!!!!!!!!!!!!!!!!=="), 400, None,
     "Sec-WebSocket-Key"),
    ("bad key: 17 bytes", handshake(key=b"AAAAAAAAAAAAAAAAAAAAAAA="), 400, None,
     "Sec-WebSocket-Key"),
    ("bad key: bad padding", handshake(key=b"dGhlIHNhbXBsZSBub25jZQ=x"), 400, None,
     "Sec-WebSocket-Key"),
    ("no key", handshake(key=None), 400, None, "missing header Sec-WebSocket-Key"),
    ("two keys", handshake(extra=b"Sec-WebSocket-Key: " + KEY + b"\r\n"), 400, None,
     "more than one Sec-WebSocket-Key"),
    ("two Origin headers", handshake(extra=b"Origin: https://a.example\r\n"
                                           b"Origin: https://b.example\r\n"), 400, None,
     "more than one Origin header"),
    ("not GET", handshake(method=b"POST"), 400, None, "GET request"),
    ("HTTP/1.0", handshake(http=b"HTTP/1.0"), 400, None, "HTTP/1.1"),
    ("no Upgrade", handshake(upgrade=None), 400, None, "Upgrade: websocket"),
    ("no Connection: Upgrade", handshake(connection=b"keep-alive"), 400, None,
     "Connection: Upgrade"),
    ("no Host", handshake().replace(b"Host: 127.0.0.1\r\n", b""), 400, None,
     "missing header Host"),
    ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, None,
     "not a well-formed HTTP/1.1 request"),
    ("a head still incomplete past 16 KiB", b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: "
     + b"a" * 20_000, 431, None, "too large"),
]


# -- sans-IO: the request head judged ------------------------------------------------


@pytest.mark.parametrize(("name", "raw", "status", "header", "reason"), CASES,
                         ids=[case[0] for case in CASES])
def test_check_request_answers_each_bad_request_by_the_rfc(
        name: str, raw: bytes, status: int, header: tuple[bytes, bytes] | None,
        reason: str) -> None:
    rejection = check_request(raw)
    assert rejection is not None and rejection.status == status, rejection
    assert reason in rejection.reason and "\n" not in rejection.reason
    if header is not None:
        assert (header[0].decode(), header[1].decode()) in rejection.headers


def test_a_valid_handshake_passes_and_an_incomplete_one_waits() -> None:
    assert check_request(handshake()) is None
    assert check_request(handshake(extra=b"Origin: https://a.example\r\n")) is None
    assert check_request(handshake(upgrade=b"WebSocket", connection=b"keep-alive, Upgrade")) \
        is None  # tokens are case-insensitive lists (RFC 9110 section 7.6.1, 7.8)
    assert check_request(handshake()[:40]) is None  # not complete yet: wait for more
    assert valid_key(KEY) and valid_key(b"AAAAAAAAAAAAAAAAAAAAAA==")
    assert not valid_key(b"AAAAAAAAAAAAAAAAAAAAAA=") and not valid_key(b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.lists(
    st.sampled_from([b"GET / HTTP/1.1", b"Host: h", b"Upgrade: websocket",
                     b"Connection: Upgrade", b"Sec-WebSocket-Key: " + KEY,
                     b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 7",
                     b"Origin: o", b"Sec-WebSocket-Key: x", b"", b"POST / HTTP/1.1"]),
    max_size=9).map(lambda lines: b"\r\n".join(lines) + b"\r\n\r\n"))
def test_any_bytes_get_none_or_a_documented_status_without_echoing_them(raw: bytes) -> None:
    rejection = check_request(raw)
    if rejection is not None:
        assert rejection.status in (400, 426, 431)
        assert rejection.reason.isprintable() and "Origin: o" not in rejection.reason


# -- a real server over TCP ------------------------------------------------------------


async def exchange(port: int, raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send ``raw`` on a new connection; the answer's status, headers (lower-case
    names) and body, read until the server closes (bounded)."""
    data = b""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            while chunk := await stream.receive_some():
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    version, status, phrase = status_line.split(b" ", 2)
    assert version == b"HTTP/1.1" and phrase, status_line
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines)}
    assert int(headers[b"content-length"]) == len(body)
    return int(status), headers, body


async def test_a_real_server_answers_each_documented_status_and_counts_it() -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery, auth=AuthConfig(origins=["https://desk.example"]))
        port = int(running.url.rsplit(":", 1)[1])
        status, headers, body = await exchange(port, PLAIN_GET)
        assert status == 426 and headers[b"upgrade"] == b"websocket"
        assert b"upgrade" in headers[b"connection"] and b"close" in headers[b"connection"]
        assert body.endswith(b"\n") and body.count(b"\n") == 1
        assert headers[b"content-type"].startswith(b"text/plain")
        expected = {
            handshake(key=b"c2hvcnQ="): (400, b"Sec-WebSocket-Key is not 16 bytes in base64\n"),
            handshake(version=b"8"): (426, b"unsupported WebSocket version: this server "
                                           b"speaks version 13\n"),
            handshake(extra=b"Origin: https://desk.example\r\nOrigin: https://evil.example\r\n"):
                (400, b"more than one Origin header\n"),
            handshake(extra=b"Origin: https://evil.example\r\n"): (403, b"origin not allowed\n"),
            handshake(method=b"PUT"): (400, b"a WebSocket handshake is a GET request\n"),
            handshake(key=None): (400, b"missing header Sec-WebSocket-Key\n"),
        }
        for raw, (want_status, want_body) in expected.items():
            status, headers, body = await exchange(port, raw)
            assert (status, body) == (want_status, want_body), raw
            assert b"close" in headers[b"connection"]
        status, headers, _ = await exchange(port, handshake(version=b"8"))
        assert headers[b"sec-websocket-version"] == b"13"
        assert running.server.rejected == {426: 3, 400: 4, 403: 1}
        # the same Origin alone, and a real client, are served
        async with trio_websocket.open_websocket_url(
                running.url, extra_headers=[(b"Origin", b"https://desk.example")]) as ws:
            assert '"welcome"' in await ws.get_message()
        assert running.server.connections == 1
        nursery.cancel_scope.cancel()


# -- close codes after the upgrade -------------------------------------------------------


def client_frame(opcode: int, payload: bytes, rsv: int = 0, masked: bool = True) -> bytes:
    """One client frame (masked, as RFC 6455 section 5.3 requires, unless told)."""
    mask = os.urandom(4) if masked else b""
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if masked else payload
    return bytes([0x80 | rsv | opcode, (0x80 if masked else 0) | len(payload)]) + mask + body


async def close_code_after(port: int, frame: bytes) -> int:
    """Upgrade, send ``frame``, and return the code of the server's close frame."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(handshake())
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some()
            assert data.startswith(b"HTTP/1.1 101 ")
            data = data.partition(b"\r\n\r\n")[2]
            await stream.send_all(frame)
            while True:  # server frames: unmasked, short (welcome, then the close)
                while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F):
                    chunk = await stream.receive_some()
                    assert chunk, "closed without a close frame"
                    data += chunk
                assert data[1] & 0x7F < 126
                opcode, size = data[0] & 0x0F, data[1] & 0x7F
                if opcode == 0x8:
                    return int(struct.unpack("!H", data[2:4])[0])
                data = data[2 + size:]


async def test_protocol_errors_are_closed_1002_and_invalid_utf8_1007() -> None:
    async with trio.open_nursery() as nursery:
        running = await start(nursery)
        port = int(running.url.rsplit(":", 1)[1])
        assert await close_code_after(port, client_frame(0x1, b"\xff\xfe")) == 1007
        assert await close_code_after(port, client_frame(0x1, b"hi", rsv=0x40)) == 1002
        assert await close_code_after(port, client_frame(0x1, b"hi", masked=False)) == 1002
        assert await close_code_after(port, client_frame(0x8, struct.pack("!H", 999))) == 1002
        assert await close_code_after(port, client_frame(0x2, b"x")) == 1003
        assert await close_code_after(port, client_frame(0x8, struct.pack("!H", 4321))) == 4321
        nursery.cancel_scope.cancel()


def test_every_close_code_the_daemon_sends_is_in_the_protocols_table() -> None:
    table = PROTOCOL.read_text().split("## Close codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d{4}) \|", table, re.MULTILINE)}
    named = {value for module in (connection, requests, session)
             for name, value in vars(module).items()
             if name.startswith("CLOSE_") and isinstance(value, int) and value >= 1000}
    # what connection.py sends itself (1003, 1009) and what wsproto's parser answers
    # (1002 protocol error, 1007 invalid UTF-8; the test above sees both sent)
    sent = named | {1002, 1003, 1007, 1009}
    assert sent <= documented, sent - documented
