"""The training configuration: one flat dataclass, settable from flags or a YAML/JSON file, and
the helpers every settings dataclass of the commands shares (:func:`option`, :func:`add_flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and the help text its flag shows."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything the :class:`~zigzag_mamba.train.trainer.Trainer` needs besides model and data.

    Example::

        >>> TrainConfig(steps=100, batch_size=32).lr
        0.0001
    """

    out_dir: str = option("outputs/train", "folder for checkpoints, logs and sample grids")
    steps: int = option(10_000, "optimizer steps to train for (in total, counting a resume)")
    max_seconds: float = option(
        0.0, "stop early after this much training time, ending as at the last step (0: no limit)"
    )
    batch_size: int = option(64, "global batch per optimizer step (all processes and micro-steps)")
    grad_accum: int = option(1, "micro-steps whose gradients are summed before each step")
    lr: float = option(1e-4, "AdamW learning rate")
    weight_decay: float = option(
        0.0, "AdamW weight decay (never on biases, norms, 1-D and _no_weight_decay parameters)"
    )
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.999, "AdamW beta2")
    warmup_steps: int = option(0, "linear learning-rate warm-up from 0")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 disables)")
    ema_decay: float = option(0.9999, "decay of the exponential moving average of the weights")
    path: str = option("linear", "interpolant path: linear, gvp or vp")
    prediction: str = option("velocity", "what the model predicts: velocity, noise or score")
    weighting: str = option("none", "loss weighting: none, velocity or likelihood")
    train_eps: float = option(1e-5, "distance kept from singular ends of time in training")
    sample_eps: float = option(1e-3, "distance kept from singular ends of time in sampling")
    cfg_dropout: float = option(0.1, "probability of training with the null class (for CFG)")
    precision: str = option("auto", "auto (bf16 autocast on CUDA when supported), fp32 or bf16")
    compile: bool = option(False, "torch.compile the model")
    grad_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    num_workers: int = option(0, "data-loader worker processes")
    seed: int = option(0, "seeds data order, noise, times and label dropout")
    log_every: int = option(10, "steps between rows of loss.csv")
    ckpt_every: int = option(1000, "steps between checkpoints (and one at the end; 0: end only)")
    sample_every: int = option(1000, "steps between sample grids (and one at the end; 0: end only)")
    sample_steps: int = option(50, "sampler steps for sample grids")
    sample_method: str = option("heun", "ODE method for sample grids: euler, heun, dopri5, ...")
    cfg_scale: float = option(4.0, "classifier-free guidance scale for sample grids")
    grid_columns: int = option(8, "images per row of a sample grid")
    grid_rows: int = option(
        0, "rows of a sample grid, row i showing class i (0: one per class up to 16, or 8 rows)"
    )
    eval_samples: int = option(0, "samples generated for the metric hooks at each sample grid")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1 or self.steps < 0:
            raise ValueError("batch_size and grad_accum must be positive and steps >= 0")
        if self.grid_columns < 1 or self.grid_rows < 0:
            raise ValueError("grid_columns must be positive and grid_rows >= 0 (0: automatic)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, rejecting unknown keys (typos would otherwise be ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_shared(cls, settings: Any, **overrides: Any) -> TrainConfig:
        """The fields ``settings`` (another settings dataclass) shares with TrainConfig by name,
        then ``overrides``.

        Example::

            >>> @dataclass
            ... class Quick:
            ...     steps: int = 20
            ...     lr: float = 1e-3
            ...     threads: int = 1          # not a training option: left out
            >>> config = TrainConfig.from_shared(Quick(), out_dir="outputs/quick")
            >>> config.steps, config.lr, config.out_dir
            (20, 0.001, 'outputs/quick')
        """
        names = {f.name for f in dataclasses.fields(cls)}
        shared = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
        return cls(**{**{k: v for k, v in shared.items() if k in names}, **overrides})


@dataclass
class SmallRun:
    """The recipe of the small ZigMa that ``zigma demo`` and ``zigma ablate`` train on a CPU in
    minutes: their settings dataclasses add their own fields to it."""

    batch_size: int = option(64, "training batch")
    lr: float = option(2e-3, "AdamW learning rate")
    warmup_steps: int = option(50, "learning-rate warm-up steps")
    ema_decay: float = option(
        0.995, "EMA decay (short runs want a short memory; samples and scores use the EMA)"
    )
    dim: int = option(64, "model width")
    depth: int = option(8, "Mamba blocks (8: each of zigzag8's orders once)")
    patch_size: int = option(2, "patch size (2: one token per 2x2 pixels)")
    sample_steps: int = option(8, "Heun steps per sample (2 model calls each)")
    threads: int = option(
        1,
        "CPU threads for PyTorch and the numba kernels (a second thread slowed this small "
        "model on 2 shared cores)",
    )
    progress: bool = option(True, "show progress bars")


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, settings: type) -> None:
    """One flag per field of the dataclass ``settings`` (``--name-with-dashes``), with the
    field's help and default in its help text; a flag not given sets nothing, so the parsed
    namespace holds only what was given.

    Booleans get ``--x/--no-x``; lists take one or more values of their items' type.
    """
    defaults = settings()
    for f in dataclasses.fields(settings):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        kwargs: dict[str, Any] = {
            "default": argparse.SUPPRESS,
            "help": f"{f.metadata['help']} (default: {shown})".replace("%", "%%"),
        }
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kwargs.update(
                type=type(default[0]), nargs="+", metavar=f.name.removesuffix("s").upper()
            )
        else:
            kwargs["type"] = type(default)
        parser.add_argument(flag, **kwargs)


def given(args: argparse.Namespace, settings: type) -> dict[str, Any]:
    """The fields of the dataclass ``settings`` that the flags of :func:`add_flags` set."""
    names = {f.name for f in dataclasses.fields(settings)}
    return {k: v for k, v in vars(args).items() if k in names}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file holding one mapping."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise ImportError("YAML configs need PyYAML: pip install pyyaml") from exc
        values = yaml.safe_load(text)
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values")
    return values
