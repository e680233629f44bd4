"""Image grids written as PNG, and clips as frame strips and animated GIFs, with Pillow (no
torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: The file names a grid may have (the formats Pillow writes grey and RGB images in).
GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_uint8(images: Tensor) -> np.ndarray:
    """Map images in ``[-1, 1]`` of shape (N, C, H, W) to uint8 arrays of shape (N, H, W, C)."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def channel_panels(images: Tensor, *, pad: int = 1) -> Tensor:
    """Lay each channel of (N, C, H, W) images out as its own grey panel, side by side:
    (N, 1, H, C * W + (C - 1) * pad), the panels ``pad`` pixels apart, on mid-grey (0), so that
    they stand apart from the black lines between images in a grid.

    Example::

        >>> channel_panels(torch.zeros(2, 4, 8, 8)).shape
        torch.Size([2, 1, 8, 35])
    """
    n, channels, height, width = images.shape
    gap = images.new_zeros((n, channels, height, pad))
    panels = torch.cat([images, gap], dim=3)
    row = panels.permute(0, 2, 1, 3).reshape(n, height, channels * (width + pad))
    return row[..., : channels * (width + pad) - pad].unsqueeze(1)


def image_grid(images: Tensor, columns: int | None = None, *, pad: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) images in ``[-1, 1]`` into one uint8 array, row by row.

    One channel is grey and three are RGB; any other number (4-channel latents, say) is shown
    channel by channel, each as a grey panel (:func:`channel_panels`), so that no channel is
    lost or read as transparency.
    """
    if images.shape[1] not in (1, 3):
        images = channel_panels(images, pad=pad)
    n, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros(
        (rows * (height + pad) + pad, columns * (width + pad) + pad, channels), dtype=np.uint8
    )
    for k, tile in enumerate(to_uint8(images)):
        top, left = pad + (k // columns) * (height + pad), pad + (k % columns) * (width + pad)
        grid[top : top + height, left : left + width] = tile
    return grid


def save_grid(
    images: Tensor, path: str | Path, columns: int | None = None, *, scale: int = 1
) -> Path:
    """Write ``images`` (N, C, H, W) in ``[-1, 1]`` as a PNG grid, enlarged ``scale`` times.

    Enlarging uses nearest-neighbour so small images keep their true pixels. The PNG is grey
    (C = 1) or RGB (C = 3); with any other C, each image is a row of C grey panels, one per
    channel (:func:`image_grid`), never RGBA.

    Example::

        >>> save_grid(torch.rand(16, 1, 8, 8) * 2 - 1, "grid.png", columns=4, scale=4)
        PosixPath('grid.png')
    """
    path = Path(path)
    _picture(image_grid(images, columns), scale).save(_ready(path))
    return path


def save_clips(
    clips: Tensor, path: str | Path, columns: int | None = None, *, scale: int = 1
) -> tuple[Path, Path]:
    """Write clips (N, T, C, H, W) in ``[-1, 1]`` twice: as frame strips at ``path`` (a PNG
    grid, one clip a row, its T frames left to right) and as an animated GIF beside it
    (``path`` with the suffix ``.gif``: the clips tiled ``columns`` a row, all playing at once,
    looping). Both are enlarged ``scale`` times; returns the two paths.

    Example::

        >>> save_clips(torch.rand(4, 8, 1, 16, 16) * 2 - 1, "clips.png", columns=2, scale=2)
        (PosixPath('clips.png'), PosixPath('clips.gif'))
    """
    path = Path(path)
    frames = clips.shape[1]
    save_grid(clips.flatten(0, 1), path, frames, scale=scale)
    movie = [_picture(image_grid(clips[:, t], columns), scale) for t in range(frames)]
    gif = _ready(path.with_suffix(".gif"))
    movie[0].save(gif, save_all=True, append_images=movie[1:], duration=GIF_FRAME_MS, loop=0)
    return path, gif


def save_samples(samples: Tensor, path: str | Path, columns: int) -> tuple[Path, ...]:
    """Write samples as the trainer and ``zigma sample`` show them, enlarged to about 64 pixels
    a side: images (N, C, H, W) as a grid (:func:`save_grid`; returns its path), clips
    (N, T, C, H, W) as frame strips and a GIF (:func:`save_clips`; returns both paths)."""
    scale = max(1, 64 // samples.shape[-1])
    if samples.dim() == 5:
        return save_clips(samples, path, columns, scale=scale)
    return (save_grid(samples, path, columns, scale=scale),)


#: How long each frame of an animated GIF shows, in milliseconds.
GIF_FRAME_MS = 125


def _picture(grid: np.ndarray, scale: int):
    """A Pillow image of a uint8 grid (H, W, 1 or 3), enlarged ``scale`` times with
    nearest-neighbour, so that small images keep their true pixels."""
    from PIL import Image

    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize(
            (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
        )
    return picture


def _ready(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
