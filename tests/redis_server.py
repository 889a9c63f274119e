"""A real ``redis-server`` for the cluster tests: started on a free 127.0.0.1
port in a folder of its own, without persistence unless asked (``appendonly``),
stopped (and restarted on the same port) by the tests, killed at the end.

Without ``redis-server`` on the machine the tests that need it skip with
``NO_REDIS`` (``.ci/run`` installs Debian's ``redis-server`` where it is missing).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

#: The skip reason when the machine has no redis-server (tests/conftest.py counts it).
NO_REDIS = "redis-server not installed (.ci/run installs Debian's redis-server)"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process on ``port`` with its data in ``folder``.

    ``persistent``: append-only file on (a restart keeps the data), else no
    persistence at all (a restart loses everything, as after a crash)."""

    def __init__(self, folder: Path, persistent: bool = False) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, NO_REDIS
        self.binary = binary
        self.folder = folder
        self.persistent = persistent
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        #: more arguments for ``redis-server`` (a cluster node's)
        self.extra: list[str] = []

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT``."""
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it and wait (at most 10 s) until it answers PING."""
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.folder), "--save", "",
                "--appendonly", "yes" if self.persistent else "no",
                "--appendfsync", "always", "--protected-mode", "no", *self.extra]
        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "redis.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"redis-server on port {self.port} did not answer in 10 s")

    def stop(self) -> None:
        """Kill it (SIGKILL: nothing is saved beyond the append-only file) and wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def command(self, *args: str) -> bytes:
        """One command over a plain socket (RESP inline is not enough for
        arguments with spaces: this sends an array); the raw reply."""
        body = b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"*%d\r\n" % len(args) + body)
            return sock.recv(65536)


#: The skip reason when the machine has no redis-cli (the cluster is made with it).
NO_REDIS_CLI = ("redis-cli not installed (Debian's redis-tools, a dependency of "
                f"redis-server); {NO_REDIS}")


class RedisClusterServers:
    """A real Redis Cluster: ``masters`` ``redis-server`` processes on free
    127.0.0.1 ports (``--cluster-enabled yes``, each with its node file in its own
    folder under ``folder``, no persistence), joined by ``redis-cli --cluster
    create ... --cluster-replicas 0``, which gives each master a third of the
    16384 slots. ``url`` is the first node's (a startup node: the client finds
    the others); ``stop`` kills them all."""

    def __init__(self, folder: Path, masters: int = 3) -> None:
        cli = shutil.which("redis-cli")
        assert cli is not None, NO_REDIS_CLI
        self.cli = cli
        self.folder = folder
        self.nodes = [_ClusterNode(folder / f"node{i}") for i in range(masters)]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT`` of the first node."""
        return self.nodes[0].url

    def start(self) -> None:
        """Start every node, create the cluster, and wait (at most 20 s) until every
        node says ``cluster_state:ok``."""
        for node in self.nodes:
            node.start()
        created = subprocess.run(
            [self.cli, "--cluster", "create",
             *[f"127.0.0.1:{node.port}" for node in self.nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        assert created.returncode == 0, created.stdout + created.stderr
        self.wait_ok()

    def wait_ok(self) -> None:
        """Wait (at most 20 s) until every node says ``cluster_state:ok``."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in node.command("CLUSTER", "INFO") for node in self.nodes):
                return
            time.sleep(0.05)
        raise AssertionError("the Redis Cluster did not reach cluster_state:ok in 20 s")

    def stop(self) -> None:
        """Kill every node."""
        for node in self.nodes:
            node.stop()

    def keys_by_node(self, pattern: str) -> dict[int, list[str]]:
        """The keys matching ``pattern`` on each node (by port): where they live."""
        found: dict[int, list[str]] = {}
        for node in self.nodes:
            reply = node.command("KEYS", pattern)
            found[node.port] = [k.decode() for k in re.findall(rb"\$\d+\r\n([^\r]*)\r\n", reply)]
        return found

    def slot(self, key: str) -> int:
        """The slot Redis gives ``key`` (``CLUSTER KEYSLOT``)."""
        reply = self.nodes[0].command("CLUSTER", "KEYSLOT", key)
        return int(reply.strip().lstrip(b":"))


class _ClusterNode(RedisServer):
    """One node of a ``RedisClusterServers``."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.extra = ["--cluster-enabled", "yes",
                      "--cluster-config-file", str(folder / "nodes.conf"),
                      "--cluster-node-timeout", "2000",
                      # the bus's port (default PORT + 10000: out of range or taken)
                      "--cluster-port", str(free_port())]
