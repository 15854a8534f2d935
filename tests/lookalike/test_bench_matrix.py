"""The service benchmarks' CPU accounting (lookalike.bench.matrix.cpu_seconds)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from lookalike.bench.matrix import cpu_by_session, cpu_seconds

BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


def _python(code: str, *, session: bool = False) -> subprocess.Popen[bytes]:
    """Python running ``code``, its output piped (in a session of its own with ``session``)."""
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=session
    )


def test_cpu_seconds_counts_a_process_and_the_children_it_reaped() -> None:
    # A parent that burns 0.3 s itself, then runs a child that burns 0.6 s and waits for it
    # (as Redis does with the children that rewrite its append-only file), then idles.
    child = BURN.format(s=0.6)
    parent = _python(
        BURN.format(s=0.3)
        + f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}])\n"
        + "print('done', flush=True)\ntime.sleep(30)\n"
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline() == b"done\n"
        seconds = cpu_seconds([parent.pid], sessions=False)
    finally:
        parent.kill()
        parent.wait()
    assert 0.85 <= seconds < 2.0  # 0.9 burnt, plus the interpreters' start


def test_cpu_seconds_counts_every_process_of_a_session() -> None:
    kid = BURN.format(s=0.5) + "time.sleep(30)\n"
    leader = _python(
        "import subprocess, sys, time\n"
        f"kid = subprocess.Popen([sys.executable, '-c', {kid!r}])\n"
        "print(kid.pid, flush=True)\ntime.sleep(30)\n",
        session=True,
    )
    try:
        assert leader.stdout is not None
        int(leader.stdout.readline())
        deadline = time.monotonic() + 20
        while cpu_seconds([leader.pid], sessions=True) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        alone = cpu_seconds([leader.pid], sessions=False)
        together = cpu_seconds([leader.pid], sessions=True)
        by_session = cpu_by_session()[leader.pid]  # (what scripts/bench_gpu.sh reads)
    finally:
        os.killpg(leader.pid, signal.SIGKILL)  # the child too
        leader.wait()
    assert alone < 0.4 and together >= 0.5  # the child is alive: counted by its session
    assert by_session >= together
