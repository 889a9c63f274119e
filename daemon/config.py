"""Configuration: a TOML file structured into attrs classes by a strict cattrs converter.

Unknown keys are errors, and so are values of the wrong type (cattrs' defaults would
turn ``1.9`` into ``1``). ``load_config`` reports every problem as one line naming
the key: ``config error: expected an integer, got '80' @ server.port``.

Defaults stream BTC and ETH from Binance, Coinbase and Kraken (``default.toml``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, cast

import attrs
import cattrs
from cattrs import Converter

from daemon.channels import PUBLISHED, ChannelPolicy, Kind, Retention, published, table
from daemon.events import MARKET_CHANNELS

NATIVE_EXCHANGES = ("binance", "binanceus", "coinbase", "kraken")
#: How an exchange (or one of its symbols) is collected.
MODES = ("native", "poll", "watch")


class ConfigError(ValueError):
    """A configuration that cannot be used; ``str()`` is one line naming the key."""


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name}: must be greater than 0, got {value!r}")


def _non_negative(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name}: must be 0 or more, got {value!r}")


def _throttle_range(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 60_000:
        raise ValueError(f"{attribute.name}: must be from 0 to 60000 (the range of "
                         f"throttle_ms), got {value!r}")


#: Environment variable suffixes of ``credentials_env`` and ccxt's setting for each.
CREDENTIAL_VARIABLES = {"APIKEY": "apiKey", "SECRET": "secret", "PASSWORD": "password",
                        "UID": "uid"}


def _credentials_env(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value:
        return
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", value):
        raise ValueError(f"{attribute.name}: must be an environment variable prefix "
                         f"(A-Z, 0-9, _), got {value!r}")
    missing = [f"{value}_{suffix}" for suffix in ("APIKEY", "SECRET")
               if not os.environ.get(f"{value}_{suffix}")]
    if missing:
        raise ValueError(f"{attribute.name}: {' and '.join(missing)} not set in the environment")


def _listen(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{attribute.name}: must be HOST:PORT, got {value!r}")


def _one_of(*choices: str) -> Any:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ValueError(
                f"{attribute.name}: {value!r} is not one of {', '.join(choices)}"
            )

    return check


class _Listening:
    """``host`` and ``port`` of a ``listen = "HOST:PORT"`` setting."""

    listen: str

    @property
    def host(self) -> str:
        """The host of ``listen``, without IPv6 brackets."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The port of ``listen``."""
        return int(self.listen.rpartition(":")[2])


@attrs.frozen(kw_only=True)
class TlsConfig:
    """TLS for clients (``wss://`` and the metrics endpoint's ``https://``).

    ``cert`` and ``key``: PEM files (the certificate chain, the private key),
    read at start and again on SIGHUP (new connections get the new certificate);
    ``enabled``: ``auto`` (on when a certificate is configured), ``on`` (a
    certificate is required) or ``off``. Authentication on a non-loopback address
    without TLS logs a warning at start: tokens travel in the clear.
    """

    enabled: str = attrs.field(default="auto", validator=_one_of("auto", "on", "off"))
    cert: str = ""
    key: str = ""

    def __attrs_post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert: cert and key go together (PEM paths); set both or neither")
        if self.enabled == "on" and not self.cert:
            raise ValueError("cert: enabled = \"on\" needs cert and key (PEM paths)")

    @property
    def on(self) -> bool:
        """Whether clients are served over TLS."""
        return self.enabled != "off" and bool(self.cert)


