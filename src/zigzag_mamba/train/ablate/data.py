"""The images an ablation trains on, and the fixed yardstick it scores every run with."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from zigzag_mamba.train.ablate.config import (
    EVAL_SEED,
    FEATURE_SCALES,
    FEATURE_WIDTH,
    AblationConfig,
    AblationError,
)
from zigzag_mamba.train.ablate.features import RandomConvFeatures
from zigzag_mamba.train.interpolant import Interpolant
from zigzag_mamba.train.metrics import GaussianStats, feature_stats, frechet_distance

# Fixes which images of a folder (or which digits) are held out: the same for every seed.
SPLIT_SEED = 0
# Training-region photo crops the Frechet distance of photo samples is measured against.
REFERENCE_CROPS = 8192


class Unlabelled(Dataset):
    """A view of ``dataset`` (optionally only ``indices``) with every label 0 and no classes.

    Ablations train unconditional models: a token order's effect on the denoiser needs no labels,
    and dropping them keeps photos, digits and folders on one footing.
    """

    num_classes = 0

    def __init__(self, dataset: Dataset, indices: Tensor | None = None) -> None:
        self.dataset = dataset
        self.indices = indices.tolist() if indices is not None else None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        inner = self.indices[index] if self.indices is not None else index
        return self.dataset[inner][0], 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


@dataclass
class StudyData:
    """The training set of each seed, the held-out images and the Frechet reference images.

    Images are (N, C, H, W) in ``[-1, 1]``. The Frechet distance is measured against images of
    the distribution the models were trained on: the held-out images where they are a random
    split of the data (digits, folders), and crops of the training region for the photos,
    whose held-out tiles show other parts of two scenes (see docs/ablation.md).
    """

    held_out: Tensor
    fd_reference: Tensor
    train_set: Callable[[int], Dataset]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.held_out.shape[1:])


def open_study_data(config: AblationConfig) -> StudyData:
    """``photos``, ``digits`` or an image folder, split into training and held-out images.

    Example::

        >>> data = open_study_data(AblationConfig(data="photos"))
        >>> data.shape, len(data.train_set(0))
        ((3, 16, 16), 32768)
    """
    if config.data == "photos":
        return _photos(config)
    if config.data == "digits":
        return _digits(config)
    return _folder(config)


def _photos(config: AblationConfig) -> StudyData:
    from zigzag_mamba.train.ablate.photos import PhotoCrops

    size, scale = config.image_size, config.photo_scale
    try:
        held_out = PhotoCrops("eval", size, scale=scale).images()
    except ValueError as exc:
        raise AblationError(str(exc)) from exc
    reference = PhotoCrops("train", size, scale=scale, count=REFERENCE_CROPS, seed=EVAL_SEED)
    return StudyData(
        held_out,
        reference.images(),
        lambda seed: PhotoCrops("train", size, scale=scale, count=config.train_crops, seed=seed),
    )


def _digits(config: AblationConfig) -> StudyData:
    from zigzag_mamba.train.data import DigitsDataset

    options: dict[str, Any] = {"holdout": config.holdout, "seed": SPLIT_SEED}
    train = Unlabelled(DigitsDataset("train", config.image_size, **options))
    held_out = DigitsDataset("test", config.image_size, **options).images
    return StudyData(held_out, held_out, lambda seed: train)


def _folder(config: AblationConfig) -> StudyData:
    from zigzag_mamba.train.data import ImageFolder

    path = Path(config.data)
    try:
        folder = ImageFolder(path, config.image_size)
    except (FileNotFoundError, ValueError) as exc:
        raise AblationError(f"cannot use the data folder {path}: {exc}") from exc
    count = len(folder)
    held = max(2, round(config.holdout * count))
    if count - held < 2:
        raise AblationError(
            f"the data folder {path} has {count} images; an ablation needs at least 2 to train "
            f"on and 2 to hold out"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED))
    try:
        held_out = torch.stack([folder[i][0] for i in order[:held].tolist()])
    except ValueError as exc:
        raise AblationError(f"cannot use the data folder {path}: {exc}") from exc
    train = Unlabelled(folder, order[held:])
    return StudyData(held_out, held_out, lambda seed: train)


def evenly_spaced(count: int, wanted: int) -> Tensor:
    """``min(wanted, count)`` indices spread evenly over ``range(count)``."""
    if wanted >= count:
        return torch.arange(count)
    return torch.linspace(0, count - 1, wanted, dtype=torch.float64).round().long()


class Evaluation:
    """The fixed yardstick: the same images, times, noise and features for every run.

    - ``heldout_loss``: the interpolant loss of the EMA weights on ``eval_images`` held-out
      images, each at every point of a grid of ``eval_times`` times (the midpoints of equal
      parts of the training interval), with noise drawn once from :data:`EVAL_SEED`. Averaged
      over the grid it estimates the training objective on unseen images, with stratified
      times and no fresh randomness, so two runs differ only by their weights.
    - ``fd``: the Frechet distance between ``fd_samples`` EMA samples (Heun, from noise drawn
      from :data:`EVAL_SEED`) and the reference images (:class:`StudyData`), in the features of
      a fixed random conv network (:class:`~zigzag_mamba.train.ablate.features.RandomConvFeatures`),
      each feature divided by its standard deviation over the reference images so that every
      feature counts alike (otherwise the few with the largest spread decide the distance).
    """

    def __init__(self, data: StudyData, config: AblationConfig, interpolant: Interpolant) -> None:
        self.images = data.held_out[evenly_spaced(len(data.held_out), config.eval_images)]
        t0, t1 = interpolant.train_interval()
        grid = (torch.arange(config.eval_times, dtype=torch.float64) + 0.5) / config.eval_times
        self.times = (t0 + (t1 - t0) * grid).float()
        g = torch.Generator().manual_seed(EVAL_SEED)
        self.noise = torch.randn((config.eval_times, *self.images.shape), generator=g)
        self.features = RandomConvFeatures(
            data.shape[0], FEATURE_WIDTH, FEATURE_SCALES, seed=EVAL_SEED
        )
        reference = self._features(data.fd_reference)
        self.feature_scale = reference.std(dim=0).clamp_min(1e-12)
        self.reference = feature_stats(reference / self.feature_scale)
        self.fd_samples = config.fd_samples

    def _features(self, images: Tensor) -> Tensor:
        return self.features(images.detach().cpu().clamp(-1, 1))

    def stats(self, images: Tensor) -> GaussianStats:
        """Gaussian statistics of ``images`` in the standardised feature space."""
        return feature_stats(self._features(images) / self.feature_scale)

    def frechet(self, images: Tensor) -> float:
        """Frechet distance of ``images`` to the reference images in the fixed feature space."""
        return frechet_distance(self.stats(images), self.reference)

    @torch.no_grad()
    def heldout_loss(
        self, model: nn.Module, interpolant: Interpolant, device: torch.device, batch: int = 256
    ) -> list[float]:
        """The held-out loss at each time of the grid."""
        model_fn = lambda x_t, t: model(x_t, t)
        losses = []
        for k, t_value in enumerate(self.times.tolist()):
            total = 0.0
            for start in range(0, len(self.images), batch):
                x = self.images[start : start + batch].to(device)
                noise = self.noise[k, start : start + batch].to(device)
                t = torch.full((len(x),), t_value, device=device)
                total += interpolant.loss(model_fn, x, noise=noise, t=t).item() * len(x)
            losses.append(total / len(self.images))
        return losses

    def score(self, trainer) -> dict[str, Any]:
        """Score a trained :class:`~zigzag_mamba.train.trainer.Trainer`'s EMA weights."""
        by_t = self.heldout_loss(trainer.ema.module, trainer.interpolant, trainer.device)
        samples, _ = trainer.sample(self.fd_samples, seed=EVAL_SEED)
        return {
            "heldout_loss": math.fsum(by_t) / len(by_t),
            "fd": self.frechet(samples),
            "heldout_loss_by_t": by_t,
            "times": self.times.tolist(),
        }
