"""``zigma demo --video``: a class-conditional video ZigMa trained on moving digits, on a CPU.

The clips are :class:`~zigzag_mamba.train.videos.MovingDigits`: 8 frames of 16x16, each one
real scikit-learn digit moving at a constant velocity and bouncing off the edges; training clips
are made from the digits' 80% split, the clips the scores compare with from the held-out 20%.
The model is a ``video_sst`` ZigMaBackbone (two layers that read each frame in a zigzag, then
one that reads each pixel through time), trained with the default interpolant; the demo samples
a grid with classifier-free guidance (row i = digit i) and scores clips drawn the same way:

- ``frame_accuracy``: how often a digit classifier (:class:`~.demo.DigitClassifier` at 16x16,
  trained on the spot on frames of training clips) reads a frame as the digit asked for;
- ``clip_accuracy``: how often it reads *every* frame of a clip so (the digit stays itself);
- ``speed_*``: the digit's motion, in pixels a frame, from each frame's centre of mass: the mean
  over samples and over held-out real clips, and the 1-D Wasserstein distance between the two
  distributions, beside ``speed_distance_real``, the same distance from as many real training
  clips (what a perfect generator would score with this many clips);
- ``acceleration_*``: the mean change of that motion from one frame to the next, for samples and
  real clips (real clips change it only where they bounce).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zigzag_mamba.train.apps.demo import (
    DemoConfig,
    accuracy,
    fit_demo_model,
    train_digit_classifier,
    write_metrics,
)
from zigzag_mamba.train.threads import torch_threads

#: What ``--video`` changes in the demo's defaults (flags given still win).
VIDEO_DEFAULTS: dict[str, Any] = {"out_dir": "outputs/demo-video", "patch_size": 4}
#: Clips of a grid row (one digit a row) in samples.png and samples.gif.
GRID_COLUMNS = 5


def run_video_demo(config: DemoConfig) -> dict[str, Any]:
    """Train, sample and score on moving digits; write everything to ``config.out_dir``
    (``zigma demo --video``, which starts from :data:`VIDEO_DEFAULTS`)."""
    with torch_threads(config.threads):
        return _run(config)


def _run(config: DemoConfig) -> dict[str, Any]:
    from zigzag_mamba.train.build import model_spec
    from zigzag_mamba.train.videos import MovingDigits
    from zigzag_mamba.viz import draw_orders

    began = time.perf_counter()
    out = Path(config.out_dir)
    train = MovingDigits("train", seed=config.seed)
    test = MovingDigits("test", clips_per_digit=1, seed=config.seed)
    classifier, classifier_accuracy = _frame_classifier(config.seed)
    print(f"frame classifier: {classifier_accuracy:.1%} on frames of held-out real clips")

    frames, _, size, _ = train[0][0].shape
    spec = model_spec(
        "ZigMa-T/1",
        data_shape=tuple(train[0][0].shape),
        num_classes=10,
        cfg_dropout=0.1,
        dim=config.dim,
        depth=config.depth,
        patch_size=config.patch_size,
    )
    trainer, summary = fit_demo_model(
        config, spec, train, began, grid_columns=GRID_COLUMNS, reserve=90.0
    )
    strips = trainer.out_dir / "samples" / f"step_{trainer.step:07d}.png"
    shutil.copyfile(strips, out / "samples.png")
    shutil.copyfile(strips.with_suffix(".gif"), out / "samples.gif")
    tokens = size // config.patch_size
    draw_orders(spec["pattern"], (frames, tokens, tokens), out / "orders.png")
    samples, labels = trainer.sample(10 * config.eval_per_class, seed=config.seed + 7)
    metrics: dict[str, Any] = score_clips(classifier, samples.clamp(-1, 1), labels, test, train)
    write_metrics(out, metrics, trainer, summary, config, began, classifier_accuracy)
    _report(out, metrics)
    return metrics


def _frame_classifier(seed: int):
    """A digit classifier for single frames, trained on every frame of one clip per training
    digit, and its accuracy on every frame of one clip per held-out digit."""
    from zigzag_mamba.train.videos import MovingDigits

    def frames(split: str) -> tuple[Tensor, Tensor]:
        clips, labels = _stack(MovingDigits(split, clips_per_digit=1, seed=seed))
        return clips.flatten(0, 1), labels.repeat_interleave(clips.shape[1])

    images, labels = frames("train")
    classifier = train_digit_classifier(images, labels, epochs=3, seed=seed)
    test_images, test_labels = frames("test")
    return classifier, accuracy(classifier, test_images, test_labels)


def _stack(data, count: int | None = None, *, generator_seed: int = 0) -> tuple[Tensor, Tensor]:
    """``count`` clips of ``data`` drawn without replacement (all when None), stacked:
    (count, T, C, H, W) and their labels (count,)."""
    indices = torch.arange(len(data))
    if count is not None:
        generator = torch.Generator().manual_seed(generator_seed)
        indices = torch.randperm(len(data), generator=generator)[:count]
    clips, labels = zip(*(data[int(i)] for i in indices), strict=True)
    return torch.stack(clips), torch.tensor(labels)


def score_clips(classifier, samples: Tensor, labels: Tensor, test, train) -> dict[str, float]:
    """The module's scores of sample clips (N, T, 1, H, W) asked for ``labels`` (N,), against
    as many real clips of ``test`` (held-out) and ``train``."""
    count, frames = samples.shape[:2]
    with torch.no_grad():
        guesses = classifier(samples.flatten(0, 1)).argmax(dim=1).view(count, frames)
    right = guesses == labels[:, None]
    held_out, _ = _stack(test, min(count, len(test)), generator_seed=1)
    real, _ = _stack(train, min(count, len(train)), generator_seed=2)
    (speed, acceleration), (real_speed, real_acceleration) = _motion(samples), _motion(held_out)
    train_speed = _motion(real)[0]
    return {
        "frame_accuracy": right.float().mean().item(),
        "clip_accuracy": right.all(dim=1).float().mean().item(),
        "speed_mean": speed.mean().item(),
        "speed_mean_real": real_speed.mean().item(),
        "speed_distance": wasserstein_1d(speed, real_speed),
        "speed_distance_real": wasserstein_1d(train_speed, real_speed),
        "acceleration_mean": acceleration.mean().item(),
        "acceleration_mean_real": real_acceleration.mean().item(),
    }


def centre_of_mass(clips: Tensor) -> Tensor:
    """(N, T, 2): each frame's centre of mass (row, column), weighting a pixel by its
    brightness in ``[0, 1]`` (the blank canvas, -1, weighs nothing)."""
    weight = ((clips.float().mean(dim=2) + 1) / 2).clamp(0, 1)  # (N, T, H, W)
    rows = torch.arange(weight.shape[-2], dtype=weight.dtype).view(-1, 1)
    columns = torch.arange(weight.shape[-1], dtype=weight.dtype).view(1, -1)
    total = weight.sum(dim=(-2, -1)).clamp_min(1e-6)
    row = (weight * rows).sum(dim=(-2, -1)) / total
    column = (weight * columns).sum(dim=(-2, -1)) / total
    return torch.stack([row, column], dim=-1)


def _motion(clips: Tensor) -> tuple[Tensor, Tensor]:
    """Speeds (N * (T - 1),) and accelerations (N * (T - 2),), in pixels a frame."""
    velocity = centre_of_mass(clips).diff(dim=1)  # (N, T - 1, 2)
    return velocity.norm(dim=-1).flatten(), velocity.diff(dim=1).norm(dim=-1).flatten()


def wasserstein_1d(a: Tensor, b: Tensor) -> float:
    """The 1-D Wasserstein distance between the empirical distributions of ``a`` and ``b``,
    read off their quantile functions at 512 levels (exact when both have 512 values or a
    divisor of it, close otherwise).

    Example::

        >>> round(wasserstein_1d(torch.zeros(100), torch.ones(100)), 6)
        1.0
    """
    levels = (torch.arange(512, dtype=torch.float64) + 0.5) / 512
    qa = torch.quantile(a.double(), levels, interpolation="lower")
    qb = torch.quantile(b.double(), levels, interpolation="lower")
    return (qa - qb).abs().mean().item()


def _report(out: Path, metrics: dict[str, Any]) -> None:
    print(
        f"trained {metrics['steps']} steps in {metrics['train_seconds']:.0f} s "
        f"({metrics['parameters']:,} parameters); demo took {metrics['wall_seconds']:.0f} s"
    )
    print(
        f"frames read as the digit asked for: {metrics['frame_accuracy']:.1%} (chance: 10%); "
        f"clips with every frame right: {metrics['clip_accuracy']:.1%}\n"
        f"motion: {metrics['speed_mean']:.2f} pixels a frame (real clips: "
        f"{metrics['speed_mean_real']:.2f}); distance between the speed distributions "
        f"{metrics['speed_distance']:.3f} (real clips: {metrics['speed_distance_real']:.3f}); "
        f"mean change of motion a frame {metrics['acceleration_mean']:.2f} (real clips: "
        f"{metrics['acceleration_mean_real']:.2f})"
    )
    for name in ("samples.png", "samples.gif", "orders.png", "loss.csv", "metrics.json"):
        print(f"  {out / name}")
