"""What an ablation runs (:class:`AblationConfig`), its presets, and the protocol it records.

The *protocol* is everything a run's numbers depend on apart from its pattern and seed: the
data, the model, the training recipe and the evaluation. It is written to ``protocol.json`` in
the results folder, and a later call into the same folder must match it, so that runs in one
table were all made the same way. Patterns and seeds may be added to a folder; the report
settings (baseline, intervals) and the number of threads are not part of it; the kind of device
is (noise drawn on a GPU differs from noise drawn on a CPU).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zigzag_mamba.orders import NO_PATTERN, list_patterns
from zigzag_mamba.train.config import SmallRun, check_device, option

#: Seeds the evaluation noise, the sampling noise and the feature network (never the run seed).
EVAL_SEED = 20240318
PROTOCOL_VERSION = 1
#: The fixed feature space of the Frechet distance (see zigzag_mamba.train.ablate.features).
FEATURE_WIDTH, FEATURE_SCALES = 16, (1, 2, 4)


class AblationError(ValueError):
    """An ablation was asked for with settings or data it cannot use."""


@dataclass
class AblationConfig(SmallRun):
    """Settings of ``zigma ablate``; :data:`PRESETS` holds the quick check and the study.

    Example::

        >>> AblationConfig(patterns=["sweep", "zigzag8"], seeds=[0, 1]).steps
        900
    """

    out_dir: str = option("outputs/ablation", "results folder (resumed if it exists)")
    data: str = option(
        "photos", "'photos' (crops of scikit-learn's two photographs), 'digits', or a folder"
    )
    image_size: int = option(
        16, "crop side for photos; images and digits are resized to it", at_least=1
    )
    photo_scale: int = option(4, "photos are shrunk this many times before cropping", at_least=1)
    holdout: float = option(
        0.2, "held-out fraction of the digits or a folder (photos: fixed tiles)", above=0, below=1
    )
    train_crops: int = option(32768, "training crops drawn from the photos per seed", at_least=1)
    patterns: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={
            "help": "arms: a pattern, or PATTERN+MIXER for another strategy (sweep+bidirectional, "
            "sweep4+cross); 'all': every registered 2-D pattern and 'none' (no permutation)"
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "seeds; each trains every pattern once"},
    )
    steps: int = option(900, "training steps per run", at_least=1)
    eval_images: int = option(512, "held-out images scored by the held-out loss", at_least=1)
    eval_times: int = option(8, "points of the fixed t-grid of the held-out loss", at_least=1)
    fd_samples: int = option(512, "EMA samples for the Frechet distance", at_least=2)
    baseline: str = option("zigzag8", "pattern the others are compared with, seed by seed")
    match: str = option(
        "none",
        "'params': each arm gets the depth whose parameter count is nearest the baseline's at "
        "--depth (strategies differ in parameters per block); 'none': --depth for every arm",
        choices=("none", "params"),
    )
    intervals: bool = option(True, "report 95% t-intervals (needs >= 2 seeds)")
    confidence: float = option(0.95, "confidence level of the intervals", above=0, below=1)
    device: str = option("auto", "auto, cpu, cuda, ...")

    def check(self) -> None:
        check_device("device", self.device)

    def resolved_patterns(self) -> list[str]:
        """The patterns to run, with ``all`` expanded and repeats dropped, in the given order."""
        names: list[str] = []
        for name in self.patterns:
            names += all_patterns() if name == "all" else [name]
        return list(dict.fromkeys(names))


def split_arm(arm: str) -> tuple[str, str | None]:
    """An arm of the study, ``PATTERN`` or ``PATTERN+MIXER``, as (pattern, mixer or None): the
    pattern alone runs the default mixer (one order per layer), ``sweep+bidirectional`` Vim's
    strategy, ``sweep4+cross`` VMamba's.

    Example::

        >>> split_arm("sweep4+cross"), split_arm("zigzag8")
        (('sweep4', 'cross'), ('zigzag8', None))
    """
    pattern, _, mixer = arm.partition("+")
    return pattern, mixer or None


def all_patterns() -> list[str]:
    """``none`` and every registered pattern for 2-D grids (the ``video_*`` ones are not)."""
    return [NO_PATTERN, *(p for p in list_patterns() if not p.startswith("video_"))]


#: The paper's four patterns (Sweep, Zigzag-1, -2, -8), a discontinuous control with as many orders
#: as zigzag8, and a continuous curve with better 2-D locality than a snake.
STUDY_PATTERNS = ["sweep", "zigzag1", "zigzag2", "zigzag8", "random8", "hilbert8"]

PRESETS: dict[str, dict[str, Any]] = {
    # A smoke test: a tiny model, two patterns, one seed; well under a minute on a CPU.
    "quick": {
        "image_size": 8,
        "train_crops": 1024,
        "patterns": ["sweep", "zigzag8"],
        "seeds": [0],
        "steps": 20,
        "batch_size": 16,
        "warmup_steps": 5,
        "dim": 16,
        "depth": 2,
        "eval_images": 64,
        "eval_times": 4,
        "fd_samples": 64,
        "sample_steps": 2,
        "intervals": False,
    },
    # The committed study (docs/ablation.md, which says how its size was chosen), fixed before it
    # was run: 6 patterns x 3 seeds on 16x16 photo crops. Every setting is spelled out, so that
    # later changes to the defaults do not change the study.
    "photos-study": {
        "data": "photos",
        "image_size": 16,
        "photo_scale": 4,
        "train_crops": 32768,
        "patterns": STUDY_PATTERNS,
        "seeds": [0, 1, 2],
        "steps": 900,
        "batch_size": 64,
        "lr": 2e-3,
        "warmup_steps": 50,
        "ema_decay": 0.995,
        "dim": 64,
        "depth": 8,
        "patch_size": 2,
        "eval_images": 512,
        "eval_times": 8,
        "fd_samples": 512,
        "sample_steps": 8,
        "baseline": "zigzag8",
        "intervals": True,
        "threads": 1,
    },
}
# The three strategies on one order set at matched parameter count (docs/ablation.md), with
# every other setting of the photo study.
PRESETS["strategies-study"] = {
    **PRESETS["photos-study"],
    "patterns": ["zigzag8", "zigzag8+bidirectional", "zigzag8+cross"],
    "match": "params",
}


def config_with_preset(preset: str | None, **overrides: Any) -> AblationConfig:
    """An :class:`AblationConfig` from defaults, then a preset, then ``overrides``."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise AblationError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update(overrides)
    return AblationConfig(**values)


