"""The cluster's engine: Redis 7, through coredis (which runs on anyio, hence trio).

Theory of operation (docs/cluster.md has the whole key layout)
--------------------------------------------------------------
Every stream ``channel:exchange:symbol`` has three keys with one hash tag, the
stream's name, so they live in one slot of a Redis Cluster::

    PREFIX:{trades:coinbase:BTC-USD}:s   the Redis Stream: entry id SEQ-0, fields
                                          p (the payload, as clients get it), t
                                          (recv_ts) and w (the write's wall time)
    PREFIX:{trades:coinbase:BTC-USD}:m   metadata hash: epoch, seq (the last one),
                                          born (when it was made), w:WRITER per writer (its own number of its
                                          last write: a retried write is not written
                                          twice), version (latest published state)
    PREFIX:{book:coinbase:BTC-USD}:b     book streams: the current book as a
                                          book_snapshot payload at seq (hash: seq, p)

plus ``PREFIX:{...}:i:KEY`` (a published message's idempotency key, with the
window as expiry), and outside any stream: ``PREFIX:epoch`` (the cluster's epoch,
set if absent by the first node to connect: gone with the data when Redis
restarts without persistence), ``PREFIX:streams`` (the set of stream names, which
edges read to find new streams) and ``PREFIX:lease:EXCHANGE`` (the feed's owner).

One Lua script (``WRITE``) writes an event atomically: it reads the metadata
(creating it, with the writer's cluster epoch and ``born``, the write's wall
time, when absent: then the stream's old entries, if any, are deleted, as their
numbers start again), drops a write it has
already done (``wseq`` not above the one stored for its writer) or a publish whose
idempotency key is known or whose ``version`` is not above the current one, gives
the next ``seq``, XADDs the payload with ``"seq":N`` spliced in at id ``N-0``
(trimmed to the channel's retention, ``MAXLEN ~``), updates the metadata and, for
a book, the stored snapshot. Two writers can never give one ``seq`` twice.

No notification is PUBLISHed: an edge reads with blocking XREAD on every stream it
mirrors, which hands it the entries in the same round trip a notification would
only announce (and new streams appear in ``PREFIX:streams``).

On a Redis Cluster (``cluster.redis_cluster``: coredis' ``RedisCluster``, the
URL one node of it) every command keeps to one slot: ``WRITE`` touches only
keys of one stream (one hash tag), the lease scripts one key, and the global
keys (``PREFIX:epoch``, ``PREFIX:streams``, a lease) are each read or written by
single-key commands; a pipelined batch of writes is split by coredis per node
(each ``EVALSHA`` in its stream's slot). Only XREAD can name many streams: its
callers group streams by ``Engine.slot`` (the mirror reads each slot apart).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from daemon.errors import RedisUnavailable, StartupError, redis_errors

#: The atomic write of one event (see the module docstring).
WRITE = """
local wkey = 'w:' .. ARGV[5]
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'seq', wkey, 'version')
local epoch = meta[1]
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'seq', 0, 'born', ARGV[8])
  meta[2] = '0'
end
local last = tonumber(meta[2])
local wseq = tonumber(ARGV[6])
if wseq > 0 and meta[3] and tonumber(meta[3]) >= wseq then
  return {'duplicate', epoch, last}
end
if ARGV[11] ~= '0' then
  local first = redis.call('GET', KEYS[4])
  if first then return {'duplicate', epoch, tonumber(first)} end
end
if ARGV[12] ~= '' and meta[4] and tonumber(ARGV[12]) <= tonumber(meta[4]) then
  return {'stale', epoch, last, meta[4]}
end
local seq = last + 1
local n = string.format('%d', seq)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], n .. '-0',
           'p', ARGV[1] .. n .. ARGV[2], 't', ARGV[7], 'w', ARGV[8])
redis.call('HSET', KEYS[2], 'seq', n)
if wseq > 0 then redis.call('HSET', KEYS[2], wkey, ARGV[6]) end
if ARGV[12] ~= '' then redis.call('HSET', KEYS[2], 'version', ARGV[12]) end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[3], 'seq', n, 'p', ARGV[9] .. n .. ARGV[10]) end
if ARGV[11] ~= '0' then redis.call('SET', KEYS[4], n, 'PX', ARGV[11]) end
return {'accepted', epoch, seq}
"""


def tag(prefix: str, stream: str) -> str:
    """The keys' common part for ``stream``: ``PREFIX:{stream}`` (its hash tag)."""
    return f"{prefix}:{{{stream}}}"


