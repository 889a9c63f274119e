"""The admin Unix socket: newline-delimited JSON requests and replies.

Protocol
--------
One JSON object a line each way. A request is ``{"op": OP}`` with an optional
``id`` (echoed back); ``OP`` is one of:

- ``status``: the daemon's ``health``, ``uptime``, ``version``, ``epoch``, ``pid``,
  every component with its ``criticality``, ``health``, ``reason`` and ``figures``,
  and the last 20 health ``transitions``;
- ``clients``: each client's address, subscriptions, queue depth and counters;
- ``feeds``: each feed's health and figures (counters, rates, ages, books, and
  ``last_error``: the cause of its last failure, ``Type: message``, with
  ``last_error_age`` in seconds; ``null`` before any);
- ``metrics``: every sample of the Prometheus registry;
- ``publish``: publish ``message`` (a publish message, docs/protocol.md
  "Publishing") with no token: the socket's mode (0660) decides who may; the
  reply adds ``ok``, ``seq`` and ``epoch`` (``duplicate`` for a repeated
  idempotency key), or is an ``error`` with the publish code (``stale``,
  ``unknown_channel``, ``busy``, ...).

Every reply has ``type`` (the op), ``id`` and ``health``. A request that cannot be
served gets ``{"type":"error","id":...,"code":...,"message":...}`` (codes as in the
client protocol: ``invalid_json``, ``invalid_request``, ``unknown_op``, plus
``request_too_large``, which also closes the connection) and the connection goes on.

The socket
----------
Its path is ``admin.socket``, or by default ``$RUNTIME_DIRECTORY/admin.sock``
(systemd's ``RuntimeDirectory=``), else ``$XDG_RUNTIME_DIR/tickwire/admin.sock``,
else ``/tmp/tickwire-$UID/admin.sock``. Binding it:

1. a file already there that answers a connection belongs to a running daemon: we
   refuse to start (``AdminSocketError``, naming its pid); one that refuses the
   connection is stale (a crashed run) and is replaced; anything but a socket is
   left alone and we refuse;
2. the socket is bound under a temporary name, set to mode 0660, listening, and only
   then renamed over the path: there is no moment where the path is missing or has
   other permissions;
3. at exit the path is removed if it is still ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio

from daemon import __version__
from daemon.errors import StartupError

if TYPE_CHECKING:
    from daemon.app import App
    from daemon.broadcast.session import Session

log = logging.getLogger(__name__)

OPS = ("status", "clients", "feeds", "metrics", "publish")
#: Largest request line, bytes.
MAX_REQUEST = 64 * 1024
#: Seconds an admin connection may stay idle.
IDLE_TIMEOUT = 300.0
#: Permissions of the socket: owner and group may connect.
SOCKET_MODE = 0o660
#: sun_path holds 108 bytes with the final NUL.
MAX_PATH = 107


class AdminSocketError(StartupError):
    """The admin socket cannot be created (one line, for people)."""


class RequestError(ValueError):
    def __init__(self, code: str, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.request_id = code, message, request_id


def _tmp_dir() -> Path:
    return Path(f"/tmp/tickwire-{os.getuid()}")


def default_socket_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where the admin socket goes when ``admin.socket`` is empty."""
    env = os.environ if environ is None else environ
    runtime = env.get("RUNTIME_DIRECTORY", "")
    if runtime:
        return Path(runtime.split(":")[0]) / "admin.sock"
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg:
        return Path(xdg) / "tickwire" / "admin.sock"
    return _tmp_dir() / "admin.sock"


def socket_path(configured: str, environ: Mapping[str, str] | None = None) -> Path:
    return Path(configured) if configured else default_socket_path(environ)


