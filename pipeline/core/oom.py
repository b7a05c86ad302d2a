"""Out-of-memory fallback: smaller batches, then the CPU, with a warning — never a crash.

A stage whose memory use is set by a batch size that does *not* change its
result (pixels scored at once, rays per chunk, views per forward pass of a
frozen network) wraps the work in :func:`call_with_oom_fallback`::

    depth = call_with_oom_fallback(
        lambda batch, device: sweep(images.to(device), chunk_pixels=batch),
        batch=mvs_cfg.chunk_pixels, device=default_device(cfg.device),
        what=f"depth of {view.name}", setting="mvs.chunk_pixels",
    ).value

On ``torch.cuda.OutOfMemoryError`` the batch is halved (down to
``min_batch``) and the call repeated; if the smallest batch still does not fit
on the GPU, the call is repeated on the CPU starting again from the full
batch (host memory is usually far larger). An allocation failure on the CPU
halves the batch too; when even ``min_batch`` fails, a one-line
:class:`~pipeline.core.errors.ReconError` names the setting to lower.

Settings whose value changes the result (e.g. the views optimized together)
must not be shrunk this way: that would make the output depend on the memory
of the machine.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from pipeline.core.errors import ReconError

logger = logging.getLogger(__name__)

T = TypeVar("T")

_CPU_OOM_MESSAGES = ("can't allocate memory", "cannot allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a torch allocation failure: ``torch.cuda.OutOfMemoryError`` (CUDA), or the RuntimeError/MemoryError of a
    CPU allocation."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _CPU_OOM_MESSAGES)


def release_device_memory(device: torch.device) -> None:
    """Drop unreferenced tensors and return cached CUDA blocks to the driver (after an OOM, before a retry)."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class OomResult(Generic[T]):
    """What :func:`call_with_oom_fallback` returned, and where it finally ran."""

    value: T
    batch: int
    """Batch size of the successful call."""
    device: torch.device
    """Device of the successful call (the CPU after a fallback)."""
    retries: int
    """Calls that ran out of memory before it."""


def call_with_oom_fallback(
    fn: Callable[[int, torch.device], T],
    *,
    batch: int,
    device: torch.device | str,
    what: str,
    setting: str,
    min_batch: int = 1,
    cpu_fallback: bool = True,
    log: logging.Logger = logger,
) -> OomResult[T]:
    """Run ``fn(batch, device)``; on out-of-memory halve the batch, then fall back to the CPU.

    Args:
        fn: the work; its result must not depend on ``batch`` (only its memory use may).
        batch: first batch size to try (>= 1).
        device: first device to try.
        what: names the work in warnings (e.g. ``"depth of view_003.png"``).
        setting: the config key that sets ``batch`` (named in the final error).
        min_batch: the smallest batch tried before giving up on a device.
        cpu_fallback: after CUDA fails at ``min_batch``, repeat on the CPU (from ``batch``).

    Raises:
        ReconError: out of memory on the last device even at ``min_batch``.
    """
    if batch < 1 or min_batch < 1:
        raise ValueError(f"batch ({batch}) and min_batch ({min_batch}) must be >= 1")
    device = torch.device(device)
    first_batch = current = max(batch, min_batch)
    retries = 0
    while True:
        try:
            return OomResult(value=fn(current, device), batch=current, device=device, retries=retries)
        except Exception as exc:  # noqa: BLE001 - only allocation failures are handled, the rest re-raised
            if not is_out_of_memory(exc):
                raise
            failure = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        # Outside the except block: the exception (and the frames holding its tensors) is released.
        retries += 1
        release_device_memory(device)
        if current > min_batch:
            smaller = max(min_batch, current // 2)
            log.warning("%s: out of memory on %s with batch %d (%s); retrying with batch %d",
                        what, device, current, failure, smaller)
            current = smaller
            continue
        if device.type != "cpu" and cpu_fallback:
            log.warning("%s: out of memory on %s even with batch %d; falling back to the CPU (slower)",
                        what, device, current)
            device, current = torch.device("cpu"), first_batch
            continue
        raise ReconError(
            f"{what}: out of memory on {device} even with {setting}={current}; close other programs, "
            f"lower the working resolution, or set a smaller {setting}"
        )
