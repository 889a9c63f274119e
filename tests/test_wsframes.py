"""The collector's decoder of server frames (``daemon.collectors.wsframes``), sans-IO,
against frames encoded by wsproto's server side (an independent encoder) and bytes
made by hand for what RFC 6455 forbids."""

from __future__ import annotations

import random
import struct

import pytest
from wsproto.frame_protocol import FrameProtocol

from daemon.collectors.wsframes import (
    CLOSE,
    INVALID_DATA,
    MESSAGE_TOO_BIG,
    PING,
    PONG,
    PROTOCOL_ERROR,
    Control,
    ServerFrames,
    WebSocketError,
    close_reason,
)
from daemon.replay.capture import read_capture


def server() -> FrameProtocol:
    """wsproto's frame encoder as a server uses it (frames not masked)."""
    return FrameProtocol(client=False, extensions=[])


def test_every_frame_of_a_capture_in_reads_of_every_size_decodes_to_the_same_texts(captures) -> None:
    texts = [r.text for c in read_capture(captures / "COINBASE.ws.28.0").connections
             for r in c.received][:2000]
    proto = server()
    stream = b"".join(proto.send_data(text, fin=True) for text in texts)
    assert any(len(t.encode()) >= 126 for t in texts)  # 16-bit lengths among them
    rng = random.Random(17)
    for _ in range(5):
        frames = ServerFrames(max_message=1 << 20)
        got: list[str | bytes | Control] = []
        pos = 0
        while pos < len(stream):
            size = rng.choice([1, 2, 3, 7, 100, 4096, 65536])
            got += frames.receive(stream[pos:pos + size])
            pos += size
        assert got == texts


def test_64_bit_lengths_binary_and_a_large_message_across_many_reads() -> None:
    big = "x" * 300_000
    proto = server()
    data = proto.send_data(big, fin=True) + proto.send_data(b"\x00\xff", fin=True)
    assert data[1] == 127  # a 64-bit length
    frames = ServerFrames(max_message=1 << 20)
    got: list[str | bytes | Control] = []
    for pos in range(0, len(data), 4096):
        got += frames.receive(data[pos:pos + 4096])
    assert got == [big, b"\x00\xff"]


def test_fragments_are_joined_and_control_frames_between_them_come_in_order() -> None:
    proto = server()
    data = (proto.send_data("{\"type\":", fin=False) + proto.ping(b"hb")
            + proto.send_data("\"l2update\"}", fin=True) + proto.pong(b"")
            + proto.send_data(b"\x01", fin=False) + proto.send_data(b"\x02", fin=True))
    got = ServerFrames(max_message=1024).receive(data)
    assert got == [Control(PING, b"hb"), '{"type":"l2update"}', Control(PONG, b""), b"\x01\x02"]


def test_a_text_message_split_inside_a_utf8_character_is_decoded_whole() -> None:
    proto = server()
    data = proto.send_data("€".encode()[:2], fin=False)  # wsproto sends bytes as binary
    data = bytes([0x01]) + data[1:]  # ... so mark the first fragment as text
    data += proto.send_data("€".encode()[2:], fin=True)
    assert ServerFrames(max_message=64).receive(data) == ["€"]


@pytest.mark.parametrize(("data", "code", "what"), [
    (b"\x81\x85abcdhello", PROTOCOL_ERROR, "masked"),
    (b"\xc1\x02hi", PROTOCOL_ERROR, "reserved bits"),
    (b"\x83\x00", PROTOCOL_ERROR, "reserved opcode"),
    (b"\x8b\x00", PROTOCOL_ERROR, "reserved opcode"),
    (b"\x09\x00", PROTOCOL_ERROR, "fragmented or oversized control"),
    (b"\x89\x7e\x00\x7e" + b"p" * 126, PROTOCOL_ERROR, "fragmented or oversized control"),
    (b"\x80\x02hi", PROTOCOL_ERROR, "continuation frame without a message"),
    (b"\x01\x02hi\x81\x02hi", PROTOCOL_ERROR, "new message inside a fragmented one"),
    (b"\x81\x7f" + struct.pack(">Q", 1 << 63), PROTOCOL_ERROR, "top bit"),
    (b"\x81\x02\xc3\x28", INVALID_DATA, "not UTF-8"),
    (b"\x81\x7e\x04\x01" + b"a" * 1025, MESSAGE_TOO_BIG, "a frame of 1025 bytes"),
    (b"\x02\x7e\x02\x00" + b"a" * 512 + b"\x80\x7e\x02\x01" + b"a" * 513, MESSAGE_TOO_BIG,
     "a message of over 1024"),
])
def test_what_rfc_6455_forbids_fails_with_its_close_code(data: bytes, code: int, what: str) -> None:
    with pytest.raises(WebSocketError, match=what) as raised:
        ServerFrames(max_message=1024).receive(data)
    assert raised.value.code == code


def test_close_frames_give_their_code_and_reason() -> None:
    proto = server()
    data = proto.close(1001, "going away")
    (control,) = ServerFrames(max_message=64).receive(data)
    assert isinstance(control, Control) and control.opcode == CLOSE
    assert close_reason(control.payload) == (1001, "going away")
    assert close_reason(b"") == (1005, "")
    with pytest.raises(WebSocketError) as raised:
        close_reason(b"\x03")
    assert raised.value.code == PROTOCOL_ERROR
    with pytest.raises(WebSocketError) as raised:
        close_reason(b"\x03\xe8\xff")
    assert raised.value.code == INVALID_DATA
