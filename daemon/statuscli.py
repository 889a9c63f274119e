"""``tickwire status`` and ``tickwire clients``: the admin socket's replies as tables.

Exit codes: 0 healthy, 1 degraded, 2 unhealthy or unreachable.
"""

from __future__ import annotations

import shutil
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from daemon.admin import Unreachable, ask, find_socket

EXIT_CODES = {"healthy": 0, "degraded": 1, "unhealthy": 2}
UNREACHABLE = 2
COLORS = {"healthy": "green", "degraded": "yellow", "unhealthy": "red"}


def _console(err: bool = False) -> Console:
    # a pipe gets wide lines, not tables folded at 80 columns
    console = Console(stderr=err)
    if not console.is_terminal:
        console = Console(stderr=err, width=max(160, shutil.get_terminal_size().columns))
    return console


def _health(value: str) -> Text:
    return Text(value, style=COLORS.get(value, "bold red"))


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _age(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.1f}s"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h{minutes}m"
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _ask(socket: str | None, *ops: str) -> list[dict[str, Any]] | None:
    path = find_socket(socket)
    try:
        replies = ask(path, *ops)
    except Unreachable as exc:
        _console(err=True).print(f"tickwire: unreachable: {exc}", markup=False, highlight=False)
        return None
    for reply in replies:
        if reply.get("type") == "error":
            _console(err=True).print(f"tickwire: {reply.get('message')}", markup=False)
            return None
    return replies


def status_command(socket: str | None, as_json: bool) -> int:
    """``tickwire status``; returns the exit code."""
    replies = _ask(socket, "status", "clients")
    if replies is None:
        return UNREACHABLE
    status, clients = replies
    if as_json:
        _console().out(orjson.dumps(status).decode(), highlight=False)
    else:
        render_status(_console(), status, clients)
    return EXIT_CODES.get(status.get("health", ""), UNREACHABLE)


def clients_command(socket: str | None, as_json: bool) -> int:
    """``tickwire clients``; returns the exit code."""
    replies = _ask(socket, "clients")
    if replies is None:
        return UNREACHABLE
    (clients,) = replies
    if as_json:
        _console().out(orjson.dumps(clients).decode(), highlight=False)
    else:
        _console().print(clients_table(clients))
    return EXIT_CODES.get(clients.get("health", ""), UNREACHABLE)


