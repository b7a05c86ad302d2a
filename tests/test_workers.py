"""pipeline.core.workers: per-view work in parallel threads."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pipeline.core.workers import available_cpus, cpu_workers, map_in_threads, torch_threads


def test_every_item_once_with_at_most_workers_in_flight():
    lock, running, peak = threading.Lock(), [0], [0]

    def work(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return i * i

    out = dict(map_in_threads(work, range(12), 3))
    assert out == {i: i * i for i in range(12)}
    assert 1 <= peak[0] <= 3


def test_one_worker_runs_in_order_in_this_thread():
    seen = []
    out = list(map_in_threads(lambda i: seen.append((i, threading.current_thread())) or i, [3, 1, 2], 1))
    assert out == [(3, 3), (1, 1), (2, 2)] and {t for _, t in seen} == {threading.current_thread()}


def test_a_failing_item_raises_and_torch_threads_are_restored():
    before = torch.get_num_threads()
    inside = []

    def work(i: int) -> int:
        inside.append(torch.get_num_threads())
        if i == 2:
            raise ValueError("view 2 is broken")
        return i

    with pytest.raises(ValueError, match="view 2"):
        list(map_in_threads(work, range(6), 2))
    assert set(inside) == {1}  # each op single-threaded while views run side by side
    assert torch.get_num_threads() == before


def test_worker_counts():
    assert cpu_workers(None, "cuda") == cpu_workers(3, "cuda:0") == 1  # one thread drives a GPU
    assert cpu_workers(3, "cpu") == 3 and cpu_workers(None, "cpu") == available_cpus() >= 1
    with torch_threads(1):
        assert torch.get_num_threads() == 1
