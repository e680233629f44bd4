"""loss.csv: appended to, rewritten only atomically, and never losing history to a kill."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from zigzag_mamba.train import runlog
from zigzag_mamba.train.runlog import LOG_FIELDS, LossLog

HEADER = ",".join(LOG_FIELDS) + "\r\n"


def _row(step: int) -> dict:
    return {"step": step, "epoch": 0, "loss": 1 / step, "grad_norm": 0.5, "lr": 1e-4,
            "samples_per_s": 10.0, "seconds": float(step)}  # fmt: skip


def _steps(path: Path) -> list[int]:
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]]


def test_a_resume_appends_without_rewriting(tmp_path, monkeypatch):
    path = tmp_path / "loss.csv"
    log = LossLog(path, 0)
    for step in (1, 2, 3):
        log.write(_row(step))
    before = path.read_bytes()
    replaced = []
    monkeypatch.setattr(runlog.os, "replace", lambda *a: replaced.append(a))
    LossLog(path, 3).write(_row(4))
    assert not replaced and path.read_bytes().startswith(before)
    assert _steps(path) == [1, 2, 3, 4]


def test_rows_past_the_resumed_step_and_a_partial_line_are_dropped(tmp_path):
    path = tmp_path / "loss.csv"
    log = LossLog(path, 0)
    for step in (1, 2, 3, 4):
        log.write(_row(step))
    LossLog(path, 2).write(_row(3))
    assert _steps(path) == [1, 2, 3]
    with open(path, "a") as file:
        file.write("4,0,0.2")  # what a kill in the middle of a write leaves
    LossLog(path, 3).write(_row(4))
    assert _steps(path) == [1, 2, 3, 4]


def test_a_fresh_run_starts_a_new_log(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text(HEADER + "1,0,0.5,0.1,0.1,1,1\r\n")
    LossLog(path, 0)
    assert path.read_bytes().decode() == HEADER


# A process that resumes the log at a step and appends rows until it is killed.
_WRITER = """
import sys
from pathlib import Path
from zigzag_mamba.train.runlog import LossLog
path, step = Path(sys.argv[1]), int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
log = LossLog(path, step)
while True:
    step += 1
    log.write({"step": step, "epoch": 0, "loss": 0.5, "grad_norm": 0.1, "lr": 0.1,
               "samples_per_s": 1.0, "seconds": 1.0})
"""


def test_kill_9_while_the_log_is_resumed_never_loses_history(tmp_path):
    path = tmp_path / "loss.csv"
    # A long history, so that the resume's rewrite (it drops the rows past the resumed step)
    # takes long enough for the kills to land in it.
    rows = "".join(f"{s},0,0.5,0.1,0.1,1.0,1.0\r\n" for s in range(1, 200_001))
    path.write_text(HEADER + rows, newline="")
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for _ in range(6):
        resumed = max(_steps(path)) - rng.randrange(1, 50_000)
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(resumed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert writer.stdout.readline() == "ready\n"
        writer.stdin.write("go\n")
        writer.stdin.flush()
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        text = path.read_bytes().decode()
        lines = text.splitlines(keepends=True)
        whole = lines if text.endswith("\n") else lines[:-1]  # a kill may cut the last row
        assert whole[0] == HEADER
        steps = [int(line.split(",")[0]) for line in whole[1:]]
        # Everything up to the resumed step is still there, in order, once.
        assert steps[:resumed] == list(range(1, resumed + 1))
        assert steps == list(range(1, len(steps) + 1))
    for orphan in tmp_path.glob(".loss.csv.*.tmp"):
        orphan.unlink()  # a kill mid-rewrite leaves it; the trainer removes it at start
