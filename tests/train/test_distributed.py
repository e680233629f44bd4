import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import TinyData, TinyNet, tiny_config

from zigzag_mamba.train.checkpoint import load_checkpoint
from zigzag_mamba.train.trainer import Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    run = subprocess.run(
        [*command, str(WORKER), str(tmp_path / "ddp")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    torch.manual_seed(0)
    Trainer(TinyNet(), TinyData(), tiny_config(tmp_path / "single", steps=4)).fit()
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    single = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")
    assert ddp["step"] == single["step"] == 4
    assert ddp["data"] == single["data"]
    for key in ("model", "ema"):
        for name, tensor in single[key].items():
            torch.testing.assert_close(
                ddp[key][name], tensor, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}"
            )
    losses = [_losses(tmp_path / run / "loss.csv") for run in ("ddp", "single")]
    assert len(losses[0]) == 2
    torch.testing.assert_close(*losses, rtol=1e-5, atol=0)
    # a run started on 2 processes resumes on 1, from the same data position
    resumed = [_resume(tmp_path / run, 6) for run in ("ddp", "single")]
    for name, tensor in resumed[1]["model"].items():
        torch.testing.assert_close(resumed[0]["model"][name], tensor, rtol=1e-5, atol=1e-6)


def _resume(out_dir, steps):
    torch.manual_seed(0)
    trainer = Trainer(TinyNet(), TinyData(), tiny_config(out_dir, steps=steps))
    trainer.fit(resume="auto")
    return trainer.state_dict()


def _losses(path):
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    return torch.tensor([float(row["loss"]) for row in rows], dtype=torch.float64)