def split_payload(payload: bytes, seq: int) -> tuple[bytes, bytes]:
    """``payload`` (an encoded message whose top-level ``"seq"`` is ``seq``) cut
    around that number: ``(before, after)``, ``before`` ending in ``"seq":``. The
    last occurrence is the top-level one: ``seq`` is the last field but for
    ``conflated`` and a published message's ``version``. Raises ``ValueError``
    when the payload has no such field."""
    marker = b'"seq":%d' % seq
    before, found, after = payload.rpartition(marker)
    if not found:
        raise ValueError(f"no {marker!r} in the payload")
    return before + b'"seq":', after


@attrs.frozen(kw_only=True)
class Write:
    """One event to write: ``stream`` (``channel:exchange:symbol``), its payload
    cut around its seq (``split_payload``), ``maxlen`` (the channel's retention,
    at least 1: the last entry is the stream's latest value), ``recv_ts`` (epoch
    s), ``wseq`` (the writer's own number of it in the stream, 0: none),
    ``snapshot`` (a book's current book_snapshot payload cut the same way, to
    store as the stream's book), and for a published message ``idempotency``
    (its key), ``window`` (seconds it is remembered) and ``version``."""

    stream: str
    before: bytes
    after: bytes
    maxlen: int
    recv_ts: float
    wseq: int = 0
    snapshot: tuple[bytes, bytes] | None = None
    idempotency: str | None = None
    window: float = 0.0
    version: int | None = None


@attrs.frozen
class Written:
    """What the script did: ``outcome`` ``accepted`` (numbered ``seq``),
    ``duplicate`` (written before: ``seq`` is the first one's, or the stream's last
    for a retried write) or ``stale`` (``version`` not above the stored one, given
    in ``version``); ``epoch``: the stream's."""

    outcome: str
    epoch: str
    seq: int
    version: int | None = None


@attrs.frozen
class Entry:
    """One entry of a stream as Redis holds it: ``seq``, ``payload``, ``recv_ts``
    (epoch s) and ``wall`` (when it was written, epoch s)."""

    seq: int
    payload: bytes
    recv_ts: float
    wall: float


@attrs.frozen
class Meta:
    """A stream's metadata hash: ``epoch``, its last ``seq`` and ``born``, when the
    hash was made (its first write's wall time, epoch s as text; empty for one
    made before it was kept): a stream made again while the cluster's epoch
    stayed (a Redis Cluster master back empty, the epoch on another) has
    another ``born``."""

    epoch: str
    seq: int
    born: str = ""


def _entry(identifier: bytes | str, fields: Mapping[Any, Any]) -> Entry:
    seq = int(bytes(identifier if isinstance(identifier, bytes) else identifier.encode())
              .partition(b"-")[0])
    return Entry(seq, bytes(fields[b"p"]), float(fields.get(b"t", 0.0)),
                 float(fields.get(b"w", 0.0)))


@contextmanager
def unavailable(what: str) -> Iterator[None]:
    """``daemon.errors.redis_errors``, and a Redis Cluster's own failures (its
    layout not loaded, no node reachable for a slot, redirections exhausted:
    coredis' ``RedisClusterError``) as ``RedisUnavailable`` too; a cross-slot
    command or transaction is a bug and passes through. Without a cluster
    client none of these is ever raised: the same as ``redis_errors``."""
    from coredis.exceptions import ClusterCrossSlotError, ClusterTransactionError, RedisClusterError

    with redis_errors(what):
        try:
            yield
        except (ClusterCrossSlotError, ClusterTransactionError):
            raise
        except RedisClusterError as exc:
            raise RedisUnavailable(f"{what}: {exc}") from exc