@attrs.frozen(kw_only=True)
class ServerConfig(_Listening):
    """The broadcast WebSocket server.

    ``listen``: ``HOST:PORT``; ``client_queue``: messages queued per client before
    its slow-consumer policy applies (books and tickers conflate, trades close the
    client with 4008); ``max_message_size``: largest client frame in bytes (larger
    closes with 1009); ``max_batch`` / ``max_frame_bytes``: most messages and bytes
    in one batched frame; ``max_write_delay_ms``: the longest coalescing window.
    After each write to the clients, the window is twice what that write took (a
    write to one client: microseconds; to a thousand: milliseconds), at most this;
    an event that comes within it waits for its end and leaves in one write (and
    one batched frame) with the events that come meanwhile, so that under load a
    client gets one write per window rather than one per event, and writing takes
    at most about a third of the process's time; an event after a quiet window goes
    out at once (0: every batch of events is written at once); ``ping_interval`` /
    ``ping_timeout``: keepalive, seconds (no pong in time closes with 4001);
    ``stall_timeout``: seconds a client's connection may take nothing before it is
    a slow consumer: closed with 4008 if it has a lossless subscription, else
    conflated; ``send_buffer``: each connection's TCP send buffer, bytes
    (``SO_SNDBUF``; 0: the kernel's autotuned default), so the kernel holds little
    for a client that stops reading;
    ``handshake_timeout``: seconds to complete the upgrade; ``idle_timeout``:
    seconds a client may stay without any subscription;
    ``max_connections`` (total; one open file each: ``daemon.limits``) and
    ``max_connections_per_ip``, each connection counted from its accept to its
    close (``daemon.broadcast.admission``);
    ``max_subscriptions``: channel x symbol pairs per client;
    ``min_throttle_ms``: the shortest ``throttle_ms`` a subscription may ask (a
    shorter one is refused, not raised); ``max_throttled``: streams a client may
    throttle: each throttled stream costs up to one conflated message (a book's
    whole snapshot) per ``min_throttle_ms``, so these two bound what one client's
    throttles cost (docs/protocol.md "Throttle");
    ``max_messages_per_second``: client requests per second (past it ``rate_limited``
    errors, and close 4029 when it goes on for ``rate_limit_grace`` seconds);
    ``tls``: ``[server.tls]`` (``TlsConfig``).
    """

    listen: str = attrs.field(default="127.0.0.1:8765", validator=_listen)
    client_queue: int = attrs.field(default=4096, validator=_positive)
    max_message_size: int = attrs.field(default=65536, validator=_positive)
    max_batch: int = attrs.field(default=256, validator=_positive)
    max_frame_bytes: int = attrs.field(default=1 << 20, validator=_positive)
    max_write_delay_ms: float = attrs.field(default=5.0, validator=_non_negative)
    ping_interval: float = attrs.field(default=20.0, validator=_positive)
    ping_timeout: float = attrs.field(default=20.0, validator=_positive)
    stall_timeout: float = attrs.field(default=10.0, validator=_positive)
    send_buffer: int = attrs.field(default=262_144, validator=_non_negative)
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    idle_timeout: float = attrs.field(default=300.0, validator=_positive)
    max_connections: int = attrs.field(default=10_000, validator=_positive)
    max_connections_per_ip: int = attrs.field(default=1000, validator=_positive)
    max_subscriptions: int = attrs.field(default=1000, validator=_positive)
    min_throttle_ms: int = attrs.field(default=50, validator=_throttle_range)
    max_throttled: int = attrs.field(default=100, validator=_positive)
    max_messages_per_second: float = attrs.field(default=50.0, validator=_positive)
    rate_limit_grace: float = attrs.field(default=5.0, validator=_positive)
    tls: TlsConfig = TlsConfig()


@attrs.frozen(kw_only=True)
class PublishGrantConfig:
    """What a token may publish: ``channels`` (published channel names, ``*``: all)
    and ``sources`` (source names, ``*``: any)."""

    channels: list[str] = attrs.field(factory=list)
    sources: list[str] = attrs.field(factory=lambda: ["*"])


@attrs.frozen(kw_only=True)
class TokenConfig:
    """One client token: ``sha256`` is the hex SHA-256 of the token (the token itself
    is never stored); ``channels`` and ``symbols`` (patterns as in ``subscribe``)
    bound what it may subscribe to; ``publish`` what it may publish (none unless
    given: a subscriber's token never publishes)."""

    name: str
    sha256: str = attrs.field(validator=attrs.validators.matches_re(r"^[0-9a-f]{64}$"))
    channels: list[str] = attrs.field(factory=lambda: ["*"])
    symbols: list[str] = attrs.field(factory=lambda: ["*"])
    publish: PublishGrantConfig | None = None


