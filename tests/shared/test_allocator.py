"""glibc keeps freed blocks up to 64 MB for reuse in the API's and workers' processes."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from shared.allocator import ENVIRONMENT, keep_freed_memory

glibc = pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"), reason="not glibc"
)

# A 40 MB block (a batch of 64 images as float32 is 38.5 MB) freed and asked for again, 50
# times: the minor page faults on the way. glibc's own threshold stops rising at 32 MB.
FAULTS = """
import ctypes, resource, sys
from shared.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    block = libc.malloc(40 << 20)
    ctypes.memset(block, 1, 40 << 20)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "."}
    done = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, env=env, check=True
    )
    return int(done.stdout)


@glibc
def test_a_freed_block_is_reused_without_page_faults() -> None:
    default, kept = _faults("default"), _faults("keep")
    assert default > 50 * 10_000  # every block mapped and faulted in anew: 10,240 pages
    assert kept < 20_000  # faulted in once


def test_the_environment_has_the_last_word(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENVIRONMENT[0], "131072")
    assert keep_freed_memory() is False
