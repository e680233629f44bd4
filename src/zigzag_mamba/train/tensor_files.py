"""Data files: tensors to train on, stored in a ``.pt`` or ``.safetensors`` file (precomputed
latents, or video clips), read without unpickling anything."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from zigzag_mamba.train.data import check_labels


class TensorFileDataset(Dataset):
    """Tensors stored in a ``.pt`` or ``.safetensors`` file: precomputed latents, or video clips.

    The file holds one of

    - ``latents`` (N, C, H, W), or (N, T, C, H, W) for clips, e.g. from a VAE encoder: used as
      stored, multiplied by ``scale`` (e.g. 0.18215 for Stable Diffusion's VAE);
    - ``videos`` (N, T, C, H, W): clips of pixels, floats in ``[-1, 1]`` or uint8 in
      ``[0, 255]`` (mapped to ``[-1, 1]``);

    and optionally ``labels`` (N,) of class ids, and the 0-d :data:`SCALING_KEYS` that
    ``zigma encode`` writes beside latents (read into ``scaling``, else None). Nothing is
    downloaded: encode your images first (:mod:`zigzag_mamba.train.vae`).

    Example::

        >>> torch.save({"latents": torch.randn(10, 4, 32, 32)}, "latents.pt")  # doctest: +SKIP
        >>> TensorFileDataset("latents.pt", scale=0.18215)[0][0].shape  # doctest: +SKIP
        torch.Size([4, 32, 32])
    """

    def __init__(self, path: str | Path, *, scale: float = 1.0) -> None:
        tensors = _load_tensors(Path(path))
        keys = [key for key in _TENSOR_KEYS if key in tensors]
        if len(keys) != 1:
            found = ", ".join(sorted(tensors)) or "nothing"
            raise ValueError(
                f"data file {path} must hold exactly one of 'latents' and 'videos' (found: {found})"
            )
        key = keys[0]
        data = tensors[key]
        if not isinstance(data, Tensor) or data.dim() not in _TENSOR_KEYS[key]:
            shape = " or ".join(_SHAPES[rank] for rank in _TENSOR_KEYS[key])
            got = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
            raise ValueError(f"{key} in {path} must be a {shape} tensor, got {got}")
        if len(data) == 0:
            raise ValueError(f"{key} in {path} must not be empty, got {tuple(data.shape)}")
        if key == "videos" and data.dtype == torch.uint8:
            data = data.float() / 127.5 - 1.0
        elif not data.is_floating_point():
            allowed = "floating point or uint8" if key == "videos" else "floating point"
            raise ValueError(f"{key} in {path} must be {allowed}, got {data.dtype}")
        labels = tensors.get("labels")
        if labels is None:
            labels, self.num_classes = torch.zeros(len(data), dtype=torch.long), 0
        else:
            self.num_classes = check_labels(labels, len(data), f"labels in {path}")
        self.scaling = _scaling(tensors, path) if SCALING_KEYS[0] in tensors else None
        self.kind = key
        self.tensors = data.float() * scale
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.tensors[index], int(self.labels[index])


#: The 0-d tensors beside a data file's latents that record how they were scaled.
SCALING_KEYS = ("scaling_factor", "shift_factor")


def _scaling(tensors: dict, path: str | Path) -> tuple[float, float]:
    values = []
    for key in SCALING_KEYS:
        value = tensors.get(key, torch.tensor(0.0))
        if not isinstance(value, Tensor) or value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{key} in {path} must be one floating-point number, got {value!r}")
        values.append(float(value))
    return values[0], values[1]


# The tensors a data file may hold, with the ranks each may have.
_TENSOR_KEYS = {"latents": (4, 5), "videos": (5,)}
_SHAPES = {4: "(N, C, H, W)", 5: "(N, T, C, H, W)"}


def _load_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"data file {path} is a folder")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if not zipfile.is_zipfile(path):
            raise ValueError("not a zip archive as torch.save writes (is it truncated?)")
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"data file {path} holds objects other than tensors and plain containers; they "
            "were not unpickled (a data file holds tensors only)"
        ) from None
    except Exception as exc:  # torch's and safetensors' own errors for a damaged file
        raise ValueError(f"data file {path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"data file {path} must hold a dict of tensors ('latents' or 'videos')")
    return data
