"""The process's malloc keeps freed blocks for reuse (pipeline.core.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.core.allocator import MALLOC_ENV, keep_freed_memory, worker_env

_FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from pipeline.core.allocator import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
    np.ones(1 << 20)  # numpy's own start-up allocations happen before counting
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        a = np.ones(1 << 20)  # 8 MiB, written: every page is touched
        b = a * 2.0
        del a, b
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _page_faults(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in (*MALLOC_ENV, "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_reused_instead_of_faulting_in_fresh_pages():
    applied, tuned = _page_faults("tuned")
    if applied != "True":
        pytest.skip("the C library is not glibc")
    _, plain = _page_faults("plain")
    pages = 80 * (8 << 20) // 4096  # 80 arrays of 8 MiB
    assert tuned < pages // 20  # reused: only the first arrays fault their pages in
    assert tuned * 10 < plain  # glibc's defaults hand the pages back and fault them in again


def test_a_users_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    keep_freed_memory.cache_clear()
    try:
        assert keep_freed_memory() is False
        assert worker_env() == {}  # the Ray workers inherit the user's settings, not recon's
    finally:
        keep_freed_memory.cache_clear()


def test_ray_workers_get_the_same_settings(monkeypatch):
    from pipeline.core import allocator

    for key in (*MALLOC_ENV, "GLIBC_TUNABLES"):
        monkeypatch.delenv(key, raising=False)
    assert worker_env() == MALLOC_ENV == {"MALLOC_MMAP_THRESHOLD_": str(allocator.MMAP_THRESHOLD_BYTES),
                          "MALLOC_TRIM_THRESHOLD_": str(allocator.TRIM_THRESHOLD_BYTES),
                          "MALLOC_ARENA_MAX": str(allocator.ARENAS)}