def render_status(console: Console, status: dict[str, Any], clients: dict[str, Any]) -> None:
    """Print the ``status`` and ``clients`` replies: the header line, the components,
    feeds and clients tables, the dispatcher's and server's figures, and the last
    transitions."""
    header = Text.assemble(
        ("tickwire ", "bold"), (str(status.get("version", "?")), "bold"), "  ",
        _health(status.get("health", "?")),
        f"  up {_duration(status.get('uptime', 0))}  epoch {status.get('epoch')}"
        f"  pid {status.get('pid')}",
    )
    console.print(header)
    components = status.get("components", [])
    table = Table(title="components", title_justify="left")
    for column in ("component", "criticality", "health", "reason"):
        table.add_column(column)
    for c in components:
        table.add_row(c["name"], c["criticality"], _health(c["health"]), c.get("reason") or "")
    console.print(table)
    console.print(feeds_table([c for c in components if c.get("kind") == "feed"]))
    for c in components:  # why a feed in trouble failed last: the cause, not only "failed"
        f = c.get("figures", {})
        if c.get("kind") == "feed" and c.get("health") != "healthy" and f.get("last_error"):
            console.print(f"{f.get('exchange', c['name'])}: last error "
                          f"{_age(f.get('last_error_age'))} ago: {f['last_error']}",
                          markup=False, highlight=False)
    others = {c["name"]: c.get("figures", {}) for c in components if c.get("kind") != "feed"}
    dispatcher = others.get("dispatcher", {})
    server = others.get("server", {})
    line = (f"dispatcher: {_num(dispatcher.get('events'))} events, "
            f"{_num(dispatcher.get('events_per_second'), 1)}/s, buffer "
            f"{_num(dispatcher.get('buffer_used'))}/{_num(dispatcher.get('buffer_size'))}, "
            f"{_num(dispatcher.get('rejected'))} rejected, "
            f"{_num(dispatcher.get('duplicates'))} duplicates")
    console.print(line, highlight=False)
    latency = server.get("latency") or {}
    line = (f"server: {server.get('listen')}, {_num(server.get('clients'))} clients, "
            f"{_num(server.get('connections'))} connections, "
            f"{_num(server.get('slow_consumers'))} slow consumers")
    if latency.get("count"):
        line += (f", latency p50 {_num(latency.get('p50_us'))}us"
                 f" p99 {_num(latency.get('p99_us'))}us p99.9 {_num(latency.get('p999_us'))}us")
    console.print(line, highlight=False)
    publish = others.get("publish")
    if publish and (publish.get("listen") or publish.get("publishers")):
        line = (f"publish: {publish.get('listen') or 'admin socket and WebSocket'}, "
                f"{_num(publish.get('accepted'))} accepted, "
                f"{_num(publish.get('duplicate'))} duplicate, {_num(publish.get('stale'))} "
                f"stale, {_num(publish.get('refused'))} refused, {_num(publish.get('busy'))} busy")
        console.print(line, highlight=False)
        for f in publish.get("publishers", []):
            console.print(f"  {f['channel']}:{f['source']}: {_num(f['accepted'])} accepted, "
                          f"{_num(f['duplicate'])} duplicate, {_num(f['stale'])} stale, "
                          f"{_num(f['refused'])} refused", markup=False, highlight=False)
    for c in components:
        if c.get("kind") == "derived":
            console.print(derived_line(c.get("figures", {})), markup=False, highlight=False)
    cluster = status.get("cluster")
    if cluster:
        render_cluster(console, cluster)
    console.print(clients_table(clients))
    transitions = status.get("transitions", [])
    if transitions:
        console.print("recent transitions:", highlight=False)
        for t in transitions[-5:]:
            console.print(f"  {t['component']}: {t['previous']} -> {t['health']}"
                          f"{' (' + t['reason'] + ')' if t.get('reason') else ''}",
                          markup=False, highlight=False)


def derived_line(f: dict[str, Any]) -> str:
    """One derived stream's counters: its input and output, resyncs, errors, and
    its computation's own figures (``daemon.derived.runner.DerivedStatistics``)."""
    line = (f"derived {f.get('name')}: {_num(f.get('received'))} in, "
            f"{_num(f.get('published'))} out, input {_num(f.get('queued'))}/"
            f"{_num(f.get('limit'))}, {_num(f.get('overflows'))} overflows "
            f"({_num(f.get('dropped'))} not taken, {_num(f.get('recovered'))} streams "
            f"recovered, {_num(f.get('lost'))} lost), {_num(f.get('errors'))} errors")
    own = f.get("figures") or {}
    if own:
        line += "; " + ", ".join(f"{k} {v}" for k, v in own.items())
    return line


