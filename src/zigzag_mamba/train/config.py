"""The training configuration: one flat dataclass, settable from flags or a YAML/JSON file, and
the helpers every settings dataclass of the commands shares: :func:`option` declares a field, its
help and the values it takes; :class:`Checked` checks them all when the dataclass is built (so
the flags, the config files and the Python API meet the same rules, before any work starts);
:func:`add_flags` makes the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zigzag_mamba.train.interpolant import PATHS, PREDICTIONS, WEIGHTINGS
from zigzag_mamba.train.samplers import ODE_METHODS

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


class OptionError(ValueError):
    """A setting outside what it takes: names the setting, the value and what is allowed."""

    def __init__(self, name: str, value: Any, allowed: str) -> None:
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"{name} must be {allowed}, got {value!r}")

    def for_flags(self) -> str:
        """The same, as the command-line flag says it: ``--log-every 0: must be ...``."""
        return f"--{self.name.replace('_', '-')} {self.value!r}: must be {self.allowed}"


def option(
    default: Any,
    help: str,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    choices: Sequence[str] | None = None,
) -> Any:
    """A dataclass field with a default, the help text its flag shows, and the values it takes:
    of the default's type (an int for an int, any finite number for a float), within the bounds
    given, one of ``choices``."""
    rules = {"at_least": at_least, "above": above, "at_most": at_most, "below": below}
    metadata = {
        "help": help,
        "rules": rules,
        "choices": None if choices is None else tuple(choices),
    }
    return field(default=default, metadata=metadata)


def _kind(value: Any) -> str:
    return type(value).__name__


def _check(name: str, value: Any, default: Any, rules: dict, choices: tuple | None) -> Any:
    """``value`` if it is what the field takes (an int as a float is made a float), else an
    :class:`OptionError`."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise OptionError(name, value, "true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise OptionError(name, value, f"an integer (not {_kind(value)})")
        value = int(value)
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise OptionError(name, value, f"a number (not {_kind(value)})")
        value = float(value)
        if not math.isfinite(value):
            raise OptionError(name, value, "a finite number")
    elif isinstance(default, str) and not isinstance(value, str):
        raise OptionError(name, value, f"a string (not {_kind(value)})")
    if choices is not None and value not in choices:
        raise OptionError(name, value, f"one of {', '.join(choices)}")
    given = [(sign, rules[key]) for key, sign in _BOUNDS.items() if rules.get(key) is not None]
    if not all(_HOLDS[sign](value, bound) for sign, bound in given):
        raise OptionError(name, value, " and ".join(f"{sign} {bound:g}" for sign, bound in given))
    return value


_BOUNDS = {"at_least": ">=", "above": ">", "at_most": "<=", "below": "<"}
_HOLDS = {
    ">=": lambda v, b: v >= b,
    ">": lambda v, b: v > b,
    "<=": lambda v, b: v <= b,
    "<": lambda v, b: v < b,
}


