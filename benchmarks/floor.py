"""Floors for the fan-out benchmark's latency run: what this machine allows a sender.

    python benchmarks/floor.py --port P --rate 1000 --mode send
    python benchmarks/fanout.py --clients 100 --modes rate --servers tickwire,peer,floor

Not a server anyone would run. It speaks just enough WebSocket for the benchmark's
load client (the handshake; what the client sends is read and ignored) and makes, at
``--rate`` events per second, a small trade event (``seq``, and ``recv_ts`` stamped
when the event is made) for every connection. What it does next is the ``--mode``:

- ``send``: the event leaves at once, alone, to every connection: one ``send`` per
  connection per event, and nothing else (no parsing, no subscriptions, no
  retention). The least a server can do: its latency is what the kernel, the
  scheduler and the load client cost on this machine.
- ``work``: each event first costs ``--work-us`` of CPU (a stand-in for reading and
  parsing the exchange frame and dispatching the event), and the events made while
  the process was busy leave together, in one frame, once it has nothing else to do:
  tickwire's policy, without tickwire (and without its 5 ms bound on the wait:
  at 1,000 events/s it catches up, as the events/s column shows).
- ``sender``: as ``work``, but the frames go over a Unix socket to a forked sender
  process, which writes to the clients what it has received since its last write:
  the fan-out on the second core.

A socket that does not take a whole write loses it (the client counts a gap): the
floor has no backpressure, and needs none at the rates of a latency run.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import selectors
import socket
import struct
import time

import orjson

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
LENGTH = struct.Struct("!I")
PAD = "x" * 200  # an event about the size of a Coinbase book_update


def text_frame(payload: bytes) -> bytes:
    """An unmasked server text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes([0x81, n]) + payload
    if n < 65536:
        return bytes([0x81, 126]) + n.to_bytes(2, "big") + payload
    return bytes([0x81, 127]) + n.to_bytes(8, "big") + payload


def accept_key(request: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for an HTTP upgrade request."""
    for line in request.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            return base64.b64encode(hashlib.sha1(value.strip() + GUID).digest())
    raise ValueError("no Sec-WebSocket-Key")


def send_to_all(sockets: list[socket.socket], data: bytes) -> None:
    """One non-blocking ``send`` of ``data`` per socket; what is not taken is lost."""
    for sock in sockets:
        try:  # noqa: SIM105 (not contextlib.suppress: this loop is what the floor measures)
            sock.send(data)
        except OSError:
            pass


def sender_process(control: socket.socket) -> None:
    """The ``sender`` mode's child: client sockets arrive over ``control`` (SCM_RIGHTS),
    then length-prefixed frames; what has arrived since the last write leaves in one
    write to every client. Exits when ``control`` closes."""
    clients: list[socket.socket] = []
    buffer = b""
    while True:
        data, fds, _, _ = socket.recv_fds(control, 1 << 20, 64)
        if not data and not fds:
            os._exit(0)
        for fd in fds:
            client = socket.socket(fileno=fd)
            client.setblocking(False)
            clients.append(client)
        buffer += data
        frames = []
        while len(buffer) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(buffer)
            if len(buffer) < LENGTH.size + size:
                break
            frames.append(buffer[LENGTH.size:LENGTH.size + size])
            buffer = buffer[LENGTH.size + size:]
        frames = [frame for frame in frames if frame]  # empty: a socket came alone
        if frames:
            send_to_all(clients, b"".join(frames))


def serve(port: int, rate: float, mode: str, work_us: float) -> None:
    """Listen on 127.0.0.1:``port`` and make ``rate`` events per second, forever."""
    control = None
    if mode == "sender":
        control, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.fork() == 0:
            control.close()
            sender_process(child)
        child.close()
    listener = socket.create_server(("127.0.0.1", port), backlog=2048)
    listener.setblocking(False)
    selector = selectors.EpollSelector()
    selector.register(listener, selectors.EVENT_READ)
    handshakes: dict[socket.socket, bytes] = {}
    clients: list[socket.socket] = []
    made: list[bytes] = []  # events made, not yet written (work mode)
    seq = 0
    start = time.perf_counter()
    while True:
        due = start + seq / rate
        if made and time.perf_counter() < due:  # idle: write what was made meanwhile
            payload = made[0] if len(made) == 1 else b"[" + b",".join(made) + b"]"
            made.clear()
            send_to_all(clients, text_frame(payload))
            continue
        for key, _ in selector.select(max(0.0, due - time.perf_counter())):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                client, _ = listener.accept()
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                client.setblocking(False)
                selector.register(client, selectors.EVENT_READ)
                handshakes[client] = b""
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:  # reset by the peer: as closed
                data = b""
            if not data:
                selector.unregister(sock)
                handshakes.pop(sock, None)
                if sock in clients:
                    clients.remove(sock)
                sock.close()
            elif sock in handshakes:
                handshakes[sock] += data
                if b"\r\n\r\n" in handshakes[sock]:
                    sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                                 + accept_key(handshakes.pop(sock)) + b"\r\n\r\n")
                    clients.append(sock)
                    if control is not None:
                        socket.send_fds(control, [LENGTH.pack(0)], [sock.fileno()])
        if time.perf_counter() < due:
            continue
        seq += 1
        recv_ts = time.time()
        if mode != "send":
            end = time.perf_counter() + work_us / 1e6
            while time.perf_counter() < end:  # the stand-in for parsing and dispatching
                pass
        payload = orjson.dumps({"type": "trade", "exchange": "coinbase", "symbol": "BTC-USD",
                                "seq": seq, "recv_ts": recv_ts, "pad": PAD})
        if mode == "send":
            send_to_all(clients, text_frame(payload))
        elif mode == "work":
            made.append(payload)
        else:
            assert control is not None
            frame = text_frame(payload)
            control.sendall(LENGTH.pack(len(frame)) + frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second")
    parser.add_argument("--mode", choices=("send", "work", "sender"), default="send")
    parser.add_argument("--work-us", type=float, default=300.0,
                        help="CPU each event costs before it is sent (work, sender)")
    args = parser.parse_args()
    serve(args.port, args.rate, args.mode, args.work_us)


if __name__ == "__main__":
    main()
