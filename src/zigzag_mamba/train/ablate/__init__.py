"""``zigma ablate``: which scan pattern helps, measured on real images with error bars.

ZigMa's claim is that spatially continuous token orders make a better diffusion model (the paper's
FID on MM-CelebA 256: Sweep 158.1, Zigzag-1 65.7, Zigzag-2 54.7, Zigzag-8 45.5). An ablation
trains the same small ZigMa once per scan pattern and seed, with the same initial weights, data
order, training noise and evaluation noise for every pattern of a seed (an order has no
parameters), and compares them on two low-variance scores: the held-out interpolant loss on a
fixed grid of times with fixed noise, and a Frechet distance of samples in a fixed random
feature space. It reports per-pattern means, spreads and t-intervals over seeds, and paired
differences to ``zigzag8``. See ``docs/ablation.md``.

Example::

    >>> from zigzag_mamba.train.ablate import config_with_preset, run_ablation
    >>> config = config_with_preset("quick", out_dir="outputs/ablation-quick")
    >>> # Not run here: it trains two models (tests/train/test_ablate.py runs it).
    >>> report = run_ablation(config)  # doctest: +SKIP
    >>> report["summary"][0]["heldout_loss"]["mean"]  # doctest: +SKIP
"""

from zigzag_mamba.train.ablate.config import (
    NO_PATTERN,
    PRESETS,
    AblationConfig,
    AblationError,
    all_patterns,
    config_with_preset,
)
from zigzag_mamba.train.ablate.run import run_ablation

__all__ = [
    "NO_PATTERN",
    "PRESETS",
    "AblationConfig",
    "AblationError",
    "all_patterns",
    "config_with_preset",
    "run_ablation",
]
