"""Training and sampling for ZigMa with stochastic interpolants (the ``train`` extra).

Conventions follow SiT's code: ``t = 0`` is noise, ``t = 1`` is data,
``x_t = alpha_t * x_data + sigma_t * noise`` (the papers' time is ``1 - t``).

Example::

    >>> from zigzag_mamba.train import Interpolant, sample_ode
    >>> itp = Interpolant()                      # linear path, velocity target x_data - noise
    >>> x = sample_ode(lambda x, t: -x, torch.randn(4, 2), num_steps=10, method="heun")

Optional dependencies (the train extra: ``pip install -e '.[train]'`` in a clone, or
``pip install 'zigzag-mamba[train]'`` from an index) load only when used: tqdm for
progress bars, Pillow for images, scikit-learn for the digits, PyYAML for YAML configs,
safetensors for .safetensors data files, torchdiffeq for adaptive ODE solvers.
"""

from zigzag_mamba.train.config import TrainConfig
from zigzag_mamba.train.data import DigitsDataset, ImageFolder, open_dataset
from zigzag_mamba.train.ema import EMA
from zigzag_mamba.train.interpolant import Interpolant
from zigzag_mamba.train.metrics import FrechetDistance, feature_stats, frechet_distance
from zigzag_mamba.train.samplers import generate, guided_model, sample_ode, sample_sde
from zigzag_mamba.train.tensor_files import TensorFileDataset
from zigzag_mamba.train.trainer import NonFiniteLossError, Trainer

__all__ = [
    "EMA",
    "DigitsDataset",
    "FrechetDistance",
    "ImageFolder",
    "Interpolant",
    "NonFiniteLossError",
    "TensorFileDataset",
    "TrainConfig",
    "Trainer",
    "feature_stats",
    "frechet_distance",
    "generate",
    "guided_model",
    "open_dataset",
    "sample_ode",
    "sample_sde",
]
