"""The process's memory allocator: freed blocks are kept for reuse instead of going back to the system.

glibc's malloc gives every block above its mmap threshold (128 KiB, growing
to at most 32 MiB as blocks are freed) fresh pages from the kernel and
returns them on ``free``, and it hands the free top of its heap back above
128 KiB. A torch op on a group of depth maps (8 × 480 × 360 floats: 5.5 MB)
then touches about 1 350 new pages that the kernel must map and zero, a few
hundred such tensors per refine step: on the 2-core machine 1.3 million page
faults in 80 refine steps, a fifth of the loop's time. With the thresholds
below, those blocks are reused from the heap (0.17 million faults; the loop
4.7–5.1 s → 3.9 s, the depth stage 20.5 → 18 s on knot; docs/results.md),
and peak memory is lower (a whole run's peak RSS 1.4–1.5 GiB against
1.6–2.0 GiB), since the freed blocks are the ones the next step allocates
again.

:func:`keep_freed_memory` sets them in this process (``mallopt``);
:func:`worker_env` gives the same settings as environment variables, for the
processes recon starts (Ray workers), which read them when they start. A
user's own malloc settings win, and other C libraries (macOS, musl) are left
as they are.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

logger = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 32 << 20
"""Blocks up to this size come from the heap (and are reused) rather than from fresh pages (glibc's maximum)."""
TRIM_THRESHOLD_BYTES = 1 << 30
"""Free memory at the top of the heap goes back to the system only beyond this."""
ARENAS = 1
"""One heap for all threads: a block freed by one worker thread is reused by the other."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's <malloc.h>

MALLOC_ENV: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD_BYTES),
    "MALLOC_ARENA_MAX": str(ARENAS),
}
""":func:`keep_freed_memory`'s settings as glibc environment variables (read at a process's start)."""


def user_tunes_malloc() -> bool:
    """The environment already sets glibc's malloc (``MALLOC_*`` variables, ``GLIBC_TUNABLES``): recon leaves it."""
    return any(key in os.environ for key in (*MALLOC_ENV, "GLIBC_TUNABLES"))


def worker_env() -> dict[str, str]:
    """Environment variables for processes recon starts: :data:`MALLOC_ENV`, or none where the user tunes malloc
    (their variables reach those processes anyway)."""
    return {} if user_tunes_malloc() else dict(MALLOC_ENV)


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the thresholds above to this process's glibc malloc; False where the C library is not glibc or the
    user's environment already tunes it (``MALLOC_*`` variables, ``GLIBC_TUNABLES``: theirs win).

    Call it early (before worker threads start); calling it again does nothing.
    """
    if user_tunes_malloc():
        return False
    try:
        libc = ctypes.CDLL(None)  # this process's symbols, the C library's among them
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has mallopt but ignores these parameters
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = all(mallopt(param, value) == 1 for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                                                                  (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                                                                  (_M_ARENA_MAX, ARENAS)))
    if not applied:
        logger.debug("mallopt refused the allocator settings; glibc's defaults stay")
    return applied
