"""The Redis clients of every process, configured in one place.

* A pool **waits** for a free connection (up to ``POOL_WAIT_S``) instead of failing: a burst of
  requests queues for a moment rather than answering 503 while Redis is healthy.
* A command that meets a dead connection (Redis was restarted, a proxy dropped it) is retried
  on a fresh one, a few times with a short back-off, before the error reaches a request: a
  503 is kept for a Redis that is really unreachable.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry

POOL_WAIT_S = 5.0
RETRIES = 3
RETRY_ON = [ConnectionError, TimeoutError]


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=0.5, base=0.05)  # 0.05, 0.1, 0.2 s


def sync_client(
    url: str, *, max_connections: int = 16, socket_timeout: float = 10.0
) -> redis.Redis:
    """A client for threads (the worker, the CLI, the API's metrics flusher)."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        socket_connect_timeout=3,
        socket_timeout=socket_timeout,
        health_check_interval=10,
        retry=Retry(_backoff(), RETRIES),
        retry_on_error=RETRY_ON,
    )
    return redis.Redis(connection_pool=pool)


def async_client(url: str, *, max_connections: int = 64) -> aioredis.Redis:
    """A client for the API's event loop."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=10,
        retry=AsyncRetry(_backoff(), RETRIES),
        retry_on_error=RETRY_ON,
    )
    return aioredis.Redis(connection_pool=pool)
