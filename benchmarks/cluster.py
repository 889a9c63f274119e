"""Cluster benchmark (issue 19): collector -> Redis -> edge(s) -> clients, against
role ``all`` in the same run.

    python benchmarks/cluster.py                       # rate 1000/s and max, 100 clients
    python benchmarks/cluster.py --rates 1000 --seconds 5 --clients 100

Needs ``redis-server`` (Debian's) and a C compiler for the load client
(``benchmarks/loadclient.c``, as ``fanout.py``). What runs, per mode (``--rates``:
exchange frames per second, and ``max``):

- **all**: ``tickwire replay COINBASE.0 COINBASE.ws.28.0 --loop --emulators
  process`` (role ``all``), N clients on its port;
- **1 edge**: a ``redis-server`` (no persistence) on a free port, the same replay
  with ``--role collector``, one ``tickwire run --role edge``, N clients on it;
- **2 edges**: the same with two edges, N clients on each.

The clients are ``fanout.py``'s C load clients: subscribe to everything, check
``seq`` per stream (a hole is a gap), and record the latency from ``recv_ts``
(when the collector, or the ``all`` daemon, received the exchange frame) to the
client's receipt, same machine, same clock. Counting starts once every client
has caught up, after ``--warmup`` s, for ``--seconds``. CPU (100 % = one core) of
each process from ``/proc``: the ``all`` daemon or the collector, the edges, Redis,
the emulator.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fanout import (  # noqa: E402
    CAPTURE_FILES,
    REPO,
    CClient,
    c_client_binary,
    child_pids,
    cpu_seconds,
    free_port,
    percentile,
    stop,
    wait_listening,
)


def config(directory: Path, name: str, role: str, port: int, redis: int | None,
           max_mode: bool) -> Path:
    lines = ['log_level = "warning"', f'role = "{role}"', "", "[server]",
             f'listen = "127.0.0.1:{port}"', f"client_queue = {100_000 if max_mode else 4096}",
             "max_connections = 20000", "max_connections_per_ip = 20000", "",
             "[admin]", f'socket = "{directory / name}.sock"']
    if redis is not None:
        lines += ["", "[cluster]", f'redis = "redis://127.0.0.1:{redis}"', f'node = "{name}"']
    path = directory / f"{name}-{'max' if max_mode else 'rate'}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(setup: str, n: int, rate: float | None, args: argparse.Namespace,
        workdir: Path) -> dict[str, Any]:
    """One setup, N clients per serving node, one window; the figures."""
    files = [str(args.captures / name) for name in CAPTURE_FILES]
    timing = ["--rate", f"{rate:g}"] if rate else ["--speed", "max"]
    edges = {"all": 0, "1 edge": 1, "2 edges": 2}[setup]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    clients: list[CClient] = []
    tick = [sys.executable, "-m", "daemon.cli"]
    try:
        redis_port = None
        if edges:
            redis_port = free_port()
            folder = workdir / f"redis-{redis_port}"
            folder.mkdir()
            procs["redis"] = subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
            wait_tcp(redis_port, procs["redis"])
        ports: list[int] = []
        main_port = free_port()
        role = "collector" if edges else "all"
        procs["daemon"] = subprocess.Popen(
            [*tick, "replay", *files, "--loop", *timing, "--emulators", "process",
             "--config", str(config(workdir, "daemon", role, main_port, redis_port, rate is None))],
            cwd=REPO, stdout=subprocess.DEVNULL)
        wait_listening(main_port, procs["daemon"])
        if not edges:
            ports.append(main_port)
        for i in range(edges):
            port = free_port()
            procs[f"edge{i + 1}"] = subprocess.Popen(
                [*tick, "run", "--config",
                 str(config(workdir, f"edge{i + 1}", "edge", port, redis_port, rate is None))],
                cwd=REPO, stdout=subprocess.DEVNULL)
            wait_listening(port, procs[f"edge{i + 1}"])
            ports.append(port)
        emulators = child_pids(procs["daemon"].pid)
        time.sleep(args.warmup)
        binary = c_client_binary(workdir)
        for port in ports:
            clients.append(CClient(binary, port, n, True))
        for expected in ("connected", "ready"):
            for client in clients:
                if not client.poll(120):
                    raise RuntimeError(f"a load client was not {expected} in time")
                status = client.recv()
                if status[0] != expected:
                    raise RuntimeError(f"load client: {status[1]}")
            if expected == "connected":
                for client in clients:
                    client.send("subscribe")
        time.sleep(args.warmup)
        pids = {name: [p.pid] for name, p in procs.items()}
        pids["emulator"] = emulators
        cpu0 = {name: sum(map(cpu_seconds, ps)) for name, ps in pids.items()}
        t0 = time.monotonic()
        for client in clients:
            client.send("start")
        time.sleep(args.seconds)
        for client in clients:
            client.send("stop")
        window = time.monotonic() - t0
        cpu1 = {name: sum(map(cpu_seconds, ps)) for name, ps in pids.items()}
        deliveries = gaps = closed = 0
        hist: dict[int, int] = {}
        for client in clients:
            if not client.poll(60):
                raise RuntimeError("a load client did not answer")
            _, d, g, _f, c, h = client.recv()
            deliveries, gaps, closed = deliveries + d, gaps + g, closed + c
            for bucket, count in h.items():
                hist[bucket] = hist.get(bucket, 0) + count
        return {
            "setup": setup, "clients": n * len(ports), "mode": f"{rate:g}/s" if rate else "max",
            "deliveries": deliveries / window, "gaps": gaps, "closed": closed,
            "p50": percentile(hist, 0.50), "p99": percentile(hist, 0.99),
            "cpu": {name: (cpu1[name] - cpu0[name]) / window * 100 for name in cpu0},
        }
    finally:
        for client in clients:
            with contextlib.suppress(OSError):
                client.send("quit")
            client.join(5)
            if client.is_alive():
                client.kill()
        for proc in reversed(list(procs.values())):
            stop(proc)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def wait_tcp(port: int, proc: subprocess.Popen[bytes], seconds: float = 30) -> None:
    """Until something accepts TCP on 127.0.0.1:``port`` (Redis)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setup | mode | clients | deliveries/s | gaps | closed | p50 ms | p99 ms | CPU % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        cpu = ", ".join(f"{name} {value:.0f}" for name, value in r["cpu"].items())
        lines.append(f"| {r['setup']} | {r['mode']} | {r['clients']} | {r['deliveries']:,.0f} | "
                     f"{r['gaps']} | {r['closed']} | {_ms(r['p50'])} | {_ms(r['p99'])} | {cpu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captures", type=Path, default=Path(
        os.environ.get("TICKWIRE_CAPTURES", REPO / "tests" / "captures")))
    parser.add_argument("--clients", type=int, default=100, help="clients per serving node")
    parser.add_argument("--rates", default="1000,max",
                        help="exchange frames per second, comma-separated ('max': as fast as it goes)")
    parser.add_argument("--setups", default="all,1 edge,2 edges")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        sys.exit("cluster.py: redis-server is not installed (apt-get install redis-server)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rate_text in args.rates.split(","):
            rate = None if rate_text == "max" else float(rate_text)
            for setup in args.setups.split(","):
                row = run(setup, args.clients, rate, args, Path(tmp))
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
