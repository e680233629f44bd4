"""A resumable stream of micro-batches, sharded over processes.

Each process reads every ``world``-th index of one seeded permutation per epoch (a
DistributedSampler), so ``world`` processes with micro-batches of ``m`` see, between them,
exactly the samples one process with micro-batches of ``world * m`` sees, and rank ``r`` holds
rows ``r, r + world, ...`` of that larger batch. The stream's position (epoch, samples taken)
is part of a checkpoint, so a resumed run reads the batches an uninterrupted one would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class _SkippingSampler(DistributedSampler):
    """A DistributedSampler that can start part-way through an epoch."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return super().__len__() - self.skip


@dataclass
class Shard:
    """Which process this is, out of how many."""

    rank: int = 0
    world: int = 1


class BatchStream:
    """An endless iterator of ``(x, labels)`` micro-batches for one process.

    Example::

        >>> from zigzag_mamba.train.data import DigitsDataset
        >>> stream = BatchStream(DigitsDataset(), micro_batch=32, seed=0)
        >>> x, y = next(stream)
        >>> x.shape, stream.state_dict()
        (torch.Size([32, 1, 8, 8]), {'epoch': 0, 'samples': 32})
    """

    def __init__(
        self,
        dataset: Dataset,
        micro_batch: int,
        *,
        seed: int = 0,
        shard: Shard | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.micro_batch = micro_batch
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        shard = shard or Shard()
        self.world = shard.world
        self.sampler = _SkippingSampler(
            dataset,
            num_replicas=shard.world,
            rank=shard.rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.per_epoch = self.sampler.num_samples // micro_batch
        if self.per_epoch == 0:
            raise ValueError(
                f"the data set has {len(dataset)} samples, fewer than one global micro-batch "
                f"({micro_batch * shard.world}); lower the batch size"
            )
        self.epoch = 0
        self.taken = 0
        self._iterator: Iterator | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self):
        if self.taken == self.per_epoch:
            self.epoch, self.taken, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self._iterator = self._start_epoch()
        self.taken += 1
        return next(self._iterator)

    def _start_epoch(self) -> Iterator:
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip = self.taken * self.micro_batch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=self.micro_batch,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        return iter(loader)

    def state_dict(self) -> dict[str, int]:
        """The position as (epoch, samples taken by all processes), so that a run can resume
        on a different number of processes with the same global micro-batch."""
        return {"epoch": self.epoch, "samples": self.taken * self.micro_batch * self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        per_batch = self.micro_batch * self.world
        if state["samples"] % per_batch:
            raise ValueError(
                f"cannot resume at sample {state['samples']} of an epoch with global "
                f"micro-batches of {per_batch}; keep batch_size / grad_accum as it was"
            )
        self.epoch, self.taken = int(state["epoch"]), int(state["samples"]) // per_batch
        self._iterator = None


def setup_distributed(device: str) -> tuple[Shard, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if cuda:
        index = int(os.environ.get("LOCAL_RANK", "0")) if device in ("auto", "cuda") else None
        chosen = torch.device("cuda", index) if index is not None else torch.device(device)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Shard(rank, world), chosen