# -- the protocol ---------------------------------------------------------------------------

# Settings that do not change any run's numbers: which runs, how to report them, where to compute.
_NOT_PROTOCOL = (
    "out_dir",
    "patterns",
    "seeds",
    "baseline",
    "intervals",
    "confidence",
    "threads",
    "progress",
)


def protocol(config: AblationConfig, model: dict[str, Any], train: dict[str, Any]) -> dict:
    """Everything that determines a run's results besides its pattern and seed."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_PROTOCOL}
    if config.data not in ("photos", "digits"):
        settings["data"] = str(Path(config.data).resolve())
    # Noise is drawn on the device, so CPU and GPU runs of one seed are not paired.
    settings["device"] = _device_type(config.device)
    return _plain(
        {
            "version": PROTOCOL_VERSION,
            "settings": settings,
            "model": {k: v for k, v in model.items() if k not in ("pattern", "mixer")},
            "train": {k: v for k, v in train.items() if k not in ("out_dir", "seed", "progress")},
            "evaluation": {
                "seed": EVAL_SEED,
                "features": {
                    "kind": "RandomConvFeatures",
                    "width": FEATURE_WIDTH,
                    "scales": FEATURE_SCALES,
                },
                "sampler": "heun",
                "photo_reference_crops": 8192,
            },
        }
    )


def _device_type(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def check_protocol(out_dir: Path, expected: dict) -> None:
    """Write ``protocol.json``, or check that the one there matches ``expected``."""
    path = out_dir / "protocol.json"
    if not path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(expected, indent=2) + "\n")
        return
    found = json.loads(path.read_text())
    differing = differing_keys(found, expected)
    if differing:
        details = "; ".join(
            f"{key}: {_get(found, key)!r} there, {_get(expected, key)!r} now" for key in differing
        )
        raise AblationError(
            f"{out_dir} holds results of a different protocol ({details}). Use another "
            "--out-dir, or the settings that folder was made with."
        )


def differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings (or exist in only one)."""
    keys = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        left, right = a.get(key, _MISSING), b.get(key, _MISSING)
        if isinstance(left, dict) and isinstance(right, dict):
            keys += differing_keys(left, right, name + ".")
        elif left != right:
            keys.append(name)
    return keys


_MISSING = "<missing>"


def _get(mapping: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(mapping, dict) or part not in mapping:
            return _MISSING
        mapping = mapping[part]
    return mapping


def _plain(value: Any) -> Any:
    """JSON round trip: tuples become lists, so a fresh protocol compares equal to a saved one."""
    return json.loads(json.dumps(value))