@attrs.frozen(kw_only=True)
class AuthConfig:
    """Client authentication. ``enabled``: ``auto`` (on when the server listens on a
    non-loopback address), ``on`` or ``off``; ``origins``: browser ``Origin``s
    allowed (empty: any)."""

    enabled: str = attrs.field(default="auto", validator=_one_of("auto", "on", "off"))
    tokens: list[TokenConfig] = attrs.field(factory=list)
    origins: list[str] = attrs.field(factory=list)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address: where
    ``auth.enabled = "auto"`` leaves authentication off."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tokens_when_on(instance: Config, attribute: attrs.Attribute[AuthConfig],
                    auth: AuthConfig) -> None:
    """Auth on with no token refuses every client: a config error, not a surprise."""
    if auth.tokens or auth.enabled == "off":
        return
    if auth.enabled == "on":
        why = 'auth.enabled = "on"'
    elif not is_loopback(instance.server.host):
        why = (f'auth.enabled = "auto" and server.listen {instance.server.listen} is not a '
               "loopback address")
    else:
        return
    raise ValueError(
        f"auth.tokens: authentication is on ({why}) but no token is configured, so every "
        'client would be refused; add an [[auth.tokens]] entry (name, sha256) or set '
        'auth.enabled = "off"')


@attrs.frozen(kw_only=True)
class AdminConfig:
    """The admin Unix socket; an empty ``socket`` picks the default path
    (``$RUNTIME_DIRECTORY/admin.sock``, ``$XDG_RUNTIME_DIR/tickwire/admin.sock``, else
    ``/tmp/tickwire-$UID/admin.sock``)."""

    socket: str = ""