def render_cluster(console: Console, cluster: dict[str, Any]) -> None:
    """A cluster node's lines (docs/cluster.md): role, Redis, writer or mirror,
    leases, and an edge's streams with their lag from Redis."""
    line = (f"cluster: role {cluster.get('role')}, node {cluster.get('node')}, "
            f"redis {cluster.get('redis')}{' (cluster)' if cluster.get('redis_cluster') else ''} "
            f"({cluster.get('prefix')}) "
            f"{'connected' if cluster.get('connected') else 'NOT CONNECTED'}")
    console.print(line, markup=False, highlight=False)
    writer = cluster.get("writer")
    if writer:
        console.print(f"  writer: {_num(writer['written'])} written, {_num(writer['queued'])} "
                      f"queued (peak {_num(writer['peak'])}), lag {_age(writer['lag'])}, "
                      f"{_num(writer['failures'])} failures"
                      f"{', ' + writer['error'] if writer.get('error') else ''}",
                      markup=False, highlight=False)
    mirror = cluster.get("mirror")
    if mirror:
        console.print(f"  mirror: {_num(mirror['streams'])} streams, {_num(mirror['entries'])} "
                      f"entries, {_num(mirror['holes'])} holes, {_num(mirror['resets'])} resets, "
                      f"{_num(mirror['reconnects'])} reconnects, {_num(mirror.get('readers', 0))} "
                      f"readers"
                      f"{', ' + mirror['error'] if mirror.get('error') else ''}",
                      markup=False, highlight=False)
    for lease in cluster.get("leases", []):
        console.print(f"  lease {lease['feed']}: held by {lease['holder'] or 'nobody'}"
                      f"{' (this node)' if lease['owned'] else ''}", markup=False, highlight=False)
    streams = cluster.get("streams", [])
    if streams:
        table = Table(title="streams (from redis)", title_justify="left")
        for column in ("stream", "seq", "lag"):
            table.add_column(column)
        for stream in streams:
            table.add_row(stream["stream"], _num(stream["seq"]), _age(stream["delay"]))
        console.print(table)


def feeds_table(feeds: list[dict[str, Any]]) -> Table:
    """The feeds table: one row per feed component of a ``status`` reply (an
    exchange whose symbols use two modes has a row per mode: ``coinbase`` and
    ``coinbase/poll``), with its mode."""
    table = Table(title="feeds", title_justify="left")
    columns = ("feed", "mode", "state", "health", "msg/s", "messages", "last msg", "trades",
               "book upd", "books", "resyncs", "gaps", "checksums ok/bad", "reconnects")
    for column in columns:
        left = column in ("feed", "mode", "state", "health")
        table.add_column(column, justify="left" if left else "right")
    for feed in feeds:
        f = feed.get("figures", {})
        books = f.get("books", {})
        synced = sum(1 for b in books.values() if b.get("synced"))
        state = f.get("state", "?")
        if f.get("fallback") == "open":
            state += " (polling)"
        # a feed of some of an exchange's symbols (symbols_mode) is "coinbase/poll"
        name = feed["name"].removeprefix("feed:")
        table.add_row(
            name, str(f.get("mode", "?")), state, _health(feed["health"]),
            _num(f.get("messages_per_second"), 1), _num(f.get("messages")),
            _age(f.get("last_message_age")), _num(f.get("trades")), _num(f.get("book_updates")),
            f"{synced}/{len(books)}" if books else "-", _num(f.get("resyncs")),
            _num(f.get("gaps")),
            f"{_num(f.get('checksum_ok'))}/{_num(f.get('checksum_mismatch'))}",
            _num(f.get("reconnects")),
        )
    return table


def _dropped(client: dict[str, Any]) -> int:
    return sum(client.get(key, 0) or 0 for key in ("dropped", "conflated", "throttled"))


def clients_table(reply: dict[str, Any]) -> Table:
    """The clients table of a ``clients`` reply: one row per client."""
    clients = reply.get("clients", [])
    table = Table(title=f"clients ({len(clients)})", title_justify="left")
    for column in ("address", "subscriptions", "queue", "sent", "frames", "bytes", "dropped"):
        left = column in ("address", "subscriptions")
        table.add_column(column, justify="left" if left else "right")
    for c in clients:
        subscriptions = c.get("subscriptions") or []
        shown = ", ".join(subscriptions[:4])
        if len(subscriptions) > 4:
            shown += f" +{len(subscriptions) - 4}"
        table.add_row(
            str(c.get("address")), shown or "-", _num(c.get("queue")), _num(c.get("sent")),
            _num(c.get("frames")), _num(c.get("bytes_sent", c.get("bytes"))), _num(_dropped(c)),
        )
    return table
