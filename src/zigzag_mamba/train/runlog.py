"""What the trainer reports while it runs: ``loss.csv`` and the progress bar."""

from __future__ import annotations

import csv
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
    """``loss.csv``, appended to across resumes; rows past the resumed step are dropped."""

    def __init__(self, path: Path, step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file() and step > 0:
            with open(path, newline="") as file:
                kept = [row for row in csv.DictReader(file) if int(row["step"]) <= step]
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(kept)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as file:
            csv.DictWriter(file, LOG_FIELDS).writerow(row)


def progress_bar(config: TrainConfig, step: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=config.steps,
        initial=step,
        disable=not config.progress,
        unit="step",
        dynamic_ncols=True,
    )