def _listen_or_off(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value:
        _listen(instance, attribute, value)


@attrs.frozen(kw_only=True)
class MetricsConfig(_Listening):
    """Prometheus metrics over HTTP at ``http://listen/metrics``; an empty
    ``listen`` (the default) serves none."""

    listen: str = attrs.field(default="", validator=_listen_or_off)


@attrs.frozen(kw_only=True)
class PublishConfig(_Listening):
    """Publishing into declared channels (docs/protocol.md "Publishing").

    ``listen``: the HTTP listener for ``POST /api/publish`` (empty, the default:
    none; the admin socket and the WebSocket still take publishes);
    ``timeout``: seconds a publish waits for room in the dispatcher before it is
    answered ``busy`` (HTTP 503); ``max_message_bytes``: the largest ``data``,
    encoded; ``idempotency_window``: seconds an ``idempotency_key`` is
    remembered; ``allow_loopback_anonymous``: publishes without a token on a
    loopback ``listen`` (off: a token with a publish grant is required).
    """

    listen: str = attrs.field(default="", validator=_listen_or_off)
    timeout: float = attrs.field(default=5.0, validator=_positive)
    max_message_bytes: int = attrs.field(default=65536, validator=_positive)
    idempotency_window: float = attrs.field(default=300.0, validator=_positive)
    allow_loopback_anonymous: bool = False


@attrs.frozen(kw_only=True)
class ChannelConfig:
    """A published channel (``[channels.NAME]``): ``policy`` ``lossless`` (late
    joiners get history, a slow client is closed with 4008) or ``latest`` (late
    joiners get each key's current value, a slow client is conflated);
    ``retention`` messages per stream, none older than ``max_age`` seconds;
    ``type``: the ``type`` its messages carry (empty: a default channel's own,
    else ``message``)."""

    policy: str = attrs.field(validator=_one_of("lossless", "latest"))
    retention: int = attrs.field(default=1000, validator=_positive)
    max_age: float = attrs.field(default=3600.0, validator=_positive)
    type: str = attrs.field(default="",
                            validator=attrs.validators.matches_re(r"^([a-z][a-z0-9_]{0,63})?$"))

    def policy_of(self, name: str) -> ChannelPolicy:
        """This declaration as channel ``name``'s policy (``daemon.channels``);
        raises ``ValueError`` for a name that cannot be declared."""
        default = PUBLISHED.get(name)
        message_type = self.type or (default.message_type if default else "message")
        return published(name, cast(Kind, self.policy),
                         Retention(self.retention, self.max_age), message_type)


@attrs.frozen(kw_only=True)
class ReporterConfig:
    """Health reporting, in seconds. ``interval``: between two ``status`` events;
    ``check``: between two health checks (a transition is published within that);
    ``recent``: how long a reconnect, resync, gap, checksum mismatch or rejected
    event keeps its component degraded; ``silent_after``: a connected feed silent
    that long is degraded; ``book_silent_after``: a book without an update that long
    is degraded (0: never)."""

    interval: float = attrs.field(default=10.0, validator=_positive)
    check: float = attrs.field(default=1.0, validator=_positive)
    recent: float = attrs.field(default=60.0, validator=_non_negative)
    silent_after: float = attrs.field(default=10.0, validator=_positive)
    book_silent_after: float = attrs.field(default=300.0, validator=_non_negative)


#: The roles a node may run (docs/cluster.md).
ROLES = ("all", "collector", "edge")


def _redis_url(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value and not re.fullmatch(r"redis://[^/:@\s]+(:\d{1,5})?(/\d+)?", value):
        raise ValueError(f"{attribute.name}: must be redis://HOST[:PORT][/DB], got {value!r}")


def _prefix(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError(f"{attribute.name}: letters, digits, _ . - (1 to 64), got {value!r}")


@attrs.frozen(kw_only=True)
class ClusterConfig:
    """Scale-out on Redis (docs/cluster.md), for the roles ``collector`` and
    ``edge``. ``redis``: ``redis://HOST[:PORT][/DB]`` (required by those roles);
    ``prefix``: of every key (several clusters on one Redis); ``node``: this
    node's name in leases and status (empty: ``HOST-PID``); ``lease``: seconds a
    feed's lease lasts (its owner renews it every third of that; a standby takes
    over within it); ``timeout``: seconds to connect to Redis and for a reply;
    ``queue``: events a collector holds for Redis before its dispatcher waits
    (backpressure, nothing dropped); ``batch``: most events in one pipelined write
    or read; ``redis_cluster``: ``redis`` is one node of a Redis Cluster (coredis'
    ``RedisCluster`` finds the others; database 0 only)."""

    redis: str = attrs.field(default="", validator=_redis_url)
    prefix: str = attrs.field(default="tickwire", validator=_prefix)
    node: str = ""
    lease: float = attrs.field(default=3.0, validator=_positive)
    timeout: float = attrs.field(default=2.0, validator=_positive)
    queue: int = attrs.field(default=10_000, validator=_positive)
    batch: int = attrs.field(default=1000, validator=_positive)
    redis_cluster: bool = attrs.field(default=False)

    @redis_cluster.validator
    def _database_0(self, attribute: attrs.Attribute[Any], value: bool) -> None:
        if value and re.search(r"/[1-9]\d*$", self.redis):
            raise ValueError(f"{attribute.name}: a Redis Cluster has database 0 only, "
                             f"got {self.redis!r}")


@attrs.frozen(kw_only=True)
class DispatchConfig:
    """``buffer``: events the collectors may queue before they wait (backpressure)."""

    buffer: int = attrs.field(default=1024, validator=_positive)


#: A bar interval: a count and a unit (``1s``, ``15s``, ``1m``, ``5m``, ``1h``, ``1d``).
INTERVAL = re.compile(r"^([1-9][0-9]{0,5})([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def interval_seconds(text: str) -> int:
    """Seconds of a bar interval (``"5m"`` -> 300); raises ``ValueError``."""
    match = INTERVAL.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not an interval (a number and s, m, h or d: 1s, 1m, 5m)")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _intervals(instance: Any, attribute: attrs.Attribute[Any], value: list[str]) -> None:
    for text in value:
        try:
            interval_seconds(text)
        except ValueError as exc:
            raise ValueError(f"{attribute.name}: {exc}") from None
    if len(set(value)) != len(value):
        raise ValueError(f"{attribute.name}: an interval is listed twice")


def _patterns(instance: Any, attribute: attrs.Attribute[Any], value: list[str]) -> None:
    for pattern in value:
        if not re.match(r"^(\*|[a-z0-9_.]+:(\*|[A-Z0-9.]+-[A-Z0-9.]+))$", pattern):
            raise ValueError(f"{attribute.name}: {pattern!r} is not EXCHANGE:BASE-QUOTE, "
                             "EXCHANGE:* or *")


def _thresholds(instance: Any, attribute: attrs.Attribute[Any], value: dict[str, float]) -> None:
    for key, threshold in value.items():
        if not re.match(r"^([a-z0-9_.]+|[A-Z0-9.]+-[A-Z0-9.]+|[a-z0-9_.]+:[A-Z0-9.]+-[A-Z0-9.]+)$",
                        key):
            raise ValueError(f"{attribute.name}: {key!r} is not EXCHANGE, BASE-QUOTE or "
                             "EXCHANGE:BASE-QUOTE")
        if threshold <= 0:
            raise ValueError(f"{attribute.name}: the threshold of {key} must be greater than 0")


@attrs.frozen(kw_only=True)
class WhalesConfig:
    """Large trades (``whales`` channel, ``daemon.derived.whales``).

    ``enabled``; ``threshold``: USD notional at or above which a trade is a whale
    (default 100,000); ``thresholds``: per ``EXCHANGE:BASE-QUOTE``, ``BASE-QUOTE``
    or ``EXCHANGE`` (the most specific wins), USD; ``symbols``: which trade
    streams (patterns as in ``subscribe``)."""

    enabled: bool = False
    threshold: float = attrs.field(default=100_000.0, validator=_positive)
    thresholds: dict[str, float] = attrs.field(factory=dict, validator=_thresholds)
    symbols: list[str] = attrs.field(factory=lambda: ["*"], validator=_patterns)


@attrs.frozen(kw_only=True)
class BarsConfig:
    """Trade bars (``bars`` channel, ``daemon.derived.bars``).

    ``intervals``: e.g. ``["1s", "1m", "5m"]`` (empty: no bars); ``grace``: seconds
    after a bar's end before it is published (late trades within it still count);
    ``empty_bars``: an interval without trades is published with the previous
    close and zero volume (``carry``) or not at all (``skip``); ``partial_ms``: the
    bar in progress goes to subscribers at most this often; ``symbols``: which
    trade streams (patterns as in ``subscribe``)."""

    intervals: list[str] = attrs.field(factory=list, validator=_intervals)
    grace: float = attrs.field(default=1.0, validator=_non_negative)
    empty_bars: str = attrs.field(default="carry", validator=_one_of("carry", "skip"))
    partial_ms: int = attrs.field(default=1000, validator=_positive)
    symbols: list[str] = attrs.field(factory=lambda: ["*"], validator=_patterns)


@attrs.frozen(kw_only=True)
class DerivedConfig:
    """Streams computed in the daemon (``daemon.derived``). ``input_queue``: messages
    a derived stream's input holds; when it overflows the stream stops taking
    messages until it has caught up, then recovers what it missed with ``since``
    (what is no longer retained is counted as lost and shown in status)."""

    input_queue: int = attrs.field(default=10_000, validator=_positive)
    whales: WhalesConfig = WhalesConfig()
    bars: BarsConfig = BarsConfig()


@attrs.frozen(kw_only=True)
class RetentionConfig:
    """Messages kept per stream of a channel: the last ``size``, none older than
    ``max_age`` seconds (late joiners' ``history`` and ``since`` recovery)."""

    size: int = attrs.field(validator=_positive)
    max_age: float = attrs.field(validator=_positive)


@attrs.frozen(kw_only=True)
class HistoryConfig:
    """Retention per channel."""

    trades: RetentionConfig = RetentionConfig(size=1000, max_age=3600.0)
    book: RetentionConfig = RetentionConfig(size=1000, max_age=60.0)
    ticker: RetentionConfig = RetentionConfig(size=100, max_age=60.0)
    system: RetentionConfig = RetentionConfig(size=100, max_age=86400.0)
    whales: RetentionConfig = RetentionConfig(size=1000, max_age=86400.0)
    bars: RetentionConfig = RetentionConfig(size=1000, max_age=86400.0)


@attrs.frozen(kw_only=True)
class ReconnectConfig:
    """Exponential backoff with full jitter, in seconds: delay n is uniform in
    ``[0, min(cap, base * 2**n)]``. ``stale_after``: a connection silent that long is
    reconnected. ``healthy_after``: a run that long resets the backoff."""

    base: float = attrs.field(default=0.5, validator=_positive)
    cap: float = attrs.field(default=30.0, validator=_positive)
    stale_after: float = attrs.field(default=30.0, validator=_positive)
    healthy_after: float = attrs.field(default=60.0, validator=_positive)


def _channels(instance: Any, attribute: attrs.Attribute[Any], value: list[str]) -> None:
    unknown = [c for c in value if c not in MARKET_CHANNELS]
    if unknown:
        raise ValueError(
            f"{attribute.name}: unknown channel {unknown[0]!r}, "
            f"expected one of {', '.join(MARKET_CHANNELS)}"
        )


def _symbols(instance: Any, attribute: attrs.Attribute[Any], value: list[str]) -> None:
    for symbol in value:
        base, sep, quote = symbol.partition("-")
        if not sep or not base or not quote or symbol != symbol.upper():
            raise ValueError(f"{attribute.name}: {symbol!r} is not BASE-QUOTE in upper case")


@attrs.frozen(kw_only=True)
class ExchangeConfig:
    """One exchange feed.

    ``symbols``: ``BASE-QUOTE``; ``channels``: of ``trades``, ``book``, ``ticker``;
    ``mode``: ``native`` (tickwire's own WebSocket client), ``poll`` (ccxt REST
    polling, any exchange id ccxt knows: trades and tickers) or ``watch`` (ccxt.pro
    WebSocket streams, any exchange id ccxt.pro knows: trades, books, tickers);
    ``depth``: book levels where the exchange takes a depth (Kraken, and the
    ``watch`` mode); ``interval``: seconds between
    polls (raised to what the exchange's rate limit allows); ``fallback_after``:
    seconds a native or watch feed may be down before its symbols are polled through ccxt
    until it is back (0: never); ``rest_url`` / ``ws_url``: override the exchange's
    base URLs (the replay emulator sets them); ``credentials_env``: for ``watch``
    mode on an exchange whose streams ccxt.pro signs (Coinbase Exchange's
    ``level2``), the prefix of the environment variables holding the API
    credentials: ``PREFIX_APIKEY`` and ``PREFIX_SECRET`` (required), ``PREFIX_PASSWORD``
    and ``PREFIX_UID`` (where the exchange has them). Credentials are never read
    from the file itself, and never logged (under systemd: ``EnvironmentFile=``).
    """

    symbols: list[str] = attrs.field(validator=_symbols)
    channels: list[str] = attrs.field(default=list(MARKET_CHANNELS), validator=_channels)
    mode: str = attrs.field(default="native", validator=_one_of(*MODES))
    depth: int = attrs.field(default=100, validator=_positive)
    interval: float = attrs.field(default=2.0, validator=_positive)
    fallback_after: float = attrs.field(default=30.0, validator=_non_negative)
    rest_url: str = ""
    ws_url: str = ""
    credentials_env: str = attrs.field(default="", validator=_credentials_env)
    symbols_mode: dict[str, str] = attrs.field(factory=dict)

    @symbols_mode.validator
    def _symbols_mode(self, attribute: attrs.Attribute[Any], value: dict[str, str]) -> None:
        for symbol, mode in value.items():
            if symbol not in self.symbols:
                raise ValueError(f"symbols_mode: {symbol!r} is not one of this exchange's symbols")
            if mode not in MODES:
                raise ValueError(f"symbols_mode: {mode!r} (of {symbol}) is not one of "
                                 f"{', '.join(MODES)}")

    def modes(self) -> set[str]:
        """Every mode this exchange's symbols use."""
        return {mode for mode, _ in self.groups()}

    def groups(self) -> list[tuple[str, ExchangeConfig]]:
        """The symbols by mode (``symbols_mode`` overriding ``mode``): each mode's
        own ``ExchangeConfig`` with its symbols, ``mode`` first; modes with no
        symbol left out."""
        groups = []
        for mode in (self.mode, *sorted(set(MODES) - {self.mode})):
            symbols = [s for s in self.symbols if self.symbols_mode.get(s, self.mode) == mode]
            if symbols:
                groups.append((mode, attrs.evolve(self, symbols=symbols, mode=mode,
                                                  symbols_mode={})))
        return groups

    def credentials(self) -> dict[str, str]:
        """ccxt's credential settings (``apiKey``, ``secret``, ``password``,
        ``uid``) from the environment variables ``credentials_env`` names; ``{}``
        without it."""
        if not self.credentials_env:
            return {}
        found = {field: os.environ.get(f"{self.credentials_env}_{suffix}", "")
                 for suffix, field in CREDENTIAL_VARIABLES.items()}
        return {field: value for field, value in found.items() if value}


@attrs.frozen(kw_only=True)
class Config:
    """The whole daemon configuration (see ``daemon/default.toml``)."""

    server: ServerConfig = ServerConfig()
    auth: AuthConfig = attrs.field(default=AuthConfig(), validator=_tokens_when_on)
    admin: AdminConfig = AdminConfig()
    metrics: MetricsConfig = MetricsConfig()
    reporter: ReporterConfig = ReporterConfig()
    dispatch: DispatchConfig = DispatchConfig()
    history: HistoryConfig = HistoryConfig()
    reconnect: ReconnectConfig = ReconnectConfig()
    publish: PublishConfig = PublishConfig()
    derived: DerivedConfig = DerivedConfig()
    channels: dict[str, ChannelConfig] = attrs.field(factory=dict)
    role: str = attrs.field(default="all", validator=_one_of(*ROLES))
    cluster: ClusterConfig = attrs.field(default=ClusterConfig())
    log_level: str = attrs.field(
        default="info",
        validator=_one_of("debug", "info", "warning", "error"),
    )
    exchanges: dict[str, ExchangeConfig] = attrs.field(factory=dict)

    @channels.validator
    def _declared(self, attribute: attrs.Attribute[Any], value: dict[str, ChannelConfig]) -> None:
        for name, channel in value.items():
            try:
                channel.policy_of(name)
            except ValueError as exc:
                raise ValueError(f"channels.{name}: {exc}") from None

    @cluster.validator
    def _engine(self, attribute: attrs.Attribute[Any], value: ClusterConfig) -> None:
        if self.role != "all" and not value.redis:
            raise ValueError(f"cluster.redis: role {self.role!r} needs Redis: set "
                             'cluster.redis = "redis://HOST:PORT"')

    def channel_table(self) -> Mapping[str, ChannelPolicy]:
        """Every channel's policy: market data, the default published channels and
        the declared ones (``daemon.channels.table``)."""
        return table({name: c.policy_of(name) for name, c in self.channels.items()})

    @exchanges.validator
    def _known(self, attribute: attrs.Attribute[Any], value: dict[str, ExchangeConfig]) -> None:
        polled = [name for name, exchange in value.items() if "poll" in exchange.modes()]
        for name, exchange in value.items():
            if "native" in exchange.modes() and name not in NATIVE_EXCHANGES:
                raise ValueError(
                    f"exchanges: {name!r} has no native collector (native ones are "
                    f"{', '.join(NATIVE_EXCHANGES)}); set mode = \"poll\" to poll it "
                    "through ccxt"
                )
        if polled:
            import ccxt  # only when needed: importing it takes a second

            unknown = [name for name in polled if name not in ccxt.exchanges]
            if unknown:
                raise ValueError(f"exchanges: ccxt knows no exchange {unknown[0]!r}")
        watched = [name for name, exchange in value.items() if "watch" in exchange.modes()]
        if watched:
            import ccxt.pro

            unknown = [name for name in watched if name not in ccxt.pro.exchanges]
            if unknown:
                raise ValueError(f"exchanges: ccxt.pro streams no exchange {unknown[0]!r}")


def _strict(cls: type, name: str) -> Any:
    def structure(value: Any, _: type) -> Any:
        # bool is an int in Python: refuse it where a number is expected
        if cls in (int, float) and isinstance(value, bool):
            raise ValueError(f"expected {name}, got {value!r}")
        if cls is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, cls):
            raise ValueError(f"expected {name}, got {value!r}")
        return value

    return structure


def make_converter() -> Converter:
    """A cattrs converter that forbids unknown keys and never coerces types."""
    converter = Converter(forbid_extra_keys=True)
    for cls, name in ((int, "an integer"), (float, "a number"), (str, "a string"),
                      (bool, "true or false")):
        converter.register_structure_hook(cls, _strict(cls, name))
    return converter


_converter = make_converter()


def structure_config(data: dict[str, Any]) -> Config:
    """Turn parsed TOML into a ``Config``; raises ``ConfigError`` naming the key."""
    try:
        return _converter.structure(data, Config)
    except cattrs.BaseValidationError as exc:
        messages = cattrs.transform_error(exc, path="config", format_exception=_describe)
        raise ConfigError(_one_line(messages[0] if messages else str(exc))) from exc
    except (ValueError, TypeError) as exc:  # a validator of the top level
        raise ConfigError(_one_line(f"{exc} @ config")) from exc


def _describe(exc: BaseException, type_: type | None) -> str:
    if isinstance(exc, ValueError) and not isinstance(exc, cattrs.BaseValidationError):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)


def _one_line(message: str) -> str:
    """``"symbols: bad @ config.exchanges['x']"`` -> ``"bad @ exchanges.x.symbols"``."""
    text, _, where = message.rpartition(" @ ")
    field, sep, rest = text.partition(": ")
    if sep and all(part.isidentifier() for part in field.split(".")):
        text, where = rest, f"{where}.{field}"
    where = re.sub(r"\['([^']*)'\]", r".\1", where).removeprefix("config.")
    return f"{text} @ {where}"


#: The packaged default config, every key explained: the example to copy.
EXAMPLE_CONFIG = resources.files("daemon").joinpath("default.toml")


def _unreadable(path: str | Path | None, exc: OSError) -> str:
    """The one line for a config file that cannot be read: the cause, and what to do."""
    line = f"cannot read {path}: {exc.strerror or exc}"
    if isinstance(exc, FileNotFoundError):
        return (f"{line}; to write one, copy the example {EXAMPLE_CONFIG} to {path} and "
                "edit it (without --config, tickwire run uses that example as it is)")
    if isinstance(exc, PermissionError):
        return f"{line}; make it readable by this user"
    if isinstance(exc, IsADirectoryError):
        return f"{line}; give the path of a TOML file"
    return line


def load_config(path: str | Path | None = None) -> Config:
    """Read and check a TOML config file; ``None`` loads the packaged default.

    Raises ``ConfigError`` (one line) for unreadable files, TOML syntax errors,
    unknown keys and wrong values; a file that is missing or not readable is told
    what to do (``_unreadable``).
    """
    try:
        if path is None:
            text = EXAMPLE_CONFIG.read_text()
        else:
            text = Path(path).read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(_unreadable(path, exc)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return structure_config(data)
