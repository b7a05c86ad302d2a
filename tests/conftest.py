"""Shared fixtures: the torch device(s) and rendered scenes (session-scoped, rendered once)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cli.py: no busy-waiting OpenMP threads

import pytest
import torch

from pipeline.core.allocator import keep_freed_memory

keep_freed_memory()  # as cli.py: freed tensors are reused


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_devices())
def device(request) -> torch.device:
    """CPU always; CUDA too when present."""
    return torch.device(request.param)