def client_socket_paths(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where a command looks for a running daemon's socket: our default, then the
    systemd unit's ``/run/tickwire/admin.sock``."""
    paths = [default_socket_path(environ), Path("/run/tickwire/admin.sock")]
    return list(dict.fromkeys(paths))


# -- the protocol (no I/O) ---------------------------------------------------------------


@attrs.frozen
class AdminRequest:
    """One request: its ``op``, ``id`` (echoed back) and, for ``publish``, the
    ``message``."""

    op: str
    id: Any = None
    message: Any = None


def parse_request(line: bytes) -> AdminRequest:
    """One request line, checked; raises ``RequestError``."""
    try:
        request = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise RequestError("invalid_json", "the request is not JSON") from None
    if not isinstance(request, dict):
        raise RequestError("invalid_request", "a request is a JSON object with an 'op'")
    request_id = request.get("id")
    if isinstance(request_id, (dict, list)):
        raise RequestError("invalid_request", "'id' must be a number or a string")
    op = request.get("op")
    if not isinstance(op, str):
        raise RequestError("invalid_request", "missing 'op' (a string)", request_id)
    extra = sorted(set(request) - {"op", "id", "message"})
    if extra or ("message" in request and op != "publish"):
        field = extra[0] if extra else "message"
        raise RequestError("invalid_request", f"unknown field {field!r}", request_id)
    if op not in OPS:
        raise RequestError("unknown_op", f"unknown op {op!r}; ops are {', '.join(OPS)}",
                           request_id)
    if op == "publish" and "message" not in request:
        raise RequestError("invalid_request", "publish needs a 'message'", request_id)
    return AdminRequest(op, request_id, request.get("message"))


def encode(reply: dict[str, Any]) -> bytes:
    return orjson.dumps(reply, default=str, option=orjson.OPT_NON_STR_KEYS) + b"\n"


def error(code: str, message: str, request_id: Any = None) -> dict[str, Any]:
    return {"type": "error", "id": request_id, "code": code, "message": message}


class Replies:
    """The answers, from a running ``App``'s components."""

    def __init__(self, app: App) -> None:
        self.app = app

    def answer(self, op: str) -> dict[str, Any]:
        health, checks = self.app.reporter.report()
        body: dict[str, Any] = {"health": health}
        if op == "status":
            body.update(
                uptime=self.app.reporter.uptime(),
                version=__version__,
                epoch=self.app.epoch,
                pid=os.getpid(),
                components=[c.as_dict() for c in checks],
                transitions=list(self.app.reporter.transitions),
                role=self.app.config.role,
            )
            if self.app.cluster is not None:
                body["cluster"] = self.app.cluster.status()
        elif op == "clients":
            body["clients"] = [client_figures(s) for s in list(self.app.server.sessions)]
        elif op == "feeds":
            body["feeds"] = [c.as_dict() for c in checks if c.kind == "feed"]
        else:
            from daemon.metrics import samples

            body["samples"] = samples(self.app.registry)
        return body


def client_figures(session: Session) -> dict[str, Any]:
    """One client: ``address`` and ``subscriptions`` first, then its counters."""
    stats = attrs.asdict(session.statistics())
    return {"address": stats.pop("remote", None),
            "subscriptions": stats.pop("subscriptions", []), **stats}


# -- the server --------------------------------------------------------------------------


@attrs.frozen
class AdminStatistics:
    """``socket``: the path; ``connections``: accepted since the start;
    ``requests``: request lines read; ``errors``: of them, answered with an error."""

    socket: str
    connections: int
    requests: int
    errors: int


class AdminServer:
    """Serves the admin protocol on the Unix socket ``path``; ``answer(op)`` builds a
    reply's body. ``address`` is the path while listening."""

    def __init__(self, path: Path, answer: Callable[[str], dict[str, Any]],
                 publish: Callable[[Any], Awaitable[dict[str, Any]]] | None = None,
                 max_request: int = MAX_REQUEST) -> None:
        self.path = path
        self.answer = answer
        #: publishes one message with the socket's trust; None: ``publish`` fails
        self.publish = publish
        self.max_request = max_request
        self.address: str | None = None
        self.connections = 0
        self.requests = 0
        self.errors = 0

    def statistics(self) -> AdminStatistics:
        """The socket's path and its counters since the start."""
        return AdminStatistics(socket=str(self.path), connections=self.connections,
                               requests=self.requests, errors=self.errors)

    async def reply(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line; never raises."""
        self.requests += 1
        try:
            request = parse_request(line)
        except RequestError as exc:
            self.errors += 1
            return error(exc.code, exc.message, exc.request_id)
        op, request_id = request.op, request.id
        try:
            if op == "publish":
                return await self._publish(request)
            return {"type": op, "id": request_id, **self.answer(op)}
        except Exception as exc:
            self.errors += 1
            log.exception("admin: %s failed", op)
            return error("internal_error", f"{type(exc).__name__}: {exc}", request_id)

    async def _publish(self, request: AdminRequest) -> dict[str, Any]:
        if self.publish is None:
            return error("unknown_op", "this daemon does not publish", request.id)
        answer = await self.publish(request.message)
        if not answer.pop("ok"):
            self.errors += 1
            return {"type": "error", "id": request.id, **answer}
        return {"type": "publish", "id": request.id, "ok": True, **answer}

    async def serve(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind (see the module docstring) and serve until cancelled; ``started(path)``.
        Raises ``AdminSocketError`` when the socket cannot be ours."""
        sock, identity = await bind_socket(self.path)
        try:
            self.address = str(self.path)
            log.info("admin: listening on %s", self.path)
            task_status.started(self.path)
            await trio.serve_listeners(self._handle, [trio.SocketListener(sock)])
        finally:
            self.address = None
            sock.close()
            _remove_if_ours(self.path, identity)

    async def _handle(self, stream: trio.SocketStream) -> None:
        # serve_listeners ends on a handler's exception: everything is caught here
        self.connections += 1
        try:
            async with stream:
                await self._converse(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("admin: a connection failed")

    async def _converse(self, stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            with trio.move_on_after(IDLE_TIMEOUT) as idle:
                data = await stream.receive_some(65536)
            if idle.cancelled_caught:
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            if not data and buffer.strip():  # the last request, without its newline
                lines.append(buffer)
            for line in [*lines, buffer]:
                if len(line) > self.max_request:
                    self.errors += 1
                    await stream.send_all(encode(error(
                        "request_too_large",
                        f"a request line is at most {self.max_request} bytes")))
                    return
            for line in lines:
                if line.strip():
                    await stream.send_all(encode(await self.reply(line)))
            if not data:
                return


async def bind_socket(path: Path) -> tuple[trio.socket.SocketType, tuple[int, int]]:
    """A listening Unix socket at ``path``, mode 0660 (module docstring, steps 1-2);
    returns it and the ``(st_dev, st_ino)`` of the file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    if len(os.fsencode(tmp)) > MAX_PATH:
        raise AdminSocketError(
            f"admin socket path {path} is too long for a Unix socket "
            f"(at most {MAX_PATH - len(tmp.name) + len(path.name)} bytes)")
    _prepare_directory(path.parent)
    await _refuse_if_live(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(tmp))
        os.chmod(tmp, SOCKET_MODE)
        sock.listen(64)
        os.rename(tmp, path)
        info = os.stat(path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise AdminSocketError(f"cannot create admin socket {path}: {exc.strerror or exc}") from exc
    return sock, (info.st_dev, info.st_ino)


def _prepare_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise AdminSocketError(
            f"cannot create the admin socket's folder {directory}: {exc.strerror or exc}"
        ) from exc
    if directory == _tmp_dir():
        # a folder in /tmp could have been made by someone else to catch our socket
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise AdminSocketError(
                f"{directory} is not a folder of user {os.getuid()}: refusing to put the "
                "admin socket there (set admin.socket)")


async def _refuse_if_live(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise AdminSocketError(f"{path} exists and is not a socket: remove it or set admin.socket")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        try:
            with trio.fail_after(2):
                await probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("admin: replacing the stale socket %s (left by a run that ended)", path)
            return
        except PermissionError:
            raise AdminSocketError(
                f"admin socket {path} exists and is not ours: is another tickwire running?"
            ) from None
        except trio.TooSlowError:
            pid = None
        else:
            pid = _peer_pid(probe)
    who = f"another tickwire (pid {pid})" if pid else "another tickwire"
    raise AdminSocketError(
        f"{who} is already running with admin socket {path}; stop it first, or give this "
        "one another admin.socket")


def _peer_pid(sock: trio.socket.SocketType) -> int | None:
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", creds)[0] or None


def _remove_if_ours(path: Path, identity: tuple[int, int]) -> None:
    try:
        info = os.stat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)
    except OSError:
        pass


# -- the client (commands) ---------------------------------------------------------------


class Unreachable(Exception):
    """No daemon answers on the admin socket (one line, for people)."""


def ask(path: Path, *ops: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send ``ops`` to the daemon on ``path`` and return the replies, in order
    (blocking: for commands, not for the daemon). Raises ``Unreachable``."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(b"".join(encode({"op": op, "id": n}) for n, op in enumerate(ops)))
            buffer = b""
            replies: list[dict[str, Any]] = []
            while len(replies) < len(ops):
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = sock.recv(1 << 20)
                if not data:
                    raise Unreachable(f"{path}: the daemon closed the connection")
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                replies += [orjson.loads(line) for line in lines if line.strip()]
            return replies
    except FileNotFoundError:
        raise Unreachable(f"no admin socket at {path}: is tickwire running?") from None
    except TimeoutError:
        raise Unreachable(f"{path}: no answer within {timeout:g}s") from None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise Unreachable(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None


def find_socket(given: str | None) -> Path:
    """``--socket`` if given, else the first default path that exists (else our
    default, which the error will name)."""
    if given:
        return Path(given)
    candidates = client_socket_paths()
    return next((p for p in candidates if p.exists()), candidates[0])
