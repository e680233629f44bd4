"""Running an ablation: one training run per (pattern, seed), each scored on the same yardstick.

Runs go seed by seed (every pattern with seed 0, then every pattern with seed 1, ...), so a
study stopped early still holds complete, paired sets of seeds. A run's result is written
atomically to ``runs/<pattern>/seed_<seed>/result.json`` when it finishes; a run with that file
is never redone. A run in progress checkpoints every quarter of its steps and, if interrupted,
continues from its last checkpoint (bit-exact on a CPU), which is deleted once it is finished.
"""

from __future__ import annotations

import contextlib
import csv
import json
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

from zigzag_mamba.modules.block import MIXERS
from zigzag_mamba.orders import as_grid, pattern_family
from zigzag_mamba.train.ablate.config import (
    NO_PATTERN,
    AblationConfig,
    AblationError,
    all_patterns,
    check_protocol,
    protocol,
    split_arm,
)
from zigzag_mamba.train.ablate.data import Evaluation, StudyData, evenly_spaced, open_study_data
from zigzag_mamba.train.ablate.report import write_reports
from zigzag_mamba.train.checkpoint import write_atomically
from zigzag_mamba.train.config import TrainConfig
from zigzag_mamba.train.lock import RunLock
from zigzag_mamba.train.threads import torch_threads


def run_ablation(config: AblationConfig | None = None) -> dict[str, Any]:
    """Train and score every (pattern, seed) not yet done; write the tables and the plot.

    Returns what ``runs.json`` holds: the protocol, the reference scores, every run and the
    per-pattern summary.

    Example::

        >>> from zigzag_mamba.train.ablate import config_with_preset
        >>> config = config_with_preset("quick", out_dir="outputs/quick")
        >>> # Not run here: it trains two models (tests/train/test_ablate.py runs it).
        >>> report = run_ablation(config)  # doctest: +SKIP
        >>> [run["pattern"] for run in report["runs"]]  # doctest: +SKIP
        ['sweep', 'zigzag8']
    """
    config = config or AblationConfig()
    with torch_threads(config.threads):
        return _run(config)


def check_settings(config: AblationConfig) -> list[str]:
    """Check what can be checked before any data is read; return the patterns to run."""
    if not config.seeds:
        raise AblationError("no seeds given")
    seeds = list(dict.fromkeys(config.seeds))
    if config.intervals and len(seeds) < 2:
        raise AblationError(
            f"confidence intervals need at least 2 seeds, got {len(seeds)}; pass more seeds "
            "or turn intervals off (--no-intervals)"
        )
    patterns = config.resolved_patterns()
    # The baseline's model is built even when it is not run: it sets the protocol's model.
    arms = [*patterns, config.baseline]
    unknown = [p for p in arms if not _known(split_arm(p)[0])]
    if unknown:
        raise AblationError(
            f"unknown scan pattern(s) {', '.join(map(repr, unknown))} (--patterns, "
            f"--baseline); choose from {', '.join(all_patterns())}, or 'all'"
        )
    mixers = {split_arm(p)[1] for p in arms} - {None}
    if mixers - set(MIXERS):
        raise AblationError(
            f"unknown mixer(s) {', '.join(map(repr, sorted(mixers - set(MIXERS))))} in "
            f"PATTERN+MIXER; choose from {', '.join(MIXERS)}"
        )
    return patterns


def _known(pattern: str) -> bool:
    # Video patterns are known names; check_fit says why they do not suit images.
    return pattern in all_patterns() or re.fullmatch(r"video_[st]+", pattern) is not None


