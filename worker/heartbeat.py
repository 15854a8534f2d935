"""Readiness: each worker process announces itself in Redis while it lives.

``<prefix>:workers`` is a sorted set of worker names scored by last beat; each name has a
short-lived JSON record (state, model, gallery, size, device, reason). ``/readyz`` reads both.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

import redis

from shared.jobs import Keys

log = logging.getLogger(__name__)

BEAT_S = 3.0
TTL_S = 15
FAILED_TTL_S = 300


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    def __init__(self, client: redis.Redis, *, prefix: str, name: str) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.name = name
        self.info: dict[str, Any] = {"name": name, "state": "starting"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def update(self, **info: Any) -> None:
        self.info.update(info)
        self.beat()

    def beat(self) -> None:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.worker(self.name), json.dumps(self.info), ex=TTL_S)
                pipe.zadd(self.keys.workers, {self.name: time.time()})
                pipe.zremrangebyscore(self.keys.workers, "-inf", time.time() - 3600)
                pipe.execute()
        except redis.RedisError as error:  # Redis is down: the next beat tries again
            log.warning("heartbeat failed: %s", error)

    def start(self) -> None:
        self._thread.start()

    def fail(self, reason: str) -> None:
        """Stop beating but leave the reason for /readyz to show for a while."""
        self._stop.set()
        self.info.update(state="failed", reason=reason)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.worker(self.name), json.dumps(self.info), ex=FAILED_TTL_S)
                pipe.zadd(self.keys.workers, {self.name: time.time()})
                pipe.execute()
        except redis.RedisError as error:
            log.warning("could not record the failure in Redis: %s", error)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.client.delete(self.keys.worker(self.name))
            self.client.zrem(self.keys.workers, self.name)
        except redis.RedisError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            self.beat()
