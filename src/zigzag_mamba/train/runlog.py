"""What the trainer reports while it runs: ``loss.csv`` and the progress bar."""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Any

from zigzag_mamba.train.config import TrainConfig

LOG_FIELDS = ("step", "epoch", "loss", "grad_norm", "lr", "samples_per_s", "seconds")


class Meter:
    """Mean loss and throughput over the steps since the last log row."""

    def __init__(self) -> None:
        self.start = self.tick = time.perf_counter()
        self.losses: list[float] = []
        self.samples = 0

    def add(self, loss: float, samples: int) -> None:
        self.losses.append(loss)
        self.samples += samples

    def row(self, step: int, epoch: int, grad_norm: float, lr: float) -> dict[str, Any]:
        now = time.perf_counter()
        row = {
            "step": step,
            "epoch": epoch,
            "loss": sum(self.losses) / len(self.losses),
            "grad_norm": grad_norm,
            "lr": lr,
            "samples_per_s": self.samples / max(now - self.tick, 1e-9),
            "seconds": now - self.start,
        }
        self.tick, self.losses, self.samples = now, [], 0
        return row


class LossLog:
    """``loss.csv``, appended to across resumes; rows past the resumed step are dropped.

    Rows are only ever appended, each in one write of a whole line, flushed: a kill loses at
    most the row being written. When a resume must drop rows (logged after the checkpoint it
    resumes from) or a partial last line, the kept rows go to a temporary file that then
    replaces the log in one atomic rename, so a kill at any moment leaves either the old log or
    the new one, never a truncated history.
    """

    def __init__(self, path: Path, step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if step == 0 or not path.is_file():
            self._replace_with([])
            return
        with open(path, newline="") as file:
            lines = file.readlines()
        kept = [line for line in lines[1:] if _is_row_up_to(line, step)]
        if lines[:1] != [_line(LOG_FIELDS)] or len(kept) < len(lines) - 1:
            self._replace_with(kept)

    def _replace_with(self, rows: list[str]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", newline="") as file:
                file.write(_line(LOG_FIELDS) + "".join(rows))
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as file:
            file.write(_line(row[field] for field in LOG_FIELDS))
            file.flush()


def _line(values) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue()


def _is_row_up_to(line: str, step: int) -> bool:
    """Whether ``line`` is a whole, readable row logged at or before ``step`` (a kill can leave
    a partial last line)."""
    if not line.endswith("\n"):
        return False
    fields = next(csv.reader([line]), [])
    try:
        return len(fields) == len(LOG_FIELDS) and int(fields[0]) <= step
    except ValueError:
        return False


def progress_bar(config: TrainConfig, step: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=config.steps,
        initial=step,
        disable=not config.progress,
        unit="step",
        dynamic_ncols=True,
    )
