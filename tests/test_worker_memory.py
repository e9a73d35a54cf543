"""Workers keep freed memory for reuse (``workers.keep_freed_memory``): a freed activation stays in the process.

Why this and not a page-fault count: the fault count of repeated allocations also moves with the kernel's own
reclaim and huge-page work on a shared VM (on this host the same probe gave 0 to 24,576 faults with memory kept,
from one run to the next), while what ``keep_freed_memory`` changes, glibc giving a freed block back to the kernel
or not, is exact: it shows in the resident set at once.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import os, sys, torch
torch.set_num_threads(1)  # a worker's setting; and no thread pool starting up inside the measurement
if sys.argv[1] == "keep":
    from metatrain.pipeline.distributed.worker import keep_freed_memory
    assert keep_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
before = rss()
x = torch.ones(4 << 20); during = rss(); del x   # a task's 16 MiB activation: every page written, then freed
print((during - before) >> 20, (rss() - before) >> 20)
"""


def resident_mib(mode: str) -> tuple[int, int]:
    """RSS growth (MiB) while a 16 MiB tensor lives, and after it is freed."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    during, after = map(int, out.stdout.split())
    return during, after


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_keeping_freed_memory_keeps_a_freed_block_for_the_next_task():
    during, after = resident_mib("default")
    # glibc serves a first 16 MiB block with mmap (above its initial 128 KiB threshold) and unmaps it on free: the
    # next task faults all 4,096 pages in again.
    # (Relative to the peak: anything else the process allocates meanwhile moves both numbers alike.)
    assert during >= 15 and after <= during - 12, (during, after)
    during, after = resident_mib("keep")
    # Kept: the block stays resident after the free, for the next task to reuse.
    assert during >= 15 and after >= during - 4, (during, after)
