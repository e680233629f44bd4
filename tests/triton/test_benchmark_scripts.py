"""The GPU benchmark scripts run end to end on tiny sizes in the Triton interpreter, so that a
broken script is found here and not on a borrowed GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCAN_ARGS = [
    "--device", "cpu", "--batch", "1", "--width", "8", "--state", "4", "--check-length", "12",
    "--lengths", "16", "--sweep-length", "8", "--repeats", "1", "--budget", "0",
]  # fmt: skip


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs on the interpreter")
@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        (
            "bench_permute.py",
            ["--device", "cpu", "--sizes", "2x64x24:bf16", "--repeats", "1", "--warmup", "0"],
            ["| 2x64x24 | bf16 | zigzag S1 |", "| 64 (default) | 4 |"],
        ),
        (
            "bench_triton_scan.py",
            SCAN_ARGS,
            ["| bfloat16 | delta_bias |", "| 16 | fwd+bwd |", "| bwd | default | default |"],
        ),
    ],
)
def test_gpu_benchmark_scripts_write_their_tables(tmp_path, script, args, expected):
    out = tmp_path / "report.md"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    report = out.read_text()
    # Correctness verdicts are not checked here: the interpreter rounds fp32 -> bf16 toward zero,
    # which can double a bf16 error (the kernel tests allow for it; the benchmark's bound is for
    # a GPU).
    assert all(row in report for row in expected), report