def parse_url(url: str) -> tuple[str, int, int]:
    """``redis://HOST:PORT[/DB]`` -> ``(host, port, db)``; raises ``ValueError``."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"{url!r} is not redis://HOST:PORT[/DB]")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"{url!r}: the database is a number")
    return parts.hostname, parts.port or 6379, int(db or 0)


class Engine:
    """The Redis side of the cluster for one node (see the module docstring).

    ``url``: ``redis://HOST:PORT[/DB]``; ``prefix``: of every key; ``timeout``:
    seconds to connect and for a reply (a blocking read adds its block time);
    ``redis_cluster``: the URL is one node of a Redis Cluster (database 0 only;
    raises ``ValueError`` for another). Every method raises ``RedisUnavailable``
    when Redis cannot be reached or breaks the connection (``unavailable``).
    Open it with ``open_engine``."""

    def __init__(self, url: str, prefix: str = "tickwire", timeout: float = 2.0,
                 redis_cluster: bool = False) -> None:
        import coredis
        from coredis.retry import NoRetryPolicy

        host, port, db = parse_url(url)
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.redis_cluster = redis_cluster
        # no retries inside coredis: a write is retried by its writer, which
        # knows whether it is safe (``wseq``)
        self.client: coredis.Redis[bytes] | coredis.RedisCluster[bytes]
        if redis_cluster:
            if db:
                raise ValueError(f"{url!r}: a Redis Cluster has database 0 only")
            # one pool per node, as large as the readers an edge may block
            # there (one per slot it follows: daemon.cluster.mirror) and the rest
            self.client = coredis.RedisCluster(
                host=host, port=port, connect_timeout=timeout, stream_timeout=timeout + 5,
                max_connections=CLUSTER_CONNECTIONS, max_connections_per_node=True,
                retry_policy=NoRetryPolicy(), decode_responses=False, verify_version=False,
                non_atomic_cross_slot=False)
        else:
            self.client = coredis.Redis(
                host=host, port=port, db=db, connect_timeout=timeout,
                stream_timeout=timeout + 5, retry_policy=NoRetryPolicy(),
                decode_responses=False, verify_version=False)
        #: a cluster client's state: open (its layout loaded) and the last failure to open
        self._open = not redis_cluster
        self._attempt = trio.Event()
        self.open_error = ""
        self._sha: str | None = None
        self.writes = 0
        self.round_trips = 0

    # -- a cluster client's opening ------------------------------------------------------

    async def keep_open(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                        ) -> None:
        """A Redis Cluster client's keeper (``open_engine`` runs it): opens the client
        (coredis loads the slot layout from the URL's node then: it fails while no
        node answers) and holds it open, its connections' task group in this task;
        tries again every ``timeout / 4`` seconds while it fails (commands raise
        ``RedisUnavailable`` meanwhile). One Redis: nothing to do."""
        from coredis.exceptions import RedisError

        task_status.started()
        if not self.redis_cluster:
            return
        while True:
            try:
                async with self.client:
                    self._open, self.open_error = True, ""
                    self._attempted()
                    await trio.sleep_forever()
            except* (RedisError, OSError, TimeoutError) as group:
                exc = group.exceptions[0]
                self._open, self.open_error = False, str(exc) or type(exc).__name__
                self._attempted()
            await trio.sleep(self.timeout / 4)

    def _attempted(self) -> None:
        self._attempt.set()
        self._attempt = trio.Event()

    @asynccontextmanager
    async def _using(self, what: str) -> AsyncIterator[None]:
        """The client for one call: a cluster client not open yet is waited for
        until its keeper's next attempt (at most ``timeout``), then
        ``RedisUnavailable``; errors mapped by ``unavailable``."""
        if not self._open:
            with trio.move_on_after(self.timeout):
                await self._attempt.wait()
            if not self._open:
                raise RedisUnavailable(f"{what}: the cluster is not reachable"
                                       f"{': ' + self.open_error if self.open_error else ''}")
        with unavailable(what):
            yield

    # -- keys ------------------------------------------------------------------------

    def keys(self, stream: str) -> tuple[str, str, str]:
        """``(stream, meta, book)`` keys of ``stream``."""
        base = tag(self.prefix, stream)
        return f"{base}:s", f"{base}:m", f"{base}:b"

    def slot(self, stream: str) -> int:
        """The Redis Cluster slot of ``stream``'s keys (of its hash tag); 0 for one
        Redis, where every stream may be read in one XREAD."""
        if not self.redis_cluster:
            return 0
        from coredis.typing import Key

        return Key(self.keys(stream)[0]).slot

    @property
    def registry(self) -> str:
        """The set of every stream's name."""
        return f"{self.prefix}:streams"

    # -- the cluster's epoch, the registry --------------------------------------------

    async def cluster_epoch(self, new: str) -> str:
        """The cluster's epoch: ``new`` if none is stored (Redis is new or lost its
        data), else the stored one."""
        key = f"{self.prefix}:epoch"
        async with self._using("redis: epoch"):
            await self.client.set(key, new, condition=_nx())
            value = await self.client.get(key)
        self.round_trips += 2
        if value is None:  # deleted in between: ours is as good as any
            return new
        return value.decode()

    async def register(self, streams: Iterable[str]) -> None:
        """Add stream names to the registry (``PREFIX:streams``)."""
        names = list(streams)
        if names:
            async with self._using("redis: register"):
                await self.client.sadd(self.registry, names)
            self.round_trips += 1

    async def streams(self) -> set[str]:
        """Every stream name in the registry."""
        async with self._using("redis: streams"):
            names = await self.client.smembers(self.registry)
        self.round_trips += 1
        return {name.decode() for name in names}

    async def ping(self) -> float:
        """One PING; its round trip in seconds."""
        start = time.perf_counter()
        async with self._using("redis: ping"):
            await self.client.ping()
        return time.perf_counter() - start

    # -- writing ---------------------------------------------------------------------

    async def _script(self) -> str:
        if self._sha is None:
            async with self._using("redis: script load"):
                self._sha = (await self.client.script_load(WRITE)).decode()
        return self._sha

    async def write(self, writes: list[Write], writer: str, epoch: str) -> list[Written]:
        """Write ``writes`` in order, pipelined in one round trip: one ``WRITE`` each.
        ``writer``: this node's id (for ``wseq``); ``epoch``: the cluster's, given to
        streams that have no metadata yet. A Redis that lost its scripts (a restart)
        gets the script again and the whole batch again (writes done before are
        dropped by ``wseq``; a publish's by its idempotency key)."""
        from coredis.exceptions import NoScriptError

        wall = repr(time.time())
        for attempt in range(2):
            sha = await self._script()
            try:
                async with self._using("redis: write"):
                    async with self.client.pipeline(transaction=False) as pipe:
                        requests = [pipe.evalsha(sha, self._keys(w), self._args(w, writer, epoch, wall))
                                    for w in writes]
                    replies = [await request for request in requests]
            except NoScriptError:
                self._sha = None
                if attempt:
                    raise
                continue
            self.round_trips += 1
            self.writes += len(writes)
            return [_written(reply) for reply in replies]
        raise AssertionError("unreachable")

    def _keys(self, w: Write) -> list[str]:
        stream, meta, book = self.keys(w.stream)
        idempotency = f"{tag(self.prefix, w.stream)}:i:{w.idempotency}" if w.idempotency else meta
        return [stream, meta, book, idempotency]

    @staticmethod
    def _args(w: Write, writer: str, epoch: str, wall: str) -> list[str | bytes | int]:
        snapshot = w.snapshot or (b"", b"")
        return [w.before, w.after, max(1, w.maxlen), epoch, writer, w.wseq, repr(w.recv_ts), wall,
                snapshot[0], snapshot[1],
                int(w.window * 1000) if w.idempotency else 0,
                "" if w.version is None else str(w.version)]

    # -- reading ---------------------------------------------------------------------

    async def meta(self, stream: str) -> Meta | None:
        """The stream's epoch and last seq, or ``None`` if Redis holds none."""
        async with self._using("redis: meta"):
            fields = await self.client.hmget(self.keys(stream)[1], ["epoch", "seq", "born"])
        self.round_trips += 1
        epoch, seq, born = fields
        if epoch is None:
            return None
        return Meta(epoch.decode(), int(seq or 0), born.decode() if born is not None else "")

    async def book(self, stream: str) -> tuple[int, bytes] | None:
        """The stored book of a book stream as ``(seq, book_snapshot payload)``."""
        async with self._using("redis: book"):
            seq, payload = await self.client.hmget(self.keys(stream)[2], ["seq", "p"])
        self.round_trips += 1
        if seq is None or payload is None:
            return None
        return int(seq), bytes(payload)

    async def range(self, stream: str, after: int, count: int) -> list[Entry]:
        """At most ``count`` entries of ``stream`` after seq ``after``, oldest first."""
        async with self._using("redis: range"):
            entries = await self.client.xrange(self.keys(stream)[0], f"({after}-0", "+", count=count)
        self.round_trips += 1
        return [_entry(e.identifier, e.field_values) for e in entries]

    async def last(self, stream: str, count: int) -> list[Entry]:
        """The last ``count`` entries of ``stream``, oldest first."""
        async with self._using("redis: range"):
            entries = await self.client.xrevrange(self.keys(stream)[0], "+", "-", count=count)
        self.round_trips += 1
        return [_entry(e.identifier, e.field_values) for e in reversed(entries)]

    async def read(self, after: Mapping[str, int], block: float, count: int
                   ) -> dict[str, list[Entry]]:
        """Blocking XREAD: the entries after each stream's seq in ``after``, at most
        ``count`` per stream, waiting up to ``block`` seconds for the first."""
        if not after:
            return {}
        by_key = {self.keys(stream)[0]: stream for stream in after}
        ids = {self.keys(stream)[0]: f"{seq}-0" for stream, seq in after.items()}
        async with self._using("redis: read"):
            reply = await self.client.xread(ids, count=count, block=max(1, int(block * 1000)))
        self.round_trips += 1
        if not reply:
            return {}
        return {by_key[key.decode() if isinstance(key, bytes) else key]:
                [_entry(e.identifier, e.field_values) for e in entries]
                for key, entries in reply.items()}

    # -- leases ----------------------------------------------------------------------

    def lease_key(self, feed: str) -> str:
        """The key of ``feed``'s lease."""
        return f"{self.prefix}:lease:{feed}"

    async def acquire(self, feed: str, owner: str, ttl: float) -> str | None:
        """Take or renew ``feed``'s lease for ``owner`` for ``ttl`` seconds; the
        current owner (``owner`` when it holds it now), or ``None`` if none."""
        async with self._using("redis: lease"):
            holder = await self.client.eval(
                LEASE, [self.lease_key(feed)], [owner, int(ttl * 1000)])
        self.round_trips += 1
        return holder.decode() if isinstance(holder, bytes) else None

    async def release(self, feed: str, owner: str) -> bool:
        """Give ``feed``'s lease up if ``owner`` holds it; whether it did."""
        async with self._using("redis: lease"):
            done = await self.client.eval(RELEASE, [self.lease_key(feed)], [owner])
        self.round_trips += 1
        return bool(done)

    async def holder(self, feed: str) -> str | None:
        """Who holds ``feed``'s lease, or ``None``."""
        async with self._using("redis: lease"):
            value = await self.client.get(self.lease_key(feed))
        return value.decode() if value is not None else None


