"""Redis clients for the control plane: short timeouts so a dead or slow Redis never hangs a request.

Every server and command that talks to Redis takes `--redis-url`, falling back to the environment
variable `FLEET_REDIS_URL`, then to `DEFAULT_REDIS_URL`. A password belongs in the URL
(`redis://:PASSWORD@host:6379/0`); `mask_redis_url` is how it is shown. TLS: `rediss://`, with
redis-py's query parameters for the CA and a client certificate (`?ssl_ca_certs=/path/ca.pem`,
`ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`), which both clients read.

Key layout (all under one prefix, default `fleet`, so several fleets or tests can share a server):
  membership  `{prefix}:replicas` (ZSET id -> last write, ms), `{prefix}:replica:{id}` (JSON,
              TTL for leases), channel `{prefix}:replicas:events`
  keys        `{prefix}:keys` (SET of key ids), `{prefix}:key:{id}` (JSON record),
              `{prefix}:keyhash:{sha256}` -> id, `{prefix}:key:{{id}}:rpm|tpm` (HASH second ->
              count), `{prefix}:key:{{id}}:slots` (ZSET ticket -> deadline, ms),
              `{prefix}:key:{{id}}:usage` (HASH), channel `{prefix}:keys:events`
              (`{{id}}`: the id inside literal braces, a Redis Cluster hash tag)
  kv events   `{prefix}:kv:{id}` (STREAM of a replica's prefix-cache changes, MAXLEN ~),
              `{prefix}:kv:{id}:snapshot` (HASH), `{prefix}:kv:{id}:want` (see kv_events.py)

The request hot path uses the pipelined client in fleet.control.resp; everything else redis-py.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_URL_ENV = "FLEET_REDIS_URL"
DEFAULT_PREFIX = "fleet"
PREFIX_ENV = "FLEET_REDIS_PREFIX"

# Short enough that a request waiting on Redis still answers quickly, long enough that a busy
# machine opening a burst of connections is not mistaken for an outage.
SOCKET_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 1.0

# What "Redis is unavailable" looks like: callers fall back or fail closed on these, never crash.
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    RedisError,
    OSError,
    asyncio.TimeoutError,
    TimeoutError,
    RedisConnectionError,
    RedisTimeoutError,
)


# Skip CLIENT SETINFO on connect (fewer round trips per new connection); the keyword changed in
# redis-py 7 (driver_info) and the old one now warns.
_NO_CLIENT_SETINFO: dict[str, None] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(AbstractConnection.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


def resolve_redis_url(url: str | None = None) -> str:
    """An explicit URL wins, then `FLEET_REDIS_URL`, then the local default."""
    return url or os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


def mask_redis_url(url: str) -> str:
    """The URL as logs and status show it: any password replaced by `***`."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def resolve_prefix(prefix: str | None = None) -> str:
    """Key prefix: explicit, then `FLEET_REDIS_PREFIX`, then "fleet" (lets fleets share a Redis)."""
    return prefix or os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX


def url_of(client: aioredis.Redis) -> str:
    """A URL for the hot-path client from a redis-py client's connection settings (TLS kept)."""
    pool = client.connection_pool
    kw = pool.connection_kwargs
    if kw.get("path"):
        return f"unix://{kw['path']}"
    auth = ""
    if kw.get("password"):
        auth = f"{quote(kw.get('username') or '')}:{quote(kw['password'], safe='')}@"
    tls = issubclass(pool.connection_class, aioredis.SSLConnection)
    query = {k: kw[k] for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if kw.get(k)}
    where = f"{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
    url = f"{'rediss' if tls else 'redis'}://{auth}{where}"
    return f"{url}?{urlencode(query)}" if query else url


def async_client(
    url: str | None = None,
    *,
    socket_timeout: float = SOCKET_TIMEOUT_S,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    max_connections: int = 32,
) -> aioredis.Redis:
    """A `redis.asyncio` client (bytes in, bytes out) that gives up fast instead of retrying.

    Its pool makes a burst of callers queue for a connection (up to `socket_timeout`) rather
    than fail, so a burst is not mistaken for an outage.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        resolve_redis_url(url),
        max_connections=max_connections,
        timeout=socket_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=AsyncRetry(NoBackoff(), 0),  # a sync Retry here makes redis-py warn on every client
        health_check_interval=0,
        **_NO_CLIENT_SETINFO,
    )
    return aioredis.Redis.from_pool(pool)


def sync_client(
    url: str | None = None,
    *,
    socket_timeout: float = 2.0,
    connect_timeout: float = 2.0,
) -> redis.Redis:
    """A blocking client for the CLI, where a slightly longer wait beats a spurious failure."""
    return redis.Redis.from_url(
        resolve_redis_url(url),
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 0),
    )