def check_device(name: str, device: str) -> None:
    """``auto``, or a device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    allowed = "auto, cpu, cuda, cuda:N or mps, on a machine that has it"
    if device == "auto":
        return
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(name, device, allowed) from None
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(name, device, f"{allowed} (this PyTorch sees no CUDA device)")
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise OptionError(name, device, f"{allowed} (this machine has {count} CUDA devices)")
    elif kind.type == "mps":
        if not torch.backends.mps.is_available():
            raise OptionError(name, device, f"{allowed} (this machine has no MPS device)")
    elif kind.type != "cpu":
        raise OptionError(name, device, allowed)


class Checked:
    """A settings dataclass whose fields (declared with :func:`option`) are checked when it is
    built; :meth:`check` adds the checks that read several fields."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            rules = f.metadata.get("rules")
            if rules is None:  # a field not declared with option()
                continue
            value = _check(f.name, getattr(self, f.name), f.default, rules, f.metadata["choices"])
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Checks across fields (none by default)."""


@dataclass
class TrainConfig(Checked):
    """Everything the :class:`~zigzag_mamba.train.trainer.Trainer` needs besides model and data.

    Every field is checked when the config is built (:class:`Checked`), so a value that would
    fail late (a sampler that does not exist, a logging interval of 0) fails before training.

    Example::

        >>> TrainConfig(steps=100, batch_size=32).lr
        0.0001
        >>> TrainConfig(sample_method="bogus")
        Traceback (most recent call last):
        ...
        zigzag_mamba.train.config.OptionError: sample_method must be one of euler, heun, ...
    """

    out_dir: str = option("outputs/train", "folder for checkpoints, logs and sample grids")
    steps: int = option(
        10_000, "optimizer steps to train for (in total, counting a resume)", at_least=0
    )
    max_seconds: float = option(
        0.0,
        "stop early after this much training time, ending as at the last step (0: no limit)",
        at_least=0,
    )
    batch_size: int = option(
        64, "global batch per optimizer step (all processes and micro-steps)", at_least=1
    )
    grad_accum: int = option(
        1, "micro-steps whose gradients are summed before each step", at_least=1
    )
    lr: float = option(1e-4, "AdamW learning rate", above=0)
    weight_decay: float = option(
        0.0,
        "AdamW weight decay (never on biases, norms, 1-D and _no_weight_decay parameters)",
        at_least=0,
    )
    beta1: float = option(0.9, "AdamW beta1", at_least=0, below=1)
    beta2: float = option(0.999, "AdamW beta2", at_least=0, below=1)
    warmup_steps: int = option(0, "linear learning-rate warm-up from 0", at_least=0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 disables)", at_least=0)
    ema_decay: float = option(
        0.9999, "decay of the exponential moving average of the weights", at_least=0, at_most=1
    )
    path: str = option("linear", "interpolant path: linear, gvp or vp", choices=PATHS)
    prediction: str = option(
        "velocity", "what the model predicts: velocity, noise or score", choices=PREDICTIONS
    )
    weighting: str = option(
        "none", "loss weighting: none, velocity or likelihood", choices=WEIGHTINGS
    )
    train_eps: float = option(
        1e-5, "distance kept from singular ends of time in training", at_least=0, below=0.5
    )
    sample_eps: float = option(
        1e-3, "distance kept from singular ends of time in sampling", at_least=0, below=0.5
    )
    cfg_dropout: float = option(
        0.1, "probability of training with the null class (for CFG)", at_least=0, below=1
    )
    precision: str = option(
        "auto",
        "auto (bf16 autocast on CUDA when supported), fp32 or bf16",
        choices=("auto", "fp32", "bf16"),
    )
    compile: bool = option(False, "torch.compile the model")
    grad_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    num_workers: int = option(0, "data-loader worker processes", at_least=0)
    seed: int = option(0, "seeds data order, noise, times and label dropout", at_least=0)
    log_every: int = option(10, "steps between rows of loss.csv", at_least=1)
    ckpt_every: int = option(
        1000, "steps between checkpoints (and one at the end; 0: end only)", at_least=0
    )
    sample_every: int = option(
        1000, "steps between sample grids (and one at the end; 0: end only)", at_least=0
    )
    sample_steps: int = option(50, "sampler steps for sample grids", at_least=1)
    sample_method: str = option(
        "heun", "ODE method for sample grids: euler, heun, dopri5, ...", choices=ODE_METHODS
    )
    cfg_scale: float = option(4.0, "classifier-free guidance scale for sample grids", at_least=0)
    grid_columns: int = option(8, "images per row of a sample grid", at_least=1)
    grid_rows: int = option(
        0,
        "rows of a sample grid, row i showing class i (0: one per class up to 16, or 8 rows)",
        at_least=0,
    )
    eval_samples: int = option(
        0, "samples generated for the metric hooks at each sample grid", at_least=0
    )
    vae: str = option(
        "",
        "a diffusers AutoencoderKL (hub name or folder) whose latents the data file holds "
        "(zigma encode): sample grids are decoded to images with it (empty: none)",
    )
    progress: bool = option(True, "show a progress bar")

    def check(self) -> None:
        if not self.out_dir.strip():
            raise OptionError("out_dir", self.out_dir, "a folder name (not empty)")
        if Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise OptionError("out_dir", self.out_dir, "a folder, not a file")
        check_device("device", self.device)

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
class SmallRun(Checked):
    """The recipe of the small ZigMa that ``zigma demo`` and ``zigma ablate`` train on a CPU in
    minutes: their settings dataclasses add their own fields to it."""

    batch_size: int = option(64, "training batch", at_least=1)
    lr: float = option(2e-3, "AdamW learning rate", above=0)
    warmup_steps: int = option(50, "learning-rate warm-up steps", at_least=0)
    ema_decay: float = option(
        0.995,
        "EMA decay (short runs want a short memory; samples and scores use the EMA)",
        at_least=0,
        at_most=1,
    )
    dim: int = option(64, "model width", at_least=1)
    depth: int = option(8, "Mamba blocks (8: each of zigzag8's orders once)", at_least=1)
    patch_size: int = option(2, "patch size (2: one token per 2x2 pixels)", at_least=1)
    sample_steps: int = option(8, "Heun steps per sample (2 model calls each)", at_least=1)
    threads: int = option(
        1,
        "CPU threads for PyTorch and the numba kernels (a second thread slowed this small "
        "model on 2 shared cores)",
        at_least=1,
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
    """Read a YAML (``.yaml``/``.yml``) or JSON (``.json``) file holding one mapping; any other
    file, or one that does not parse to a mapping, is an error naming it."""
    path = Path(path)
    if path.suffix not in CONFIG_SUFFIXES:
        raise ValueError(
            f"config file {path}: the name must end in {', '.join(CONFIG_SUFFIXES)} (JSON or "
            "YAML), so that it is read as what it is"
        )
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            try:
                import yaml
            except ImportError as exc:
                raise ImportError("YAML configs need PyYAML: pip install pyyaml") from exc
            values = yaml.safe_load(text)
    except ImportError:
        raise
    except Exception as exc:  # the parsers' errors differ; each says where it failed
        raise ValueError(f"config file {path} does not parse: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return values