def check_fit(patterns: list[str], shape: tuple[int, ...], patch_size: int) -> tuple[int, int]:
    """The token grid of images of ``shape`` (C, H, W); every pattern must give orders for it."""
    _, height, width = shape
    if height % patch_size or width % patch_size:
        raise AblationError(
            f"{height}x{width} images do not split into {patch_size}x{patch_size} patches"
        )
    grid = as_grid((height // patch_size, width // patch_size))
    for arm in patterns:
        pattern = split_arm(arm)[0]
        if pattern == NO_PATTERN:
            continue
        try:
            pattern_family(pattern, grid)
        except (ValueError, TypeError) as exc:
            raise AblationError(
                f"pattern {pattern!r} does not fit the data's {grid[0]}x{grid[1]} token grid "
                f"({height}x{width} images, patch {patch_size}): {exc}"
            ) from exc
    return grid


def model_spec(config: AblationConfig, shape: tuple[int, ...], arm: str) -> dict[str, Any]:
    """The ZigMaBackbone of a run: the same for every arm but for its pattern, its mixer and,
    with ``match="params"``, its depth (:func:`matched_depth`)."""
    depth = config.depth if config.match == "none" else matched_depth(config, shape, arm)
    return _spec(config, shape, arm, depth)


def matched_depth(config: AblationConfig, shape: tuple[int, ...], arm: str) -> int:
    """The depth whose parameter count is nearest the baseline's at ``config.depth`` (the
    shallower of two equally near)."""
    target = _parameters(_spec(config, shape, config.baseline, config.depth))
    counts = {}
    for depth in range(1, 4 * config.depth + 1):
        counts[depth] = _parameters(_spec(config, shape, arm, depth))
        if counts[depth] >= target:
            break
    return min(counts, key=lambda depth: (abs(counts[depth] - target), depth))


def _spec(config: AblationConfig, shape: tuple[int, ...], arm: str, depth: int) -> dict[str, Any]:
    from zigzag_mamba.train.build import model_spec as base_spec

    pattern, mixer = split_arm(arm)
    return base_spec(
        "ZigMa-T/1",
        data_shape=shape,
        num_classes=0,
        cfg_dropout=0.0,
        dim=config.dim,
        depth=depth,
        patch_size=config.patch_size,
        pattern=None if pattern == NO_PATTERN else pattern,
        **({} if mixer is None else {"mixer": mixer}),
    )


def _parameters(spec: dict[str, Any]) -> int:
    from zigzag_mamba.train.build import build_model

    return sum(p.numel() for p in build_model(spec).parameters())


def build_run_model(config: AblationConfig, shape: tuple[int, ...], pattern: str, seed: int):
    """The initial model of a run; an order has no parameters: one seed, one set of weights."""
    from zigzag_mamba.train.build import build_model

    spec = model_spec(config, shape, pattern)
    torch.manual_seed(seed)
    return build_model(spec), spec


def train_config(config: AblationConfig, seed: int, run_dir: Path) -> TrainConfig:
    return TrainConfig.from_shared(
        config,
        out_dir=str(run_dir),
        cfg_dropout=0.0,
        seed=seed,
        log_every=max(1, min(10, config.steps // 20)),
        ckpt_every=max(1, config.steps // 4),
        sample_every=0,
        sample_method="heun",
        grid_rows=4,
        grid_columns=8,
    )


def _run(config: AblationConfig) -> dict[str, Any]:
    patterns = check_settings(config)
    seeds = list(dict.fromkeys(config.seeds))
    data = open_study_data(config)
    check_fit([*patterns, config.baseline], data.shape, config.patch_size)
    available = len(data.train_set(seeds[0]))
    if available < config.batch_size:
        raise AblationError(
            f"{available} training images are fewer than one batch of {config.batch_size}; "
            "lower --batch-size"
        )
    out = Path(config.out_dir)
    # One writer per results folder, from its first write on.
    with RunLock(out):
        # The baseline's model: with matched depths, the arms' depths follow from it.
        spec = _spec(config, data.shape, config.baseline, config.depth)
        check_protocol(out, protocol(config, spec, train_config(config, 0, out).to_dict()))

        from zigzag_mamba.train.interpolant import Interpolant

        evaluation = Evaluation(data, config, Interpolant())
        reference = _reference(out, data, evaluation, config)
        runs = [(pattern, seed) for seed in seeds for pattern in patterns]
        done = [result_path(out, p, s).is_file() for p, s in runs]
        results: list[dict[str, Any]] = []
        bar = _progress(config, total=len(runs), initial=sum(done))
        try:
            for (pattern, seed), finished in zip(runs, done, strict=True):
                if finished:
                    results.append(json.loads(result_path(out, pattern, seed).read_text()))
                    continue
                bar.set_description(f"{pattern}, seed {seed}")
                results.append(train_and_score(config, pattern, seed, data, evaluation, out))
                write_reports(out, results, reference, config)
                bar.update(1)
        finally:
            bar.close()
        return write_reports(out, results, reference, config)


def result_path(out: Path, pattern: str, seed: int) -> Path:
    return out / "runs" / pattern / f"seed_{seed}" / "result.json"


def train_and_score(
    config: AblationConfig,
    pattern: str,
    seed: int,
    data: StudyData,
    evaluation: Evaluation,
    out: Path,
) -> dict[str, Any]:
    """Train one run (continuing its checkpoint if there is one), score it, save the result."""
    from zigzag_mamba.train.checkpoint import previous_path, remove_checkpoint
    from zigzag_mamba.train.trainer import Trainer

    path = result_path(out, pattern, seed)
    model, spec = build_run_model(config, data.shape, pattern, seed)
    flops = training_flops(model, data.shape, config.batch_size)
    trainer = Trainer(
        model, data.train_set(seed), train_config(config, seed, path.parent), model_config=spec
    )
    began = time.perf_counter()
    summary = trainer.fit(resume="auto")
    trained = time.perf_counter()
    scores = evaluation.score(trainer)
    result = {
        "pattern": pattern,
        "seed": seed,
        "steps": summary["step"],
        **scores,
        **_loss_curve(path.parent / "loss.csv"),
        "train_seconds": round(trained - began, 2),
        "eval_seconds": round(time.perf_counter() - trained, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "depth": spec["depth"],
        "train_flops": flops,
        "threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    write_atomically(path, json.dumps(result, indent=2) + "\n")
    # The checkpoints only serve to finish an interrupted run.
    for checkpoint in (trainer.checkpoint_path, previous_path(trainer.checkpoint_path)):
        remove_checkpoint(checkpoint)
    with contextlib.suppress(OSError):
        trainer.checkpoint_path.parent.rmdir()
    return result


def training_flops(model: torch.nn.Module, shape: tuple[int, ...], batch_size: int) -> int:
    """Model FLOPs of one training step's forward and backward (``torch.utils.flop_counter``'s
    count of matrix products and convolutions, with the library's ops' formulas), on a batch of
    zeros; the model's gradients are cleared afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    from zigzag_mamba.ops import FLOP_FORMULAS

    x = torch.zeros(batch_size, *shape)
    t = torch.full((batch_size,), 0.5)
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with counter:
        model(x, t).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _loss_curve(log: Path) -> dict[str, Any]:
    """The training loss as logged, and its mean over the last tenth of the rows."""
    with open(log, newline="") as file:
        rows = [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(file)]
    tail = [loss for _, loss in rows[-max(1, len(rows) // 10) :]]
    return {
        "final_train_loss": sum(tail) / len(tail),
        "loss_curve": {"step": [s for s, _ in rows], "loss": [loss for _, loss in rows]},
    }


def _reference(
    out: Path, data: StudyData, evaluation: Evaluation, config: AblationConfig
) -> dict[str, Any]:
    """Scores of real images, for scale: what a generator of the training images would get."""
    train = data.train_set(0)
    images = torch.stack(
        [train[i][0] for i in evenly_spaced(len(train), config.fd_samples).tolist()]
    )
    reference = {
        "fd_training_images": evaluation.frechet(images),
        "fd_held_out_images": evaluation.frechet(data.held_out),
        "training_images": len(images),
        "reference_images": len(data.fd_reference),
        "held_out_images": len(data.held_out),
        "heldout_loss_images": len(evaluation.images),
        "times": evaluation.times.tolist(),
    }
    write_atomically(out / "reference.json", json.dumps(reference, indent=2) + "\n")
    return reference


def _versions() -> dict[str, str]:
    from zigzag_mamba import __version__

    return {
        "zigzag_mamba": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _progress(config: AblationConfig, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, unit="run", disable=not config.progress, dynamic_ncols=True
    )
