"""Per-view work spread over CPU threads, and torch's CPU thread count.

On a CPU, one view at a time with torch's intra-op threads keeps the cores
busy only part of the time (the depth stage's ops on 480x360 maps used 1.36
of 2 cores); views in parallel threads, each op single-threaded, use them
all. Every view's result depends only on its inputs, never on which thread
made it or when, so the output is the same for any number of workers (the
ops are elementwise or reduce in a fixed order). On CUDA one thread drives
the device.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (None: leave torch's setting), then restore it."""
    import torch

    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(old)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cpu_workers(setting: int | None, device: torch.device | str) -> int:
    """Parallel view threads: 1 on a GPU; on the CPU ``setting``, or :func:`available_cpus` when None."""
    if str(device).split(":")[0] != "cpu":
        return 1
    return max(1, setting if setting is not None else available_cpus())


def map_in_threads(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` for every item, in the order they finish, from ``workers`` threads.

    With more than one worker, torch ops run single-threaded meanwhile (when
    torch is loaded; this module never imports it for numpy-only work) and at
    most ``workers`` items are in flight (bounded memory); one worker calls
    ``fn`` in this thread, in order. The first exception is raised once the
    items in flight have finished; no new item starts after it.
    """
    todo = list(items)
    if workers <= 1 or len(todo) <= 1:
        for item in todo:
            yield item, fn(item)
        return
    single = torch_threads(1) if "torch" in sys.modules else contextlib.nullcontext()
    with single, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recon-view") as pool:
        pending: dict[Future, Any] = {}
        queue = iter(todo)
        for item in queue:
            pending[pool.submit(fn, item)] = item
            if len(pending) >= workers:
                break
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    item = pending.pop(future)
                    result = future.result()
                    nxt = next(queue, _END)
                    if nxt is not _END:
                        pending[pool.submit(fn, nxt)] = nxt
                    yield item, result
        finally:
            for future in pending:
                future.cancel()


_END = object()

