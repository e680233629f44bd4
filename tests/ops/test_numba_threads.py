"""The numba kernels and threads: torch's thread count, and one kernel at a time."""

import os
import subprocess
import sys
import threading
import time

import numba
import torch

from zigzag_mamba.ops import selective_scan
from zigzag_mamba.ops.selective_scan import numba as kernels


def scan_inputs(length: int = 64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 32, length, generator=g)
    delta = torch.rand(2, 32, length, generator=g)
    A = -torch.rand(32, 4, generator=g)
    B, C = (torch.randn(2, 4, length, generator=g) for _ in range(2))
    return u, delta, A, B, C


def run_numba(*inputs: torch.Tensor) -> torch.Tensor:
    import zigzag_mamba

    with zigzag_mamba.use_backend(selective_scan="numba"):
        return selective_scan(*inputs)


def test_kernels_run_with_torchs_thread_count(monkeypatch):
    seen = []
    real = kernels.selective_scan_forward

    def spy(*args):
        seen.append(numba.get_num_threads())
        return real(*args)

    monkeypatch.setattr(kernels, "selective_scan_forward", spy)
    before = torch.get_num_threads()
    try:
        for count in (1, max(1, min(2, numba.config.NUMBA_NUM_THREADS))):
            torch.set_num_threads(count)
            run_numba(*scan_inputs())
            assert seen[-1] == count and torch.get_num_threads() == count
    finally:
        torch.set_num_threads(before)


def test_kernels_launched_from_several_threads_run_one_at_a_time(monkeypatch):
    running, most = [0], [0]
    lock = threading.Lock()
    real = kernels.selective_scan_forward

    def slow(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        try:
            return real(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(kernels, "selective_scan_forward", slow)
    inputs = scan_inputs()
    expected = run_numba(*inputs)
    results = []

    def work():
        results.append(run_numba(*inputs))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1
    assert len(results) == 4 and all(torch.equal(r, expected) for r in results)


CONCURRENT = """
import threading, torch, zigzag_mamba
from zigzag_mamba.ops import selective_scan
g = torch.Generator().manual_seed(0)
u = torch.randn(2, 64, 256, generator=g)
delta, A = torch.rand(2, 64, 256, generator=g), -torch.rand(64, 8, generator=g)
B, C = torch.randn(2, 8, 256, generator=g), torch.randn(2, 8, 256, generator=g)
def work():
    with zigzag_mamba.use_backend(selective_scan="numba"):
        for _ in range(10):
            selective_scan(u, delta, A, B, C)
threads = [threading.Thread(target=work) for _ in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
import numba
print(numba.threading_layer())
"""


def test_threads_calling_the_model_at_once_do_not_abort_the_workqueue_layer():
    # numba's workqueue layer (where neither OpenMP nor TBB loads, as in pip's macOS wheels)
    # ends the process when two threads launch parallel kernels at once.
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    done = subprocess.run(
        [sys.executable, "-c", CONCURRENT], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "workqueue"
