"""Trains the tiny stand-in model for 4 steps; run under torchrun by test_distributed.py."""

import sys

import torch
import torch.distributed as dist
from train_helpers import TinyData, TinyNet, tiny_config

from zigzag_mamba.train.trainer import Trainer


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    Trainer(TinyNet(), TinyData(), tiny_config(out_dir, steps=4)).fit()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
