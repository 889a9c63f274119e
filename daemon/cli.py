"""The ``tickwire`` command line (click)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import attrs
import click
import trio

from daemon import __version__
from daemon.config import Config, ConfigError, load_config
from daemon.errors import StartupError
from daemon.logs import journal_stderr, setup_logging

log = logging.getLogger("daemon")


def _config(path: str | None, role: str | None = None) -> Config:
    """The configuration at ``path`` (``None``: the packaged default), with
    ``role`` when given (``--role``); one line and exit 2 when it cannot be used."""
    try:
        config = load_config(path)
        if role is not None:
            try:
                config = attrs.evolve(config, role=role)
            except ValueError as exc:
                raise ConfigError(f"{exc} (--role {role})") from exc
        return config
    except ConfigError as exc:
        click.echo(f"tickwire: config error: {exc}", err=True)
        sys.exit(2)


def _role_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--role", type=click.Choice(["all", "collector", "edge"]), default=None,
        help="Override the configuration's role (docs/cluster.md): all, collector or edge.",
    )(function)


async def _until_signal(
    start: Callable[..., Awaitable[Any]],
    reload: Callable[[], Awaitable[Any]] | None = None,
) -> None:
    """Start ``start`` in a nursery, and cancel it all on SIGINT or SIGTERM, or
    return when ``start`` returns. SIGHUP calls ``reload`` (when there is none it
    is logged and ignored)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def run(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
                await start(task_status=task_status)
                nursery.cancel_scope.cancel()  # it ended by itself: so does the process

            await nursery.start(run)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if reload is None:
                        log.warning("received SIGHUP: nothing to reload here; ignored")
                    else:
                        log.info("received SIGHUP: reloading the configuration")
                        await reload()
                    continue
                log.info("received %s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def startup_errors(error: BaseException) -> list[StartupError] | None:
    """The ``StartupError``s ``error`` is made of (itself, or the leaves of nested
    exception groups), or ``None`` when anything else is among them: a bug, which
    keeps its traceback."""
    if isinstance(error, StartupError):
        return [error]
    if isinstance(error, BaseExceptionGroup):
        found: list[StartupError] = []
        for inner in error.exceptions:
            errors = startup_errors(inner)
            if errors is None:
                return None
            found += errors
        return found
    return None


def _run_daemon(main: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """``trio.run(main, *args)``; a start-up error of ours (a listener's address is
    busy, the admin socket is taken, a capture is unreadable), alone or in
    exception groups, is one line on stderr and exit status 2."""
    try:
        trio.run(main, *args)
    except (StartupError, BaseExceptionGroup) as exc:
        errors = startup_errors(exc)
        if not errors:
            raise
        _cannot_start(errors)


def _cannot_start(errors: Sequence[StartupError]) -> NoReturn:
    """Say why the daemon cannot start, one line per distinct error (under
    systemd: a log line at priority ``err``), and exit 2."""
    messages = list(dict.fromkeys(" ".join(str(error).split()) for error in errors))
    for message in messages:
        if journal_stderr():
            log.error("cannot start: %s", message)
        else:
            click.echo(f"tickwire: {message}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(__version__, prog_name="tickwire")
def main() -> None:
    """tickwire: real-time market data from exchanges to WebSocket clients."""


@main.command(short_help="Run the daemon.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML configuration file (default: the packaged default.toml).")
@_role_option
def run(config_path: str | None, role: str | None) -> None:
    """Run the daemon: collectors, dispatcher and broadcast server (role all);
    feeds into Redis (role collector); Redis to clients (role edge)."""
    from daemon.app import App

    config = _config(config_path, role)
    setup_logging(config.log_level)
    app = App(config)

    async def reload() -> None:
        await app.reload(lambda: load_config(config_path))

    _run_daemon(_until_signal, app.run, reload)


@main.command("check-config", short_help="Check a config file (exit 0, or one line and exit 2).")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Check a configuration file: exit 0 if usable, else one line and exit 2.
    A usable but risky exposure (auth off or tokens in the clear on a public
    address) is a "warning:" line on stderr, as the daemon logs it at start; so is
    a server.max_connections this shell's open-file limit cannot hold."""
    from daemon.tls import exposure_warnings

    config = _config(path)
    feeds = ", ".join(f"{name} ({len(e.symbols)} symbols)" for name, e in config.exchanges.items())
    click.echo(f"{path}: ok; listen {config.server.listen}; feeds: {feeds or 'none'}")
    for warning in [*exposure_warnings(config), *_descriptor_warning(config)]:
        click.echo(f"warning: {warning}", err=True)


def _descriptor_warning(config: Config) -> list[str]:
    """The warning when ``server.max_connections`` and the daemon's own descriptors
    exceed this shell's hard open-file limit (the daemon raises its soft limit to
    it: ``daemon.limits``), or none."""
    from daemon import limits

    hard = limits.current().hard
    line = limits.warning(config, hard, f"this shell's hard open-file limit ({hard}), which the "
                                        "daemon would raise its soft limit to")
    return [line] if line else []


def _speed(ctx: click.Context, param: click.Parameter, value: str) -> float | None:
    if value == "max":
        return None
    try:
        speed = float(value)
    except ValueError:
        raise click.BadParameter("a factor (e.g. 5) or 'max'") from None
    if speed <= 0:
        raise click.BadParameter("must be greater than 0")
    return speed


@main.command(short_help="Run the daemon on recorded exchange traffic.")
@click.argument("captures", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--speed", default="1", show_default=True, callback=_speed,
              help="Replay speed: a factor of the recorded timing, or 'max'.")
@click.option("--listen", default=None, help="HOST:PORT of the broadcast server.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML configuration for everything but the exchanges.")
@click.option("--loop", is_flag=True,
              help="Play the captures again and again, each pass continuing the last "
                   "(ids, sequence numbers and times shifted; books kept consistent).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Exchange messages per second (per exchange), overriding --speed.")
@click.option("--via", type=click.Choice(["native", "ccxt"]), default="native",
              show_default=True,
              help="Collect through the native collectors, or through ccxt.pro (watch mode).")
@click.option("--emulators", type=click.Choice(["inside", "process"]), default="inside",
              show_default=True,
              help="Run the emulators in the daemon's process, or each exchange's in a "
                   "process of its own (the daemon then spends only what it does live; "
                   "native collectors).")
@_role_option
def replay(
    captures: tuple[str, ...], speed: float | None, listen: str | None, config_path: str | None,
    loop: bool, rate: float | None, via: str, emulators: str, role: str | None,
) -> None:
    """Run the daemon on recorded traffic: each exchange's capture files are served by
    an emulator on 127.0.0.1, and the collectors connect to it as to the exchange.

    An exchange's files go together: its WebSocket recordings (X.ws.*), its markets
    (X.0) and, for Binance, its REST book snapshots (X.http.*). A folder stands for
    the files in it; README*, LICENSE* and *.md files are skipped. For example:

    \b
        tickwire replay tests/captures/KRAKEN.* --speed 5
        tickwire replay tests/captures     (every exchange recorded there)
        tickwire tail book 'kraken:*'      (in another shell)"""
    from functools import partial

    from daemon.config import ServerConfig
    from daemon.replay.run import serve_replay

    config = _config(config_path, role)
    if listen is not None:
        try:
            config = attrs.evolve(config, server=attrs.evolve(config.server, listen=listen))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--listen") from None
    assert isinstance(config.server, ServerConfig)
    setup_logging(config.log_level)

    async def start(*, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            replay = await nursery.start(
                partial(serve_replay, captures, config, speed, loop=loop, rate=rate, via=via,
                        emulators=emulators)
            )
            task_status.started()
            await replay.wait_finished()
            log.info("replay: every capture played; still serving (Ctrl-C to stop)")

    _run_daemon(_until_signal, start)


@main.command(short_help="Serve recorded traffic as the exchanges would.")
@click.argument("captures", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--speed", default="1", show_default=True, callback=_speed,
              help="Replay speed: a factor of the recorded timing, or 'max'.")
@click.option("--loop", is_flag=True, help="Play the captures again and again (as replay).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Exchange messages per second (per exchange), overriding --speed.")
@click.option("--parent-pipe", is_flag=True, hidden=True,
              help="Stop when stdin closes (the parent process's end of a pipe).")
def emulate(captures: tuple[str, ...], speed: float | None, loop: bool,
            rate: float | None, parent_pipe: bool) -> None:
    """Serve recorded traffic as the exchanges would, on 127.0.0.1, without the
    daemon: one emulator per exchange (CAPTURES: files or folders, as for replay).
    Prints one JSON line per exchange with its rest_url, ws_url and the recorded
    symbols and channels, and another when its tape has played (tickwire replay
    --emulators process runs this)."""
    from functools import partial

    from daemon.replay.process import serve_emulators
    from daemon.replay.run import group_captures

    setup_logging("info")
    try:
        groups = group_captures(captures)
    except StartupError as exc:
        _cannot_start([exc])
    _run_daemon(_until_signal, partial(serve_emulators, groups, speed, loop=loop, rate=rate,
                                       parent_pipe=parent_pipe))


#: The environment variable ``tickwire tail`` reads its token from.
TOKEN_VARIABLE = "TICKWIRE_TOKEN"


def _token(path: str | None) -> str | None:
    """The client token: the first line of the file at ``path``, else
    ``$TICKWIRE_TOKEN``, else ``None``. A file that cannot be read, or holds no
    token, is one line and exit 2."""
    if path is None:
        return os.environ.get(TOKEN_VARIABLE) or None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        click.echo(f"tickwire: cannot read the token file {path}: "
                   f"{getattr(exc, 'strerror', None) or exc}", err=True)
        sys.exit(2)
    if not token:
        click.echo(f"tickwire: the token file {path} is empty: put the token on its "
                   "first line", err=True)
        sys.exit(2)
    return token


def _die_on_broken_pipe() -> None:
    """Let a closed stdout end this process quietly, as it ends ``cat`` or ``ls``:
    ``tickwire status | head -1`` then stops at SIGPIPE (the shell sees 141)
    instead of a traceback and exit status 1, which would read as "degraded".
    Python ignores SIGPIPE by default; only the short-lived client commands
    (status, clients, tail) restore the default, never the daemon."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def _socket_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--socket", "socket_path", type=click.Path(dir_okay=False),
        help="The daemon's admin socket (default: $RUNTIME_DIRECTORY/admin.sock, "
        "$XDG_RUNTIME_DIR/tickwire/admin.sock or /tmp/tickwire-$UID/admin.sock, "
        "then /run/tickwire/admin.sock).",
    )(function)


@main.command(short_help="The running daemon's health, feeds and clients.")
@_socket_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw reply (one JSON object).")
def status(socket_path: str | None, as_json: bool) -> None:
    """Show the running daemon's health, feeds and clients. Exit code: 0 healthy,
    1 degraded, 2 unhealthy or unreachable."""
    from daemon.statuscli import status_command

    _die_on_broken_pipe()
    sys.exit(status_command(socket_path, as_json))


@main.command(short_help="The running daemon's clients.")
@_socket_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw reply (one JSON object).")
def clients(socket_path: str | None, as_json: bool) -> None:
    """Show the running daemon's clients: address, subscriptions, queue, counters.
    Exit code as for tickwire status."""
    from daemon.statuscli import clients_command

    _die_on_broken_pipe()
    sys.exit(clients_command(socket_path, as_json))


@main.command(short_help="Print a channel's events, one JSON object a line.")
@click.argument("channel")
@click.argument("symbols", nargs=-1, required=True)
@click.option("--url", default="ws://127.0.0.1:8765", show_default=True, help="tickwire server.")
@click.option("--history", default=0, show_default=True,
              help="Retained messages to get first (trades, signals, executions).")
@click.option("--depth", type=click.IntRange(0, 1000), default=0,
              help="book: the top N levels a side, sent when they change (0: whole books).")
@click.option("--throttle-ms", type=click.IntRange(0, 60_000), default=0,
              help="At most one book, ticker, quote or view message per stream per interval.")
@click.option("--once", is_flag=True,
              help="Exit (status 1) when the connection ends, instead of resuming.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="A file holding the token for a daemon with auth on (else the "
                   "TICKWIRE_TOKEN environment variable; never the command line, which "
                   "ps shows to every user).")
def tail(channel: str, symbols: tuple[str, ...], url: str, history: int, depth: int,
         throttle_ms: int, once: bool, token_file: str | None) -> None:
    """Print the events of CHANNEL (or CHANNEL,CHANNEL...) for SYMBOLS
    (EXCHANGE:BASE-QUOTE, EXCHANGE:* or *), one JSON object a line.

    When the connection ends (daemon restart, slow consumer, dropped), tail connects
    again and resumes each stream after the last seq it printed, if the daemon still
    retains what was missed; stderr says when a stream could not be resumed. Exit
    status: 1 on an error reply or a refused request, 2 if the daemon cannot be
    reached at start, or the token file cannot be read.

    A daemon with auth on wants a token: tail reads it from --token-file, else from
    the TICKWIRE_TOKEN environment variable, and sends it as Authorization: Bearer."""
    from functools import partial

    import trio_websocket

    from daemon.tail import TailError, tail_events

    _die_on_broken_pipe()
    token = _token(token_file)
    try:
        trio.run(partial(tail_events, url, channel.split(","), list(symbols), history,
                         depth=depth, throttle_ms=throttle_ms, resume=not once, token=token))
    except KeyboardInterrupt:
        pass
    except TailError as exc:
        click.echo(f"tickwire: {exc}", err=True)
        sys.exit(1)
    except (OSError, trio_websocket.HandshakeError) as exc:
        click.echo(f"tickwire: cannot reach {url}: {str(exc) or type(exc).__name__}", err=True)
        sys.exit(2)


def _publish_ts(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    if value == "now":
        import time

        return time.time()
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter("epoch seconds (e.g. 1733400000.5) or 'now'") from None


def _publish_data(text: str) -> dict[str, Any]:
    """The JSON argument (``-``: stdin) as an object; anything else is one line and
    exit 2."""
    import orjson

    if text == "-":
        text = sys.stdin.read()
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        click.echo(f"tickwire: JSON: not JSON ({exc}): give the data as an object, e.g. "
                   """'{"side":"buy"}'""", err=True)
        sys.exit(2)
    if not isinstance(data, dict):
        click.echo(f"tickwire: JSON: the data must be a JSON object ({{...}}), not "
                   f"{_json_kind(data)}", err=True)
        sys.exit(2)
    return data


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


@main.command(short_help="Publish a message into a channel (signals, portfolio, ...).")
@click.argument("channel")
@click.argument("source")
@click.argument("key")
@click.argument("data", metavar="JSON")
@click.option("--ts", callback=_publish_ts, default=None, metavar="SECONDS|now",
              help="The message's time, epoch seconds, or 'now' (default: none; "
                   "subscribers get the daemon's recv_ts).")
@click.option("--idempotency-key", default=None, metavar="K",
              help="Makes a retry safe: the same key again within the daemon's "
                   "publish.idempotency_window is answered with the first seq, "
                   "not delivered again.")
@click.option("--version", "version", type=click.IntRange(min=0), default=None, metavar="N",
              help="The state's version, on a latest channel (portfolio, trading_state): "
                   "one not above the key's current version is refused as stale.")
@click.option("--url", default=None,
              help="Publish over HTTP to this publish listener (publish.listen), e.g. "
                   "http://127.0.0.1:8766; default: the admin socket.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="With --url: a file holding a token with a publish grant (else the "
                   "TICKWIRE_TOKEN environment variable; never the command line, which "
                   "ps shows to every user).")
@_socket_option
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, metavar="SECONDS",
              show_default=True, help="Seconds connecting, sending or waiting may take.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the daemon's answer (one JSON object), error answers too.")
def publish(channel: str, source: str, key: str, data: str, ts: float | None,
            idempotency_key: str | None, version: int | None, url: str | None,
            token_file: str | None, socket_path: str | None, timeout: float,
            as_json: bool) -> None:
    """Publish one message into CHANNEL (a published channel: signals,
    executions, portfolio, trading_state or one the config declares) as SOURCE,
    for KEY, with JSON (a JSON object; - reads it from stdin). Subscribers get it
    on the stream CHANNEL:SOURCE:KEY. For example:

    \b
        tickwire publish signals momentum BTC-USD '{"side":"buy","confidence":0.8}'

    By default through the running daemon's admin socket (no token: the socket's
    permissions decide); with --url, over HTTP to its publish listener, with the
    token from --token-file or TICKWIRE_TOKEN.

    Prints CHANNEL:SOURCE:KEY seq N (epoch E). Exit status: 0 published (or a
    duplicate of an earlier publish), 1 refused (error: CODE: message on stderr),
    2 the daemon cannot be reached, or a usage error (JSON that is not an object)."""
    from daemon import client

    _die_on_broken_pipe()
    if url is not None and socket_path is not None:
        click.echo("tickwire: give --url (HTTP) or --socket (the admin socket), not both",
                   err=True)
        sys.exit(2)
    body = _publish_data(data)
    token = _token(token_file) if url is not None else None
    try:
        receipt = client.publish(channel, source, key, body, ts=ts,
                                 idempotency_key=idempotency_key, version=version, url=url,
                                 token=token, socket=socket_path, timeout=timeout)
    except ValueError as exc:  # a URL that is not http(s)://
        click.echo(f"tickwire: {exc}", err=True)
        sys.exit(2)
    except client.PublishRefused as refused:
        if as_json:
            click.echo(_json_line(refused.as_dict()))
        else:
            click.echo(f"error: {refused.code}: {refused.message}", err=True)
        sys.exit(1)
    except (client.Unreachable, client.BadAnswer) as exc:
        click.echo(f"tickwire: unreachable: {exc}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(_json_line(receipt.as_dict()))
    else:
        note = "; a duplicate: published before with this idempotency key" if receipt.duplicate else ""
        click.echo(f"{channel}:{source}:{key} seq {receipt.seq} (epoch {receipt.epoch}{note})")


def _json_line(value: Any) -> str:
    import orjson

    return orjson.dumps(value).decode()


if __name__ == "__main__":
    main()
