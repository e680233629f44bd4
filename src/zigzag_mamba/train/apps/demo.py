"""``zigma demo``: a class-conditional ZigMa trained on real handwritten digits, on a CPU.

The data are the 1797 8x8 digits that scikit-learn ships (80% to train, a stratified 20% held
out). The demo trains a small zigzag8 ZigMaBackbone (2x2 patches, so a 4x4 grid of tokens and
8 blocks, one per zigzag order) with the default interpolant (linear path, velocity, plain
MSE), samples a 10x10 grid with classifier-free guidance (row i = digit i), and
scores samples with a small CNN trained on the spot on the same training digits:

- ``class_accuracy``: how often the CNN recognises a sample as the digit it was asked for;
- ``frechet_distance``: between samples and the held-out real digits, in the CNN's feature
  space, beside ``frechet_distance_real``, the same distance from as many real training digits
  (what a perfect generator would score with this many samples).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zigzag_mamba.train.config import SmallRun, TrainConfig, option
from zigzag_mamba.train.threads import torch_threads


@dataclass
class DemoConfig(SmallRun):
    """Settings of ``zigma demo``; the defaults fit in 10 minutes on 2 CPU cores (patch 2 makes
    a 4x4 grid of tokens from an 8x8 digit)."""

    out_dir: str = option("outputs/demo", "where samples.png, orders.png, loss.csv, ... go")
    steps: int = option(1200, "training steps (fewer if max_minutes runs out first)", at_least=1)
    max_minutes: float = option(10.0, "wall-clock budget for the whole demo", above=0)
    cfg_scale: float = option(2.0, "classifier-free guidance scale for the samples", at_least=0)
    eval_per_class: int = option(50, "samples per digit for the scores", at_least=1)
    seed: int = option(0, "seed for everything", at_least=0)


class DigitClassifier(nn.Module):
    """A small CNN for ``size x size`` digits (8: scikit-learn's own; even sizes); ``features``
    gives the 128-d space for Frechet distances."""

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (size // 2) ** 2, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_digit_classifier(
    images: Tensor, labels: Tensor, *, epochs: int = 10, seed: int = 0
) -> DigitClassifier:
    """Fit :class:`DigitClassifier` to images in ``[-1, 1]`` of shape (N, 1, S, S)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(images.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(64):
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(classifier: nn.Module, images: Tensor, labels: Tensor) -> float:
    return (classifier(images).argmax(dim=1) == labels).float().mean().item()


def score_samples(
    classifier: DigitClassifier,
    samples: Tensor,
    labels: Tensor,
    held_out: Tensor,
    train_images: Tensor,
) -> dict[str, float]:
    """Class accuracy of ``samples`` and their Frechet distance to ``held_out`` (see module)."""
    from zigzag_mamba.train.metrics import FrechetDistance

    fd = FrechetDistance(classifier.features, held_out)
    real = train_images[torch.randperm(len(train_images), generator=_gen(1))[: len(samples)]]
    return {
        "class_accuracy": accuracy(classifier, samples, labels),
        "frechet_distance": fd(samples)["fd"],
        "frechet_distance_real": fd(real)["fd"],
    }


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_demo(config: DemoConfig | None = None) -> dict[str, Any]:
    """Train, sample, draw and score; write everything to ``config.out_dir``.

    Example::

        >>> # Not run here: even 50 steps, sampling and scoring take about a minute on a CPU
        >>> # (tests/train/test_demo.py runs it).
        >>> metrics = run_demo(DemoConfig(steps=50, out_dir="outputs/quick"))  # doctest: +SKIP
        >>> 0.0 <= metrics["class_accuracy"] <= 1.0  # doctest: +SKIP
        True
    """
    config = config or DemoConfig()
    with torch_threads(config.threads):
        return _run(config)


def _run(config: DemoConfig) -> dict[str, Any]:
    from zigzag_mamba.train.build import model_spec
    from zigzag_mamba.train.data import DigitsDataset
    from zigzag_mamba.viz import draw_orders

    began = time.perf_counter()
    out = Path(config.out_dir)
    train, test = DigitsDataset("train", seed=config.seed), DigitsDataset("test", seed=config.seed)
    classifier = train_digit_classifier(train.images, train.labels, seed=config.seed)
    classifier_accuracy = accuracy(classifier, test.images, test.labels)
    print(f"digit classifier: {classifier_accuracy:.1%} on {len(test)} held-out real digits")

    spec = model_spec(
        "ZigMa-T/1",
        data_shape=(1, 8, 8),
        num_classes=10,
        cfg_dropout=0.1,
        dim=config.dim,
        depth=config.depth,
        patch_size=config.patch_size,
        pattern="zigzag8",
    )
    trainer, summary = fit_demo_model(config, spec, train, began, grid_columns=10, reserve=75.0)
    grid = trainer.out_dir / "samples" / f"step_{trainer.step:07d}.png"
    shutil.copyfile(grid, out / "samples.png")
    tokens = 8 // config.patch_size
    draw_orders("zigzag8", (tokens, tokens), out / "orders.png")
    samples, labels = trainer.sample(10 * config.eval_per_class, seed=config.seed + 7)
    metrics: dict[str, Any] = score_samples(
        classifier, samples.clamp(-1, 1), labels, test.images, train.images
    )
    write_metrics(out, metrics, trainer, summary, config, began, classifier_accuracy)
    _report(out, metrics)
    return metrics


def fit_demo_model(
    config: DemoConfig,
    spec: dict[str, Any],
    data,
    began: float,
    *,
    grid_columns: int,
    reserve: float,
):
    """Build the model ``spec`` describes (seeded) and train it on ``data`` within the demo's
    minutes, keeping ``reserve`` seconds for what follows; returns the trainer and its summary
    (with ``train_seconds``, counted from ``began``)."""
    from zigzag_mamba.train.build import build_model
    from zigzag_mamba.train.trainer import Trainer

    torch.manual_seed(config.seed)
    train_config = TrainConfig.from_shared(
        config,
        max_seconds=max(10.0, config.max_minutes * 60 - reserve - (time.perf_counter() - began)),
        log_every=25,
        ckpt_every=0,
        sample_every=0,
        grid_rows=10,
        grid_columns=grid_columns,
        device="cpu",
    )
    trainer = Trainer(build_model(spec), data, train_config, model_config=spec)
    summary = trainer.fit()
    summary["train_seconds"] = time.perf_counter() - began
    return trainer, summary


def write_metrics(
    out: Path,
    metrics: dict[str, Any],
    trainer,
    summary: dict[str, Any],
    config: DemoConfig,
    began: float,
    classifier_accuracy: float,
) -> None:
    """Add what every demo records (the run, its time, the model, the options) to ``metrics``
    and write them to ``out/metrics.json``."""
    metrics.update(
        classifier_test_accuracy=classifier_accuracy,
        steps=trainer.step,
        final_loss=summary["loss"],
        train_seconds=round(summary["train_seconds"], 1),
        wall_seconds=round(time.perf_counter() - began, 1),
        parameters=sum(p.numel() for p in trainer.model.parameters()),
        model=trainer.model_config,
        demo=asdict(config),
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def _report(out: Path, metrics: dict[str, Any]) -> None:
    print(
        f"trained {metrics['steps']} steps in {metrics['train_seconds']:.0f} s "
        f"({metrics['parameters']:,} parameters); demo took {metrics['wall_seconds']:.0f} s"
    )
    print(
        f"class accuracy of guided samples: {metrics['class_accuracy']:.1%} (chance: 10%)\n"
        f"Frechet distance to held-out digits (classifier features): "
        f"{metrics['frechet_distance']:.2f} (real digits: {metrics['frechet_distance_real']:.2f})"
    )
    for name in ("samples.png", "orders.png", "loss.csv", "metrics.json"):
        print(f"  {out / name}")
