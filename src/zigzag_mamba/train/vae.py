"""Latent space through a diffusers ``AutoencoderKL``, as the paper trains its large images.

``zigma encode`` (:func:`encode_folder`) turns an image folder into a data file of latents,
scaled as the model trains on them and recording that scaling; a run with ``--vae``
(``TrainConfig.vae``) decodes its sample grids back to images with the same VAE, and so does
``zigma sample``. Needs diffusers: ``pip install 'zigzag-mamba[diffusers]'``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from torch import Tensor

from zigzag_mamba.train.data import ImageFolder
from zigzag_mamba.train.tensor_files import SCALING_KEYS


class LatentCodec:
    """A VAE and its latent scaling: ``encode`` maps images (B, 3, H, W) in ``[-1, 1]`` to
    the latents a model trains on, ``(mean - shift_factor) * scaling_factor`` of the encoder's
    distribution (its mean: a stored file cannot redraw the noise each epoch anyway), and
    ``decode`` maps latents (B, C, h, w), or clips (B, T, C, h, w), back to images.

    Example::

        >>> codec = LatentCodec.load("stabilityai/sd-vae-ft-ema")  # doctest: +SKIP
        >>> codec.decode(codec.encode(torch.zeros(1, 3, 64, 64))).shape  # doctest: +SKIP
        torch.Size([1, 3, 64, 64])
    """

    def __init__(self, vae: torch.nn.Module, name: str = "") -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.name = name
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.latent_channels = int(vae.config.latent_channels)
        #: How many times the encoder shrinks each side.
        self.downsampling = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device = "cpu") -> LatentCodec:
        """A diffusers ``AutoencoderKL`` from the hub or a folder (a VAE's own, or a pipeline's
        with a ``vae`` sub-folder), or a ``ValueError`` naming it."""
        try:
            import diffusers
        except ImportError as exc:
            raise ImportError(
                "--vae needs diffusers, which is not installed: pip install "
                "'zigzag-mamba[diffusers]'  (or: pip install diffusers)"
            ) from exc
        subfolder = "vae" if (Path(name_or_path) / "vae" / "config.json").is_file() else None
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"--vae {name_or_path!r}: cannot load a diffusers AutoencoderKL from it (a hub "
                f"name or a folder holding its config.json): {exc}"
            ) from None
        return cls(vae.to(device), name_or_path)

    @property
    def scaling(self) -> tuple[float, float]:
        """``(scaling_factor, shift_factor)``."""
        return self.scaling_factor, self.shift_factor

    def _run(self, x: Tensor) -> Tensor:
        parameter = next(self.vae.parameters())
        return x.to(parameter.device, parameter.dtype)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        mean = self.vae.encode(self._run(images)).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        if latents.dim() == 5:  # clips: every frame on its own
            return self.decode(latents.flatten(0, 1)).unflatten(0, latents.shape[:2])
        images = self.vae.decode(self._run(latents) / self.scaling_factor + self.shift_factor)
        return images.sample.float().clamp(-1, 1).to(latents.device)

    def check_data(self, dataset: object, where: str) -> None:
        """``dataset`` holds latents of this VAE: it records this scaling and has its number of
        channels; else a ``ValueError`` naming ``where``."""
        scaling = getattr(dataset, "scaling", None)
        if scaling is None:
            raise ValueError(
                f"--vae {self.name!r}: {where} records no latent scaling (a data file written "
                f"by zigma encode holds {' and '.join(SCALING_KEYS)}); decoded samples could be "
                "scaled wrongly, so encode the images with zigma encode"
            )
        # float32 is exact enough: a file written by hand may hold 0.18215 as 0.18215000629
        pairs = zip(scaling, self.scaling, strict=True)
        if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in pairs):
            found, own = (", ".join(f"{v:g}" for v in s) for s in (scaling, self.scaling))
            raise ValueError(
                f"--vae {self.name!r}: {where} was scaled with (scaling_factor, shift_factor) "
                f"({found}), this VAE with ({own}); encode the data with this VAE"
            )
        channels = dataset[0][0].shape[-3]
        if channels != self.latent_channels:
            raise ValueError(
                f"--vae {self.name!r}: {where} has {channels}-channel latents, this VAE "
                f"{self.latent_channels}"
            )


def encode_folder(
    images: str | Path,
    out: str | Path,
    codec: LatentCodec,
    *,
    image_size: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Path:
    """Encode an image folder (:class:`~zigzag_mamba.train.data.ImageFolder`, RGB; one class a
    sub-folder, or unlabelled) into the data file ``out`` (``.safetensors`` or ``.pt``):
    ``latents`` (N, C, h, w), ``labels`` (N,) if the folder has classes, and the 0-d
    :data:`SCALING_KEYS`. ``out`` is written whole or not at all.

    Example::

        >>> codec = LatentCodec.load("stabilityai/sd-vae-ft-ema")  # doctest: +SKIP
        >>> encode_folder("photos/", "latents.safetensors", codec, image_size=256)  # doctest: +SKIP
        PosixPath('latents.safetensors')
    """
    from tqdm.auto import tqdm

    from zigzag_mamba.train.checkpoint import write_atomically

    out = Path(out)
    if out.suffix not in (".safetensors", ".pt"):
        raise ValueError(f"the latent file {out} must end in .safetensors or .pt")
    data = ImageFolder(images, image_size)
    height, width = data[0][0].shape[-2:]
    factor = codec.downsampling
    if height % factor or width % factor:
        raise ValueError(
            f"images of {images} are {height}x{width}; the VAE shrinks each side {factor} "
            f"times, so each must be a multiple of {factor}: pass --image-size (e.g. "
            f"{max(1, min(height, width) // factor) * factor})"
        )
    batches = range(0, len(data), batch_size)
    latents = []
    for start in tqdm(batches, disable=not progress, unit="batch", desc=f"encoding {images}"):
        batch = torch.stack([data[i][0] for i in range(start, min(start + batch_size, len(data)))])
        latents.append(codec.encode(batch).cpu())
    tensors = {"latents": torch.cat(latents).contiguous()}
    if data.num_classes:
        tensors["labels"] = torch.tensor(data.labels, dtype=torch.long)
    for key, value in zip(SCALING_KEYS, codec.scaling, strict=True):
        tensors[key] = torch.tensor(value, dtype=torch.float64)  # as the VAE's config has it
    write_atomically(out, _serialise(tensors, out))
    return out


def _serialise(tensors: dict[str, Tensor], out: Path) -> bytes:
    if out.suffix == ".safetensors":
        from safetensors.torch import save

        return save(tensors)
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()