#: Take (set if absent) or renew (same owner) a lease; returns the holder.
LEASE = """
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return holder
"""

#: Delete a lease only when its value is the owner's.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


#: Connections to each node of a Redis Cluster at most (readers blocked in XREAD,
#: one per slot followed there, and the rest); Redis accepts 10,000 clients.
CLUSTER_CONNECTIONS = 1000


def _nx() -> Any:
    from coredis.tokens import PureToken

    return PureToken.NX


def _written(reply: Any) -> Written:
    outcome, epoch, seq = bytes(reply[0]).decode(), bytes(reply[1]).decode(), int(reply[2])
    version = int(reply[3]) if len(reply) > 3 else None
    return Written(outcome, epoch, seq, version)


@asynccontextmanager
async def open_engine(url: str, prefix: str, reply_timeout: float = 2.0,
                      redis_cluster: bool = False) -> AsyncIterator[Engine]:
    """An ``Engine`` for the block, its connections closed at the end. Raises
    ``StartupError`` for a URL that is not ``redis://HOST:PORT[/DB]`` (or names a
    database other than 0 of a Redis Cluster); does not wait for Redis (it may be
    down at start: the users retry; a cluster client is opened by its keeper,
    ``Engine.keep_open``, in a task of its own)."""
    try:
        engine = Engine(url, prefix, reply_timeout, redis_cluster)
    except ValueError as exc:
        raise StartupError(f"cluster.redis: {exc}") from exc
    if not redis_cluster:
        async with engine.client:
            yield engine
        return
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.keep_open)
            try:
                yield engine
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # the keeper raises nothing: what the nursery wrapped is the block's own
        # exception, given to the caller as it is (as without a cluster)
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
