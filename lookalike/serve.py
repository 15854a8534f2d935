"""``lookalike serve``: Redis, one worker and the API on one machine, each supervised.

Every part is restarted when it stops unexpectedly, after a back-off that doubles on each
quick failure (1 s up to 30 s, back to 1 s once a part has run for a minute). Redis is
restarted on the same port with the same data folder and its append-only file, so the jobs it
had accepted are still there and still answered. A part that exits with ``EXIT_CANNOT_START``
(a setting, the model or the index is wrong: restarting cannot help) stops the whole service,
and ``serve`` exits non-zero naming it, so a script or a supervisor above can tell a failure
from a clean stop (Ctrl+C or SIGTERM: exit 0).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lookalike.redis_server import RedisServer, free_port, start_redis
from shared.errors import ConfigError
from shared.settings import data_home, get_settings, load_settings

log = logging.getLogger("lookalike.serve")

# What `lookalike worker` and `lookalike api` exit with when they cannot start at all.
EXIT_CANNOT_START = 2
EXIT_FAILED = 1
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0
STOP_GRACE_S = 20.0


@dataclass
class Part:
    """One supervised process: how to start it, and what stopped it for good."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0


@dataclass
class Supervisor:
    """Keeps every part running until :meth:`stop`, or until one part cannot start."""

    announce: Callable[[str], object] = field(default=lambda line: print(line, file=sys.stderr))
    stopping: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None
    parts: list[Part] = field(default_factory=list)

    def run(self, part: Part) -> threading.Thread:
        self.parts.append(part)
        thread = threading.Thread(target=self._keep, args=(part,), name=part.name, daemon=True)
        thread.start()
        return thread

    def _keep(self, part: Part) -> None:
        backoff = BACKOFF_MIN_S
        while not self.stopping.is_set():
            started = time.monotonic()
            code = self._run_once(part)
            if self.stopping.is_set():
                return
            if code == EXIT_CANNOT_START:
                self.fail(f"the {part.name} cannot start (see above)")
                return
            # At once after a part that had been running; then 1 s, 2 s... up to 30 s while it
            # keeps failing within a minute of its start.
            quick = time.monotonic() - started < HEALTHY_AFTER_S
            delay = min(backoff, BACKOFF_MAX_S) if quick and part.restarts else 0.0
            backoff = backoff * 2 if quick and part.restarts else BACKOFF_MIN_S
            part.restarts += 1
            self.announce(
                f"lookalike: the {part.name} stopped ({_describe(code)}); "
                + (f"restarting in {delay:.0f}s" if delay else "restarting")
            )
            self.stopping.wait(delay)

    def _run_once(self, part: Part) -> int | None:
        """Start the part (unless it was handed over running) and wait for it to end."""
        if part.process is None or part.process.poll() is not None:
            try:
                part.process = part.start()
            except ConfigError as error:  # e.g. redis-server refused to start
                self.announce(f"lookalike: the {part.name} did not start: {error}")
                return None
            if self.stopping.is_set():  # stopped while it was starting: it goes too
                part.process.terminate()
        return part.process.wait()

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self.stopping.set()

    def stop(self) -> None:
        self.stopping.set()

    def wait(self) -> None:
        self.stopping.wait()

    def terminate_all(self) -> None:
        """SIGTERM every running part and wait for it; Redis last (the others write to it as
        they stop). A part that does not stop within ``STOP_GRACE_S`` is killed."""
        others = [part for part in self.parts if part.name != "Redis"]
        last = [part for part in self.parts if part.name == "Redis"]
        for group in (others, last):
            running = [p.process for p in group if p.process and p.process.poll() is None]
            for process in running:
                process.send_signal(signal.SIGTERM)
            for process in running:
                try:
                    process.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _describe(code: int | None) -> str:
    if code is None:
        return "not started"
    if code < 0:
        return f"signal {signal.Signals(-code).name}" if -code in signal.valid_signals() else "?"
    return f"exit {code}"


def command(*args: str) -> list[str]:
    """This same ``lookalike`` command, in a child process."""
    return [sys.executable, "-m", "lookalike", *args]


def spawner(*args: str) -> Callable[[], subprocess.Popen[bytes]]:
    """What starts ``lookalike ARGS`` in a child process."""

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command(*args))

    return spawn


class SupervisedRedis:
    """The embedded Redis: one port and one data folder for its whole life, so a restarted
    server reloads its append-only file and the service finds every job it had."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.server: RedisServer | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> subprocess.Popen[bytes]:
        started = time.monotonic()
        self.server = start_redis(self.directory, port=self.port)
        log.info("Redis answering on %s after %.2fs", self.url, time.monotonic() - started)
        return self.server.process


def supervise(supervisor: Supervisor) -> int:
    """Run until SIGINT or SIGTERM, or until a part fails for good; stop every part; the exit
    status (``EXIT_FAILED``, saying why, when a part failed)."""

    def on_signal(signum: int, frame: object) -> None:
        supervisor.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    supervisor.wait()
    supervisor.terminate_all()
    if supervisor.failure is not None:
        print(f"lookalike: stopping: {supervisor.failure}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def run_workers(processes: int, *, build_index: bool, loglevel: str) -> int:
    """``lookalike worker --processes N``: N worker processes on this machine, each its own
    model and consumer, supervised like ``serve``'s parts. Several processes keep one GPU busy
    where one process's Python (decoding messages, storing results) would leave it idle. With
    ``--build-index`` a missing index is built once, first."""
    if build_index:
        built = subprocess.run(command("worker", "--build-index", "--only-build"), check=False)
        if built.returncode:
            return built.returncode
    supervisor = Supervisor()
    for number in range(1, processes + 1):
        supervisor.run(Part(f"worker {number}", spawner("worker", "--loglevel", loglevel)))
    return supervise(supervisor)


def cmd_serve(args: argparse.Namespace) -> int:
    """API + one worker + Redis, on one machine, with nothing but pip packages."""
    load_settings()
    supervisor = Supervisor()
    if not os.environ.get("LOOKALIKE_REDIS_URL"):
        redis = SupervisedRedis(data_home() / "redis")
        try:
            first = redis.start()
        except ConfigError as error:
            print(f"lookalike: Redis cannot start: {error}", file=sys.stderr)
            return EXIT_FAILED
        os.environ["LOOKALIKE_REDIS_URL"] = redis.url
        get_settings.cache_clear()
        print(f"lookalike: Redis on {redis.url} (data in {redis.directory})", file=sys.stderr)
        supervisor.run(Part("Redis", redis.start, process=first))
    api = ("api", "--host", args.host, "--port", str(args.port))
    for name, cli_args in (("worker", ("worker", "--build-index")), ("API", api)):
        supervisor.run(Part(name, spawner(*cli_args)))

    print(
        f"lookalike: API on http://{args.host}:{args.port} - the first start builds the index; "
        "then try: lookalike query PHOTO.jpg",
        file=sys.stderr,
    )
    return supervise(supervisor)
